"""The run: a worklist into an output folder (resume, state, table, sending), locally or on Dask."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_ai.batch.inputs import WorkItem, BatchInputs
from cxr_ai.batch.report import write_skipped_inputs
from cxr_ai.batch.pools import (
    usable_cores,
    _worker_pipeline,
    batch_section,
    model_plan,
    pool_kind,
    run_items,
)
from cxr_ai.batch.stages import Finished, pipeline_finding_keys
from cxr_ai.batch.state import (
    STATE_DB_NAME,
    STUDIES_DIR,
    TMP_PREFIX,
    BatchState,
    load_or_create_key,
)
from cxr_ai.batch.table import DEFAULT_FINDINGS, write_table
from cxr_ai.contract import StagedPipeline
from cxr_ai.errors import ConfigError

logger = logging.getLogger("cxr_ai.batch")  # one logger for the package (sites and tests filter on it)

MSG_WORKERS_AND_SCHEDULER = "give either --workers (a local Dask cluster) or --scheduler (an existing one), not both"


# ============================================================================================
# Dask
# ============================================================================================


def process_partition(items: list[tuple[str, ...]], *, config_json: str, explain: bool,
                      out_dir: str, pkey_hex: str, threads: int, write: bool,
                      pool: str | None = None) -> list[dict[str, Any]]:
    """Dask task: process a partition of the worklist on this worker; return finished records.

    A Dask worker is usually a daemonic process, which may not start worker processes: the
    stage pool then runs in threads (logged), and Dask's own processes spread the load.
    """
    pipeline = _worker_pipeline(config_json, explain)
    work = [WorkItem(*t) for t in items]
    fins = run_items(pipeline, work, out_dir=Path(out_dir), pkey=bytes.fromhex(pkey_hex),
                     threads=threads, write=write, pool=pool)
    return [dataclasses.asdict(f) for f in fins]


def partition_studies(items: Sequence[WorkItem], *, n_partitions: int) -> list[list[WorkItem]]:
    """Cut items into at most ``n_partitions`` lists of whole studies, balanced by instances."""
    groups: dict[str, list[WorkItem]] = {}
    for it in items:
        groups.setdefault(it.study_uid or it.key, []).append(it)
    parts: list[list[WorkItem]] = [[] for _ in range(max(1, n_partitions))]
    for study in sorted(groups, key=lambda s: (-len(groups[s]), s)):
        min(parts, key=len).extend(groups[study])
    return [p for p in parts if p]


# ============================================================================================
# The run
# ============================================================================================


#: How many ignored files and duplicates the printed summary names (the report names all).
SUMMARY_LIST_LIMIT = 20


@dataclass
class BatchSummary:
    """What a run did. Counters of reasons for not-applicable and failed instances."""

    total: int = 0
    skipped: int = 0
    processed: int = 0
    not_applicable: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    ignored_files: int = 0
    ignored: list[str] = field(default_factory=list)  # the non-DICOM files themselves
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (kept, not processed)
    uid_reused: list[tuple[str, str]] = field(default_factory=list)  # (first, other): both processed
    skipped_report: str = ""  # skipped_inputs.csv: the ignored files and the duplicates
    elapsed_s: float = 0.0
    table_csv: str = ""
    table_parquet: str = ""
    sent: int = 0
    send_errors: list[str] = field(default_factory=list)
    dry_run: bool = False
    planned: list[WorkItem] = field(default_factory=list)  # dry run: what would run

    @property
    def done(self) -> int:
        return self.processed + sum(self.not_applicable.values()) + sum(self.failed.values())

    def text(self) -> str:
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            (f"instances: {self.total} in worklist, {self.skipped} already done (skipped), "
             f"{self.done} run in {self.elapsed_s:.1f} s ({rate:.2f} img/s)"),
            f"  processed:      {self.processed}",
            f"  not applicable: {sum(self.not_applicable.values())}"
            + "".join(f"\n    {r}: {n}" for r, n in sorted(self.not_applicable.items())),
            f"  failed:         {sum(self.failed.values())}"
            + "".join(f"\n    {r}: {n}" for r, n in sorted(self.failed.items())),
        ]
        n_ignored = max(self.ignored_files, len(self.ignored))
        if n_ignored:
            lines.append(f"  ignored (not DICOM): {n_ignored} files"
                         + "".join(f"\n    {name}" for name in self.ignored[:SUMMARY_LIST_LIMIT])
                         + self._more(len(self.ignored)))
        if self.duplicates:
            lines.append(f"  duplicate SOP Instance UID (not processed; the first file was): {len(self.duplicates)} files"
                         + "".join(f"\n    {dup} (same instance as {kept})" for kept, dup in self.duplicates[:SUMMARY_LIST_LIMIT])
                         + self._more(len(self.duplicates)))
        if self.uid_reused:
            lines.append(f"  SOP Instance UID reused for another study or patient (both processed, results of their "
                         f"own): {len(self.uid_reused)} files"
                         + "".join(f"\n    {other} (same UID as {first})" for first, other in self.uid_reused[:SUMMARY_LIST_LIMIT])
                         + self._more(len(self.uid_reused)))
        if self.sent or self.send_errors:
            lines.append(f"  sent to PACS: {self.sent} objects, {len(self.send_errors)} errors")
        if self.table_csv:
            lines.append(f"results: {self.table_csv} and {self.table_parquet}")
        if self.skipped_report and (n_ignored or self.duplicates):
            lines.append(f"ignored and duplicate files: {self.skipped_report}")
        return "\n".join(lines)

    def _more(self, n: int) -> str:
        if n <= SUMMARY_LIST_LIMIT:
            return ""
        where = self.skipped_report or "the skipped-inputs report"
        return f"\n    ... and {n - SUMMARY_LIST_LIMIT} more (all in {where})"


@dataclass
class BatchOptions:
    """How to run. See :func:`~cxr_ai.batch.cli.add_batch_parser` for the meaning of each option."""

    out_dir: Path
    force: bool = False
    dry_run: bool = False
    explain: bool = True
    threads: int = 0
    batch_size: int = 0
    progress: bool = True
    workers: int = 0
    scheduler: str = ""
    partitions_per_worker: int = 2
    write_outputs: bool = True
    pool: str = ""  # "auto" / "processes" / "threads"; "" = [batch] pool
    send_to: Any = None  # cxr_ai.net.scu.Peer
    run_id: str = ""


def _pseudonym_key(config: Mapping[str, Any], out_dir: Path) -> bytes:
    path = str(batch_section(config).get("pseudonym_key_file", "") or "")
    if path:
        return load_or_create_key(path, create=False)
    from cxr_ai.monitoring.log import resolve_pseudonym_key

    return resolve_pseudonym_key(config)  # the site key the listener's prediction log uses


def _prediction_log(config: Mapping[str, Any]) -> Any:
    """The site's live prediction log (``[monitoring]``), or None when monitoring is off."""
    if not config.get("monitoring", {}).get("enabled", True):
        return None
    from cxr_ai.monitoring.log import PredictionLog

    return PredictionLog.from_config(config)


def _clean_tmp(out_dir: Path) -> int:
    n = 0
    studies = out_dir / STUDIES_DIR
    if studies.is_dir():
        for p in studies.rglob(f"{TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
            n += 1
    if n:
        logger.info("removed %d partial output files left by an interrupted run", n)
    return n


def _run_settings(cfg: Mapping[str, Any], options: BatchOptions) -> tuple[int, str, bool]:
    """Stage pool size, pool kind and whether Dask runs it; bad settings fail here, before any work."""
    bcfg = batch_section(cfg)
    threads = options.threads or int(bcfg.get("threads", 0) or 0) or max(2, usable_cores())
    pool = str(options.pool or bcfg.get("pool", "auto") or "auto")
    pool_kind(pool, write=options.write_outputs)  # a typo fails here, before any work
    if options.write_outputs and not options.dry_run and not str(
            cfg.get("fhir", {}).get("default_patient_identifier_system", "") or "").strip():
        logger.warning("the FHIR bundles written next to the results carry no patient identifier system for "
                       "issuers that are not mapped: set [fhir] default_patient_identifier_system before "
                       "delivering them to a FHIR server")
    if options.workers and options.scheduler:
        raise ConfigError(MSG_WORKERS_AND_SCHEDULER)
    return threads, pool, bool(options.workers or options.scheduler)


def _recorder(state: BatchState, summary: BatchSummary, *, options: BatchOptions, out_dir: Path, run_id: str,
              plog: Any, bar: Any) -> Callable[[Finished], None]:
    """What happens to each finished instance, in the driver's thread: its state row, the
    prediction log, the summary's counts, sending its results (``--send-to``), the progress bar."""
    sent_lock = threading.Lock()

    def on_finished(fin: Finished) -> None:
        state.record(key=fin.key, row=fin.row, outputs=fin.outputs, run_id=run_id)
        if plog is not None and fin.row.get("sop_uid"):
            plog.append(plog.record_from_row(fin.row, source="batch"))
        status = fin.row["status"]
        if status == "processed":
            summary.processed += 1
        elif status == "not_applicable":
            summary.not_applicable[fin.row["reason"] or "unknown"] += 1
        else:
            summary.failed[fin.row["reason"] or "unknown"] += 1
        if options.send_to is not None and fin.outputs:
            _send(fin, out_dir, options.send_to, summary, sent_lock)
        bar.update(1)

    return on_finished


def _write_tables(state: BatchState, summary: BatchSummary, *, model: Any, finding_keys: list[str],
                  out_dir: Path) -> None:
    """The results table (CSV and Parquet) of every recorded instance of this model, and the
    skipped-inputs report."""
    rows = [r["row"] for r in state.records(model.name, model.version)]
    keys = sorted({k[2:] for r in rows for k in r if k.startswith("p_")} | set(finding_keys),
                  key=lambda k: (finding_keys.index(k) if k in finding_keys else 99, k))
    csv_path, pq_path = write_table(rows, out_dir, finding_keys=keys)
    summary.table_csv, summary.table_parquet = str(csv_path), str(pq_path)
    summary.skipped_report = str(write_skipped_inputs(out_dir, ignored=summary.ignored,
                                                      duplicates=summary.duplicates))


def run_batch(
    worklist: BatchInputs,
    *,
    options: BatchOptions,
    config: Mapping[str, Any] | None = None,
    pipeline: StagedPipeline | None = None,
) -> BatchSummary:
    """Run the pipeline over ``worklist`` into ``options.out_dir`` (see :mod:`cxr_ai.batch`).

    Parameters
    ----------
    worklist
        From :func:`~cxr_ai.batch.inputs.scan_inputs` or :func:`~cxr_ai.batch.inputs.retrieve_studies`.
    options
        Output folder, resume/force, pools, Dask, progress.
    config
        Loaded configuration (the CLI's :func:`cxr_ai.config.load_settings`); when None, the
        embedded defaults (``cxr_ai/defaults.toml``), never a site file or the environment.
    pipeline
        A ready :class:`cxr_ai.pipeline.Pipeline` (local runs); built from ``config`` if None.
    """
    from cxr_ai.config import default_config

    t_start = time.perf_counter()
    cfg = dict(config) if config is not None else default_config()
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary(total=len(worklist.items), ignored_files=len(worklist.ignored),
                           ignored=[str(p) for p in worklist.ignored],
                           duplicates=list(worklist.duplicates), uid_reused=list(worklist.uid_reused),
                           dry_run=options.dry_run)
    bcfg = batch_section(cfg)
    threads, pool, use_dask = _run_settings(cfg, options)
    if options.batch_size:
        cfg.setdefault("models", {})
        cfg["models"] = {**cfg["models"], "batch_size": int(options.batch_size)}

    if pipeline is None and not use_dask:
        from cxr_ai.pipeline import Pipeline

        pipeline = Pipeline(config=cfg, explain=options.explain)
    model = pipeline.model_info if pipeline is not None else _model_info_of(cfg)
    finding_keys = pipeline_finding_keys(pipeline) if pipeline is not None else list(DEFAULT_FINDINGS)

    state = BatchState(out_dir / STATE_DB_NAME)
    try:
        finished = set() if options.force else state.finished(model.name, model.version)
        todo = [it for it in worklist.items if it.key not in finished]
        summary.skipped = len(worklist.items) - len(todo)
        if options.dry_run:
            summary.dry_run = True
            summary.planned = todo
            summary.elapsed_s = time.perf_counter() - t_start
            return summary
        _clean_tmp(out_dir)
        pkey = _pseudonym_key(cfg, out_dir)
        run_id = options.run_id or time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        bar = _progress(total=len(todo), enabled=options.progress)
        on_finished = _recorder(state, summary, options=options, out_dir=out_dir, run_id=run_id,
                                plog=_prediction_log(cfg), bar=bar)
        try:
            if use_dask:
                _run_dask(todo, cfg=cfg, options=options, out_dir=out_dir, pkey=pkey, threads=threads,
                          on_finished=on_finished)
            else:
                run_items(pipeline, todo, out_dir=out_dir, pkey=pkey, threads=threads,
                          batch_size=options.batch_size or None,
                          on_finished=on_finished, write=options.write_outputs, pool=pool,
                          start_method=str(bcfg.get("start_method", "auto") or "auto"),
                          plan=model_plan(pipeline, config=cfg))
        finally:
            bar.close()
        _write_tables(state, summary, model=model, finding_keys=finding_keys, out_dir=out_dir)
    finally:
        state.close()
    summary.elapsed_s = time.perf_counter() - t_start
    logger.info("batch done: %d processed, %d not applicable, %d failed, %d skipped",
                summary.processed, sum(summary.not_applicable.values()), sum(summary.failed.values()), summary.skipped)
    return summary


def plan(worklist: BatchInputs, *, out_dir: Path, config: Mapping[str, Any] | None = None,
         force: bool = False, model: Any = None) -> list[WorkItem]:
    """What a run would process (the dry run): the worklist minus what is already finished."""
    from cxr_ai.config import default_config

    cfg = dict(config) if config is not None else default_config()
    model = model or _model_info_of(cfg)
    db = Path(out_dir) / STATE_DB_NAME
    if force or not db.exists():
        return list(worklist.items)
    state = BatchState(db)
    try:
        done = state.finished(model.name, model.version)
    finally:
        state.close()
    return [it for it in worklist.items if it.key not in done]


def _model_info_of(cfg: Mapping[str, Any]) -> Any:
    """Name and version of the configured bundle, read from its metadata (no weights loaded)."""
    from cxr_ai.models.bundle import load_bundle
    from cxr_ai.models.engine import default_bundle_path

    path = (cfg.get("models", {}) or {}).get("bundle") or default_bundle_path()
    return load_bundle(path, verify_checksum=False).model_info()


def _send(fin: Finished, out_dir: Path, peer: Any, summary: BatchSummary, lock: threading.Lock) -> None:
    from cxr_ai.net.scu import SendError, send_files

    dicom = [out_dir / p for p in fin.outputs if p.endswith(".dcm")]
    try:
        send_files(dicom, peer)
        with lock:
            summary.sent += len(dicom)
    except (SendError, OSError) as exc:
        logger.warning("could not send the results of one instance to %s: %s", peer.ae_title, exc)
        with lock:
            summary.send_errors.append(str(exc))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(*, total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="cxr-ai batch", dynamic_ncols=True, smoothing=0.1)


def _run_dask(todo: Sequence[WorkItem], *, cfg: Mapping[str, Any], options: BatchOptions, out_dir: Path,
              pkey: bytes, threads: int, on_finished: Callable[[Finished], None]) -> None:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if options.workers:
        n = int(options.workers)
        per_worker_threads = max(1, usable_cores() // n)
        cfg = {**cfg, "models": {**cfg.get("models", {}), "num_threads": per_worker_threads}}
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=logging.WARNING)
        client = Client(cluster)
        threads = max(1, per_worker_threads)
    else:
        client = Client(options.scheduler)
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or 1)
        parts = partition_studies(todo, n_partitions=n_workers * max(1, options.partitions_per_worker))
        config_json = json.dumps(cfg, sort_keys=True, default=str)
        futures = [
            client.submit(process_partition, [(i.path, i.sop_uid, i.study_uid, i.patient_fp, i.variant) for i in part],
                          config_json=config_json, explain=options.explain, out_dir=str(out_dir.resolve()),
                          pkey_hex=pkey.hex(), threads=threads, write=options.write_outputs,
                          pool=options.pool or None,
                          pure=False, key=f"cxr-batch-{k}-{secrets.token_hex(4)}")
            for k, part in enumerate(parts)
        ]
        for fut in as_completed(futures):
            for rec in fut.result():
                on_finished(Finished(**rec))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
