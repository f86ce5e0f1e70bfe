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

from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from cxr_ai.service.web.access import page_tools, templates
from cxr_ai.service.web.context import PageTools, WebContext
from cxr_ai.service.web.errors import exception_handlers
from cxr_ai.service.web.middleware import BodyLimit, SecurityHeaders
from cxr_ai.service.web.ops_page import routes as ops_routes
from cxr_ai.service.web.second_opinion_page import MSG_UPLOAD_TOO_LARGE, MULTIPART_OVERHEAD, UPLOAD_PATHS
from cxr_ai.service.web.second_opinion_page import routes as second_opinion_routes
from cxr_ai.service.web.service_endpoints import routes as service_routes
from cxr_ai.service.web.signin_page import routes as signin_routes
from cxr_ai.service.web.settings import session_secret
from cxr_ai.service.web.study_page import MSG_UNKNOWN_STUDY
from cxr_ai.service.web.study_page import routes as study_routes
from cxr_ai.service.web.worklist_page import routes as worklist_routes

__all__ = ["MSG_UNKNOWN_STUDY", "BodyLimit", "PageTools", "SecurityHeaders", "WebContext", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"


def create_app(ctx: WebContext, *, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The Starlette application over ``ctx`` (no globals: tests build as many as they like).

    ``extra_routes`` are added after the built-in ones (further pages; see :class:`PageTools`).
    Every route is behind the same middleware: body limit, session, security headers. Each
    page module registers its own routes; its handlers find ``ctx`` and the tools on
    ``request.app.state.pages``.
    """
    env = templates()
    s = ctx.settings
    routes = service_routes()
    if s.enabled:  # [web] enabled = false: the service endpoints only
        routes += worklist_routes() + signin_routes() + study_routes()
        routes.append(Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"))
        routes += second_opinion_routes() + ops_routes() + list(extra_routes)
    middleware = [
        Middleware(SecurityHeaders, https=s.https),
        Middleware(BodyLimit, limit=s.max_body_bytes, paths={
            p: (s.max_upload_bytes + MULTIPART_OVERHEAD,
                MSG_UPLOAD_TOO_LARGE.format(mb=s.max_upload_bytes / 2**20))
            for p in UPLOAD_PATHS}),
        Middleware(SessionMiddleware, secret_key=session_secret(s.secret_file), session_cookie="cxr_ai_session",
                   max_age=None, same_site="strict", https_only=s.https),
    ]
    app = Starlette(routes=routes, middleware=middleware, debug=False, exception_handlers=exception_handlers(env))
    app.state.pages = page_tools(ctx, env)
    return app
