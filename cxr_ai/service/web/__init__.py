"""The web pages of ``cxr-ai serve``: the radiologist's triage worklist, the study page with
the heatmap, feedback that becomes monitoring truth, sign-in and the audit log.

:func:`~cxr_ai.service.web.app.create_app` builds the Starlette application over a
:class:`~cxr_ai.service.web.context.WebContext` from the routes each page module registers
(``service_endpoints``, ``worklist_page``, ``signin_page``, ``study_page``,
``second_opinion_page``, ``ops_page``); :class:`~cxr_ai.service.web.server.WebServer` runs it on
uvicorn in a thread of the service. Templates and static files ship inside this package.

Further pages: pass ``extra_routes`` to :func:`~cxr_ai.service.web.app.create_app`, or add a page
module's ``routes()`` to its list; a handler gets :class:`~cxr_ai.service.web.context.PageTools` from
``request.app.state.pages`` (``require_user``, ``check_csrf``, ``render``, the context). Address studies by job id only,
audit what a user sees or changes (``ctx.audit.write``), and give every error a page.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cxr_ai.service.web.app import PageTools, WebContext, create_app
    from cxr_ai.service.web.server import WebServer, context_for
    from cxr_ai.service.web.settings import WebSettings

#: Where each name lives: imported on first use, so that a command that needs one light module
#: (``cxr-ai users`` needs ``web.auth``) does not load Starlette, Jinja2 and the pages.
_HOMES = {"PageTools": "app", "WebContext": "app", "create_app": "app", "WebServer": "server",
          "context_for": "server", "WebSettings": "settings"}
__all__ = ["PageTools", "WebContext", "WebServer", "WebSettings", "context_for", "create_app"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"cxr_ai.service.web.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'cxr_ai.service.web' has no attribute {name!r}")
