"""uvicorn in a thread of ``cxr-ai serve``, beside the DICOM listener.

The socket is bound in :meth:`WebServer.start` (so a busy port fails the start at once, and
port 0 picks a free one); uvicorn's event loop then runs in one daemon thread. Page handlers
that do real work (ranking, image rendering) run in its thread pool, never on the listener's
threads; the listener does not wait for the pages.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

import uvicorn

from cxr_ai.service.web.settings import WebSettings

if TYPE_CHECKING:
    from cxr_ai.service import Service
    from cxr_ai.service.web.context import WebContext

logger = logging.getLogger(__name__)


def context_for(service: Service) -> WebContext:
    """The pages' view of a running service (own database connections for the pages)."""
    from cxr_ai.monitoring.log import monitoring_dir, resolve_pseudonym_key
    from cxr_ai.monitoring.truth import TruthStore
    from cxr_ai.service.web.context import WebContext
    from cxr_ai.worklist import Worklist

    import copy

    cfg = copy.deepcopy(dict(service.config))
    cfg.setdefault("store", {})["root"] = str(service.settings.store_root)
    settings = WebSettings.for_service(cfg, service.settings)
    if settings.enabled and not settings.loopback and not settings.trusted_proxy_header:
        from cxr_ai.service.web.auth import UserStore

        if not UserStore(settings.users_file).any_users():
            logger.warning("the web pages listen beyond loopback and need sign-in, but %s has no users yet: "
                           "add one with `cxr-ai users add NAME`", settings.users_file)
    recorder = service.workers.recorder
    mon = cfg.get("monitoring", {})
    truth = None
    key = b""
    if mon.get("enabled", True):
        truth = TruthStore(monitoring_dir(cfg) / mon.get("truth_log", "truth.jsonl"))
        key = resolve_pseudonym_key(cfg)
    else:
        from cxr_ai.service.web.settings import session_secret

        key = session_secret(settings.secret_file).encode()
    return WebContext(settings=settings, store=service.store, spool=service.spool,
                      worklist=Worklist(recorder.worklist.path, policy=recorder.worklist.policy), truth=truth,
                      pseudonym_key=key, health=service.health, status=service.status, metrics=service.metrics_text,
                      service=service, config=cfg)


class WebServer:
    """One uvicorn server on a socket bound at :meth:`start`."""

    def __init__(self, app: Any, *, host: str, port: int, settings: WebSettings | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.settings = settings
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve; returns the port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        tls: dict[str, Any] = {}
        if self.settings is not None and self.settings.https:
            tls = {"ssl_certfile": self.settings.tls_cert, "ssl_keyfile": self.settings.tls_key}
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                server_header=False, proxy_headers=False, timeout_keep_alive=5, **tls)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="cxr-ai-http", daemon=True)
        self._thread.start()
        return self.bound_port

    def _run(self) -> None:
        assert self._server is not None and self._sock is not None
        asyncio.run(self._server.serve(sockets=[self._sock]))

    @property
    def bound_port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def scheme(self) -> str:
        return "https" if self.settings is not None and self.settings.https else "http"

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
