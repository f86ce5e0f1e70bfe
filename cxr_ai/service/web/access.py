"""Who may see a page, and how a page is drawn: the templates, the signed-in user (session
with idle time-out, or a trusted proxy's header, or the open loopback workstation), the
session's CSRF token, and :func:`page_tools`, which bundles them for the handlers.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse

from cxr_ai.results import format_probability
from cxr_ai.service.web.auth import User
from cxr_ai.service.web.context import PageTools, WebContext
from cxr_ai.service.web.data import DISPLAY

OPEN_USER = User(name="workstation", role="radiologist")

MSG_CSRF = ("The form's security token did not match this session, so nothing was changed. This happens "
            "when a form was sent from another site or after signing in again in another tab. Reload the "
            "page and try again.")
MSG_EXPIRED = "Your session ended after a period of inactivity. Sign in again to continue."
MSG_SIGNIN_REQUIRED = "Sign in to see this page."


def templates() -> Environment:
    """The page templates (``cxr_ai/service/web/templates``) with the pages' filters."""
    env = Environment(loader=PackageLoader("cxr_ai.service.web", "templates"), autoescape=select_autoescape(["html"]))

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


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


def wants_json(request: Request) -> bool:
    """JSON errors for the data and service endpoints and for clients that ask for JSON only."""
    path, accept = request.url.path, request.headers.get("accept", "")
    return (path.startswith("/api/") or path in ("/healthz", "/metrics", "/status")
            or ("application/json" in accept and "text/html" not in accept))


class Expired(Exception):
    """The session's user was idle longer than ``[web] idle_timeout_seconds``."""


def csrf_token(request: Request) -> str:
    if "csrf" not in request.session:
        request.session["csrf"] = secrets.token_urlsafe(32)
    return request.session["csrf"]


def proxy_user(ctx: WebContext, request: Request) -> User | None:
    """The user a trusted reverse proxy names in its header, from an allow-listed address."""
    s = ctx.settings
    if not s.trusted_proxy_header or client_of(request) not in s.trusted_proxies:
        return None
    name = request.headers.get(s.trusted_proxy_header, "").strip()
    if not name:
        return None
    known = ctx.users.get(name)
    if known is not None:
        return None if known.disabled else known
    return User(name=name, role=s.trusted_proxy_role)


def current_user(ctx: WebContext, request: Request) -> User | None:
    """The signed-in user; raises :class:`Expired` after the idle time-out."""
    user = proxy_user(ctx, request)
    if user is not None:
        return user
    name = request.session.get("user")
    if name:
        now = time.time()
        if now - float(request.session.get("seen", 0)) > ctx.settings.idle_timeout_seconds:
            request.session.pop("user", None)
            raise Expired()
        known = ctx.users.get(name)
        if known is None or known.disabled:
            request.session.pop("user", None)
            return None
        request.session["seen"] = now
        return known
    if ctx.open_access():
        return OPEN_USER
    return None


def page_tools(ctx: WebContext, env: Environment) -> PageTools:
    """``render``, ``check_csrf`` and ``require_user`` over ``ctx`` and the templates ``env``."""

    def render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        user = values.pop("user", None)
        html = env.get_template(template).render(user=user, csrf=csrf_token(request), open_access=ctx.open_access(),
                                             request_path=request.url.path, **values)
        return HTMLResponse(html, status_code=status)

    async def check_csrf(request: Request) -> dict[str, str]:
        form = await request.form()
        sent = request.headers.get("x-csrf-token") or str(form.get("csrf_token", ""))
        expected = request.session.get("csrf", "")
        if not expected or not sent or not secrets.compare_digest(sent, expected):
            ctx.audit.write("csrf-refused", user=request.session.get("user", ""), client=client_of(request),
                            outcome="refused", path=request.url.path)
            raise HTTPException(403, MSG_CSRF)
        return {k: str(v) for k, v in form.items()}

    def require_user(request: Request) -> User:
        try:
            user = current_user(ctx, request)
        except Expired:
            raise HTTPException(401, MSG_EXPIRED) from None
        if user is None:
            raise HTTPException(401, MSG_SIGNIN_REQUIRED)
        return user

    return PageTools(ctx=ctx, require_user=require_user, check_csrf=check_csrf, render=render)
