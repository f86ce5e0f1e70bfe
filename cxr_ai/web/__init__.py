"""The web pages of ``cxr-ai serve``: the radiologist's triage worklist, the study page with
the heatmap, feedback that becomes monitoring truth, sign-in and the audit log.

:func:`~cxr_ai.web.app.create_app` builds the Starlette application over a
:class:`~cxr_ai.web.app.WebContext`; :class:`~cxr_ai.web.server.WebServer` runs it on uvicorn
in a thread of the service. Templates and static files ship inside this package.
"""

from cxr_ai.web.app import WebContext, create_app
from cxr_ai.web.server import WebServer, context_for
from cxr_ai.web.settings import WebSettings

__all__ = ["WebContext", "WebServer", "WebSettings", "context_for", "create_app"]
