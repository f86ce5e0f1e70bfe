"""The web pages of ``cxr-ai serve``: the radiologist's triage worklist, the study page with
the heatmap, feedback that becomes monitoring truth, sign-in and the audit log.

:func:`~cxr_ai.web.app.create_app` builds the Starlette application over a
:class:`~cxr_ai.web.context.WebContext` from the routes each page module registers
(``service_endpoints``, ``worklist_page``, ``signin_page``, ``study_page``,
``second_opinion_page``, ``ops_page``); :class:`~cxr_ai.web.server.WebServer` runs it on
uvicorn in a thread of the service. Templates and static files ship inside this package.

Further pages: pass ``extra_routes`` to :func:`~cxr_ai.web.app.create_app`, or add a page
module's ``routes()`` to its list; a handler gets :class:`~cxr_ai.web.context.PageTools` from
``request.app.state.pages`` (``require_user``, ``check_csrf``, ``render``, the context). Address studies by job id only,
audit what a user sees or changes (``ctx.audit.write``), and give every error a page.
"""

from cxr_ai.web.app import PageTools, WebContext, create_app
from cxr_ai.web.server import WebServer, context_for
from cxr_ai.web.settings import WebSettings

__all__ = ["PageTools", "WebContext", "WebServer", "WebSettings", "context_for", "create_app"]
