"""The service's own endpoints, open and unchanged since before the web pages: ``/healthz``,
``/metrics`` (Prometheus) and ``/status`` (JSON). With ``[web] enabled = false`` they are the
only routes."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route


async def healthz(request: Request) -> Response:
    health = request.app.state.pages.ctx.health()
    return Response(json.dumps(health).encode(), status_code=200 if health["status"] == "ok" else 503,
                    media_type="application/json")


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.pages.ctx.metrics(), headers={"content-type": CONTENT_TYPE_LATEST})


async def status(request: Request) -> Response:
    return Response(json.dumps(request.app.state.pages.ctx.status()).encode(), media_type="application/json")


def routes() -> list[BaseRoute]:
    return [Route("/healthz", healthz), Route("/metrics", metrics), Route("/status", status)]
