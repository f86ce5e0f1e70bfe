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
from pathlib import Path
from typing import Any

import pydicom

from cxr_ai.contract import MSG_NOT_A_PIPELINE, PipelineFactory
from cxr_ai.errors import ConfigError
from cxr_ai.service.metrics import ServiceMetrics
from cxr_ai.service.routing import Router
from cxr_ai.service.settings import (  # the settings' names are also this module's (cxr_ai.service)
    MSG_AE_TITLE as MSG_AE_TITLE,
    MSG_SECTION_TYPE as MSG_SECTION_TYPE,
    ServiceSettings as ServiceSettings,
    validate_config,
)
from cxr_ai.net.scp import StorageSCP
from cxr_ai.store.jobs import (
    DeliveryState,
    JobStore,
    StudyState,
)
from cxr_ai.store.listing import recent_problems
from cxr_ai.store.spool import Spool, safe_key
from cxr_ai.service.workers import WorkerPool

logger = logging.getLogger(__name__)

MSG_BAD_PIPELINE = (
    "[workers] pipeline = {spec!r} cannot be imported ({detail}); give 'package.module:Name' of a "
    "class or function that accepts config= and returns an object with process_study(paths)"
)


#: Seconds of the shutdown grace kept for stopping routing and HTTP and closing the job store.
STOP_TAIL_SECONDS = 1.5
#: Seconds between two sweeps of stale temporary files while the service runs.
SWEEP_SECONDS = 60.0


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
        A full configuration (:attr:`cxr_ai.config.Settings.config`, or a plain mapping).
    secrets
        Values of the environment variables the configuration names in ``token_env`` and
        ``fhir_truth_token_env`` (:attr:`cxr_ai.config.Settings.secrets`); nothing here reads
        the environment. A named variable missing from it is a :class:`ConfigError`.
    pipeline_factory
        Callable ``factory(config=...)`` returning an object with ``process_study(paths)``;
        default: the ``[workers] pipeline`` import path (``cxr_ai.pipeline:Pipeline``).
    base_dir
        Folder that relative paths in the configuration are relative to.
    own_tempdir
        Point the process's :mod:`tempfile` at the spool on start (only when this process is
        the service, and the environment names no ``TMPDIR``: :func:`run_service`).
    """

    def __init__(self, config: Mapping[str, Any], *, secrets: Mapping[str, str] | None = None,
                 pipeline_factory: PipelineFactory | None = None, base_dir: str | os.PathLike | None = None,
                 own_tempdir: bool = False) -> None:
        self.config = config
        self.own_tempdir = own_tempdir
        self.secrets: Mapping[str, str] = dict(secrets or {})
        self.settings = validate_config(config, base_dir=base_dir, secrets=self.secrets)
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
        self._http: Any = None  # cxr_ai.service.web.server.WebServer (pages, /healthz, /metrics, /status)
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
            token = self.secrets.get(str(mon["fhir_truth_token_env"]), "")
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
        if self.own_tempdir:
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
            from cxr_ai.service.web import WebServer, context_for, create_app

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
            fingerprint = patient_study_fingerprint(study_instance_uid=info.study_instance_uid,
                                                    patient_id=info.patient_id,
                                                    issuer_of_patient_id=info.issuer_of_patient_id)
            # the study (one patient's) is found or made as on receipt; the file stays where it is
            study = self.store.record_instance(study_key=safe_key(info.study_instance_uid),
                                               study_uid=info.study_instance_uid, sop_key=Path(path).stem,
                                               sop_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
                                               path=path, size=info.size, patient_fp=fingerprint)
            keys.append(study.study_key)
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
                    self.sweep()
            except Exception:  # broad on purpose: housekeeping retries on its next round
                logger.exception("housekeeping failed; will retry")

    def sweep(self) -> None:
        """Once a minute, whether studies arrive or not: remove stale temporary files from the
        spool, and blank worklist demographics whose ``[worklist] demographics_keep_hours``
        have passed (an idle service keeps none past their time)."""
        n = self.spool.clear_incoming(older_than=self.settings.stale_temp_seconds)
        if n:
            logger.warning("removed %d stale temporary files from the spool", n)
        purged = self.workers.recorder.purge_demographics()
        if purged:
            logger.info("blanked the demographics of %d worklist studies past their retention", purged)

    def housekeeping(self) -> None:
        """Release stale studies, finish sent ones, apply spool retention (``[store] keep_hours``:
        received files go and results are cut down to headers; ``retract_keep_hours`` later
        the headers go too)."""
        s = self.settings
        if self.store.release_stale(max_open_seconds=s.max_open_seconds, quiet_seconds=s.quiet_seconds):
            self.workers.wake()
        for study in self.store.finish_sent():
            self.metrics.studies_finished.labels("done").inc()
            logger.info("job %s: results sent; done", study.job_id)
        if s.keep_seconds is not None:
            for study in self.store.expired_files(keep_seconds=s.keep_seconds):
                self.spool.remove_instance_files(i.path for i in self.store.instances(study.study_key))
                self.spool.strip_results(study.job_id)  # headers and FHIR bundles stay, for retract
                self.store.mark_files_removed(study.study_key)
            if s.retract_keep_seconds is not None:
                for study in self.store.expired_results(keep_seconds=s.keep_seconds + s.retract_keep_seconds):
                    self.spool.remove_results(study.job_id)
                    self.store.mark_results_removed(study.study_key)

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


def run_service(config: Mapping[str, Any], *, secrets: Mapping[str, str] | None = None,
                pipeline_factory: PipelineFactory | None = None, base_dir: str | os.PathLike | None = None,
                ready: Callable[[Service], None] | None = None, own_tempdir: bool = True) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the exit code.

    This owns the process: it installs signal handlers and, with ``own_tempdir`` (the CLI passes
    False when the environment sets ``TMPDIR``), points ``tempfile`` at the spool.
    """
    service = Service(config, secrets=secrets, pipeline_factory=pipeline_factory, base_dir=base_dir,
                      own_tempdir=own_tempdir)
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
