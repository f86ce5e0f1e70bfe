"""``cxr-ai serve``: the listener service (SCP + job store + workers + routing + HTTP).

Wiring only; the parts live in :mod:`cxr_ai.net` and :mod:`cxr_ai.store`::

    PACS --C-STORE--> StorageSCP --spool+job store--> WorkerPool --pipeline--> results/ + outbox
                                                                                    |
                                               Router (one thread per destination) <-+--> PACS / STOW / FHIR / folder

``serve_main(argv)`` starts it with the embedded defaults when no config is given (demo
bundle, SQLite and spool under ``./var``, results to ``./var/out``). ``demo_main(argv)``
runs the whole loop on a few phantom studies.
"""

from __future__ import annotations

import importlib
import copy
import io
import inspect
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from cxr_ai.errors import ConfigError
from cxr_ai.net.metrics import ServiceMetrics
from cxr_ai.net.routing import Destination, RetryPolicy, Router, build_destination
from cxr_ai.net.scp import ListenerSettings, StorageSCP
from cxr_ai.net.tls import server_context
from cxr_ai.store.jobs import (
    ClaimedStudy,
    DeliveryState,
    InstanceResult,
    InstanceState,
    JobStore,
    NewDelivery,
    StudyState,
)
from cxr_ai.store.spool import Spool, safe_key

logger = logging.getLogger(__name__)

MSG_SECTION_TYPE = "[{section}] {key} must be {what}, got {value!r}"
MSG_BAD_PIPELINE = (
    "[workers] pipeline = {spec!r} cannot be imported ({detail}); give 'package.module:Name' of a "
    "class or function that accepts config= and returns an object with process_study(paths)"
)
MSG_AE_TITLE = "[{section}] {key} {value!r} is not a valid AE title (1-16 characters, no backslash or control characters)"

PipelineFactory = Callable[..., Any]


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
        acse_timeout=_get(li, "listener", "acse_timeout", float, "seconds > 0", check=pos),
        dimse_timeout=_get(li, "listener", "dimse_timeout", float, "seconds > 0", check=pos),
        network_timeout=_get(li, "listener", "network_timeout", float, "seconds > 0", check=pos),
        ssl_context=ssl_ctx,
    )
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
    return obj


# -- workers ----------------------------------------------------------------------------------
def _status_of(outcome: Any) -> InstanceState:
    value = getattr(outcome.status, "value", outcome.status)
    return {"processed": InstanceState.PROCESSED, "not_applicable": InstanceState.NOT_APPLICABLE}.get(
        str(value), InstanceState.FAILED)


def _result_summary(outcome: Any) -> dict[str, Any] | None:
    result = getattr(outcome, "result", None)
    if result is None:
        return None
    summary: dict[str, Any] = {}
    findings = getattr(result, "findings", None)
    if findings:
        summary["findings"] = [f.to_dict() for f in findings]
    model = getattr(result, "model", None)
    if model is not None:
        summary["model"] = getattr(model, "label", str(model))
    decision = getattr(result, "decision", None)
    if decision is not None and hasattr(decision, "to_dict"):
        summary["decision"] = decision.to_dict()
    return summary or None


def _dataset_bytes(ds: Dataset) -> bytes:
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


_PREFIX_BY_SOP_CLASS = (
    ("1.2.840.10008.5.1.4.1.1.88.", "SR"),   # Structured Report Storage classes
    ("1.2.840.10008.5.1.4.1.1.30", "PM"),    # Parametric Map Storage
    ("1.2.840.10008.5.1.4.1.1.7", "SC"),     # Secondary Capture Image Storage classes
)


def _kind_prefix(ds: Dataset) -> str:
    """File name prefix of a result object: SR, SC, PM, else its modality."""
    sop_class = str(ds.get("SOPClassUID", ""))
    for prefix, name in _PREFIX_BY_SOP_CLASS:
        if sop_class.startswith(prefix):
            return name
    return "".join(c for c in str(ds.get("Modality", "") or "OBJ") if c.isalnum())[:8] or "OBJ"


class ResultRecorder:
    """After a study is processed: the prediction log (``[monitoring]``) and the triage
    worklist (``[worklist]``). Both are secondary records: a failure here is logged and
    counted, and never fails the study or loses its results."""

    def __init__(self, config: Mapping[str, Any], settings: ServiceSettings) -> None:
        from cxr_ai.monitoring.log import PredictionLog, resolve_pseudonym_key
        from cxr_ai.worklist import TriagePolicy, Worklist

        # Relative monitoring paths follow the service's resolved store root.
        cfg = copy.deepcopy(dict(config))
        cfg.setdefault("store", {})["root"] = str(settings.store_root)
        mon = cfg.get("monitoring", {})
        self.log: Any = None
        if mon.get("enabled", True):
            folder = Path(mon.get("dir") or settings.store_root / "monitoring")
            self.log = PredictionLog(folder / mon.get("prediction_log", "predictions.jsonl"),
                                     key=resolve_pseudonym_key(cfg))
        wl_path = Path(cfg.get("worklist", {}).get("path") or settings.store_root / "worklist.sqlite3")
        self.worklist = Worklist(wl_path, policy=TriagePolicy.from_config(cfg))
        self.errors = 0

    def record(self, outcomes: Sequence[Any], received_at: float | None) -> None:
        study_uid, findings, report_uid, pkey, accession = "", [], "", "", ""
        for o in outcomes:
            rg, result = getattr(o, "radiograph", None), getattr(o, "result", None)
            if rg is None or result is None:
                continue
            try:
                if self.log is not None:
                    record = self.log.log_prediction(rg, result, source="listener")
                    pkey = pkey or record.get("patient_key", "")
            except (OSError, ValueError, TypeError) as exc:
                self.errors += 1
                logger.error("prediction log write failed (%s); the study's results are unaffected", type(exc).__name__)
            if result.findings:
                study_uid = study_uid or rg.study_instance_uid
                accession = accession or rg.accession_number
                findings.extend(result.findings)
                sr = next((ds for ds in getattr(o, "datasets", []) if str(ds.get("Modality", "")) == "SR"), None)
                report_uid = report_uid or (str(sr.SOPInstanceUID) if sr is not None else "")
        if not findings:
            return
        try:
            self.worklist.upsert_study(study_uid, findings, received_at=received_at, accession=accession,
                                       patient_key=pkey, report_uid=report_uid)
        except (OSError, ValueError, sqlite3.Error) as exc:
            self.errors += 1
            logger.error("worklist update failed (%s); the study's results are unaffected", type(exc).__name__)


class WorkerPool:
    """Threads that take ready studies from the job store and run the pipeline on them."""

    def __init__(self, *, store: JobStore, spool: Spool, router: Router, pipeline_factory: PipelineFactory,
                 config: Mapping[str, Any], settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.store = store
        self.spool = spool
        self.router = router
        self.factory = pipeline_factory
        self.config = config
        self.settings = settings
        self.metrics = metrics
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inflight: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._pipelines: dict[int, Any] = {}
        self.errors: list[str] = []
        self.recorder = ResultRecorder(config, settings)

    def start(self) -> None:
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._run, name=f"cxr-ai-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._stop.is_set()

    def stop(self, grace: float) -> None:
        """Finish the current studies within ``grace`` seconds; re-queue what is still running."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = [k for keys in self._inflight.values() for k in keys]
        if left:
            logger.warning("shutdown: %d studies still processing after %.0f s; re-queued", len(left), grace)
            self.store.requeue(left)

    def _pipeline(self) -> Any:
        ident = threading.get_ident()
        if ident not in self._pipelines:
            self._pipelines[ident] = self.factory(config=self.config)
        return self._pipelines[ident]

    def _build_pipeline(self) -> Any | None:
        """Build this worker's pipeline, retrying with backoff until it works or we stop.

        While it fails, the error is on ``/healthz`` and studies stay queued (nothing is lost);
        once it works (e.g. the model bundle is back) the error is cleared.
        """
        delay = self.settings.pipeline_retry_seconds
        while not self._stop.is_set():
            try:
                pipeline = self._pipeline()
            except Exception as exc:  # broad on purpose: reported on /healthz; receiving goes on
                message = f"pipeline could not be built: {type(exc).__name__}: {exc}"
                with self._lock:
                    if message not in self.errors:
                        self.errors.append(message)
                logger.error("worker could not build the pipeline (%s); studies stay queued; retrying in %.0f s",
                             type(exc).__name__, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 600.0)
                continue
            with self._lock:
                self.errors[:] = [e for e in self.errors if not e.startswith("pipeline could not be built")]
            return pipeline
        return None

    def _run(self) -> None:
        pipeline = self._build_pipeline()
        if pipeline is None:
            return
        while not self._stop.is_set():
            try:
                claims = self.store.claim_ready(limit=self.settings.max_batch_studies)
                if not claims and self.settings.idle_start:
                    claims = self.store.claim_ready(limit=self.settings.max_batch_studies, within_quiet=True)
            except Exception:  # broad on purpose: e.g. database locked longer than busy_timeout; retried
                logger.exception("could not claim studies; retrying")
                claims = []
            if not claims:
                timeout = self.settings.worker_poll_seconds
                try:
                    nxt = self.store.next_ready_at()
                except Exception:  # noqa: BLE001 - fall back to polling
                    nxt = None
                if nxt is not None:
                    timeout = max(0.002, min(timeout, nxt - time.time()))
                self._wake.wait(timeout)
                self._wake.clear()
                continue
            with self._lock:
                self._inflight[threading.get_ident()] = [c.study.study_key for c in claims]
            try:
                self.process(pipeline, claims)
            except Exception as exc:  # broad on purpose: e.g. spool full while writing results; re-queued
                logger.exception("worker failed while recording results; studies go back to the queue")
                for c in claims:
                    try:
                        self.store.fail_processing(c.study.study_key, max_attempts=self.settings.max_attempts,
                                                   reason=f"recording results failed: {type(exc).__name__}: {exc}"[:2000])
                    except Exception:  # broad on purpose: recovered at the next start
                        logger.exception("could not re-queue job %s", c.study.job_id)
            finally:
                with self._lock:
                    self._inflight.pop(threading.get_ident(), None)

    def process(self, pipeline: Any, claims: Sequence[ClaimedStudy]) -> None:
        """Run the pipeline over the claimed studies (one batch) and record the outcomes.

        A pipeline that takes ``on_results`` (the default one) hands over each image's SR and
        FHIR objects as soon as they are built; they are written and queued for delivery at
        once, while the heatmap objects are still being computed (they follow with the rest).
        """
        now = time.time()
        for c in claims:
            if c.study.ready_at:
                self.metrics.stage_seconds.labels("queue_wait").observe(max(0.0, now - c.study.ready_at))
        paths = [Path(i.path) for c in claims for i in c.instances]
        early: dict[str, set[str]] = {}  # job id -> result file names already queued

        def on_results(outcomes: Sequence[Any]) -> None:
            self._queue_first_results(claims, outcomes, early)

        t0 = time.perf_counter()
        try:
            if not paths:
                outcomes = []
            elif _takes_on_results(pipeline):
                outcomes = list(pipeline.process_study(paths, on_results=on_results))
            else:
                outcomes = list(pipeline.process_study(paths))
        except Exception as exc:  # broad on purpose: a pipeline bug must not stop the worker
            if len(claims) > 1:
                logger.warning("batch of %d studies failed (%s); retrying them one by one",
                               len(claims), type(exc).__name__)
                for c in claims:
                    self.process(pipeline, [c])
                return
            c = claims[0]
            reason = f"pipeline error: {type(exc).__name__}: {exc}"
            state = self.store.fail_processing(c.study.study_key, reason=reason[:2000],
                                               max_attempts=self.settings.max_attempts)
            logger.exception("job %s: pipeline raised (%s)", c.study.job_id, state.value)
            if state is StudyState.FAILED:
                self.metrics.studies_finished.labels("failed").inc()
            return
        elapsed = time.perf_counter() - t0
        if paths:
            self.metrics.stage_seconds.labels("process_per_instance").observe(elapsed / len(paths))
        for c, pairs in _pair(claims, outcomes):
            self._finish_study(c, pairs, skip=early.get(c.study.job_id, set()))
        self.router.wake()

    def _result_files(self, job: str, inst_key: str, outcome: Any, skip: set[str]) -> list[Path]:
        """Write an outcome's result objects into the job's result folder (names not in ``skip``)."""
        files: list[Path] = []
        for ds in getattr(outcome, "datasets", None) or []:
            name = f"{_kind_prefix(ds)}-{safe_key(str(ds.SOPInstanceUID))}.dcm"
            if name not in skip:
                files.append(self.spool.write_result(job, name, _dataset_bytes(ds)))
        bundle = getattr(outcome, "fhir_bundle", None)
        name = f"fhir-{inst_key}.json"
        if bundle and name not in skip:
            files.append(self.spool.write_result(job, name, json.dumps(bundle, indent=1).encode("utf-8")))
        return files

    def _deliveries(self, files: Sequence[Path]) -> list[NewDelivery]:
        deliveries = []
        for name in self.router.destinations:
            items = self.router.items_for(name, files)
            if items:
                deliveries.append(NewDelivery(name, items))
        return deliveries

    def _queue_first_results(self, claims: Sequence[ClaimedStudy], outcomes: Sequence[Any],
                             early: dict[str, set[str]]) -> None:
        """Write and queue the SR / FHIR objects built so far; the study stays processing.

        A failure here only delays those objects: they are written and queued again with the
        rest of the study's results.
        """
        try:
            for c, pairs in _pair(claims, outcomes):
                job = c.study.job_id
                files = [f for inst, o in pairs if o is not None for f in self._result_files(job, inst.sop_key, o, set())]
                if not files:
                    continue
                self.store.queue_deliveries(c.study.study_key, self._deliveries(files))
                early.setdefault(job, set()).update(f.name for f in files)
                self.metrics.stage_seconds.labels("received_to_first_results").observe(
                    max(0.0, time.time() - c.study.last_received_at))
            self.router.wake()
        except Exception:  # broad on purpose: e.g. spool full; everything goes out with the rest
            logger.exception("first results could not be queued early; they go with the study's other results")

    def _finish_study(self, claim: ClaimedStudy, pairs: list[tuple[Any, Any]], *, skip: set[str] = frozenset()) -> None:
        job = claim.study.job_id
        files: list[Path] = []
        results: list[InstanceResult] = []
        counts: dict[str, int] = {}
        for inst, outcome in pairs:
            if outcome is None:
                results.append(InstanceResult(inst.sop_key, InstanceState.FAILED, "pipeline returned no outcome"))
                counts["failed"] = counts.get("failed", 0) + 1
                continue
            state = _status_of(outcome)
            counts[state.value] = counts.get(state.value, 0) + 1
            reason = str(getattr(outcome, "reason", "") or "")
            files.extend(self._result_files(job, inst.sop_key, outcome, skip))
            results.append(InstanceResult(inst.sop_key, state, reason[:500], _result_summary(outcome)))
        if files or skip:
            summary = {"job_id": job, "instances": [
                {"instance": i, "state": r.state.value, "reason": r.reason, "result": r.result}
                for i, r in enumerate(results)]}
            files.append(self.spool.write_result(job, "summary.json", json.dumps(summary, indent=1).encode()))
        deliveries = self._deliveries(files)
        state = self.store.complete_processing(claim.study.study_key, results=results, deliveries=deliveries)
        self.recorder.record([o for _, o in pairs if o is not None], received_at=claim.study.created_at)
        for outcome_name, n in counts.items():
            self.metrics.instances_processed.labels(outcome_name).inc(n)
        if state in (StudyState.NOT_APPLICABLE, StudyState.FAILED):
            self.metrics.studies_finished.labels(state.value).inc()
        logger.info("job %s: %d instances processed (%s); %d result files (%d sent ahead) for %d destinations; "
                    "study %s", job, len(pairs), ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                    len(files) + len(skip), len(skip), len(deliveries), state.value)


def _pair(claims: Sequence[ClaimedStudy], outcomes: Sequence[Any]) -> list[tuple[ClaimedStudy, list[tuple[Any, Any]]]]:
    """Each claimed study with its (instance, outcome) pairs: by position, else by SOP Instance UID."""
    n = sum(len(c.instances) for c in claims)
    by_index = outcomes if len(outcomes) == n else None
    by_uid = {str(getattr(o, "sop_instance_uid", "")): o for o in outcomes}
    k = 0
    paired = []
    for c in claims:
        pairs = []
        for inst in c.instances:
            pairs.append((inst, by_index[k] if by_index is not None else by_uid.get(inst.sop_uid)))
            k += 1
        paired.append((c, pairs))
    return paired


def _takes_on_results(pipeline: Any) -> bool:
    """Whether ``pipeline.process_study`` accepts ``on_results`` (custom pipelines may not)."""
    try:
        return "on_results" in inspect.signature(pipeline.process_study).parameters
    except (TypeError, ValueError):
        return False


# -- HTTP -------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    service: Service

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        svc = self.service
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            health = svc.health()
            self._send(200 if health["status"] == "ok" else 503, json.dumps(health).encode(), "application/json")
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            self._send(200, svc.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/status":
            self._send(200, json.dumps(svc.status()).encode(), "application/json")
        else:
            self._send(404, b'{"error": "not found; try /healthz, /metrics or /status"}', "application/json")


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
        self._http: ThreadingHTTPServer | None = None
        self._janitor: threading.Thread | None = None
        self._stopped = threading.Event()
        self.started_at: float | None = None

    @property
    def dicom_port(self) -> int:
        return self.scp.port

    @property
    def http_port(self) -> int | None:
        return self._http.server_address[1] if self._http is not None else None

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
        if self.settings.http_enabled:
            handler = type("Handler", (_Handler,), {"service": self})
            self._http = ThreadingHTTPServer((self.settings.http_host, self.settings.http_port), handler)
            self._http.daemon_threads = True
            threading.Thread(target=self._http.serve_forever, name="cxr-ai-http", daemon=True).start()
            logger.info("health and metrics on http://%s:%d/healthz and /metrics", self.settings.http_host,
                        self.http_port)
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
        self.scp.stop()
        self.workers.stop(grace)
        self.router.stop(timeout=min(grace, 10.0) if grace else 1.0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._janitor is not None:
            self._janitor.join(5.0)
        self.store.close()
        logger.info("stopped")

    def reconcile_spool(self) -> int:
        """Record spooled instances the job store does not know (a transaction lost to a power
        failure with ``sqlite_synchronous = "normal"``). Returns how many were recorded."""
        from pydicom.filereader import read_file_meta_info

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
                                       sop_key=safe_key(info.sop_instance_uid), sop_uid=info.sop_instance_uid,
                                       sop_class_uid=info.sop_class_uid, path=path, size=info.size)
            keys.append(study_key)
        if keys:
            self.store.association_closed(keys, quiet_seconds=self.settings.quiet_seconds)
            logger.warning("re-recorded %d spooled instances the job store had lost", len(keys))
        return len(keys)

    def _janitor_loop(self) -> None:
        while not self._stopped.wait(0.5):
            try:
                self.housekeeping()
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

    def health(self) -> dict[str, Any]:
        problems = list(self.workers.errors)
        if not self.workers.alive() and not self._stopped.is_set():
            problems.append("a worker thread stopped")
        try:
            counts = self.store.counts()
        except Exception as exc:  # noqa: BLE001 - reported as unhealthy
            problems.append(f"job store unavailable: {type(exc).__name__}")
            counts = None
        return {"status": "ok" if not problems else "unhealthy", "problems": problems,
                "dicom_port": self.dicom_port, "ae_title": self.settings.listener.ae_title,
                "queue_depth": counts["studies"]["received"] if counts else None,
                "dead_letters": counts["outbox"]["dead"] if counts else None}

    def status(self) -> dict[str, Any]:
        return {"counts": self.store.counts(),
                "dead_letters": [{"job_id": d.job_id, "destination": d.destination, "attempts": d.attempts,
                                  "error": d.last_error} for d in self.store.deliveries(state=DeliveryState.DEAD)]}

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
def run_service(config: Mapping[str, Any], *, pipeline_factory: PipelineFactory | None = None,
                base_dir: str | os.PathLike | None = None, ready: Callable[[Service], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the exit code.

    This owns the process: it installs signal handlers and points ``tempfile`` at the spool.
    """
    service = Service(config, pipeline_factory=pipeline_factory, base_dir=base_dir, own_tempdir=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("received %s", signal.Signals(signum).name)
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
    return 0


if __name__ == "__main__":  # `python -m cxr_ai.service`, as the systemd unit and tests run it
    from cxr_ai.service_cli import serve_main

    sys.exit(serve_main())
