"""The web application: worklist and study pages, sign-in, feedback, and the service's
``/healthz``, ``/metrics``, ``/status`` (Starlette; run by uvicorn inside ``cxr-ai serve``).

Access: on loopback with no users configured (and no proxy header trusted) the pages are open
to the local workstation. Otherwise every page needs a signed-in user: a local user (argon2
hash in the users file) or one a trusted reverse proxy names in its header, from an
allow-listed proxy address. Sessions are signed cookies (HttpOnly, SameSite=Strict, Secure
over HTTPS) with an idle time-out; every POST carries the session's CSRF token. Patient data
appear only on signed-in pages, never in URLs (studies are addressed by their opaque job id)
and never in logs; the audit log names who did what to which job.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxr_ai.errors import ConfigError
from cxr_ai.monitoring.truth import VERDICTS, TruthStore, truth_from_feedback
from cxr_ai.results import format_probability
from cxr_ai.store.jobs import JobStore
from cxr_ai.store.spool import Spool
from cxr_ai.web.audit import AuditLog
from cxr_ai.web.auth import Lockout, User, UserStore, reader_pseudonym
from cxr_ai.web.data import (
    DISPLAY,
    STATES,
    Filters,
    RowCache,
    all_rows,
    filter_rows,
    finding_keys,
    page_of,
    study_view,
)
from cxr_ai.web.feedback import FeedbackStore
from cxr_ai.web.images import ImageCache, display_size, heatmap_png, pm_finding, radiograph_png
from cxr_ai.web.ops_page import routes as ops_routes
from cxr_ai.web.second_opinion_page import MSG_UPLOAD_TOO_LARGE, MULTIPART_OVERHEAD, UPLOAD_PATHS
from cxr_ai.web.second_opinion_page import routes as second_opinion_routes
from cxr_ai.web.settings import WebSettings, session_secret
from cxr_ai.worklist import Worklist

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
NOT_FOUND_JSON = b'{"error": "not found; try /healthz, /metrics or /status"}'
OPEN_USER = User(name="workstation", role="radiologist")

MSG_UNKNOWN_STUDY = ("There is no study with this link. It may have been removed by retention, or the link "
                     "was mistyped. Go back to the worklist to find the study.")
MSG_CSRF = ("The form's security token did not match this session, so nothing was changed. This happens "
            "when a form was sent from another site or after signing in again in another tab. Reload the "
            "page and try again.")
MSG_EXPIRED = "Your session ended after a period of inactivity. Sign in again to continue."
MSG_SIGNIN_REQUIRED = "Sign in to see this page."
MSG_TOO_LARGE = "The request was larger than this server accepts ({limit} bytes). Nothing was changed."
MSG_ROLE = "Your account ({role}) cannot give feedback; feedback is for radiologists."
MSG_LOCKED = "Too many failed sign-ins for this user. Wait {minutes:.0f} minutes, or ask an administrator."
MSG_BAD_SIGNIN = "The user name or password is wrong, or the account is disabled."
MSG_NO_IMAGE = "The images of this study are no longer kept on this server (spool retention)."


@dataclass
class WebContext:
    """What the pages read and write; built by :func:`cxr_ai.web.server.context_for`."""

    settings: WebSettings
    store: JobStore
    spool: Spool
    worklist: Worklist
    truth: TruthStore | None
    pseudonym_key: bytes
    health: Callable[[], dict[str, Any]]
    status: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]
    #: the running service (the operations page's health, queues, monitor); None in unit tests
    service: Any = None
    #: the service's configuration (the second-opinion pipeline is built from it)
    config: dict[str, Any] = field(default_factory=dict)
    users: UserStore = field(init=False)
    audit: AuditLog = field(init=False)
    feedback: FeedbackStore = field(init=False)
    lockout: Lockout = field(init=False)
    images: ImageCache = field(init=False)
    rows: RowCache = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.users = UserStore(s.users_file)
        self.audit = AuditLog(s.audit_log)
        self.feedback = FeedbackStore(s.feedback_db)
        self.lockout = Lockout(failures=s.lockout_failures, seconds=s.lockout_seconds)
        self.images = ImageCache()
        self.rows = RowCache()

    def open_access(self) -> bool:
        """Loopback, no users and no trusted proxy: a single workstation (and the demo)."""
        s = self.settings
        return s.loopback and not s.trusted_proxy_header and not self.users.any_users()

    def close(self) -> None:
        self.feedback.close()
        self.worklist.close()


# -- helpers ------------------------------------------------------------------------------
def _templates() -> Environment:
    env = Environment(loader=PackageLoader("cxr_ai.web", "templates"), autoescape=select_autoescape(["html"]))

    def minutes(value: float) -> str:
        m = int(value)
        return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"

    def clock(ts: float | None) -> str:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else ""

    env.filters["minutes"] = minutes
    env.filters["clock"] = clock
    env.filters["probability"] = format_probability  # never "1.00": "> 0.99" / "< 0.01" at the ends
    env.globals["DISPLAY"] = DISPLAY
    return env


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _wants_json(request: Request) -> bool:
    """JSON errors for the data and service endpoints and for clients that ask for JSON only."""
    path, accept = request.url.path, request.headers.get("accept", "")
    return (path.startswith("/api/") or path in ("/healthz", "/metrics", "/status")
            or ("application/json" in accept and "text/html" not in accept))


class _Expired(Exception):
    pass


class BodyLimit:
    """Refuse requests whose body is larger than ``limit`` bytes (413, before any handler).

    ``paths`` give other limits for some paths (the uploads), with their own message. The
    limit is checked on the declared length first and then on every chunk as it is read, so
    a body over the limit is never buffered whole.
    """

    def __init__(self, app: ASGIApp, *, limit: int, paths: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.paths = dict(paths or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message_text = self.paths.get(scope.get("path", ""), (self.limit, ""))
        message_text = message_text or MSG_TOO_LARGE.format(limit=limit)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            await _drain(receive, cap=DRAIN_FACTOR * limit)
            await _too_large(scope, receive, send, message_text)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if message.get("more_body", False):
                        await _drain(receive, cap=DRAIN_FACTOR * limit)
                    raise HTTPException(413, message_text)
            return message

        await self.app(scope, limited, send)


#: A body over the limit is read and dropped (never kept) up to this many times the limit
#: before the 413 goes out: a server that closes a connection with unread data makes the
#: client's TCP stack reset it, and the client never sees the answer. Beyond it, the
#: connection is closed at once.
DRAIN_FACTOR = 4


async def _drain(receive: Receive, *, cap: int) -> None:
    dropped = 0
    while dropped <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _too_large(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    path = str(scope.get("path", ""))
    accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
    if path.startswith("/api/") or ("application/json" in accept and "text/html" not in accept):
        body, media = json.dumps({"error": message, "reason": "too_large"}).encode(), b"application/json"
    else:
        body = _templates().get_template("error.html").render(
            title="Request too large", message=message, user=None, csrf="").encode()
        media = b"text/html; charset=utf-8"
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """No framing, no referrer, no caching of pages, scripts and styles only from this server."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"),
                         (b"content-security-policy",
                          b"default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; "
                          b"base-uri 'none'; form-action 'self'")]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if self.https:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers + [h for h in extra if h[0] not in names]
            await send(message)

        await self.app(scope, receive, add)


# -- the application ------------------------------------------------------------------------
@dataclass(frozen=True)
class PageTools:
    """What a page handler needs, on ``request.app.state.pages`` (for pages added through
    ``create_app(extra_routes=...)``): ``require_user(request)`` → :class:`User` (or the
    sign-in redirect / 401), ``await check_csrf(request)`` → the form (or 403),
    ``render(request, template, status=200, user=..., **values)`` → HTML (templates from
    ``cxr_ai/web/templates``, extending ``base.html``), and the :class:`WebContext`."""

    ctx: WebContext
    require_user: Callable[[Request], User]
    check_csrf: Callable[[Request], Any]
    render: Callable[..., HTMLResponse]


def create_app(ctx: WebContext, *, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The Starlette application over ``ctx`` (no globals: tests build as many as they like).

    ``extra_routes`` are added after the built-in ones (further pages; see :class:`PageTools`).
    Every route is behind the same middleware: body limit, session, security headers.
    """
    env = _templates()
    s = ctx.settings

    def render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        user = values.pop("user", None)
        html = env.get_template(template).render(user=user, csrf=csrf_token(request), open_access=ctx.open_access(),
                                             request_path=request.url.path, **values)
        return HTMLResponse(html, status_code=status)

    def csrf_token(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    async def check_csrf(request: Request) -> dict[str, str]:
        form = await request.form()
        sent = request.headers.get("x-csrf-token") or str(form.get("csrf_token", ""))
        expected = request.session.get("csrf", "")
        if not expected or not sent or not secrets.compare_digest(sent, expected):
            ctx.audit.write("csrf-refused", user=request.session.get("user", ""), client=_client(request),
                            outcome="refused", path=request.url.path)
            raise HTTPException(403, MSG_CSRF)
        return {k: str(v) for k, v in form.items()}

    def proxy_user(request: Request) -> User | None:
        if not s.trusted_proxy_header or _client(request) not in s.trusted_proxies:
            return None
        name = request.headers.get(s.trusted_proxy_header, "").strip()
        if not name:
            return None
        known = ctx.users.get(name)
        if known is not None:
            return None if known.disabled else known
        return User(name=name, role=s.trusted_proxy_role)

    def current_user(request: Request) -> User | None:
        """The signed-in user; raises :class:`_Expired` after the idle time-out."""
        user = proxy_user(request)
        if user is not None:
            return user
        name = request.session.get("user")
        if name:
            now = time.time()
            if now - float(request.session.get("seen", 0)) > s.idle_timeout_seconds:
                request.session.pop("user", None)
                raise _Expired()
            known = ctx.users.get(name)
            if known is None or known.disabled:
                request.session.pop("user", None)
                return None
            request.session["seen"] = now
            return known
        if ctx.open_access():
            return OPEN_USER
        return None

    def require_user(request: Request) -> User:
        try:
            user = current_user(request)
        except _Expired:
            raise HTTPException(401, MSG_EXPIRED) from None
        if user is None:
            raise HTTPException(401, MSG_SIGNIN_REQUIRED)
        return user

    # -- service endpoints (same answers as before the web pages) --------------------------
    async def healthz(request: Request) -> Response:
        health = ctx.health()
        return Response(json.dumps(health).encode(), status_code=200 if health["status"] == "ok" else 503,
                        media_type="application/json")

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(ctx.metrics(), headers={"content-type": CONTENT_TYPE_LATEST})

    async def status(request: Request) -> Response:
        return Response(json.dumps(ctx.status()).encode(), media_type="application/json")

    # -- sign-in -----------------------------------------------------------------------------
    async def signin_form(request: Request) -> Response:
        notice = MSG_EXPIRED if request.query_params.get("expired") else ""
        return render(request, "signin.html", notice=notice, error="", name="")

    async def signin(request: Request) -> Response:
        form = await check_csrf(request)
        name, password = form.get("name", "").strip()[:64], form.get("password", "")
        client = _client(request)
        if ctx.lockout.locked(name):
            ctx.audit.write("sign-in", user=name, client=client, outcome="locked-out")
            return render(request, "signin.html", status=429, notice="", name=name,
                          error=MSG_LOCKED.format(minutes=s.lockout_seconds / 60))
        user = ctx.users.verify(name, password) if name and password else None
        if user is None:
            ctx.lockout.failed(name)
            ctx.audit.write("sign-in", user=name, client=client, outcome="failed")
            return render(request, "signin.html", status=401, notice="", name=name, error=MSG_BAD_SIGNIN)
        ctx.lockout.succeeded(name)
        request.session.clear()
        request.session.update(user=user.name, seen=time.time(), csrf=secrets.token_urlsafe(32))
        ctx.audit.write("sign-in", user=user.name, client=client, role=user.role)
        return RedirectResponse("/", status_code=303)

    async def signout(request: Request) -> Response:
        await check_csrf(request)
        ctx.audit.write("sign-out", user=request.session.get("user", ""), client=_client(request))
        request.session.clear()
        return RedirectResponse("/signin", status_code=303)

    # -- worklist ------------------------------------------------------------------------------
    def _page(request: Request) -> int:
        try:
            return int(request.query_params.get("page", "1"))
        except ValueError:
            return 1

    def rows_context(request: Request) -> dict[str, Any]:
        filters = Filters.from_mapping(request.session.get("filters"))
        every, at_version = ctx.rows.get(version(), lambda: all_rows(ctx.worklist, ctx.store))
        rows = filter_rows(every, filters)
        page_rows, page, pages = page_of(rows, page=_page(request), size=s.page_size)
        return {"rows": page_rows, "page": page, "pages": pages, "total": len(rows), "filters": filters,
                "version": at_version,
                "cap_minutes": ctx.worklist.policy.ageing_cap_minutes}

    def version() -> str:
        n, t = ctx.worklist.last_change()
        counts = ctx.store.counts()["studies"]
        return f"{n}:{t:.6f}:" + ",".join(str(counts[k]) for k in sorted(counts))

    async def worklist_page(request: Request) -> Response:
        user = require_user(request)
        return render(request, "worklist.html", user=user, states=STATES,
                      findings=finding_keys(ctx.worklist), **rows_context(request))

    async def worklist_rows_fragment(request: Request) -> Response:
        require_user(request)
        return render(request, "_rows.html", **rows_context(request))

    async def worklist_version(request: Request) -> Response:
        require_user(request)
        return JSONResponse({"version": version()})

    async def set_filters(request: Request) -> Response:
        require_user(request)
        form = await check_csrf(request)
        request.session["filters"] = {} if "clear" in form else Filters.from_mapping(form).to_dict()
        return RedirectResponse("/", status_code=303)

    # -- study -----------------------------------------------------------------------------------
    def load_study(job_id: str):  # noqa: ANN202
        view = study_view(job_id=job_id, store=ctx.store, worklist=ctx.worklist,
                          results_dir=ctx.spool.results_dir(job_id)) if job_id.isalnum() else None
        if view is None:
            raise HTTPException(404, MSG_UNKNOWN_STUDY)
        return view

    async def study_page(request: Request) -> Response:
        user = require_user(request)
        job_id = request.path_params["job_id"]
        view = load_study(job_id)
        ctx.audit.write("study-view", user=user.name, client=_client(request), job_id=job_id)
        viewer = ""
        if s.viewer_url:
            from urllib.parse import quote

            accession = view.ranked.accession if view.ranked else ""
            viewer = s.viewer_url.replace("{StudyInstanceUID}", quote(view.study_uid, safe="")).replace(
                "{AccessionNumber}", quote(accession, safe=""))
        reader = reader_pseudonym(ctx.pseudonym_key, user.name)
        return render(request, "study.html", user=user, view=view, viewer_url=viewer,
                      mine=ctx.feedback.latest(job_id, reader), verdicts=VERDICTS,
                      history=ctx.feedback.for_job(job_id), saved=request.query_params.get("saved") == "1")

    def _frontal_path(job_id: str) -> Path:
        view = load_study(job_id)
        inst = next((i for i in ctx.store.instances() if i.sop_key == view.frontal_sop_key), None) \
            if view.frontal_sop_key else None
        if inst is None or view.files_removed or not Path(inst.path).is_file():
            raise HTTPException(404, MSG_NO_IMAGE)
        return Path(inst.path)

    async def study_image(request: Request) -> Response:
        require_user(request)
        job_id = request.path_params["job_id"]
        path = _frontal_path(job_id)
        from starlette.concurrency import run_in_threadpool

        png = await run_in_threadpool(ctx.images.get_or_make, ("img", job_id),
                                      lambda: radiograph_png(path, max_side=s.image_max_side))
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    async def study_heatmap(request: Request) -> Response:
        require_user(request)
        job_id, finding = request.path_params["job_id"], request.path_params["finding"]
        source = _frontal_path(job_id)
        pm = None
        folder = ctx.spool.results_dir(job_id)
        for f in sorted(folder.glob("PM-*.dcm")) if folder.is_dir() else []:
            if pm_finding(f) == finding:
                pm = f
                break
        if pm is None:
            raise HTTPException(404, f"This study has no heatmap for {finding!r}.")
        from starlette.concurrency import run_in_threadpool

        def make() -> bytes:
            return heatmap_png(pm, size=display_size(source, max_side=s.image_max_side))

        png = await run_in_threadpool(ctx.images.get_or_make, ("heat", job_id, finding), make)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    async def study_feedback(request: Request) -> Response:
        user = require_user(request)
        form = await check_csrf(request)
        if not user.can_give_feedback:
            raise HTTPException(403, MSG_ROLE.format(role=user.role))
        job_id = request.path_params["job_id"]
        view = load_study(job_id)
        reader = reader_pseudonym(ctx.pseudonym_key, user.name)
        now_iso = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        given = []
        for f in view.findings:
            verdict = form.get(f"verdict_{f['key']}", "")
            if not verdict:
                continue
            if verdict not in VERDICTS:
                raise HTTPException(400, f"Feedback {verdict!r} for {f['key']} is not one of {', '.join(VERDICTS)}.")
            truth = truth_from_feedback(finding=f["key"], verdict=verdict, model_positive=bool(f["positive"]),
                                        study_uid=view.study_uid,
                                        patient_key=view.ranked.patient_key if view.ranked else None,
                                        reader=reader, observed_at=now_iso)
            if truth and ctx.truth is not None:
                ctx.truth.add(truth)
            ctx.feedback.add(job_id=job_id, study_uid=view.study_uid, finding=f["key"], verdict=verdict,
                             reader=reader, model_positive=bool(f["positive"]),
                             became_truth=bool(truth and ctx.truth is not None))
            given.append(f"{f['key']}={verdict}")
        read = form.get("read")
        if read in ("1", "0") and view.ranked is not None:
            ctx.worklist.mark_read(view.study_uid, read=read == "1")
            ctx.rows.invalidate()  # the reader sees their own change at once
        ctx.audit.write("feedback", user=user.name, client=_client(request), job_id=job_id, reader=reader,
                        verdicts=given, read={"1": True, "0": False}.get(read or ""))
        return RedirectResponse(f"/study/{job_id}?saved=1", status_code=303)

    # -- errors ------------------------------------------------------------------------------------
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404 and exc.detail in ("Not Found", None):
            if _wants_json(request) or "text/html" not in request.headers.get("accept", ""):
                return Response(NOT_FOUND_JSON, status_code=404, media_type="application/json")
            return render(request, "error.html", status=404, title="Not found",
                          message="There is no page at this address. The worklist is at /.")
        if _wants_json(request):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        if exc.status_code == 401:
            return RedirectResponse("/signin?expired=1" if exc.detail == MSG_EXPIRED else "/signin", status_code=303)
        titles = {400: "Bad request", 403: "Refused", 404: "Unknown study", 405: "Not allowed",
                  413: "Request too large", 429: "Too many requests"}
        return render(request, "error.html", status=exc.status_code,
                      title=titles.get(exc.status_code, "Error"), message=exc.detail)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.error("web request failed: %s %s (%s)", request.method, request.url.path, type(exc).__name__)
        if _wants_json(request):
            return JSONResponse({"error": "internal error; see the service log"}, status_code=500)
        return HTMLResponse(env.get_template("error.html").render(
            title="Something went wrong", user=None, csrf="", open_access=False,
            message="The server could not show this page. The error is in the service log; nothing was changed."),
            status_code=500)

    async def config_error(request: Request, exc: Exception) -> Response:
        logger.error("web configuration problem: %s", exc)
        return HTMLResponse(env.get_template("error.html").render(
            title="Configuration problem", user=None, csrf="", open_access=False,
            message=f"{exc}"), status_code=500)

    service_routes = [Route("/healthz", healthz), Route("/metrics", metrics), Route("/status", status)]
    routes = service_routes + [
        Route("/", worklist_page), Route("/worklist", worklist_page),
        Route("/worklist/rows", worklist_rows_fragment), Route("/api/worklist/version", worklist_version),
        Route("/filters", set_filters, methods=["POST"]),
        Route("/signin", signin_form), Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/study/{job_id}", study_page), Route("/study/{job_id}/image.png", study_image),
        Route("/study/{job_id}/heatmap/{finding}.png", study_heatmap),
        Route("/study/{job_id}/feedback", study_feedback, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    routes += second_opinion_routes() + ops_routes()
    routes += list(extra_routes)
    if not s.enabled:  # [web] enabled = false: the service endpoints only
        routes = service_routes
    middleware = [
        Middleware(SecurityHeaders, https=s.https),
        Middleware(BodyLimit, limit=s.max_body_bytes, paths={
            p: (s.max_upload_bytes + MULTIPART_OVERHEAD,
                MSG_UPLOAD_TOO_LARGE.format(mb=s.max_upload_bytes / 2**20))
            for p in UPLOAD_PATHS}),
        Middleware(SessionMiddleware, secret_key=session_secret(s.secret_file), session_cookie="cxr_ai_session",
                   max_age=None, same_site="strict", https_only=s.https),
    ]
    app = Starlette(routes=routes, middleware=middleware, debug=False,
                    exception_handlers={HTTPException: http_error, ConfigError: config_error, Exception: server_error})
    app.state.ctx = ctx
    app.state.pages = PageTools(ctx=ctx, require_user=require_user, check_csrf=check_csrf, render=render)
    return app
