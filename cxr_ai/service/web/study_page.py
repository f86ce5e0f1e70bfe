"""One study (``/study/{job_id}``): the page with the findings and the viewer link, the
radiograph and heatmap images, and the radiologist's feedback (which becomes monitoring
truth). Studies are addressed by their opaque job id only."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from cxr_ai.monitoring.truth import VERDICTS, truth_from_feedback
from cxr_ai.service.web.access import client_of
from cxr_ai.service.web.auth import reader_pseudonym
from cxr_ai.service.web.context import WebContext
from cxr_ai.service.web.data import study_view
from cxr_ai.service.web.images import display_size, heatmap_png, pm_finding, radiograph_png

MSG_UNKNOWN_STUDY = ("There is no study with this link. It may have been removed by retention, or the link "
                     "was mistyped. Go back to the worklist to find the study.")
MSG_ROLE = "Your account ({role}) cannot give feedback; feedback is for radiologists."
MSG_NO_IMAGE = "The images of this study are no longer kept on this server (spool retention)."


def load_study(ctx: WebContext, job_id: str):  # noqa: ANN201
    view = study_view(job_id=job_id, store=ctx.store, worklist=ctx.worklist,
                      results_dir=ctx.spool.results_path(job_id)) if job_id.isalnum() else None
    if view is None:
        raise HTTPException(404, MSG_UNKNOWN_STUDY)
    return view


def _frontal_path(ctx: WebContext, job_id: str) -> Path:
    view = load_study(ctx, job_id)
    if not view.frontal_path or view.files_removed or not Path(view.frontal_path).is_file():
        raise HTTPException(404, MSG_NO_IMAGE)
    return Path(view.frontal_path)


def _viewer_url(template: str, *, study_uid: str, accession: str) -> str:
    from urllib.parse import quote

    return template.replace("{StudyInstanceUID}", quote(study_uid, safe="")).replace(
        "{AccessionNumber}", quote(accession, safe=""))


async def study_page(request: Request) -> Response:
    pages = request.app.state.pages
    ctx = pages.ctx
    user = pages.require_user(request)
    job_id = request.path_params["job_id"]
    view = load_study(ctx, job_id)
    ctx.audit.write("study-view", user=user.name, client=client_of(request), job_id=job_id)
    viewer = ""
    if ctx.settings.viewer_url:
        viewer = _viewer_url(ctx.settings.viewer_url, study_uid=view.study_uid,
                             accession=view.ranked.accession if view.ranked else "")
    reader = reader_pseudonym(ctx.pseudonym_key, user.name)
    return pages.render(request, "study.html", user=user, view=view, viewer_url=viewer,
                        mine=ctx.feedback.latest(job_id, reader), verdicts=VERDICTS,
                        history=ctx.feedback.for_job(job_id), saved=request.query_params.get("saved") == "1")


async def study_image(request: Request) -> Response:
    pages = request.app.state.pages
    ctx = pages.ctx
    pages.require_user(request)
    job_id = request.path_params["job_id"]
    path = _frontal_path(ctx, job_id)
    png = await run_in_threadpool(ctx.images.get_or_make, ("img", job_id),
                                  lambda: radiograph_png(path, max_side=ctx.settings.image_max_side))
    return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})


async def study_heatmap(request: Request) -> Response:
    pages = request.app.state.pages
    ctx = pages.ctx
    pages.require_user(request)
    job_id, finding = request.path_params["job_id"], request.path_params["finding"]
    source = _frontal_path(ctx, job_id)
    from cxr_ai.outputs import OutputKind, listener_glob  # the writers load only when a map is asked for

    pm = None
    folder = ctx.spool.results_path(job_id)
    for f in sorted(folder.glob(listener_glob(OutputKind.PM))) if folder.is_dir() else []:
        if pm_finding(f) == finding:
            pm = f
            break
    if pm is None:
        raise HTTPException(404, f"This study has no heatmap for {finding!r}.")

    def make() -> bytes:
        return heatmap_png(pm, size=display_size(source, max_side=ctx.settings.image_max_side))

    png = await run_in_threadpool(ctx.images.get_or_make, ("heat", job_id, finding), make)
    return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})


async def study_feedback(request: Request) -> Response:
    pages = request.app.state.pages
    ctx = pages.ctx
    user = pages.require_user(request)
    form = await pages.check_csrf(request)
    if not user.can_give_feedback:
        raise HTTPException(403, MSG_ROLE.format(role=user.role))
    job_id = request.path_params["job_id"]
    view = load_study(ctx, job_id)
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
        # only the entry shown: another patient's study under a reused Study UID stays as it was
        ctx.worklist.mark_read(view.study_uid, patient_key=view.ranked.patient_key, read=read == "1")
        ctx.rows.invalidate()  # the reader sees their own change at once
    ctx.audit.write("feedback", user=user.name, client=client_of(request), job_id=job_id, reader=reader,
                    verdicts=given, read={"1": True, "0": False}.get(read or ""))
    return RedirectResponse(f"/study/{job_id}?saved=1", status_code=303)


def routes() -> list[BaseRoute]:
    return [Route("/study/{job_id}", study_page), Route("/study/{job_id}/image.png", study_image),
            Route("/study/{job_id}/heatmap/{finding}.png", study_heatmap),
            Route("/study/{job_id}/feedback", study_feedback, methods=["POST"])]
