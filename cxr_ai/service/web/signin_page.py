"""Sign-in and sign-out (``/signin``, ``/signout``): local users with lock-out after repeated
failures; every attempt is audited."""

from __future__ import annotations

import secrets
import time

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from cxr_ai.service.web.access import MSG_EXPIRED, client_of

MSG_LOCKED = "Too many failed sign-ins for this user. Wait {minutes:.0f} minutes, or ask an administrator."
MSG_BAD_SIGNIN = "The user name or password is wrong, or the account is disabled."


async def signin_form(request: Request) -> Response:
    notice = MSG_EXPIRED if request.query_params.get("expired") else ""
    return request.app.state.pages.render(request, "signin.html", notice=notice, error="", name="")


async def signin(request: Request) -> Response:
    pages = request.app.state.pages
    ctx = pages.ctx
    form = await pages.check_csrf(request)
    name, password = form.get("name", "").strip()[:64], form.get("password", "")
    client = client_of(request)
    if ctx.lockout.locked(name):
        ctx.audit.write("sign-in", user=name, client=client, outcome="locked-out")
        return pages.render(request, "signin.html", status=429, notice="", name=name,
                            error=MSG_LOCKED.format(minutes=ctx.settings.lockout_seconds / 60))
    user = ctx.users.verify(name, password) if name and password else None
    if user is None:
        ctx.lockout.failed(name)
        ctx.audit.write("sign-in", user=name, client=client, outcome="failed")
        return pages.render(request, "signin.html", status=401, notice="", name=name, error=MSG_BAD_SIGNIN)
    ctx.lockout.succeeded(name)
    request.session.clear()
    request.session.update(user=user.name, seen=time.time(), csrf=secrets.token_urlsafe(32))
    ctx.audit.write("sign-in", user=user.name, client=client, role=user.role)
    return RedirectResponse("/", status_code=303)


async def signout(request: Request) -> Response:
    pages = request.app.state.pages
    await pages.check_csrf(request)
    pages.ctx.audit.write("sign-out", user=request.session.get("user", ""), client=client_of(request))
    request.session.clear()
    return RedirectResponse("/signin", status_code=303)


def routes() -> list[BaseRoute]:
    return [Route("/signin", signin_form), Route("/signin", signin, methods=["POST"]),
            Route("/signout", signout, methods=["POST"])]
