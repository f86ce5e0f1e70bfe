"""The operations page (``/ops``, admin role): health, queues, dead letters (with a re-queue
button, audited), throughput and per-stage latency plots, and the live fairness windows of the
monitor (per-subgroup metrics with CIs, gap bars, calibration, drift, truth coverage).

All of it comes from :mod:`cxr_ai.ops` (read-only SQLite connections, never the listener's
write lock) and :mod:`cxr_ai.plots` (inline SVG, nothing from the internet). The rendered
panel is cached for a few seconds, so an open page (it polls ``/ops/panel``) or several cost the
service one rendering per interval, not one per viewer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from cxr_ai import ops, plots
from cxr_ai.service.web.access import client_of

logger = logging.getLogger(__name__)

MSG_ADMIN = "The operations page is for administrators; your account ({role}) cannot open it."
MSG_NO_SERVICE = "This web application runs without the service, so there is nothing to show."
MSG_BAD_IDS = "Re-queue: {value!r} is not a dead letter's number; nothing was changed."
#: Fairness attributes shown with plots (the rest as tables).
PLOT_METRIC = "auroc"


def svg_img(svg: str, title: str) -> Markup:
    """An inline SVG plot as an ``<img>`` with a data URI: the page's Content-Security-Policy
    allows no inline styles (matplotlib's SVG uses them), an image document keeps its own."""
    import base64

    data = base64.b64encode(('<?xml version="1.0" encoding="utf-8"?>' + svg).encode()).decode()
    return Markup('<img class="svgplot" alt="{t}" title="{t}" src="data:image/svg+xml;base64,{d}">').format(
        t=title, d=Markup(data))


def _require_admin(request: Request) -> Any:
    pages = request.app.state.pages
    user = pages.require_user(request)
    if user.role != "admin" and not pages.ctx.open_access():
        raise HTTPException(403, MSG_ADMIN.format(role=user.role))
    return user


class OpsData:
    """The page's data from a running service, cached for ``ttl`` seconds."""

    def __init__(self, ctx: Any, *, ttl: float = 5.0) -> None:
        self.ctx = ctx
        self.ttl = ttl
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.ttl:
                return self._cached[1]
            data = self._collect()
            self._cached = (time.monotonic(), data)
            return data

    def _collect(self) -> dict[str, Any]:
        svc = self.ctx.service
        if svc is None:
            return {"note": MSG_NO_SERVICE}
        db = svc.settings.db_path
        out: dict[str, Any] = {"at": time.time()}
        out["health"] = ops.service_health(svc)
        out["queue"] = ops.queue_view(db)
        out["dead"] = ops.dead_letters(db)
        out["throughput"], out["latency"] = {}, {}
        for window in ("hour", "day"):
            tp = ops.throughput(db, window=window)
            lat = ops.stage_latency(db, window=window)
            out["throughput"][window] = (tp, svg_img(plots.throughput_svg(tp), f"Throughput, last {window}"))
            out["latency"][window] = (lat, svg_img(plots.latency_svg(lat, window=window),
                                                   f"Per-stage latency, last {window}"))
        runner = getattr(svc, "monitor_runner", None)
        record = None
        coverage: list[ops.TruthCoverage] = []
        if runner is not None:
            record = runner.last_record or ops.last_performance_record(runner.monitor.performance_log)
            try:
                coverage = ops.truth_coverage(runner.monitor)
            except Exception as exc:  # noqa: BLE001 - the panel shows the rest
                logger.warning("truth coverage could not be computed: %s", type(exc).__name__)
        view = ops.fairness_view(record)
        out["fairness"] = view
        out["monitoring"] = runner is not None
        out["coverage"] = coverage
        out["plots"] = {}
        for t in view.tables:
            if t.available and t.groups:
                flagged = [m for m in ops.OPS_METRICS if any(g.gaps[m].flagged for g in t.groups)]
                metric = flagged[0] if flagged else PLOT_METRIC
                out["plots"][(t.finding, t.attribute)] = (
                    svg_img(plots.gap_bars_svg(t, metric=metric),
                            f"{t.finding}: {ops.OPS_METRICS[metric]} gap by {t.attribute}"),
                    svg_img(plots.calibration_svg(t), f"{t.finding}: calibration by {t.attribute}"))
        return out


def _data(request: Request) -> OpsData:
    app = request.app
    if not hasattr(app.state, "ops_data"):
        app.state.ops_data = OpsData(app.state.pages.ctx)
    return app.state.ops_data


async def page(request: Request) -> Response:
    user = _require_admin(request)
    pages = request.app.state.pages
    data = await run_in_threadpool(_data(request).get)
    return pages.render(request, "ops.html", user=user, d=data, metrics=ops.OPS_METRICS,
                        refresh=pages.ctx.settings.ops_refresh_seconds, saved=request.query_params.get("requeued"))


async def panel(request: Request) -> Response:
    _require_admin(request)
    pages = request.app.state.pages
    data = await run_in_threadpool(_data(request).get)
    return pages.render(request, "_ops_panel.html", d=data, metrics=ops.OPS_METRICS)


async def requeue(request: Request) -> Response:
    user = _require_admin(request)
    pages = request.app.state.pages
    form = await pages.check_csrf(request)
    svc = pages.ctx.service
    if svc is None:
        raise HTTPException(404, MSG_NO_SERVICE)
    value = form.get("delivery_id", "all")
    ids: list[int] | None = None
    if value != "all":
        try:
            ids = [int(value)]
        except ValueError:
            raise HTTPException(400, MSG_BAD_IDS.format(value=value[:40])) from None
    # audited by requeue_dead itself (the same record as `cxr-ai jobs --retry-dead`, with the user)
    client = client_of(request)
    n = await run_in_threadpool(lambda: ops.requeue_dead(svc.store, audit_path=pages.ctx.settings.audit_log,
                                                         actor=user.name, client=client, delivery_ids=ids))
    _data(request).invalidate()
    return RedirectResponse(f"/ops?requeued={n}", status_code=303)


async def api(request: Request) -> Response:
    """``GET /api/v1/ops``: the same data as JSON (no plots)."""
    _require_admin(request)
    data = await run_in_threadpool(_data(request).get)
    if "note" in data and "health" not in data:
        return JSONResponse({"note": data["note"]})
    from dataclasses import asdict

    return JSONResponse({
        "health": [asdict(h) for h in data["health"]], "queue": asdict(data["queue"]),
        "dead_letters": [asdict(x) for x in data["dead"]],
        "latency": {w: [asdict(s) for s in v[0]] for w, v in data["latency"].items()},
        "fairness": data["fairness"].to_dict(),
        "truth_coverage": [{**asdict(c), "fraction": c.fraction} for c in data["coverage"]],
    })


def routes() -> list[BaseRoute]:
    return [Route("/ops", page), Route("/ops/panel", panel), Route("/ops/requeue", requeue, methods=["POST"]),
            Route("/api/v1/ops", api)]
