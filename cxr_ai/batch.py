"""The batch worklist processor: the pipeline over a folder, a DICOMDIR or studies from PACS.

Same core as the listener (:class:`cxr_ai.pipeline.Pipeline`), other driver. A run:

1. **resolves the worklist** into instances (:class:`WorkItem`): files under folders
   (recursive), the instances a DICOMDIR lists (pydicom :class:`~pydicom.fileset.FileSet`), or
   studies found on a PACS (C-FIND by Study Instance UID, accession number, date range,
   modality) and fetched by C-GET / C-MOVE (:mod:`cxr_ai.net.query`) or by DICOMweb
   (``dicomweb-client``) into ``<out>/retrieved``;
2. **skips** what this model version already finished (resumable, idempotent): a small SQLite
   state database ``<out>/batch-state.sqlite`` keyed by SOP Instance UID + model name +
   model version. ``processed`` and ``not_applicable`` are final; ``failed`` is retried on the
   next run; ``force=True`` reprocesses everything;
3. **processes** the rest: decoding, the applicability gate and the pixel pipeline run in a
   thread pool (pydicom's decoders and numpy release the GIL) while the engine runs batches
   (on the GPU when there is one); result objects are built and written by a second pool;
4. **writes** per instance the SR / heatmap SC / Parametric Map / FHIR bundle into
   ``<out>/studies/<StudyInstanceUID>/`` under deterministic names
   (``<SOPInstanceUID>_<kind><n>.dcm``, ``<SOPInstanceUID>_fhir.json``): each file is written
   under a temporary name, fsynced and renamed, and only then the instance is recorded (one
   transaction). A run killed at any point leaves no half-recorded instance, and re-running
   rewrites the same names, so there are never duplicate outputs;
5. **tabulates** every recorded instance (``results.csv`` and ``results.parquet``, columns
   :data:`TABLE_COLUMNS` + one ``p_/thr_/pred_`` triple per finding), sorted by study and
   instance so that runs compare equal row by row.

On Dask (``scheduler=`` or ``workers=``) the worklist is cut into partitions of whole studies;
each worker process loads the bundle once (:func:`_worker_pipeline`) and writes outputs into
the same output folder, which must therefore be a path all workers see (a shared volume);
rows come back to the client, the only writer of the state database.

Patients appear in the table only as ``patient_key``, an HMAC-SHA256 pseudonym of
IssuerOfPatientID + PatientID under a site key (:func:`patient_key`), never as the ID.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from cxr_ai.dicom.reader import is_valid_uid
from cxr_ai.errors import ConfigError, CxrAiError

logger = logging.getLogger(__name__)

STATE_DB_NAME = "batch-state.sqlite"
KEY_FILE_NAME = "pseudonym.key"
STUDIES_DIR = "studies"
RETRIEVED_DIR = "retrieved"
TMP_PREFIX = ".tmp-"

#: Columns of the results table, in order; ``p_<key>``, ``thr_<key>``, ``pred_<key>`` follow
#: for each finding of the model (e.g. cardiomegaly, low_ef), then :data:`TAIL_COLUMNS`.
TABLE_COLUMNS: tuple[str, ...] = (
    "sop_uid", "study_uid", "series_uid", "patient_key", "source",
    "model_name", "model_version", "gate_accepted", "gate_reason",
)
TAIL_COLUMNS: tuple[str, ...] = ("status", "reason", "message", "sex", "age", "ethnic_group", "n_outputs")
#: Findings every table carries columns for, even before a model reports them.
DEFAULT_FINDINGS: tuple[str, ...] = ("cardiomegaly", "low_ef")

MSG_NO_INPUT = (
    "nothing to process: give folders or DICOMDIR files, or --studies CSV / --date-from with "
    "--pacs or --dicomweb"
)
MSG_INPUT_MISSING = "input {path} does not exist; give an existing folder or DICOMDIR file"
MSG_BAD_DICOMDIR = "{path} is not a readable DICOMDIR ({detail}); give the DICOMDIR file of a DICOM File-set"
MSG_CSV_COLUMNS = (
    "{path}: no column with study UIDs or accession numbers; name one of {known} "
    "(header row required)"
)
MSG_NEED_PACS = "--studies and date/modality queries need a PACS (--pacs HOST:PORT:AET) or --dicomweb URL"
MSG_BAD_PEER = "{text!r} is not HOST:PORT:AET (e.g. 127.0.0.1:4242:ORTHANC)"
MSG_KEY_FILE = (
    "pseudonym key file {path} is missing or shorter than 16 bytes; point [batch] "
    "pseudonym_key_file at a file holding the site's secret key (keep it the same across runs)"
)
MSG_WORKERS_AND_SCHEDULER = "give either --workers (a local Dask cluster) or --scheduler (an existing one), not both"


# ============================================================================================
# Pseudonyms
# ============================================================================================


def load_or_create_key(path: str | os.PathLike, *, create: bool = True) -> bytes:
    """The HMAC key in ``path``; a new random 32-byte key (mode 0600) if absent and ``create``."""
    p = Path(path)
    if p.is_file():
        key = p.read_bytes()
        if len(key) >= 16:
            return key
        raise ConfigError(MSG_KEY_FILE.format(path=p))
    if not create:
        raise ConfigError(MSG_KEY_FILE.format(path=p))
    p.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    logger.info("created a new pseudonym key at %s; keep it to get the same patient keys next time", p)
    return key


def patient_key(patient_id: str, issuer: str, *, key: bytes) -> str:
    """The site's pseudonym of (issuer, PatientID) — the same function and key as the live
    prediction log (:func:`cxr_ai.monitoring.log.patient_key`), so batch tables and live logs
    join; "" without an ID. The issuer is part of the message: same ID, other issuer, other key.
    """
    from cxr_ai.monitoring.log import patient_key as _site_patient_key

    return _site_patient_key(key, issuer, patient_id) if patient_id else ""


# ============================================================================================
# Worklist
# ============================================================================================


@dataclass(frozen=True)
class WorkItem:
    """One instance to process. ``sop_uid``/``study_uid`` are "" when the header lacks them."""

    path: str
    sop_uid: str
    study_uid: str

    @property
    def key(self) -> str:
        """State key: the SOP Instance UID, or the path for files without one."""
        return self.sop_uid or f"file:{self.path}"


@dataclass
class Worklist:
    items: list[WorkItem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files that are not DICOM
    #: files whose SOP Instance UID another file in the worklist already has: (kept, duplicate)
    duplicates: list[tuple[str, str]] = field(default_factory=list)

    def studies(self) -> dict[str, list[WorkItem]]:
        """Items grouped by study (files without a study UID each form their own group)."""
        groups: dict[str, list[WorkItem]] = {}
        for it in self.items:
            groups.setdefault(it.study_uid or it.key, []).append(it)
        return groups


_HEADER_TAGS = ["SOPInstanceUID", "StudyInstanceUID"]


def _header_item(path: Path) -> WorkItem | None:
    """A work item from the file's header, or None when the file is not DICOM (no preamble)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        # No preamble/'DICM': a raw data set (which the reader accepts) or not DICOM at all.
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        except Exception:  # noqa: BLE001 - not parseable: not DICOM
            return None
        if not is_valid_uid(str(ds.get("SOPInstanceUID", "") or "")):
            return None
    except (EOFError, OSError):
        return None
    except Exception:  # noqa: BLE001 - a malformed header: let the pipeline report why
        return WorkItem(str(path), "", "")
    return WorkItem(str(path), str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""))


def scan_folder(root: str | os.PathLike, *, threads: int = 4) -> Worklist:
    """All DICOM files under ``root`` (recursive), headers read in parallel; DICOMDIRs skipped."""
    from cxr_ai.dicom.reader import iter_dicom_files

    root = Path(root)
    if not root.exists():
        raise ConfigError(MSG_INPUT_MISSING.format(path=root))
    files = [p for p in iter_dicom_files(root) if not p.name.startswith(TMP_PREFIX)]
    wl = Worklist()
    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        for path, item in zip(files, pool.map(_header_item, files)):
            if item is None:
                wl.ignored.append(str(path))
            else:
                wl.items.append(item)
    return wl


def scan_dicomdir(path: str | os.PathLike) -> Worklist:
    """The instances a DICOMDIR lists (their UIDs come from the directory records)."""
    from pydicom.fileset import FileSet

    p = Path(path)
    if not p.is_file():
        raise ConfigError(MSG_INPUT_MISSING.format(path=p))
    try:
        fs = FileSet(pydicom.dcmread(p))
    except (InvalidDicomError, ValueError, AttributeError, KeyError, OSError) as exc:
        raise ConfigError(MSG_BAD_DICOMDIR.format(path=p, detail=f"{type(exc).__name__}: {exc}")) from exc
    wl = Worklist()
    for inst in fs:
        wl.items.append(WorkItem(str(inst.path), str(inst.SOPInstanceUID), str(getattr(inst, "StudyInstanceUID", ""))))
    return wl


def scan_inputs(inputs: Sequence[str | os.PathLike], *, threads: int = 4) -> Worklist:
    """Folders and DICOMDIR files (a folder holding a DICOMDIR is still scanned as a folder)."""
    wl = Worklist()
    for inp in inputs:
        p = Path(inp)
        part = scan_dicomdir(p) if p.is_file() and p.name.upper() == "DICOMDIR" else scan_folder(p, threads=threads)
        wl.items.extend(part.items)
        wl.ignored.extend(part.ignored)
    kept: dict[str, WorkItem] = {}
    unique = []
    for it in sorted(wl.items, key=lambda i: (i.study_uid, i.sop_uid, i.path)):
        if it.key in kept:  # the same SOP Instance UID twice: processed once, reported
            wl.duplicates.append((kept[it.key].path, it.path))
            continue
        kept[it.key] = it
        unique.append(it)
    wl.items = unique
    if wl.duplicates:
        logger.warning("%d files repeat a SOP Instance UID already in the worklist; each is processed "
                       "once (see the summary)", len(wl.duplicates))
    return wl


STUDY_COLUMNS = ("StudyInstanceUID", "study_uid", "study_instance_uid", "StudyUID")
ACCESSION_COLUMNS = ("AccessionNumber", "accession", "accession_number")


def read_study_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``{"StudyInstanceUID": ...}`` or ``{"AccessionNumber": ...}`` from a CSV."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(MSG_INPUT_MISSING.format(path=p))
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        study_col = next((c for c in fields if c in STUDY_COLUMNS), None)
        acc_col = next((c for c in fields if c in ACCESSION_COLUMNS), None)
        if study_col is None and acc_col is None:
            raise ConfigError(MSG_CSV_COLUMNS.format(path=p, known=STUDY_COLUMNS + ACCESSION_COLUMNS))
        out = []
        for row in reader:
            if study_col and (row.get(study_col) or "").strip():
                out.append({"StudyInstanceUID": row[study_col].strip()})
            elif acc_col and (row.get(acc_col) or "").strip():
                out.append({"AccessionNumber": row[acc_col].strip()})
        return out


# ============================================================================================
# State database
# ============================================================================================


class BatchState:
    """What a batch output folder has finished, keyed by instance + model name + version.

    One writer (the driving process). Each :meth:`record` is one transaction (WAL,
    ``synchronous=FULL``), made only after the instance's output files are renamed into place.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS instances (
                   item_key TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
                   study_uid TEXT NOT NULL, status TEXT NOT NULL, run_id TEXT NOT NULL,
                   finished_at REAL NOT NULL, row_json TEXT NOT NULL, outputs_json TEXT NOT NULL,
                   PRIMARY KEY (item_key, model_name, model_version))"""
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def finished(self, model_name: str, model_version: str) -> set[str]:
        """Keys of instances that need no further run (processed or not applicable)."""
        cur = self._db.execute(
            "SELECT item_key FROM instances WHERE model_name=? AND model_version=? AND status!='failed'",
            (model_name, model_version),
        )
        return {r[0] for r in cur}

    def record(self, *, key: str, row: Mapping[str, Any], outputs: Sequence[str], run_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                    (key, row["model_name"], row["model_version"], row["study_uid"], row["status"], run_id,
                     time.time(), json.dumps(dict(row), default=str), json.dumps(list(outputs))),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def records(self, model_name: str | None = None, model_version: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT item_key, run_id, finished_at, row_json, outputs_json FROM instances"
        args: tuple = ()
        if model_name is not None:
            sql += " WHERE model_name=? AND model_version=?"
            args = (model_name, model_version)
        out = []
        for key, run_id, finished_at, row_json, outputs_json in self._db.execute(sql, args):
            out.append({"key": key, "run_id": run_id, "finished_at": finished_at,
                        "row": json.loads(row_json), "outputs": json.loads(outputs_json)})
        return out


# ============================================================================================
# Processing one chunk of instances (shared by the local run and the Dask workers)
# ============================================================================================


@dataclass
class Prepared:
    """An instance after the gate and the pixel pipeline (``pre`` is None unless accepted)."""

    item: WorkItem
    outcome: Any  # cxr_ai.pipeline.InstanceOutcome
    pre: Any = None  # cxr_ai.imaging.Preprocessed


def prepare(pipeline: Any, item: WorkItem) -> Prepared:
    """Read, gate and preprocess one instance (runs in the decode pool): the pipeline's stage 1."""
    outcome, pre = pipeline.prepare(item.path)
    # an unreadable file keeps the UIDs the worklist scan found for it (if any)
    outcome.sop_instance_uid = outcome.sop_instance_uid or item.sop_uid
    outcome.study_instance_uid = outcome.study_instance_uid or item.study_uid
    return Prepared(item, outcome, pre)


def infer(pipeline: Any, batch: Sequence[Prepared]) -> None:
    """Run the model on the accepted instances of ``batch`` (one engine call): stage 2."""
    pipeline.infer([(p.outcome, p.pre) for p in batch])
    for p in batch:
        p.pre = None  # free the tensor


def _kind(ds: Any) -> str:
    uid = str(getattr(ds, "SOPClassUID", ""))
    if uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "sr"
    if uid == "1.2.840.10008.5.1.4.1.1.30":
        return "pm"
    if uid.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "sc"
    return "obj"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_outputs(outcome: Any, out_dir: Path) -> list[str]:
    """Write the instance's result objects under deterministic names; return them (relative).

    Temporary names first, fsync, then rename: a kill leaves either nothing or complete files
    under the final names, which a re-run overwrites.
    """
    from cxr_ai.store.spool import fsync_dir, safe_key

    if not outcome.datasets and outcome.fhir_bundle is None:
        return []
    study_dir = out_dir / STUDIES_DIR / safe_key(outcome.study_instance_uid or "unknown")
    study_dir.mkdir(parents=True, exist_ok=True)
    sop = safe_key(outcome.sop_instance_uid)
    staged: list[tuple[Path, Path]] = []
    counts: Counter[str] = Counter()
    for ds in outcome.datasets:
        kind = _kind(ds)
        counts[kind] += 1
        final = study_dir / f"{sop}_{kind}{counts[kind]}.dcm"
        tmp = study_dir / f"{TMP_PREFIX}{final.name}"
        ds.save_as(tmp, enforce_file_format=True)
        _fsync(tmp)
        staged.append((tmp, final))
    if outcome.fhir_bundle is not None:
        final = study_dir / f"{sop}_fhir.json"
        tmp = study_dir / f"{TMP_PREFIX}{final.name}"
        tmp.write_text(json.dumps(outcome.fhir_bundle, sort_keys=True), encoding="utf-8")
        _fsync(tmp)
        staged.append((tmp, final))
    for tmp, final in staged:
        os.replace(tmp, final)
    fsync_dir(study_dir)
    return [str(final.relative_to(out_dir)) for _, final in staged]


def outcome_row(outcome: Any, *, model: Any, key: bytes, finding_keys: Sequence[str], n_outputs: int) -> dict[str, Any]:
    """One results-table row (plain JSON types) for an instance outcome."""
    rg = outcome.radiograph
    result = outcome.result
    decision = result.decision if result is not None else None
    row: dict[str, Any] = {
        "sop_uid": outcome.sop_instance_uid,
        "study_uid": outcome.study_instance_uid,
        "series_uid": rg.series_instance_uid if rg else "",
        "patient_key": patient_key(rg.patient_id, rg.issuer_of_patient_id, key=key) if rg else "",
        "source": outcome.source,
        "model_name": model.name,
        "model_version": model.version,
        "gate_accepted": bool(decision.accepted) if decision else False,
        "gate_reason": decision.reason.value if decision else outcome.reason,
    }
    findings = {f.key: f for f in (result.findings if result is not None else [])}
    for k in finding_keys:
        f = findings.get(k)
        row[f"p_{k}"] = float(f.probability) if f else None
        row[f"thr_{k}"] = float(f.threshold) if f else None
        row[f"pred_{k}"] = bool(f.positive) if f else None
    row.update(
        status=outcome.status.value,
        reason=outcome.reason,
        message=outcome.message,
        sex=(rg.sex or "") if rg else "",
        age=float(rg.age_years) if rg and rg.age_years is not None else None,
        ethnic_group=(rg.ethnic_group or "") if rg else "",
        study_date=rg.study_date.isoformat() if rg and rg.study_date else "",
        n_outputs=n_outputs,
    )
    return row


@dataclass
class Finished:
    """What one instance produced, ready for the state database."""

    key: str
    row: dict[str, Any]
    outputs: list[str]


def finish(pipeline: Any, prepared: Prepared, *, out_dir: Path, pkey: bytes, write: bool = True) -> Finished:
    """Build the result objects of an instance (after :func:`infer`), write them, make its row."""
    outcome = prepared.outcome
    if outcome.result is not None and outcome.result.findings and outcome.radiograph is not None:
        t0 = time.perf_counter()
        pipeline.build_outputs(outcome)  # same objects as the listener
        outcome.timings["outputs_s"] = time.perf_counter() - t0
    outputs = write_outputs(outcome, out_dir) if write else []
    row = outcome_row(outcome, model=pipeline.model_info, key=pkey,
                      finding_keys=_finding_keys(pipeline), n_outputs=len(outputs))
    outcome.radiograph = None  # free the pixels
    outcome.datasets = []
    return Finished(prepared.item.key, row, outputs)


def _finding_keys(pipeline: Any) -> list[str]:
    keys = list(getattr(pipeline.engine, "finding_keys", []) or [])
    return keys + [k for k in DEFAULT_FINDINGS if k not in keys]


def run_items(
    pipeline: Any,
    items: Sequence[WorkItem],
    *,
    out_dir: Path,
    pkey: bytes,
    threads: int = 2,
    batch_size: int | None = None,
    on_finished: Callable[[Finished], None] | None = None,
    write: bool = True,
) -> list[Finished]:
    """Process ``items``: a decode pool feeds engine batches, a writer pool builds outputs.

    ``on_finished`` is called in this thread, in completion order, as each instance is done
    (the caller records it). Returns everything finished, in the order of ``items``.
    """
    bs = int(batch_size or getattr(pipeline.engine, "batch_size", 8) or 8)
    threads = max(1, int(threads))
    lookahead = max(2 * bs, 2 * threads)
    results: dict[str, Finished] = {}
    pending_writes: deque[cf.Future] = deque()

    def drain(block_until: int) -> None:
        while len(pending_writes) > block_until:
            fin = pending_writes.popleft().result()
            results[fin.key] = fin
            if on_finished is not None:
                on_finished(fin)

    with cf.ThreadPoolExecutor(threads, thread_name_prefix="cxr-decode") as decode_pool, \
            cf.ThreadPoolExecutor(max(1, threads // 2), thread_name_prefix="cxr-write") as write_pool:
        it = iter(items)
        queue: deque[cf.Future] = deque()
        for item in it:
            queue.append(decode_pool.submit(prepare, pipeline, item))
            if len(queue) >= lookahead:
                break
        batch: list[Prepared] = []
        while queue:
            prepared = queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(decode_pool.submit(prepare, pipeline, nxt))
            batch.append(prepared)
            n_accepted = sum(p.pre is not None for p in batch)
            if n_accepted >= bs or not queue:
                infer(pipeline, batch)
                for p in batch:
                    pending_writes.append(write_pool.submit(finish, pipeline, p, out_dir=out_dir, pkey=pkey, write=write))
                batch = []
                drain(block_until=2 * bs)  # bounded memory: radiographs wait for their writes
        drain(block_until=0)
    return [results[i.key] for i in items if i.key in results]


# ============================================================================================
# Dask
# ============================================================================================

_WORKER_PIPELINES: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


def _worker_pipeline(config_json: str, explain: bool) -> Any:
    """The pipeline of this process for this configuration, loaded once and kept."""
    key = hashlib.sha256(f"{config_json}|{explain}".encode()).hexdigest()
    with _WORKER_LOCK:
        if key not in _WORKER_PIPELINES:
            from cxr_ai.pipeline import Pipeline

            _WORKER_PIPELINES[key] = Pipeline(config=json.loads(config_json), explain=explain)
        return _WORKER_PIPELINES[key]


def process_partition(items: list[tuple[str, str, str]], *, config_json: str, explain: bool,
                      out_dir: str, pkey_hex: str, threads: int, write: bool) -> list[dict[str, Any]]:
    """Dask task: process a partition of the worklist on this worker; return finished records."""
    pipeline = _worker_pipeline(config_json, explain)
    work = [WorkItem(*t) for t in items]
    fins = run_items(pipeline, work, out_dir=Path(out_dir), pkey=bytes.fromhex(pkey_hex),
                     threads=threads, write=write)
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


@dataclass
class BatchSummary:
    """What a run did. Counters of reasons for not-applicable and failed instances."""

    total: int = 0
    skipped: int = 0
    processed: int = 0
    not_applicable: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    ignored_files: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (kept, not processed)
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
            f"instances: {self.total} in worklist, {self.skipped} already done (skipped), "
            f"{self.done} run in {self.elapsed_s:.1f} s ({rate:.2f} img/s)",
            f"  processed:      {self.processed}",
            f"  not applicable: {sum(self.not_applicable.values())}"
            + "".join(f"\n    {r}: {n}" for r, n in sorted(self.not_applicable.items())),
            f"  failed:         {sum(self.failed.values())}"
            + "".join(f"\n    {r}: {n}" for r, n in sorted(self.failed.items())),
        ]
        if self.ignored_files:
            lines.append(f"  ignored (not DICOM): {self.ignored_files} files")
        if self.duplicates:
            lines.append(f"  duplicate SOP Instance UID (not processed; the first file was): {len(self.duplicates)} files"
                         + "".join(f"\n    {dup} (same instance as {kept})" for kept, dup in self.duplicates[:20]))
        if self.sent or self.send_errors:
            lines.append(f"  sent to PACS: {self.sent} objects, {len(self.send_errors)} errors")
        if self.table_csv:
            lines.append(f"results: {self.table_csv} and {self.table_parquet}")
        return "\n".join(lines)


@dataclass
class BatchOptions:
    """How to run. See :func:`add_batch_parser` for the meaning of each option."""

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
    send_to: Any = None  # cxr_ai.net.scu.Peer
    run_id: str = ""


def batch_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("batch", {}) if isinstance(config.get("batch", {}), Mapping) else {}


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


def write_table(rows: Iterable[Mapping[str, Any]], out_dir: Path, *, finding_keys: Sequence[str]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.parquet`` (sorted by study, instance), written atomically."""
    import pandas as pd

    cols = list(TABLE_COLUMNS)
    for k in finding_keys:
        cols += [f"p_{k}", f"thr_{k}", f"pred_{k}"]
    cols += list(TAIL_COLUMNS)
    df = pd.DataFrame(list(rows))
    for c in cols:
        if c not in df.columns:
            df[c] = None
    extra = [c for c in df.columns if c not in cols]
    df = df[cols + extra]
    if len(df):
        df = df.sort_values(["study_uid", "sop_uid", "source"], kind="stable").reset_index(drop=True)
    for k in finding_keys:
        df[f"p_{k}"] = pd.to_numeric(df[f"p_{k}"], errors="coerce").astype("float64")
        df[f"thr_{k}"] = pd.to_numeric(df[f"thr_{k}"], errors="coerce").astype("float64")
        df[f"pred_{k}"] = df[f"pred_{k}"].astype("boolean")
    df["age"] = pd.to_numeric(df["age"], errors="coerce").astype("float64")
    df["gate_accepted"] = df["gate_accepted"].astype(bool)
    df["n_outputs"] = pd.to_numeric(df["n_outputs"], errors="coerce").fillna(0).astype("int64")
    csv_path, pq_path = out_dir / "results.csv", out_dir / "results.parquet"
    tmp_csv, tmp_pq = out_dir / f"{TMP_PREFIX}results.csv", out_dir / f"{TMP_PREFIX}results.parquet"
    df.to_csv(tmp_csv, index=False)
    df.to_parquet(tmp_pq, index=False)
    os.replace(tmp_csv, csv_path)
    os.replace(tmp_pq, pq_path)
    return csv_path, pq_path


def run_batch(
    worklist: Worklist,
    *,
    options: BatchOptions,
    config: Mapping[str, Any] | None = None,
    pipeline: Any | None = None,
) -> BatchSummary:
    """Run the pipeline over ``worklist`` into ``options.out_dir`` (see the module docstring).

    Parameters
    ----------
    worklist
        From :func:`scan_inputs` or :func:`retrieve_studies`.
    options
        Output folder, resume/force, pools, Dask, progress.
    config
        Loaded configuration; defaults when None.
    pipeline
        A ready :class:`cxr_ai.pipeline.Pipeline` (local runs); built from ``config`` if None.
    """
    from cxr_ai.config import load_config

    t_start = time.perf_counter()
    cfg = dict(config) if config is not None else load_config()
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary(total=len(worklist.items), ignored_files=len(worklist.ignored),
                           duplicates=list(worklist.duplicates), dry_run=options.dry_run)
    bcfg = batch_section(cfg)
    threads = options.threads or int(bcfg.get("threads", 0) or 0) or max(2, _cores())
    use_dask = bool(options.workers or options.scheduler)
    if options.workers and options.scheduler:
        raise ConfigError(MSG_WORKERS_AND_SCHEDULER)
    if options.batch_size:
        cfg.setdefault("models", {})
        cfg["models"] = {**cfg["models"], "batch_size": int(options.batch_size)}

    if pipeline is None and not use_dask:
        from cxr_ai.pipeline import Pipeline

        pipeline = Pipeline(config=cfg, explain=options.explain)
    model = pipeline.model_info if pipeline is not None else _model_info_of(cfg)
    finding_keys = _finding_keys(pipeline) if pipeline is not None else list(DEFAULT_FINDINGS)

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
        sent_lock = threading.Lock()

        plog = _prediction_log(cfg)

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

        try:
            if use_dask:
                _run_dask(todo, cfg=cfg, options=options, out_dir=out_dir, pkey=pkey, threads=threads,
                          on_finished=on_finished)
            else:
                run_items(pipeline, todo, out_dir=out_dir, pkey=pkey, threads=threads,
                          on_finished=on_finished, write=options.write_outputs)
        finally:
            bar.close()
        records = state.records(model.name, model.version)
        rows = [r["row"] for r in records]
        keys = sorted({k[2:] for r in rows for k in r if k.startswith("p_")} | set(finding_keys),
                      key=lambda k: (finding_keys.index(k) if k in finding_keys else 99, k))
        csv_path, pq_path = write_table(rows, out_dir, finding_keys=keys)
        summary.table_csv, summary.table_parquet = str(csv_path), str(pq_path)
    finally:
        state.close()
    summary.elapsed_s = time.perf_counter() - t_start
    logger.info("batch done: %d processed, %d not applicable, %d failed, %d skipped",
                summary.processed, sum(summary.not_applicable.values()), sum(summary.failed.values()), summary.skipped)
    return summary


def plan(worklist: Worklist, *, out_dir: Path, config: Mapping[str, Any] | None = None,
         force: bool = False, model: Any = None) -> list[WorkItem]:
    """What a run would process (the dry run): the worklist minus what is already finished."""
    from cxr_ai.config import load_config

    cfg = dict(config) if config is not None else load_config()
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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
        per_worker_threads = max(1, _cores() // n)
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
            client.submit(process_partition, [(i.path, i.sop_uid, i.study_uid) for i in part],
                          config_json=config_json, explain=options.explain, out_dir=str(out_dir.resolve()),
                          pkey_hex=pkey.hex(), threads=threads, write=options.write_outputs,
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


# ============================================================================================
# PACS and DICOMweb sources
# ============================================================================================


def parse_peer(text: str, *, calling_ae: str = "CXR_AI") -> Any:
    """``HOST:PORT:AET`` -> :class:`cxr_ai.net.scu.Peer`."""
    from cxr_ai.net.scu import Peer

    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
        raise ConfigError(MSG_BAD_PEER.format(text=text))
    return Peer(host=parts[0], port=int(parts[1]), ae_title=parts[2], calling_ae=calling_ae)


def retrieve_studies(
    *,
    out_dir: Path,
    pacs: Any = None,
    dicomweb: str = "",
    studies: Sequence[Mapping[str, str]] = (),
    date_from: str = "",
    date_to: str = "",
    modalities: Sequence[str] = (),
    method: str = "get",
    move_port: int = 0,
    skip_sops: set[str] | None = None,
) -> Worklist:
    """Resolve studies on a PACS (C-FIND / QIDO) and fetch them into ``<out>/retrieved``.

    Instances whose SOP Instance UID is in ``skip_sops`` (already finished) are not fetched
    when the PACS lists instances; a study already on disk is not fetched again.
    """
    from cxr_ai.net import query

    dest = Path(out_dir) / RETRIEVED_DIR
    if dicomweb:
        query_studies = query.DicomWebSource(dicomweb)
    elif pacs is not None:
        query_studies = query.DimseSource(pacs, method=method, move_port=move_port)
    else:
        raise ConfigError(MSG_NEED_PACS)
    uids: list[str] = []
    for s in studies:
        uids.extend(query_studies.find_study_uids(
            study_uid=s.get("StudyInstanceUID", ""), accession=s.get("AccessionNumber", "")))
    if date_from or date_to or (modalities and not studies):
        uids.extend(query_studies.find_study_uids(date_from=date_from, date_to=date_to, modalities=tuple(modalities)))
    seen: set[str] = set()
    for uid in uids:
        if uid in seen:
            continue
        seen.add(uid)
        sops = set(query_studies.list_instances(uid))
        if skip_sops is not None and sops and sops <= skip_sops:
            logger.info("study %d of %d already done; not retrieving it", len(seen), len(uids))
            continue
        query_studies.fetch_study(uid, dest)
    return scan_folder(dest) if dest.exists() else Worklist()


# ============================================================================================
# CLI
# ============================================================================================


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``batch`` sub-command to a ``cxr-ai`` sub-parser set."""
    p = subparsers.add_parser(
        "batch", help="run the models over a folder, a DICOMDIR or studies pulled from PACS",
        description="Run the pipeline over a worklist; resumable (re-running skips what this "
        "model version finished), with a results table (CSV + Parquet) and the same result objects "
        "as the listener.")
    _fill_parser(p)
    p.set_defaults(func=_cmd_batch)
    return p


def _fill_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="folders (recursive) and/or DICOMDIR files")
    p.add_argument("--out", required=True, help="output folder (results table, state, result objects)")
    p.add_argument("--config", default=None, help="site config TOML")
    src = p.add_argument_group("PACS / DICOMweb sources")
    src.add_argument("--studies", default=None, help="CSV with a StudyInstanceUID or AccessionNumber column")
    src.add_argument("--pacs", default=None, help="HOST:PORT:AET of the PACS to query and retrieve from")
    src.add_argument("--calling-ae", default="CXR_AI", help="our AE title (default CXR_AI)")
    src.add_argument("--retrieve", choices=("get", "move"), default="get", help="C-GET (default) or C-MOVE")
    src.add_argument("--move-port", type=int, default=0, help="port of our C-MOVE destination SCP (0 = free port)")
    src.add_argument("--dicomweb", default="", help="DICOMweb base URL (QIDO-RS/WADO-RS) instead of --pacs")
    src.add_argument("--date-from", default="", help="query studies from this StudyDate (YYYYMMDD)")
    src.add_argument("--date-to", default="", help="query studies up to this StudyDate (YYYYMMDD)")
    src.add_argument("--modality", action="append", default=[], help="modality to query (repeatable; e.g. CR, DX)")
    run = p.add_argument_group("running")
    run.add_argument("--force", action="store_true", help="reprocess instances this model version already finished")
    run.add_argument("--dry-run", action="store_true", help="list what would run, process nothing")
    run.add_argument("--no-explain", action="store_true", help="no heatmaps (no SC / Parametric Map), faster")
    run.add_argument("--no-outputs", action="store_true", help="results table only, no result objects written")
    run.add_argument("--threads", type=int, default=0, help="decode/preprocess threads (default: [batch] threads or cores)")
    run.add_argument("--batch-size", type=int, default=0, help="images per model batch (default: [models] batch_size)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--send-to", default=None, help="HOST:PORT:AET to C-STORE the result objects to")
    dask = p.add_argument_group("Dask")
    dask.add_argument("--workers", type=int, default=0, help="start a local Dask cluster with N worker processes")
    dask.add_argument("--scheduler", default="", help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786")


def _cmd_batch(args: argparse.Namespace) -> int:
    from cxr_ai.config import load_config

    cfg = load_config(args.config)
    out_dir = Path(args.out)
    options = BatchOptions(
        out_dir=out_dir, force=args.force, dry_run=args.dry_run, explain=not args.no_explain,
        threads=args.threads, batch_size=args.batch_size, progress=not args.no_progress,
        workers=args.workers, scheduler=args.scheduler, write_outputs=not args.no_outputs,
        send_to=parse_peer(args.send_to, calling_ae=args.calling_ae) if args.send_to else None,
    )
    if args.workers and args.scheduler:
        raise ConfigError(MSG_WORKERS_AND_SCHEDULER)
    worklist = scan_inputs(args.inputs, threads=max(2, _cores())) if args.inputs else Worklist()
    wants_pacs = bool(args.studies or args.date_from or args.date_to or args.modality)
    if wants_pacs:
        pacs = parse_peer(args.pacs, calling_ae=args.calling_ae) if args.pacs else None
        if pacs is None and not args.dicomweb:
            raise ConfigError(MSG_NEED_PACS)
        skip: set[str] = set()
        if not args.force and (out_dir / STATE_DB_NAME).exists():
            state = BatchState(out_dir / STATE_DB_NAME)
            try:
                model = _model_info_of(cfg)
                skip = state.finished(model.name, model.version)
            finally:
                state.close()
        if args.dry_run:
            from cxr_ai.net import query

            source = query.DicomWebSource(args.dicomweb) if args.dicomweb else query.DimseSource(pacs)
            rows = read_study_csv(args.studies) if args.studies else []
            for r in rows:
                for uid in source.find_study_uids(study_uid=r.get("StudyInstanceUID", ""), accession=r.get("AccessionNumber", "")):
                    print(f"would retrieve study {uid}")
            if args.date_from or args.date_to or args.modality:
                for uid in source.find_study_uids(date_from=args.date_from, date_to=args.date_to, modalities=tuple(args.modality)):
                    print(f"would retrieve study {uid}")
        else:
            fetched = retrieve_studies(
                out_dir=out_dir, pacs=pacs, dicomweb=args.dicomweb,
                studies=read_study_csv(args.studies) if args.studies else (),
                date_from=args.date_from, date_to=args.date_to, modalities=args.modality,
                method=args.retrieve, move_port=args.move_port, skip_sops=skip,
            )
            worklist.items.extend(fetched.items)
            worklist.ignored.extend(fetched.ignored)
    if not worklist.items and not wants_pacs:
        raise ConfigError(MSG_NO_INPUT)
    if args.dry_run:
        todo = plan(worklist, out_dir=out_dir, config=cfg, force=args.force)
        for it in todo:
            print(f"would process {it.path} (study {it.study_uid or '?'}, instance {it.sop_uid or '?'})")
        print(f"{len(todo)} of {len(worklist.items)} instances would run "
              f"({len(worklist.items) - len(todo)} already done); {len(worklist.ignored)} non-DICOM files ignored")
        return 0
    summary = run_batch(worklist, options=options, config=cfg)
    print(summary.text())
    return 0 if not summary.failed else 1


def batch_main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxr_ai.batch`` / ``cxr-ai batch``: see :func:`add_batch_parser`."""
    parser = argparse.ArgumentParser(prog="cxr-ai batch", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    _fill_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _cmd_batch(args)
    except CxrAiError as exc:
        print(f"cxr-ai batch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(batch_main())
