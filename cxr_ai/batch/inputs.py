"""The worklist: instances from folders, DICOMDIRs, a study CSV, or studies retrieved from a
PACS (C-FIND + C-GET / C-MOVE) or by DICOMweb."""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from cxr_ai.batch.state import RETRIEVED_DIR, TMP_PREFIX
from cxr_ai.dicom.reader import is_usable_uid
from cxr_ai.dicom.uids import patient_study_fingerprint
from cxr_ai.errors import ConfigError

logger = logging.getLogger("cxr_ai.batch")  # one logger for the package (sites and tests filter on it)

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


# ============================================================================================
# BatchInputs
# ============================================================================================


@dataclass(frozen=True)
class WorkItem:
    """One instance to process. ``sop_uid``/``study_uid`` are "" when the header lacks them."""

    path: str
    sop_uid: str
    study_uid: str
    #: Fingerprint of (study, patient) (:func:`cxr_ai.dicom.uids.patient_study_fingerprint`).
    patient_fp: str = ""
    #: Set (to ``patient_fp``) when another item of the worklist has the same SOP Instance UID
    #: for another study or patient: keeps this item's state key and output names its own.
    variant: str = ""

    @property
    def key(self) -> str:
        """State key: the SOP Instance UID (with the variant when the UID is reused), or the
        path for files without one."""
        if not self.sop_uid:
            return f"file:{self.path}"
        return f"{self.sop_uid}~{self.variant}" if self.variant else self.sop_uid


@dataclass
class BatchInputs:
    """The instances one batch run reads (folders, DICOMDIRs, study lists), and what was left
    out and why. Not the triage worklist (:class:`cxr_ai.worklist.Worklist`)."""

    items: list[WorkItem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files that are not DICOM
    #: files whose SOP Instance UID another file in the worklist already has for the same study
    #: and patient: (kept, duplicate)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    #: files whose SOP Instance UID another file has for another study or patient: both are
    #: processed, with results of their own (first, other)
    uid_reused: list[tuple[str, str]] = field(default_factory=list)

    def studies(self) -> dict[str, list[WorkItem]]:
        """Items grouped by study (files without a study UID each form their own group)."""
        groups: dict[str, list[WorkItem]] = {}
        for it in self.items:
            groups.setdefault(it.study_uid or it.key, []).append(it)
        return groups


_HEADER_TAGS = ["SOPInstanceUID", "StudyInstanceUID", "PatientID", "IssuerOfPatientID"]


def _item(path: str, ds: Any) -> WorkItem:
    """A work item from a data set or a DICOMDIR instance record (attributes read by name)."""

    def text(keyword: str) -> str:
        try:
            return str(getattr(ds, keyword, "") or "")
        except (AttributeError, KeyError, ValueError):
            return ""

    study = text("StudyInstanceUID")
    fp = patient_study_fingerprint(study_instance_uid=study, patient_id=text("PatientID"),
                                   issuer_of_patient_id=text("IssuerOfPatientID"))
    return WorkItem(path, text("SOPInstanceUID"), study, fp)


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
        if not is_usable_uid(str(ds.get("SOPInstanceUID", "") or "")):
            return None
    except (EOFError, OSError):
        return None
    except Exception:  # noqa: BLE001 - a malformed header: let the pipeline report why
        return WorkItem(str(path), "", "")
    return _item(str(path), ds)


def scan_folder(root: str | os.PathLike, *, threads: int = 4) -> BatchInputs:
    """All DICOM files under ``root`` (recursive), headers read in parallel; DICOMDIRs skipped."""
    from cxr_ai.dicom.reader import iter_dicom_files

    root = Path(root)
    if not root.exists():
        raise ConfigError(MSG_INPUT_MISSING.format(path=root))
    files = [p for p in iter_dicom_files(root) if not p.name.startswith(TMP_PREFIX)]
    wl = BatchInputs()
    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        for path, item in zip(files, pool.map(_header_item, files)):
            if item is None:
                wl.ignored.append(str(path))
            else:
                wl.items.append(item)
    return wl


def scan_dicomdir(path: str | os.PathLike) -> BatchInputs:
    """The instances a DICOMDIR lists (their UIDs come from the directory records)."""
    from pydicom.fileset import FileSet

    p = Path(path)
    if not p.is_file():
        raise ConfigError(MSG_INPUT_MISSING.format(path=p))
    try:
        fs = FileSet(pydicom.dcmread(p))
    except (InvalidDicomError, ValueError, AttributeError, KeyError, OSError) as exc:
        raise ConfigError(MSG_BAD_DICOMDIR.format(path=p, detail=f"{type(exc).__name__}: {exc}")) from exc
    wl = BatchInputs()
    for inst in fs:
        wl.items.append(_item(str(inst.path), inst))
    return wl


def scan_inputs(inputs: Sequence[str | os.PathLike], *, threads: int = 4) -> BatchInputs:
    """Folders and DICOMDIR files (a folder holding a DICOMDIR is still scanned as a folder)."""
    wl = BatchInputs()
    for inp in inputs:
        p = Path(inp)
        part = scan_dicomdir(p) if p.is_file() and p.name.upper() == "DICOMDIR" else scan_folder(p, threads=threads)
        wl.items.extend(part.items)
        wl.ignored.extend(part.ignored)
    kept: dict[tuple[str, str], WorkItem] = {}
    first: dict[str, WorkItem] = {}
    unique = []
    for it in sorted(wl.items, key=lambda i: (i.study_uid, i.sop_uid, i.path)):
        if not it.sop_uid:
            unique.append(it)
            continue
        ident = (it.sop_uid, it.patient_fp)
        if ident in kept:  # the same instance twice (same study and patient): processed once, reported
            wl.duplicates.append((kept[ident].path, it.path))
            continue
        if it.sop_uid in first:  # the UID reused for another study or patient: both processed
            wl.uid_reused.append((first[it.sop_uid].path, it.path))
            it = dataclasses.replace(it, variant=it.patient_fp)
        else:
            first[it.sop_uid] = it
        kept[ident] = it
        unique.append(it)
    wl.items = unique
    if wl.duplicates:
        logger.warning("%d files repeat a SOP Instance UID already in the worklist; each is processed "
                       "once (see the summary)", len(wl.duplicates))
    if wl.uid_reused:
        logger.warning("%d files reuse a SOP Instance UID that another file has for another study or patient; "
                       "both are processed, with results of their own (see the summary)", len(wl.uid_reused))
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
) -> BatchInputs:
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
    return scan_folder(dest) if dest.exists() else BatchInputs()
