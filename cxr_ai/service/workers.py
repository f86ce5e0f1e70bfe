"""The listener's workers: ready studies from the job store through the pipeline to the outbox.

:class:`WorkerPool` threads claim ready studies, run the pipeline (the findings first, handed
over through ``on_results`` and queued at once; the heatmap objects after), write the result
files into the spool (each kind named by :mod:`cxr_ai.outputs`), and queue one delivery per destination in the transaction that settles
the study. :class:`ResultRecorder` keeps the secondary records: the prediction log and the
triage worklist. Wired together by :class:`cxr_ai.service.Service`.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from cxr_ai.contract import OutcomeLike, PipelineFactory, PipelineLike, check_pipeline, status_of
from cxr_ai.service.metrics import ServiceMetrics
from cxr_ai.service.routing import Router
from cxr_ai.store.jobs import (
    ClaimedStudy,
    InstanceResult,
    InstanceState,
    JobStore,
    NewDelivery,
    ReasonCode,
    StudyState,
)
from cxr_ai.outputs import listener_fhir_name, listener_name
from cxr_ai.store.spool import Spool, safe_key

if TYPE_CHECKING:
    from cxr_ai.service.settings import ServiceSettings

logger = logging.getLogger(__name__)


def _state_of(outcome: OutcomeLike) -> InstanceState:
    """The job store's state of an outcome: the same strings as :class:`InstanceStatus`."""
    return InstanceState(status_of(outcome).value)


def _result_summary(outcome: OutcomeLike) -> dict[str, Any] | None:
    result = outcome.result
    if result is None:
        return None
    summary: dict[str, Any] = {}
    if result.findings:
        summary["findings"] = [f.to_dict() for f in result.findings]
    model = result.model
    if model is not None:
        summary["model"] = model.label
        summary["not_for_clinical_use"] = bool(model.not_for_clinical_use)
        if model.intended_use:
            summary["intended_use"] = str(model.intended_use)
    summary["decision"] = result.decision.to_dict()
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
        # The patient pseudonym names a worklist entry (a study of one patient) whether the
        # prediction log is on or not, and whether its write succeeds or not.
        self._pseudonym_key = resolve_pseudonym_key(cfg)
        self.log: Any = None
        if mon.get("enabled", True):
            folder = Path(mon.get("dir") or settings.store_root / "monitoring")
            self.log = PredictionLog(folder / mon.get("prediction_log", "predictions.jsonl"),
                                     key=self._pseudonym_key)
        self.worklist = Worklist(settings.worklist_path, policy=TriagePolicy.from_config(cfg))
        keep = float(cfg.get("worklist", {}).get("demographics_keep_hours", 720))
        self.demographics_keep_seconds = None if keep < 0 else keep * 3600.0
        self.errors = 0

    def purge_demographics(self) -> int:
        """Blank worklist demographics past their retention (the service's sweep calls this
        whether studies arrive or not). Returns how many studies were blanked."""
        try:
            return self.worklist.purge_demographics()
        except (OSError, sqlite3.Error) as exc:
            self.errors += 1
            logger.error("worklist demographics purge failed (%s); will retry", type(exc).__name__)
            return 0

    def record(self, outcomes: Sequence[OutcomeLike], received_at: float | None, *, job_id: str = "",
               study_uid: str = "") -> None:
        """Log the predictions and put the study on the worklist (a study without findings
        goes on it too, with the reason it is not applicable)."""
        from cxr_ai.monitoring.log import patient_key
        from cxr_ai.worklist import acquisition_time

        findings: list[Any] = []
        report_uid, pkey, accession = "", "", ""
        acquired: float | None = None
        demographics: dict[str, Any] = {}
        reasons: list[str] = []
        for o in outcomes:
            # The radiograph is optional in the contract: a site's pipeline may not keep it.
            rg, result = getattr(o, "radiograph", None), o.result
            if rg is not None and not demographics:
                pkey = patient_key(self._pseudonym_key, rg.issuer_of_patient_id, rg.patient_id)
                acquired = acquisition_time(rg.dataset.get("StudyDate", ""), rg.study_time)
                demographics = {"name": str(rg.dataset.get("PatientName", "") or ""), "id": rg.patient_id,
                                "age": rg.age_years, "sex": rg.sex or ""}
                accession = accession or rg.accession_number
                study_uid = study_uid or rg.study_instance_uid
            if result is None or not result.findings:
                why = str(o.reason or "")
                if why and why not in reasons:
                    reasons.append(why)
            if rg is None or result is None:
                continue
            try:
                if self.log is not None:
                    self.log.log_prediction(rg, result, source="listener")
            except (OSError, ValueError, TypeError) as exc:
                self.errors += 1
                logger.error("prediction log write failed (%s); the study's results are unaffected", type(exc).__name__)
            if result.findings:
                study_uid = study_uid or rg.study_instance_uid
                accession = accession or rg.accession_number
                findings.extend(result.findings)
                sr = o.outputs.sr
                report_uid = report_uid or (str(sr.SOPInstanceUID) if sr is not None else "")
        if not study_uid:
            return
        try:
            self.worklist.upsert_study(study_uid, findings, received_at=received_at, accession=accession,
                                       patient_key=pkey, report_uid=report_uid, job_id=job_id, acquired_at=acquired,
                                       reason="" if findings else ("; ".join(reasons) or "no finding computed"),
                                       demographics=demographics or None,
                                       demographics_keep_seconds=self.demographics_keep_seconds)
            self.worklist.purge_demographics()
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
        self._pipelines: dict[int, PipelineLike] = {}
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

    def _pipeline(self) -> PipelineLike:
        ident = threading.get_ident()
        if ident not in self._pipelines:
            built = self.factory(config=self.config)
            what = f"[workers] pipeline ({type(built).__module__}:{type(built).__qualname__})"
            self._pipelines[ident] = check_pipeline(built, what=what)
        return self._pipelines[ident]

    def _build_pipeline(self) -> PipelineLike | None:
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
                                                   reason=f"recording results failed: {type(exc).__name__}: {exc}"[:2000],
                                                   code=ReasonCode.RECORDING_FAILED.value)
                    except Exception:  # broad on purpose: recovered at the next start
                        logger.exception("could not re-queue job %s", c.study.job_id)
            finally:
                with self._lock:
                    self._inflight.pop(threading.get_ident(), None)

    def process(self, pipeline: PipelineLike, claims: Sequence[ClaimedStudy]) -> None:
        """Run the pipeline over the claimed studies (one batch) and record the outcomes.

        The pipeline hands over each image's SR and FHIR objects through ``on_results`` as
        soon as they are built (the default one does; see :class:`cxr_ai.contract.PipelineLike`);
        they are written and queued for delivery at once, while the heatmap objects are still
        being computed (they follow with the rest).
        """
        now = time.time()
        for c in claims:
            if c.study.ready_at:
                self.metrics.stage_seconds.labels("queue_wait").observe(max(0.0, now - c.study.ready_at))
        paths = [Path(i.path) for c in claims for i in c.instances]
        early: dict[str, set[str]] = {}  # job id -> result file names already queued

        def on_results(outcomes: Sequence[OutcomeLike]) -> None:
            self._queue_first_results(claims, outcomes, early)

        t0 = time.perf_counter()
        try:
            outcomes = list(pipeline.process_study(paths, on_results=on_results)) if paths else []
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
            logger.exception("job %s: pipeline raised (%s; reason pipeline_error)", c.study.job_id, state.value)
            if state is StudyState.FAILED:
                self.metrics.studies_finished.labels("failed").inc()
            return
        elapsed = time.perf_counter() - t0
        if paths:
            self.metrics.stage_seconds.labels("process_per_instance").observe(elapsed / len(paths))
        for c, pairs in _pair(claims, outcomes):
            self._finish_study(c, pairs, skip=early.get(c.study.job_id, set()))  # wakes the router

    def _result_files(self, job: str, inst_key: str, outcome: OutcomeLike, skip: Collection[str]) -> list[Path]:
        """Write an outcome's result objects into the job's result folder (names not in ``skip``),
        in the order they are sent: SR first, then the heatmap objects, then the FHIR bundle."""
        files: list[Path] = []
        for kind, ds in outcome.outputs.objects():
            name = listener_name(kind, safe_key(str(ds.SOPInstanceUID)))
            if name not in skip:
                files.append(self.spool.write_result(job, name, _dataset_bytes(ds)))
        name = listener_fhir_name(inst_key)
        bundle = outcome.outputs.fhir_json() if name not in skip else None
        if bundle:
            files.append(self.spool.write_result(job, name, json.dumps(bundle, indent=1).encode("utf-8")))
        return files

    def _deliveries(self, files: Sequence[Path]) -> list[NewDelivery]:
        deliveries = []
        for name in self.router.destinations:
            items = self.router.items_for(name, files)
            if items:
                deliveries.append(NewDelivery(name, items))
        return deliveries

    def _queue_first_results(self, claims: Sequence[ClaimedStudy], outcomes: Sequence[OutcomeLike],
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

    def _finish_study(self, claim: ClaimedStudy, pairs: list[tuple[Any, OutcomeLike | None]], *, skip: Collection[str] = frozenset()) -> None:
        job = claim.study.job_id
        files: list[Path] = []
        results: list[InstanceResult] = []
        counts: dict[str, int] = {}
        for inst, outcome in pairs:
            if outcome is None:
                results.append(InstanceResult(inst.sop_key, InstanceState.FAILED, "pipeline returned no outcome"))
                counts["failed"] = counts.get("failed", 0) + 1
                continue
            state = _state_of(outcome)
            counts[state.value] = counts.get(state.value, 0) + 1
            reason = str(outcome.reason or "")
            files.extend(self._result_files(job, inst.sop_key, outcome, skip))
            results.append(InstanceResult(inst.sop_key, state, reason[:500], _result_summary(outcome)))
        if files or skip:
            summary = {"job_id": job, "instances": [
                {"instance": i, "state": r.state.value, "reason": r.reason, "result": r.result}
                for i, r in enumerate(results)]}
            files.append(self.spool.write_result(job, "summary.json", json.dumps(summary, indent=1).encode()))
        deliveries = self._deliveries(files)
        state = self.store.complete_processing(claim.study.study_key, results=results, deliveries=deliveries)
        if deliveries:
            self.router.wake()  # the results go out while the secondary records are written
        self.recorder.record([o for _, o in pairs if o is not None], received_at=claim.study.created_at,
                             job_id=job, study_uid=claim.study.study_uid)
        for outcome_name, n in counts.items():
            self.metrics.instances_processed.labels(outcome_name).inc(n)
        code = ""
        if state in (StudyState.NOT_APPLICABLE, StudyState.FAILED):
            self.metrics.studies_finished.labels(state.value).inc()
            record = self.store.study(claim.study.study_key)
            code = f" (reason {record.reason_code or 'unknown'})" if record is not None else ""
        logger.info("job %s: %d instances processed (%s); %d result files (%d sent ahead) for %d destinations; "
                    "study %s%s", job, len(pairs), ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                    len(files) + len(skip), len(skip), len(deliveries), state.value, code)


def _pair(claims: Sequence[ClaimedStudy], outcomes: Sequence[OutcomeLike]
          ) -> list[tuple[ClaimedStudy, list[tuple[Any, OutcomeLike | None]]]]:
    """Each claimed study with its (instance, outcome) pairs: by position, else by SOP Instance UID."""
    n = sum(len(c.instances) for c in claims)
    by_index = outcomes if len(outcomes) == n else None
    by_uid = {str(o.sop_instance_uid or ""): o for o in outcomes}
    k = 0
    paired = []
    for c in claims:
        pairs = []
        for inst in c.instances:
            pairs.append((inst, by_index[k] if by_index is not None else by_uid.get(inst.sop_uid)))
            k += 1
        paired.append((c, pairs))
    return paired

