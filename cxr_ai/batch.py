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
3. **processes** the rest (:func:`run_items`): a pool of worker processes (``[batch] pool``;
   each holds the pipeline, inherited by fork or loaded once) reads, gates, decodes and
   preprocesses each instance and hands only the small model input to the driver, which runs
   the model on batches made in worklist order (on the GPU when there is one; on the CPU in
   one single-threaded "lane" per core, :func:`model_plan`); the worker that prepared an
   instance then computes its Grad-CAM maps (CPU models), builds its result objects, writes
   them and makes its table row — no Python work competes with the model loop for the GIL and
   no full-resolution image crosses between processes. A thread pool does the same where
   processes cannot start, and for results-table-only runs (``pool = "auto"``);
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
import gc
import hashlib
import json
import logging
import logging.handlers
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


#: Kinds of stage pool beside the inference loop (``[batch] pool``); "auto" = worker processes
#: when result objects are built, threads for a results-table-only run (see :func:`pool_kind`).
POOL_KINDS: tuple[str, ...] = ("auto", "processes", "threads")
#: ``[batch] start_method``: "auto" = fork on Linux (workers share the driver's loaded pipeline),
#: else spawn (each worker loads the pipeline from the configuration once).
START_METHODS: tuple[str, ...] = ("auto", "fork", "forkserver", "spawn")

MSG_BAD_POOL = '[batch] pool = {value!r} is not one of {known}; use "auto" (default), "processes" or "threads"'
MSG_BAD_START_METHOD = "[batch] start_method = {value!r} is not one of {known}"
MSG_POOL_FALLBACK = "batch worker processes not used ({why}); decoding and result objects run in threads instead"
MSG_WORKER_MODEL = (
    "a batch worker process loaded model {got!r}, not the driver's {want!r}: the driver's pipeline was not "
    "built from its configuration"
)
MSG_WORKER_DIED = (
    "a batch worker process died ({detail}); the instances finished so far are recorded: run the same "
    "command again to resume (if a worker dies again on the same input, --pool threads runs everything "
    "in one process, where the failing instance's error shows)"
)


class BatchWorkerError(CxrAiError):
    """A worker process of the batch stage pool died (killed, out of memory, crashed decoder)."""


@dataclass
class Prepared:
    """An instance after the gate and the pixel pipeline (``pre`` is None unless accepted).

    ``ticket`` identifies the instance inside one :func:`run_items` call (its position); with a
    process pool, the worker that prepared it keeps the full outcome (radiograph, decoded
    pixels) under that ticket and ``outcome`` here is a light copy without pixel data.
    """

    item: WorkItem
    outcome: Any  # cxr_ai.pipeline.InstanceOutcome
    pre: Any = None  # cxr_ai.imaging.Preprocessed
    ticket: int = -1


def prepare(pipeline: Any, item: WorkItem, *, keep_pixels: bool | None = None) -> Prepared:
    """Read, gate and preprocess one instance (runs in the stage pool): the pipeline's stage 1.

    Unless ``keep_pixels`` (default: the pipeline makes heatmaps), the decoded pixels are
    dropped once preprocessed: the SR, FHIR and table need the header only, and
    ``Radiograph.pixels()`` decodes again should anything ask. Memory per waiting instance then
    is its file's bytes, not twice that.
    """
    outcome, pre = pipeline.prepare(item.path)
    # an unreadable file keeps the UIDs the worklist scan found for it (if any)
    outcome.sop_instance_uid = outcome.sop_instance_uid or item.sop_uid
    outcome.study_instance_uid = outcome.study_instance_uid or item.study_uid
    keep = bool(getattr(pipeline, "explain", True)) if keep_pixels is None else keep_pixels
    rg = outcome.radiograph
    if pre is not None and rg is not None and not keep:
        rg._pixels = None
    return Prepared(item, outcome, pre)


def infer(pipeline: Any, batch: Sequence[Prepared], *, explain: bool | None = None) -> None:
    """Run the model on the accepted instances of ``batch`` (one engine call): stage 2.

    ``explain`` (default: the pipeline's) adds the Grad-CAM heatmaps in the same call.
    """
    pairs = [(p.outcome, p.pre) for p in batch]
    if explain is None:
        pipeline.infer(pairs)
    else:
        pipeline.infer(pairs, explain=explain)
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
    """Build the result objects of an instance (after :func:`infer`), write them, make its row.

    ``write=False`` is the results-table-only mode: no SR / SC / PM / FHIR object is built.
    """
    outcome = prepared.outcome
    if outcome.result is not None and outcome.result.findings and outcome.radiograph is not None:
        if write:
            pipeline.build_outputs(outcome)  # the same objects as the listener
        else:
            pipeline.build_outputs(outcome, parts=())  # status and message only, no object
    outputs = write_outputs(outcome, out_dir) if write else []
    row = outcome_row(outcome, model=pipeline.model_info, key=pkey,
                      finding_keys=_finding_keys(pipeline), n_outputs=len(outputs))
    outcome.radiograph = None  # free the pixels
    outcome.datasets = []
    return Finished(prepared.item.key, row, outputs)


def _finding_keys(pipeline: Any) -> list[str]:
    keys = list(getattr(pipeline.engine, "finding_keys", []) or [])
    return keys + [k for k in DEFAULT_FINDINGS if k not in keys]


def _prepare_or_finish(pipeline: Any, item: WorkItem, ticket: int, *, out_dir: Path, pkey: bytes,
                       write: bool) -> Prepared | Finished:
    """Stage 1; an instance the model will not see (not applicable, failed) is finished at once."""
    prepared = prepare(pipeline, item, keep_pixels=bool(pipeline.explain) and write)
    prepared.ticket = ticket
    if prepared.pre is None:
        return finish(pipeline, prepared, out_dir=out_dir, pkey=pkey, write=write)
    return prepared


# --- the stage pools ---------------------------------------------------------------------------


def _finish_one(pipeline: Any, prepared: Prepared, args: Mapping[str, Any]) -> list[Finished]:
    return [finish(pipeline, prepared, **args)]


class _ThreadStages:
    """Stages 1 and 3 in threads of this process (pydicom's decoders and numpy release the GIL;
    building result objects does not, so it competes with the driver)."""

    kind = "threads"
    computes_heatmaps = False  # Grad-CAM runs in the driver's model call

    def __init__(self, pipeline: Any, size: int, *, out_dir: Path, pkey: bytes, write: bool) -> None:
        self.pipeline, self.size = pipeline, size
        self._args = {"out_dir": out_dir, "pkey": pkey, "write": write}
        self._decode = cf.ThreadPoolExecutor(size, thread_name_prefix="cxr-decode")
        self._write = cf.ThreadPoolExecutor(max(1, size // 2), thread_name_prefix="cxr-write")

    def prepare(self, item: WorkItem, ticket: int) -> cf.Future:
        return self._decode.submit(_prepare_or_finish, self.pipeline, item, ticket, **self._args)

    def finish(self, batch: Sequence[Prepared]) -> list[tuple[cf.Future, int]]:
        """Stage 3 of an inferred batch: (future of a list of :class:`Finished`, its length)."""
        return [(self._write.submit(_finish_one, self.pipeline, p, self._args), 1) for p in batch]

    def close(self, *, cancel: bool = False) -> None:
        self._decode.shutdown(wait=True, cancel_futures=cancel)
        self._write.shutdown(wait=True, cancel_futures=cancel)


#: State of a batch worker process: its pipeline and the outcomes it keeps until stage 3.
_PROC: dict[str, Any] = {}


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it ends (a killed batch
    must not leave workers writing outputs nobody records)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        pass


def _proc_init(pipeline: Any, config_json: str, explain: bool, log_queue: Any, log_level: int) -> None:
    """Initializer of a worker process: one pipeline per process (inherited or loaded once);
    its log records go to the driver, which hands them to its own handlers."""
    _die_with_parent()
    import torch

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(log_level)
    torch.set_num_threads(1)  # the pixel pipeline's resize; the model runs in the driver
    _PROC.clear()
    _PROC["pipeline"] = pipeline if pipeline is not None else _worker_pipeline(config_json, explain)
    _PROC["kept"] = {}


def _proc_hello() -> str:
    return str(_PROC["pipeline"].model_info.label)


def _proc_prepare(item: WorkItem, ticket: int, out_dir: Path, pkey: bytes, write: bool) -> Prepared | Finished:
    """Worker: stage 1. The full outcome stays here; the driver gets the model input and a light
    copy (no pixels), so full-resolution images never cross between processes."""
    pipeline = _PROC["pipeline"]
    got = _prepare_or_finish(pipeline, item, ticket, out_dir=out_dir, pkey=pkey, write=write)
    if isinstance(got, Finished):
        return got
    _PROC["kept"][ticket] = got
    return Prepared(item, _light_outcome(got.outcome), got.pre, ticket)


def _proc_finish(done: list[tuple[int, Any, dict[str, float]]], heatmaps: bool, out_dir: Path, pkey: bytes,
                 write: bool) -> list[Finished]:
    """Worker: stage 3 for instances of one model batch that this process prepared, given the
    driver's model outputs (``(ticket, result, timings)``). With ``heatmaps``, their Grad-CAM
    maps are computed here first (:meth:`Pipeline.add_heatmaps`, one call), on this process's
    copy of the model, so that the explanations of several batches run in parallel."""
    pipeline = _PROC["pipeline"]
    mine: list[Prepared] = []
    for ticket, result, timings in done:
        prepared = _PROC["kept"].pop(ticket)
        prepared.outcome.result = result
        prepared.outcome.timings.update(timings)
        mine.append(prepared)
    if heatmaps:
        pipeline.add_heatmaps([(p.outcome, p.pre) for p in mine])
    out = []
    for p in mine:
        p.pre = None
        out.append(finish(pipeline, p, out_dir=out_dir, pkey=pkey, write=write))
    return out


def _light_outcome(outcome: Any) -> Any:
    """A copy of ``outcome`` for the driver: the radiograph's metadata without its data set."""
    from pydicom.dataset import Dataset

    rg = outcome.radiograph
    light_rg = dataclasses.replace(rg, dataset=Dataset(), _pixels=None) if rg is not None else None
    return dataclasses.replace(outcome, radiograph=light_rg, datasets=[], fhir_bundle=None,
                               timings=dict(outcome.timings))


def _worker_config_json(pipeline: Any) -> str:
    """The configuration a spawned worker builds its pipeline from: the driver's, on the CPU
    with one thread (workers never run the model)."""
    cfg = json.loads(json.dumps(dict(pipeline.config), default=str))
    models = dict(cfg.get("models", {}) or {})
    bundle = getattr(getattr(pipeline.engine, "bundle", None), "path", None)
    if bundle is not None and not models.get("bundle"):
        models["bundle"] = str(bundle)
    models.update(device="cpu", num_threads=1)
    cfg["models"] = models
    return json.dumps(cfg, sort_keys=True)


def _start_method(value: str) -> str:
    import multiprocessing as mp

    if value not in START_METHODS:
        raise ConfigError(MSG_BAD_START_METHOD.format(value=value, known=START_METHODS))
    available = mp.get_all_start_methods()
    if value == "auto":
        return "fork" if sys.platform.startswith("linux") and "fork" in available else "spawn"
    return value if value in available else "spawn"


def _forward_logs(queue: Any) -> None:
    """Driver thread: each worker log record to the driver's logger of the same name (so the
    driver's handlers, levels and PHI rules apply to what the workers log)."""
    while True:
        try:
            record = queue.get()
        except (EOFError, OSError, ValueError):  # closed, or a killed worker broke the stream
            return
        if record is None:
            return
        logging.getLogger(record.name).handle(record)


class _ProcessStages:
    """Stages 1 and 3 in worker processes, each with its own pipeline, so that reading,
    decoding and building result objects never hold the driver's GIL.

    One single-process executor per worker: stage 3 of an instance runs in the process that
    prepared it, which kept the decoded radiograph (no full-resolution pixels are pickled, no
    file is read twice). A new instance goes to the worker with the fewest tasks in flight.
    """

    kind = "processes"

    def __init__(self, pipeline: Any, size: int, *, out_dir: Path, pkey: bytes, write: bool,
                 start_method: str = "auto") -> None:
        import multiprocessing as mp

        self.pipeline, self.size = pipeline, size
        # Grad-CAM in the workers when the model runs on the CPU (on a GPU it stays there)
        self.computes_heatmaps = getattr(getattr(pipeline.engine, "device", None), "type", "cpu") == "cpu"
        self.start_method = _start_method(start_method)
        ctx = mp.get_context(self.start_method)
        inherit = pipeline if self.start_method == "fork" else None  # fork: no pickling, no reload
        config_json = "" if inherit is not None else _worker_config_json(pipeline)
        self._args = (out_dir, pkey, write)
        self._pools: list[cf.ProcessPoolExecutor] = []
        self._log_queue = ctx.Queue()
        self._log_queue.cancel_join_thread()  # never wait at exit on a queue a killed worker broke
        self._log_thread = threading.Thread(target=_forward_logs, args=(self._log_queue,),
                                            name="cxr-worker-logs", daemon=True)
        self._log_thread.start()
        if inherit is not None:
            # Objects that exist now go to the permanent generation: the children's garbage
            # collector then never writes to them, so their pages stay shared with this
            # process instead of being copied (most of the CPU a forked worker would spend).
            gc.freeze()
        try:
            for _ in range(size):
                self._pools.append(cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_proc_init,
                                                          initargs=(inherit, config_json, bool(pipeline.explain),
                                                                    self._log_queue, logging.getLogger().level)))
            labels = [f.result() for f in [p.submit(_proc_hello) for p in self._pools]]
        except BaseException:
            self.close(cancel=True)
            raise
        finally:
            if inherit is not None:
                gc.unfreeze()
        want = str(pipeline.model_info.label)
        if any(label != want for label in labels):
            self.close(cancel=True)
            raise ValueError(MSG_WORKER_MODEL.format(got=next(x for x in labels if x != want), want=want))
        self._inflight: list[list[cf.Future]] = [[] for _ in range(size)]
        self._where: dict[int, int] = {}

    def _least_busy(self) -> int:
        for futs in self._inflight:
            futs[:] = [f for f in futs if not f.done()]
        return min(range(self.size), key=lambda w: len(self._inflight[w]))

    def _submit(self, w: int, fn: Callable[..., Any], *args: Any) -> cf.Future:
        try:
            fut = self._pools[w].submit(fn, *args)
        except cf.BrokenExecutor as exc:
            raise BatchWorkerError(MSG_WORKER_DIED.format(detail=exc)) from exc
        self._inflight[w].append(fut)
        return fut

    def prepare(self, item: WorkItem, ticket: int) -> cf.Future:
        w = self._least_busy()
        self._where[ticket] = w
        return self._submit(w, _proc_prepare, item, ticket, *self._args)

    def finish(self, batch: Sequence[Prepared], *, heatmaps: bool = False) -> list[tuple[cf.Future, int]]:
        """Stage 3 of an inferred batch, one task per worker holding some of it."""
        by_worker: dict[int, list[tuple[int, Any, dict[str, float]]]] = {}
        for p in batch:
            by_worker.setdefault(self._where.pop(p.ticket), []).append(
                (p.ticket, p.outcome.result, dict(p.outcome.timings)))
        return [(self._submit(w, _proc_finish, done, heatmaps, *self._args), len(done))
                for w, done in by_worker.items()]

    def close(self, *, cancel: bool = False) -> None:
        for p in self._pools:
            p.shutdown(wait=True, cancel_futures=cancel)
        self._log_queue.put(None)  # after the workers exited: their last records come first
        self._log_thread.join(timeout=10)
        self._log_queue.close()


def _processes_unavailable() -> str:
    """Why worker processes cannot be started here ("" when they can)."""
    import multiprocessing as mp

    if mp.current_process().daemon:
        return "this is a daemonic process (e.g. a Dask worker), which may not start children"
    return ""


def pool_kind(value: str, *, write: bool) -> str:
    """``[batch] pool`` resolved: "auto" is "processes" when result objects are built (building
    them is Python that holds the GIL, as is Grad-CAM's bookkeeping: in threads they stall the
    model loop) and "threads" for a results-table-only run, whose read / decode / preprocess
    mostly release the GIL and then need no inter-process traffic (measured on 2 cores, see
    ``benchmarks/results/batch.json``)."""
    if value not in POOL_KINDS:
        raise ConfigError(MSG_BAD_POOL.format(value=value, known=POOL_KINDS))
    if value == "auto":
        return "processes" if write else "threads"
    return value


def _stage_pool(pipeline: Any, kind: str, size: int, *, out_dir: Path, pkey: bytes, write: bool,
                start_method: str) -> _ThreadStages | _ProcessStages:
    kind = pool_kind(kind, write=write)
    if kind == "processes":
        why = _processes_unavailable()
        if not why:
            try:
                return _ProcessStages(pipeline, size, out_dir=out_dir, pkey=pkey, write=write,
                                      start_method=start_method)
            except (OSError, ValueError, TypeError, AttributeError, ImportError, RuntimeError,
                    cf.BrokenExecutor) as exc:
                # e.g. no /dev/shm, a pipeline that cannot be pickled (spawn), a custom engine
                why = f"{type(exc).__name__}: {exc}"
        logger.info(MSG_POOL_FALLBACK.format(why=why))
    return _ThreadStages(pipeline, size, out_dir=out_dir, pkey=pkey, write=write)


def _batch_settings(pipeline: Any) -> Mapping[str, Any]:
    cfg = getattr(pipeline, "config", None)
    return batch_section(cfg) if isinstance(cfg, Mapping) else {}


@dataclass(frozen=True)
class ModelPlan:
    """How the driver runs the model: ``lanes`` batches at once, each call with ``torch_threads``
    intra-op threads (None: leave PyTorch's setting alone)."""

    lanes: int
    torch_threads: int | None


def model_plan(pipeline: Any, *, config: Mapping[str, Any] | None = None) -> ModelPlan:
    """The driver's model plan from ``[batch] model_lanes`` / ``torch_threads`` (0 = automatic)
    of ``config`` (default: the pipeline's).

    Automatic, on the CPU with ``[models] num_threads = 0``: one lane per core, one thread each.
    A forward with one thread spends the fewest CPU seconds per image, and single-threaded
    lanes share the cores with the stage pool without the model's threads spinning at their
    barriers while a worker holds a core; the engine's ``predict`` is thread-safe (Grad-CAM
    takes its own lock). With an explicit ``[models] num_threads``, or on a GPU: one lane and
    the engine's threads.
    """
    settings = batch_section(config) if config is not None else _batch_settings(pipeline)
    lanes = int(settings.get("model_lanes", 0) or 0)
    threads = int(settings.get("torch_threads", 0) or 0)
    engine = getattr(pipeline, "engine", None)
    on_cpu = getattr(getattr(engine, "device", None), "type", "cpu") == "cpu"
    models = (getattr(pipeline, "config", {}) or {}).get("models", {}) or {}
    automatic = on_cpu and int(models.get("num_threads", 0) or 0) <= 0
    if threads <= 0:
        threads = 1 if automatic else 0
    if lanes <= 0:
        lanes = max(1, _cores() // max(1, threads)) if automatic else 1
    return ModelPlan(lanes=lanes, torch_threads=threads if on_cpu and threads > 0 else None)


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
    pool: str | None = None,
    start_method: str | None = None,
    plan: ModelPlan | None = None,
) -> list[Finished]:
    """Process ``items``: a stage pool prepares and finishes instances; model lanes (threads of
    this process) run the model on batches in between.

    Parameters
    ----------
    pipeline
        A :class:`cxr_ai.pipeline.Pipeline`; the model runs in this process.
    threads
        Size of the stage pool (worker processes or threads).
    pool
        ``"processes"``: stage 1 (read, gate, decode, preprocess) and stage 3 (Grad-CAM on the
        CPU, result objects, write, table row) in worker processes, each holding a pipeline
        (inherited by fork, or loaded once), so that they run beside the model without its GIL;
        only the model input and the model outputs cross between processes. Falls back to
        threads, with a log line, where processes cannot start (inside a daemonic Dask worker,
        say). ``"threads"``: both stages in threads of this process. ``"auto"``: see
        :func:`pool_kind`. None: ``[batch] pool`` of the pipeline's config.
    start_method
        How worker processes start (see :data:`START_METHODS`); None: ``[batch] start_method``.
    plan
        Model lanes and threads (restored after the run); None: :func:`model_plan`.
    write
        False: results table only (no result object built or written).

    Batches are made in the order of ``items`` (the same batches whatever the pools), so the
    results do not depend on timing. ``on_finished`` is called in this thread, in completion
    order, as each instance is done (the caller records it). Returns everything finished, in
    the order of ``items``. Memory stays bounded: at most about ``max(2 x batch, 2 x pool)``
    instances are prepared ahead of the model, ``lanes x batch`` are in the model and
    ``2 x batch`` wait for their result objects.
    """
    if not items:
        return []
    settings = _batch_settings(pipeline)
    kind = str(pool or settings.get("pool", "auto") or "auto")
    method = str(start_method or settings.get("start_method", "auto") or "auto")
    plan = plan or model_plan(pipeline)
    bs = int(batch_size or getattr(pipeline.engine, "batch_size", 8) or 8)
    size = max(1, int(threads))
    lookahead = max(2 * bs, 2 * size)
    results: dict[str, Finished] = {}
    pending: deque[tuple[cf.Future, int]] = deque()  # stage 3 tasks in submission order, instances
    waiting = 0  # instances in stage 3
    inferring: deque[tuple[cf.Future, list[Prepared]]] = deque()  # model calls, in batch order

    stages = _stage_pool(pipeline, kind, size, out_dir=out_dir, pkey=pkey, write=write, start_method=method)
    logger.info("batch: %d instances, model batches of %d in %d lane(s)%s, stages in %d %s", len(items), bs,
                plan.lanes, f" of {plan.torch_threads} thread(s)" if plan.torch_threads else "", size, stages.kind)

    # Heatmaps are made only when result objects are; in worker processes when they can
    # (Grad-CAM of several batches then runs in parallel), else in the driver's model call.
    explain = bool(getattr(pipeline, "explain", False)) and write
    heatmaps_in_pool = explain and stages.computes_heatmaps

    def deliver(fin: Finished) -> None:
        results[fin.key] = fin
        if on_finished is not None:
            on_finished(fin)

    def drain(block_until: int) -> None:
        """Deliver finished instances; wait while more than ``block_until`` are in stage 3."""
        nonlocal waiting
        while pending and (waiting > block_until or pending[0][0].done()):
            fut, n = pending.popleft()
            waiting -= n
            for fin in _result(fut):
                deliver(fin)

    def to_stage3(done: list[Prepared]) -> None:
        nonlocal waiting
        tasks = stages.finish(done, heatmaps=True) if heatmaps_in_pool else stages.finish(done)
        pending.extend(tasks)
        waiting += sum(n for _, n in tasks)

    def harvest(block_until: int) -> None:
        """Hand inferred batches (oldest first) to stage 3."""
        while inferring and (len(inferring) > block_until or inferring[0][0].done()):
            fut, done = inferring.popleft()
            fut.result()
            to_stage3(done)

    restore: int | None = None
    if plan.torch_threads:
        import torch

        restore = torch.get_num_threads()
        torch.set_num_threads(int(plan.torch_threads))
    lanes = cf.ThreadPoolExecutor(plan.lanes, thread_name_prefix="cxr-model")
    ok = False
    try:
        it = iter(enumerate(items))
        queue: deque[cf.Future] = deque()
        for ticket, item in it:
            queue.append(stages.prepare(item, ticket))
            if len(queue) >= lookahead:
                break
        batch: list[Prepared] = []
        while queue:
            got = _result(queue.popleft())
            nxt = next(it, None)
            if nxt is not None:
                queue.append(stages.prepare(nxt[1], nxt[0]))
            if isinstance(got, Finished):  # not applicable / failed: finished by the pool
                deliver(got)
            else:
                batch.append(got)
            if batch and (len(batch) >= bs or not queue):
                harvest(block_until=plan.lanes - 1)  # a free lane
                inferring.append((lanes.submit(infer, pipeline, batch, explain=explain and not heatmaps_in_pool),
                                  batch))
                batch = []
            harvest(block_until=plan.lanes)
            drain(block_until=2 * bs)  # bounded memory: prepared outcomes wait for their outputs
        harvest(block_until=0)
        drain(block_until=0)
        ok = True
    finally:
        lanes.shutdown(wait=True, cancel_futures=not ok)
        stages.close(cancel=not ok)
        if restore is not None:
            import torch

            torch.set_num_threads(restore)
    return [results[i.key] for i in items if i.key in results]


def _result(fut: cf.Future) -> Any:
    try:
        return fut.result()
    except cf.BrokenExecutor as exc:
        raise BatchWorkerError(MSG_WORKER_DIED.format(detail=exc)) from exc


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
            (f"instances: {self.total} in worklist, {self.skipped} already done (skipped), "
             f"{self.done} run in {self.elapsed_s:.1f} s ({rate:.2f} img/s)"),
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
    pool: str = ""  # "auto" / "processes" / "threads"; "" = [batch] pool
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
    pool = str(options.pool or bcfg.get("pool", "auto") or "auto")
    pool_kind(pool, write=options.write_outputs)  # a typo fails here, before any work
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
                          batch_size=options.batch_size or None,
                          on_finished=on_finished, write=options.write_outputs, pool=pool,
                          start_method=str(bcfg.get("start_method", "auto") or "auto"),
                          plan=model_plan(pipeline, config=cfg))
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
    run.add_argument("--threads", type=int, default=0,
                     help="size of the pool that decodes and builds result objects beside the model "
                     "(worker processes or threads; default: [batch] threads, or the cores)")
    run.add_argument("--pool", choices=POOL_KINDS, default="",
                     help="where decoding and result objects run beside the model: worker processes or "
                     "threads of the driving process (default: [batch] pool, auto = processes unless "
                     "--no-outputs)")
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
        threads=args.threads, pool=args.pool, batch_size=args.batch_size, progress=not args.no_progress,
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
