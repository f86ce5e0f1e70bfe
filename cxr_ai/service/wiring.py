"""``cxr-ai serve``: the listener service (SCP + job store + workers + routing + HTTP).

Wiring only; the parts live in :mod:`cxr_ai.net`, :mod:`cxr_ai.store` and :mod:`cxr_ai.service.workers`::

    PACS --C-STORE--> StorageSCP --spool+job store--> WorkerPool --pipeline--> results/ + outbox
                                                                                    |
                                               Router (one thread per destination) <-+--> PACS / STOW / FHIR / folder

``serve_main(argv)`` starts it with the embedded defaults when no config is given (demo
bundle, SQLite and spool under ``./var``, results to ``./var/out``). ``demo_main(argv)``
runs the whole loop on a few phantom studies.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from cxr_ai.contract import MSG_NOT_A_PIPELINE, PipelineFactory
from cxr_ai.errors import ConfigError
from cxr_ai.service.metrics import ServiceMetrics
from cxr_ai.service.routing import Destination, RetryPolicy, Router, build_destination
from cxr_ai.net.scp import ListenerSettings, StorageSCP
from cxr_ai.net.tls import server_context
from cxr_ai.store.jobs import (
    DeliveryState,
    JobStore,
    StudyState,
)
from cxr_ai.store.listing import recent_problems
from cxr_ai.store.spool import Spool, safe_key
from cxr_ai.service.workers import WorkerPool

logger = logging.getLogger(__name__)

MSG_SECTION_TYPE = "[{section}] {key} must be {what}, got {value!r}"
MSG_BAD_PIPELINE = (
    "[workers] pipeline = {spec!r} cannot be imported ({detail}); give 'package.module:Name' of a "
    "class or function that accepts config= and returns an object with process_study(paths)"
)
MSG_AE_TITLE = "[{section}] {key} {value!r} is not a valid AE title (1-16 characters, no backslash or control characters)"


#: Seconds of the shutdown grace kept for stopping routing and HTTP and closing the job store.
STOP_TAIL_SECONDS = 1.5
#: Seconds between two sweeps of stale temporary files while the service runs.
SWEEP_SECONDS = 60.0


# -- configuration ----------------------------------------------------------------------------
@dataclass
class ServiceSettings:
    """The service's configuration sections, validated."""

    listener: ListenerSettings
    spool_dir: Path
    db_path: Path
    store_root: Path
    quiet_seconds: float
    max_open_seconds: float
    keep_seconds: float | None  # None keeps spool files forever
    sqlite_synchronous: str
    workers: int
    max_batch_studies: int
    worker_poll_seconds: float
    pipeline_retry_seconds: float
    idle_start: bool
    max_attempts: int
    pipeline: str
    shutdown_grace_seconds: float
    routing_policy: RetryPolicy
    routing_poll_seconds: float
    destinations: list[Destination] = field(repr=False, default_factory=list)
    http_enabled: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = 8780
    stale_temp_seconds: float = 3600.0


def _get(section: Mapping[str, Any], name: str, key: str, kind: type, what: str, *, check=None) -> Any:
    value = section.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(MSG_SECTION_TYPE.format(section=name, key=key, what=what, value=value))
    if check is not None and not check(value):
        raise ConfigError(MSG_SECTION_TYPE.format(section=name, key=key, what=what, value=value))
    return value


def _ae_title(value: Any, section: str, key: str) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ConfigError(MSG_AE_TITLE.format(section=section, key=key, value=value))
    return value.strip()


def validate_config(config: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None) -> ServiceSettings:
    """Check the ``[listener] [store] [workers] [routing] [http]`` sections; clear errors.

    Relative paths are resolved against ``base_dir`` (default: the working directory).
    """
    base = Path(base_dir or os.getcwd()).resolve()
    for name in ("listener", "store", "workers", "routing", "http"):
        if not isinstance(config.get(name), Mapping):
            raise ConfigError(f"configuration has no [{name}] section")
    li, st, wk, rt, ht = (config[n] for n in ("listener", "store", "workers", "routing", "http"))
    port_ok = lambda v: 0 <= v < 65536
    pos = lambda v: v > 0
    nonneg = lambda v: v >= 0
    allowed = li.get("allowed_calling_aes")
    if not isinstance(allowed, list) or not allowed:
        raise ConfigError(MSG_SECTION_TYPE.format(section="listener", key="allowed_calling_aes",
                                                  what="a non-empty list of AE titles (or [\"*\"] for any)", value=allowed))
    allowed = [a if a == "*" else _ae_title(a, "listener", "allowed_calling_aes") for a in allowed]
    ssl_ctx = None
    if _get(li, "listener", "tls", bool, "true or false"):
        ssl_ctx = server_context(cert_file=li.get("tls_cert"), key_file=li.get("tls_key"),
                                 ca_file=li.get("tls_ca") or None,
                                 require_client_cert=bool(li.get("tls_require_client_cert")))
    ae_title = _ae_title(li.get("ae_title"), "listener", "ae_title")
    listener = ListenerSettings(
        ae_title=ae_title,
        host=_get(li, "listener", "host", str, "a host name or address"),
        port=_get(li, "listener", "port", int, "a TCP port (0-65535; 0 picks a free one)", check=port_ok),
        allowed_calling_aes=allowed,
        require_called_ae=_get(li, "listener", "require_called_ae", bool, "true or false"),
        max_pdu=_get(li, "listener", "max_pdu", int, "0 (unlimited) or a PDU size >= 4096",
                     check=lambda v: v == 0 or v >= 4096),
        max_associations=_get(li, "listener", "max_associations", int, "a positive integer", check=pos),
        min_free_bytes=int(_get(li, "listener", "min_free_mb", float, "a number of MiB >= 0", check=nonneg) * 2**20),
        max_associations_per_address=_get(li, "listener", "max_associations_per_address", int,
                                          "a positive integer (at most max_associations)", check=pos),
        max_inflated_bytes=int(_get(li, "listener", "max_inflated_mb", float, "a number of MiB > 0", check=pos)
                               * 2**20),
        acse_timeout=_get(li, "listener", "acse_timeout", float, "seconds > 0", check=pos),
        dimse_timeout=_get(li, "listener", "dimse_timeout", float, "seconds > 0", check=pos),
        network_timeout=_get(li, "listener", "network_timeout", float, "seconds > 0", check=pos),
        pdu_timeout=_get(li, "listener", "pdu_timeout", float, "seconds > 0", check=pos),
        fast_receive=_get({"fast_receive": li.get("fast_receive", True)}, "listener", "fast_receive", bool,
                          "true or false"),
        ssl_context=ssl_ctx,
    )
    stale = _get(li, "listener", "stale_temp_minutes", float, "minutes > 0", check=pos)
    root = Path(_get(st, "store", "root", str, "a folder path", check=bool))
    root = root if root.is_absolute() else base / root
    spool_dir = Path(st.get("spool_dir") or root / "spool")
    db_path = Path(st.get("db") or root / "jobs.sqlite3")
    store_root = root
    keep_hours = _get(st, "store", "keep_hours", float, "hours >= 0, or -1 to keep files forever",
                      check=lambda v: v >= 0 or v == -1)
    policy = RetryPolicy(
        max_attempts=_get(rt, "routing", "max_attempts", int, "a positive integer", check=pos),
        backoff_initial=_get(rt, "routing", "backoff_initial_seconds", float, "seconds > 0", check=pos),
        backoff_max=_get(rt, "routing", "backoff_max_seconds", float, "seconds > 0", check=pos),
    )
    specs = rt.get("destinations")
    if not isinstance(specs, list):
        raise ConfigError(MSG_SECTION_TYPE.format(section="routing", key="destinations",
                                                  what="a list of destination tables", value=specs))
    destinations = [build_destination(s, calling_ae=ae_title, base_dir=base) for s in specs]
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"[routing] destinations have duplicate names: {names}")
    fhir_destinations = [d.name for d in destinations if d.kind == "fhir"]
    if fhir_destinations:  # a patient the FHIR server cannot match is worse than no delivery
        from cxr_ai.fhir import FhirOptions, require_patient_system

        require_patient_system(FhirOptions.from_config(config), destination=fhir_destinations[0])
    pipeline = _get(wk, "workers", "pipeline", str, "'package.module:Name'", check=lambda v: ":" in v)
    return ServiceSettings(
        listener=listener,
        spool_dir=spool_dir if spool_dir.is_absolute() else base / spool_dir,
        db_path=db_path if db_path.is_absolute() else base / db_path,
        store_root=store_root,
        quiet_seconds=_get(st, "store", "quiet_seconds", float, "seconds >= 0", check=nonneg),
        max_open_seconds=_get(st, "store", "max_open_seconds", float, "seconds > 0", check=pos),
        keep_seconds=None if keep_hours == -1 else keep_hours * 3600.0,
        sqlite_synchronous=_get(st, "store", "sqlite_synchronous", str, "'full' or 'normal'",
                                check=lambda v: v.lower() in ("full", "normal")).lower(),
        workers=_get(wk, "workers", "count", int, "a positive integer", check=pos),
        max_batch_studies=_get(wk, "workers", "max_batch_studies", int, "a positive integer", check=pos),
        worker_poll_seconds=_get(wk, "workers", "poll_seconds", float, "seconds > 0", check=pos),
        pipeline_retry_seconds=_get(wk, "workers", "pipeline_retry_seconds", float, "seconds > 0", check=pos),
        idle_start=_get(wk, "workers", "idle_start", bool, "true or false"),
        max_attempts=_get(wk, "workers", "max_attempts", int, "a positive integer", check=pos),
        pipeline=pipeline,
        shutdown_grace_seconds=_get(wk, "workers", "shutdown_grace_seconds", float, "seconds >= 0", check=nonneg),
        routing_policy=policy,
        routing_poll_seconds=_get(rt, "routing", "poll_seconds", float, "seconds > 0", check=pos),
        destinations=destinations,
        http_enabled=_get(ht, "http", "enabled", bool, "true or false"),
        http_host=_get(ht, "http", "host", str, "a host name or address"),
        http_port=_get(ht, "http", "port", int, "a TCP port (0-65535; 0 picks a free one)", check=port_ok),
        stale_temp_seconds=stale * 60.0,
    )


def import_factory(spec: str) -> PipelineFactory:
    """Resolve ``'package.module:Name'`` to a callable (the pipeline factory)."""
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(MSG_BAD_PIPELINE.format(spec=spec, detail=f"{type(exc).__name__}: {exc}")) from exc
    if not callable(obj):
        raise ConfigError(MSG_BAD_PIPELINE.format(spec=spec, detail="not callable"))
    if isinstance(obj, type) and not callable(getattr(obj, "process_study", None)):
        # A class is checked here, at start; a factory function's product when a worker builds it.
        raise ConfigError(MSG_NOT_A_PIPELINE.format(what=f"[workers] pipeline = {spec!r}"))
    return obj


# -- the service ------------------------------------------------------------------------------
class Service:
    """The running service. ``start()`` returns once everything listens; ``stop()`` is graceful.

    Parameters
    ----------
    config
        A full configuration (:func:`cxr_ai.config.load_config`).
    pipeline_factory
        Callable ``factory(config=...)`` returning an object with ``process_study(paths)``;
        default: the ``[workers] pipeline`` import path (``cxr_ai.pipeline:Pipeline``).
    base_dir
        Folder that relative paths in the configuration are relative to.
    """

    def __init__(self, config: Mapping[str, Any], *, pipeline_factory: PipelineFactory | None = None,
                 base_dir: str | os.PathLike | None = None, own_tempdir: bool = False) -> None:
        self.config = config
        self.own_tempdir = own_tempdir
        self.settings = validate_config(config, base_dir=base_dir)
        s = self.settings
        self.factory = pipeline_factory or import_factory(s.pipeline)
        self.spool = Spool(s.spool_dir)
        self.store = JobStore(s.db_path, synchronous=s.sqlite_synchronous)
        self.metrics = ServiceMetrics(counts=self.store.counts, spool_root=self.spool.root)
        self.router = Router(store=self.store, destinations=s.destinations, policy=s.routing_policy,
                             poll_seconds=s.routing_poll_seconds, metrics=self.metrics)
        self.workers = WorkerPool(store=self.store, spool=self.spool, router=self.router,
                                  pipeline_factory=self.factory, config=config, settings=s, metrics=self.metrics)
        self.scp = StorageSCP(settings=s.listener, spool=self.spool, store=self.store,
                              quiet_seconds=s.quiet_seconds, metrics=self.metrics, on_studies_closed=self.workers.wake)
        self.monitor_runner = self._monitor_runner(config)
        from cxr_ai.ops import OpsCollector

        self.metrics.registry.register(OpsCollector(db_path=s.db_path, config=config,
                                                    min_free_bytes=s.listener.min_free_bytes))
        self._http: Any = None  # cxr_ai.web.server.WebServer (pages, /healthz, /metrics, /status)
        self._janitor: threading.Thread | None = None
        self._stopped = threading.Event()
        self.started_at: float | None = None

    def _monitor_runner(self, config: Mapping[str, Any]) -> Any:
        """The scheduled performance monitor (``[monitoring]``), its values in ``/metrics``;
        None when monitoring is off."""
        import copy

        from cxr_ai.monitoring.runner import MonitorCollector, runner_from_config

        mon = config.get("monitoring", {})
        if not mon.get("enabled", True):
            return None
        cfg = copy.deepcopy(dict(config))
        cfg.setdefault("store", {})["root"] = str(self.settings.store_root)  # as the prediction log
        token = ""
        if mon.get("fhir_truth_token_env"):
            token = os.environ.get(str(mon["fhir_truth_token_env"]), "")
            if not token:
                raise ConfigError(f"[monitoring] fhir_truth_token_env names {mon['fhir_truth_token_env']}, "
                                  "which is not set")
        runner = runner_from_config(cfg, token=token)
        self.metrics.registry.register(MonitorCollector(runner))
        return runner

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of ``/metrics`` (service, job store and monitor)."""
        return self.metrics.render()

    @property
    def dicom_port(self) -> int:
        return self.scp.port

    @property
    def http_port(self) -> int | None:
        return self._http.bound_port if self._http is not None else None

    @property
    def http_url(self) -> str | None:
        """The web pages' base URL (``http(s)://host:port/``), or None when HTTP is off."""
        if self._http is None:
            return None
        return f"{self._http.scheme}://{self.settings.http_host}:{self.http_port}/"

    def start(self) -> Service:
        if self.own_tempdir and not os.environ.get("TMPDIR"):
            # Process-wide, so only when this process is the service (serve_main): pynetdicom
            # streams each data set to a temp file; on the spool's file system the commit is a
            # rename, not a copy.
            tempfile.tempdir = str(self.spool.tmp)
        n = self.spool.clear_incoming()
        if n:
            logger.info("removed %d partial files left in the spool by an interrupted run", n)
        self.store.recover(quiet_seconds=self.settings.quiet_seconds)
        self.reconcile_spool()
        self.router.start()
        self.workers.start()
        self._janitor = threading.Thread(target=self._janitor_loop, name="cxr-ai-janitor", daemon=True)
        self._janitor.start()
        if self.monitor_runner is not None:
            self.monitor_runner.start()
        if self.settings.http_enabled:
            from cxr_ai.web import WebServer, context_for, create_app

            web = context_for(self)
            self._http = WebServer(create_app(web), host=self.settings.http_host, port=self.settings.http_port,
                                   settings=web.settings)
            self._http.start()
            logger.info("worklist on %s://%s:%d/, health and metrics on /healthz and /metrics", self._http.scheme,
                        self.settings.http_host, self.http_port)
        self.scp.start()
        self.started_at = time.time()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop receiving, let workers finish (or re-queue), stop routing and HTTP."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        logger.info("stopping: no new associations; waiting up to %.0f s for running studies", grace)
        # the workers get the grace less what the rest of the stop takes (routing, HTTP, the
        # job store), so that all of it fits in shutdown_grace_seconds
        deadline = time.monotonic() + grace - min(STOP_TAIL_SECONDS, grace / 2)
        self.scp.stop()
        self.workers.stop(max(0.0, deadline - time.monotonic()))
        self.router.stop(timeout=min(grace, 10.0) if grace else 1.0)
        if self.monitor_runner is not None:
            self.monitor_runner.stop()
        if self._http is not None:
            self._http.stop()
        if self._janitor is not None:
            self._janitor.join(5.0)
        self.store.close()
        logger.info("stopped")

    def reconcile_spool(self) -> int:
        """Record spooled instances the job store does not know (a transaction lost to a power
        failure with ``sqlite_synchronous = "normal"``). Returns how many were recorded."""
        from pydicom.filereader import read_file_meta_info

        from cxr_ai.dicom.uids import patient_study_fingerprint
        from cxr_ai.net.scp import DatasetProblem, inspect_received

        missing = self.store.unrecorded_paths(self.spool.instance_files())
        keys = []
        for path in missing:
            try:
                meta = read_file_meta_info(path)
                info = inspect_received(path, affected_sop_class=str(meta.MediaStorageSOPClassUID),
                                        affected_sop_instance=str(meta.MediaStorageSOPInstanceUID))
            except (DatasetProblem, OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
                logger.error("spool file %s is unreadable (%s); left in place for inspection", path, exc)
                continue
            study_key = safe_key(info.study_instance_uid)
            self.store.record_instance(study_key=study_key, study_uid=info.study_instance_uid,
                                       sop_key=Path(path).stem, sop_uid=info.sop_instance_uid,
                                       sop_class_uid=info.sop_class_uid, path=path, size=info.size,
                                       patient_fp=patient_study_fingerprint(
                                           study_instance_uid=info.study_instance_uid, patient_id=info.patient_id,
                                           issuer_of_patient_id=info.issuer_of_patient_id))
            keys.append(study_key)
        if keys:
            self.store.association_closed(keys, quiet_seconds=self.settings.quiet_seconds)
            logger.warning("re-recorded %d spooled instances the job store had lost", len(keys))
        return len(keys)

    def _janitor_loop(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopped.wait(0.5):
            try:
                self.housekeeping()
                if time.monotonic() - last_sweep >= SWEEP_SECONDS:
                    last_sweep = time.monotonic()
                    n = self.spool.clear_incoming(older_than=self.settings.stale_temp_seconds)
                    if n:
                        logger.warning("removed %d stale temporary files from the spool", n)
            except Exception:  # broad on purpose: housekeeping retries on its next round
                logger.exception("housekeeping failed; will retry")

    def housekeeping(self) -> None:
        """Release stale studies, finish sent ones, apply spool retention."""
        s = self.settings
        if self.store.release_stale(max_open_seconds=s.max_open_seconds, quiet_seconds=s.quiet_seconds):
            self.workers.wake()
        for study in self.store.finish_sent():
            self.metrics.studies_finished.labels("done").inc()
            logger.info("job %s: results sent; done", study.job_id)
        if s.keep_seconds is not None:
            for study in self.store.expired_files(keep_seconds=s.keep_seconds):
                self.spool.remove_study_files(study.study_key)
                self.spool.remove_results(study.job_id)
                self.store.mark_files_removed(study.study_key)

    def health_check(self) -> tuple[bool, list[str]]:
        """(ok, reasons) of the listener's own conditions: today the spool's free space
        against ``[listener] min_free_mb`` (below it every C-STORE is answered 0xA700)."""
        return self.spool.check_space(min_free_bytes=int(self.scp.settings.min_free_bytes))

    def health(self) -> dict[str, Any]:
        problems = list(self.workers.errors)
        if not self.workers.alive() and not self._stopped.is_set():
            problems.append("a worker thread stopped")
        try:
            counts = self.store.counts()
        except Exception as exc:  # noqa: BLE001 - reported as unhealthy
            problems.append(f"job store unavailable: {type(exc).__name__}")
            counts = None
        space_ok, degraded = self.health_check()
        status = "unhealthy" if problems else "ok" if space_ok else "degraded"
        return {"status": status, "problems": problems + degraded,
                "dicom_port": self.dicom_port, "ae_title": self.settings.listener.ae_title,
                "queue_depth": counts["studies"]["received"] if counts else None,
                "dead_letters": counts["outbox"]["dead"] if counts else None}

    def status(self) -> dict[str, Any]:
        return {"counts": self.store.counts(),
                "dead_letters": [{"job_id": d.job_id, "destination": d.destination, "attempts": d.attempts,
                                  "error": d.last_error} for d in self.store.deliveries(state=DeliveryState.DEAD)],
                **recent_problems(self.store)}

    def wait_idle(self, *, timeout: float, expected_instances: int | None = None) -> bool:
        """Block until every study is final (tests, demo). True if reached in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.store.counts()
            busy = sum(counts["studies"][s.value] for s in (StudyState.RECEIVED, StudyState.PROCESSING,
                                                             StudyState.SENDING, StudyState.RESULTS_SENT))
            n_inst = sum(counts["instances"].values())
            if busy == 0 and (expected_instances is None or n_inst >= expected_instances):
                return True
            time.sleep(0.1)
        return False


# -- logging ----------------------------------------------------------------------------------
class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (no PHI is ever logged at INFO)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage(), "thread": record.threadName}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(*, verbosity: int = 0, json_lines: bool = False) -> None:
    """Configure the root logger for the service process (only the CLI calls this)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO - 10 * verbosity if verbosity >= 0 else logging.WARNING)
    # Libraries that log UIDs at INFO: quiet unless asked for debugging (-vv).
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING if verbosity < 2 else logging.DEBUG)


# -- entry points -----------------------------------------------------------------------------
#: Least time a signalled process is given to stop cleanly (closing the job store) before it
#: exits regardless; otherwise ``shutdown_grace_seconds``.
SHUTDOWN_MIN_SECONDS = 2.0


def _exit_after(seconds: float) -> None:
    """End the process ``seconds`` from now if it is still running (a daemon timer): the
    bound on a shutdown, whatever a peer, a delivery or a worker is doing then."""

    def expire() -> None:
        logger.error("shutdown did not finish within %.0f s; exiting now (interrupted studies are re-queued at "
                     "the next start)", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def run_service(config: Mapping[str, Any], *, pipeline_factory: PipelineFactory | None = None,
                base_dir: str | os.PathLike | None = None, ready: Callable[[Service], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the exit code.

    This owns the process: it installs signal handlers and points ``tempfile`` at the spool.
    """
    service = Service(config, pipeline_factory=pipeline_factory, base_dir=base_dir, own_tempdir=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        if not stop.is_set():
            _exit_after(max(service.settings.shutdown_grace_seconds, SHUTDOWN_MIN_SECONDS))
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.start()
        if ready is not None:
            ready(service)
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        busy = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.current_thread()]
        if busy:
            logger.warning("stopped; threads still ending: %s", ", ".join(busy))
        # The process ends next: its final garbage collection of every loaded module (torch,
        # MONAI) took seconds of the shutdown grace, for memory the system reclaims anyway.
        gc.freeze()
    return 0
