"""The second-opinion page (``/second-opinion``) and its JSON API (``POST /api/v1/second-opinion``).

One uploaded file (DICOM, PNG or JPEG) goes through :func:`cxr_ai.second_opinion.second_opinion`
on a pipeline of the pages' own (built on first use): the same gate, pixel pipeline, models
and heatmaps as the listener, but nothing enters the job store, the worklist, the prediction
log or the outbox.

Privacy: the upload lives in memory for the request only (written to ``[web] uploads_dir``
only when ``[web] keep_uploads`` is true). The answer's downloads (SR, SC, PM, FHIR Bundle,
overlay PNG) are held in memory for ``[web] download_ttl_seconds`` under opaque random ids
(never a UID or a file name in a URL), for the user who uploaded, then dropped. Each user may
upload ``[web] second_opinion_per_minute`` files a minute (429 past it). The size limit is
enforced while the body is read (413), by :class:`cxr_ai.service.web.middleware.BodyLimit`.

CSRF: the page's form carries the session's token; API clients send it in the
``X-CSRF-Token`` header (a cross-site form cannot set a header), or authenticate through the
trusted proxy's header (no cookie, so nothing for another site to ride on). Session cookies
are ``SameSite=Strict`` as well.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from cxr_ai.results import format_probability
from cxr_ai.second_opinion import (
    NOT_VERIFIED,
    SecondOpinion,
    SecondOpinionError,
    SecondOpinionSettings,
    safe_filename,
    second_opinion,
)
from cxr_ai.service.web.access import client_of

logger = logging.getLogger(__name__)

PAGE = "/second-opinion"
API = "/api/v1/second-opinion"
UPLOAD_PATHS = (PAGE, API)
#: Room for the multipart envelope around the file (boundaries, part headers, the token).
MULTIPART_OVERHEAD = 64 * 1024

MSG_NO_FILE = "No file was sent: choose one DICOM, PNG or JPEG file (form field \"file\")."
MSG_RATE = ("You have sent {n} files in the last minute; the limit is {n} a minute per user. "
            "Wait a minute and try again.")
MSG_GONE = ("This download has expired or never existed; downloads are held for {ttl:.0f} s after the "
            "answer. Upload the file again to get it.")
MSG_UPLOAD_TOO_LARGE = ("The upload is larger than this server accepts ({mb:.1f} MB, [web] max_upload_mb); "
                        "nothing was kept. Upload a smaller file.")

MEDIA = {".dcm": "application/dicom", ".json": "application/fhir+json", ".png": "image/png"}


@dataclass
class _Held:
    user: str
    name: str
    data: bytes
    media_type: str
    expires: float


class DownloadStore:
    """Answer files in memory under opaque ids, each for one user, dropped after ``ttl``."""

    def __init__(self, *, ttl: float, clock=time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._items: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def put(self, *, user: str, name: str, data: bytes) -> str:
        ident = secrets.token_urlsafe(18)
        media = MEDIA.get(Path(name).suffix.lower(), "application/octet-stream")
        with self._lock:
            self._expire()
            self._items[ident] = _Held(user, name, data, media, self._clock() + self.ttl)
        return ident

    def get(self, ident: str, *, user: str) -> _Held | None:
        with self._lock:
            self._expire()
            held = self._items.get(ident)
        return held if held is not None and secrets.compare_digest(held.user, user) else None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def _expire(self) -> None:
        now = self._clock()
        for k in [k for k, v in self._items.items() if v.expires <= now]:
            del self._items[k]


class RateLimit:
    """At most ``per_minute`` events per key in any 60 s (a sliding window)."""

    def __init__(self, *, per_minute: int, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._seen: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            q = self._seen.setdefault(key, collections.deque())
            while q and now - q[0] >= 60.0:
                q.popleft()
            if len(q) >= self.per_minute:
                return False
            q.append(now)
            return True


class SecondOpinionService:
    """The pages' pipeline (built once, on first use; one upload at a time), the download
    store and the rate limit."""

    def __init__(self, ctx: Any) -> None:
        s = ctx.settings
        self.ctx = ctx
        base = SecondOpinionSettings.from_config(ctx.config) if ctx.config else SecondOpinionSettings()
        # the upload limits as the web settings resolved them
        self.settings = replace(base, max_bytes=s.max_upload_bytes, rgb_tolerance=s.rgb_tolerance)
        self.downloads = DownloadStore(ttl=s.download_ttl_seconds)
        self.rate = RateLimit(per_minute=s.second_opinion_per_minute)
        self._pipeline: Any = None
        self._lock = threading.Lock()

    def pipeline(self) -> Any:
        if self._pipeline is None:
            from cxr_ai.pipeline import Pipeline

            self._pipeline = Pipeline(config=self.ctx.config)
        return self._pipeline

    def answer(self, data: bytes, filename: str) -> SecondOpinion:
        with self._lock:  # one upload at a time: the pages never compete with themselves
            return second_opinion(data, filename, pipeline=self.pipeline(), settings=self.settings)

    def keep(self, data: bytes, filename: str) -> None:
        s = self.ctx.settings
        if not s.keep_uploads or s.uploads_dir is None:
            return
        s.uploads_dir.mkdir(parents=True, exist_ok=True)
        path = s.uploads_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}-{safe_filename(filename)}"
        path.write_bytes(data)


def _service(request: Request) -> SecondOpinionService:
    app = request.app
    if not hasattr(app.state, "second_opinion"):
        app.state.second_opinion = SecondOpinionService(app.state.pages.ctx)
    return app.state.second_opinion


async def _read_upload(request: Request) -> tuple[bytes, str]:
    """The one file of the multipart form (the body limit applies while it is read)."""
    form = await request.form(max_files=1, max_fields=4)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, MSG_NO_FILE)
    try:
        data = await upload.read()
    finally:
        await upload.close()
    return data, upload.filename or "upload"


def answer_view(ans: SecondOpinion, *, user: str, so: SecondOpinionService) -> dict[str, Any]:
    """The answer as the page and the API show it (download links, probabilities as text)."""
    links: dict[str, Any] = {"image": None, "overlays": {}, "objects": []}
    if ans.image_png:
        links["image"] = "/second-opinion/download/" + so.downloads.put(user=user, name="image.png",
                                                                        data=ans.image_png)
    stem = ans.filename.rsplit(".", 1)[0] or "upload"
    for key, png in ans.overlays.items():
        links["overlays"][key] = "/second-opinion/download/" + so.downloads.put(
            user=user, name=f"{stem}-{key}-overlay.png", data=png)
    for name, data in sorted(ans.downloads.items()):
        kind = "FHIR Bundle" if name.endswith(".json") else name.rsplit("-", 2)[-2]
        links["objects"].append({"name": name, "kind": kind,
                                 "url": "/second-opinion/download/" + so.downloads.put(user=user, name=name, data=data)})
    findings = [{**f, "probability_text": format_probability(f["probability"]),
                 "threshold_text": format_probability(f["threshold"])} for f in ans.findings]
    return {**ans.to_dict(), "findings": findings, "links": links,
            "applicability": "verified by the DICOM gate" if ans.applicability_verified else NOT_VERIFIED,
            "expires_in_seconds": so.downloads.ttl}


async def _run(request: Request, user_name: str) -> tuple[SecondOpinion | None, SecondOpinionError | None, bytes, str]:
    so = _service(request)
    if not so.rate.allow(user_name):
        raise HTTPException(429, MSG_RATE.format(n=so.rate.per_minute))
    data, filename = await _read_upload(request)
    try:
        ans = await run_in_threadpool(so.answer, data, filename)
    except SecondOpinionError as exc:
        return None, exc, data, filename
    finally:
        await run_in_threadpool(so.keep, data, filename)
    return ans, None, data, filename


def _audit(request: Request, *, user: str, outcome: str, **detail: Any) -> None:
    ctx = request.app.state.pages.ctx
    ctx.audit.write("second-opinion", user=user, client=client_of(request),
                    outcome=outcome, **detail)


async def page(request: Request) -> Response:
    pages = request.app.state.pages
    user = pages.require_user(request)
    so = _service(request)
    return pages.render(request, "second_opinion.html", user=user, result=None, error=None,
                        max_mb=so.settings.max_bytes / 2**20)


async def page_upload(request: Request) -> Response:
    pages = request.app.state.pages
    user = pages.require_user(request)
    await pages.check_csrf(request)
    so = _service(request)
    ans, err, data, filename = await _run(request, user.name)
    max_mb = so.settings.max_bytes / 2**20
    if err is not None:
        _audit(request, user=user.name, outcome="refused", reason=err.reason, bytes=len(data))
        return pages.render(request, "second_opinion.html", status=err.status, user=user, result=None,
                            error={"reason": err.reason, "message": err.message}, max_mb=max_mb)
    assert ans is not None
    _audit(request, user=user.name, outcome="success" if ans.accepted else "not-applicable",
           kind=ans.kind, bytes=len(data))
    return pages.render(request, "second_opinion.html", status=ans.status, user=user,
                        result=answer_view(ans, user=user.name, so=so), error=None, max_mb=max_mb)


MSG_API_CSRF = ("The request lacks the X-CSRF-Token header (or it does not match this session's token, "
                "from GET /api/v1/csrf); nothing was done.")


def check_api_csrf(request: Request, *, user: str) -> None:
    """API requests carry the ``X-CSRF-Token`` header: a page on another site can neither set
    a custom header on a cross-site request (no CORS here) nor read the token. With a signed-in
    session, it must be the session's token; a proxy-authenticated or open-workstation client
    has no session token to match, and must still send the header (any value)."""
    sent = request.headers.get("x-csrf-token", "")
    expected = request.session.get("csrf", "") if request.session.get("user") else ""
    if not sent or (expected and not secrets.compare_digest(sent, expected)):
        ctx = request.app.state.pages.ctx
        ctx.audit.write("csrf-refused", user=user, client=client_of(request),
                        outcome="refused", path=request.url.path)
        raise HTTPException(403, MSG_API_CSRF)


async def api(request: Request) -> Response:
    pages = request.app.state.pages
    user = pages.require_user(request)
    check_api_csrf(request, user=user.name)
    so = _service(request)
    ans, err, data, _ = await _run(request, user.name)
    if err is not None:
        _audit(request, user=user.name, outcome="refused", reason=err.reason, bytes=len(data), api=True)
        return JSONResponse({"error": err.message, "reason": err.reason}, status_code=err.status)
    assert ans is not None
    _audit(request, user=user.name, outcome="success" if ans.accepted else "not-applicable", kind=ans.kind,
           bytes=len(data), api=True)
    return JSONResponse(answer_view(ans, user=user.name, so=so), status_code=ans.status)


async def download(request: Request) -> Response:
    pages = request.app.state.pages
    user = pages.require_user(request)
    so = _service(request)
    held = so.downloads.get(request.path_params["ident"], user=user.name)
    if held is None:
        raise HTTPException(404, MSG_GONE.format(ttl=so.downloads.ttl))
    inline = held.media_type == "image/png"
    disposition = f'{"inline" if inline else "attachment"}; filename="{held.name}"'
    return Response(held.data, media_type=held.media_type,
                    headers={"content-disposition": disposition, "cache-control": "private, no-store"})


async def csrf_endpoint(request: Request) -> Response:
    """``GET /api/v1/csrf``: the session's CSRF token, for API clients that sign in with a
    session cookie and then send it in ``X-CSRF-Token``."""
    pages = request.app.state.pages
    pages.require_user(request)
    if "csrf" not in request.session:
        request.session["csrf"] = secrets.token_urlsafe(32)
    return JSONResponse({"csrf_token": request.session["csrf"], "header": "X-CSRF-Token"})


async def openapi(request: Request) -> Response:
    from cxr_ai.service.web.openapi import openapi_document

    return JSONResponse(openapi_document())


def routes() -> list[BaseRoute]:
    return [Route(PAGE, page), Route(PAGE, page_upload, methods=["POST"]), Route(API, api, methods=["POST"]),
            Route("/second-opinion/download/{ident}", download), Route("/api/v1/csrf", csrf_endpoint),
            Route("/api/v1/openapi.json", openapi)]
