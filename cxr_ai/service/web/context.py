"""What every page reads and writes (:class:`WebContext`, built by
:func:`cxr_ai.service.web.server.context_for`) and what every page handler gets on
``request.app.state.pages`` (:class:`PageTools`, built by :func:`cxr_ai.service.web.access.page_tools`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from cxr_ai.monitoring.truth import TruthStore
from cxr_ai.store.jobs import JobStore
from cxr_ai.store.spool import Spool
from cxr_ai.audit import AuditLog
from cxr_ai.service.web.auth import Lockout, User, UserStore
from cxr_ai.service.web.data import RowCache
from cxr_ai.service.web.feedback import FeedbackStore
from cxr_ai.service.web.images import ImageCache
from cxr_ai.service.web.settings import WebSettings
from cxr_ai.worklist import Worklist


@dataclass
class WebContext:
    """What the pages read and write; built by :func:`cxr_ai.service.web.server.context_for`."""

    settings: WebSettings
    store: JobStore
    spool: Spool
    worklist: Worklist
    truth: TruthStore | None
    pseudonym_key: bytes
    health: Callable[[], dict[str, Any]]
    status: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]
    #: the running service (the operations page's health, queues, monitor); None in unit tests
    service: Any = None
    #: the service's configuration (the second-opinion pipeline is built from it)
    config: dict[str, Any] = field(default_factory=dict)
    users: UserStore = field(init=False)
    audit: AuditLog = field(init=False)
    feedback: FeedbackStore = field(init=False)
    lockout: Lockout = field(init=False)
    images: ImageCache = field(init=False)
    rows: RowCache = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.users = UserStore(s.users_file)
        self.audit = AuditLog(s.audit_log)
        self.feedback = FeedbackStore(s.feedback_db)
        self.lockout = Lockout(failures=s.lockout_failures, seconds=s.lockout_seconds)
        self.images = ImageCache()
        self.rows = RowCache()

    def open_access(self) -> bool:
        """Loopback, no users and no trusted proxy: a single workstation (and the demo)."""
        s = self.settings
        return s.loopback and not s.trusted_proxy_header and not self.users.any_users()

    def close(self) -> None:
        self.feedback.close()
        self.worklist.close()


@dataclass(frozen=True)
class PageTools:
    """What a page handler needs, on ``request.app.state.pages`` (for pages added through
    ``create_app(extra_routes=...)``): ``require_user(request)`` → :class:`User` (or the
    sign-in redirect / 401), ``await check_csrf(request)`` → the form (or 403),
    ``render(request, template, status=200, user=..., **values)`` → HTML (templates from
    ``cxr_ai/service/web/templates``, extending ``base.html``), and the :class:`WebContext`."""

    ctx: WebContext
    require_user: Callable[[Request], User]
    check_csrf: Callable[[Request], Any]
    render: Callable[..., HTMLResponse]
