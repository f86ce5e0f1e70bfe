"""Every error gets a page (or JSON, for the API, the service endpoints and clients that ask
for JSON only): :func:`exception_handlers` for the application."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from jinja2 import Environment
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from cxr_ai.errors import ConfigError
from cxr_ai.service.web.access import MSG_EXPIRED, wants_json

logger = logging.getLogger(__name__)

NOT_FOUND_JSON = b'{"error": "not found; try /healthz, /metrics or /status"}'
TITLES = {400: "Bad request", 403: "Refused", 404: "Unknown study", 405: "Not allowed",
          413: "Request too large", 429: "Too many requests"}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    render = request.app.state.pages.render
    if exc.status_code == 404 and exc.detail in ("Not Found", None):
        if wants_json(request) or "text/html" not in request.headers.get("accept", ""):
            return Response(NOT_FOUND_JSON, status_code=404, media_type="application/json")
        return render(request, "error.html", status=404, title="Not found",
                      message="There is no page at this address. The worklist is at /.")
    if wants_json(request):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    if exc.status_code == 401:
        return RedirectResponse("/signin?expired=1" if exc.detail == MSG_EXPIRED else "/signin", status_code=303)
    return render(request, "error.html", status=exc.status_code,
                  title=TITLES.get(exc.status_code, "Error"), message=exc.detail)


Handler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers(env: Environment) -> dict[type[Exception], Handler]:
    """HTTP errors as pages; a configuration problem and any other failure as a 500 page
    drawn without the session (which may be what failed)."""

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.error("web request failed: %s %s (%s)", request.method, request.url.path, type(exc).__name__)
        if wants_json(request):
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

    return {HTTPException: http_error, ConfigError: config_error, Exception: server_error}
