"""Withdrawing a study's results for patient safety (``cxr-ai retract``).

When a study turns out to belong to another patient, or a result must be withdrawn, cxr-ai
pulls back what it sent, everywhere it sent it:

- **PACS**: an IHE IOCM (Imaging Object Change Management) *rejection note*: a Key Object
  Selection Document (PS3.3 A.35.4, built with highdicom ``ko``) titled DCM 113001 "Rejected for
  Patient Safety Reasons" (PS3.16 CID 7011) that references every SR, heatmap SC and Parametric
  Map cxr-ai made for the study, in the study itself, sent to every DICOM / STOW-RS destination.
  A PACS that implements IOCM hides or deletes the referenced objects.
- **FHIR**: every Observation and DiagnosticReport cxr-ai sent is found by its identifier and
  updated to status ``entered-in-error`` on each FHIR destination.
- **Worklist**: the study is taken off the triage worklist (its row is deleted).
- **Audit log**: one JSON line per retraction (who, when, why, which job, what was withdrawn
  where); no patient data.
- **Job store**: the study is marked retracted (``cxr-ai jobs`` shows it).

The result objects are read from the job's result folder in the spool (``results/<job>``).
Past ``[store] keep_hours`` they are kept there as headers (no pixel data), with the FHIR
bundles, for ``[store] retract_keep_hours`` more (30 days by default), which is all a rejection
note and the FHIR updates need; after that this command cannot name them, and they must be
rejected at the PACS by hand.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import requests
from pydicom.dataset import Dataset

from cxr_ai import __version__
from cxr_ai.audit import AuditLog
from cxr_ai.dicom import codes
from cxr_ai.dicom.uids import rejection_note_uids
from cxr_ai.outputs import LISTENER_FHIR_GLOB, OutputKind, listener_glob, stored_kind
from cxr_ai.service.routing import DeliveryError, Destination, DicomDestination, FhirDestination, StowDestination
from cxr_ai.store.jobs import JobStore, StudyRecord
from cxr_ai.store.spool import Spool

logger = logging.getLogger(__name__)

#: Series number of the rejection notes (beside the SR 990, SC 991, PM 992 series).
KOS_SERIES_NUMBER = 993
#: The kinds of result object a rejection note references.
RETRACTED_KINDS = frozenset({OutputKind.SR, OutputKind.SC, OutputKind.PM, OutputKind.SEG})
#: FHIR resources cxr-ai creates per result that carry a result identity (the Device is shared).
FHIR_RETRACTED_TYPES = ("Observation", "DiagnosticReport")
ENTERED_IN_ERROR = "entered-in-error"

MSG_NO_STUDY = "no study in the job store matches {what}; check it with cxr-ai jobs --state done"
MSG_STUDY_SHARED = ("Study Instance UID {uid} was received for {n} patients, each a job of its own ({jobs}); "
                    "retract the one concerned with --job JOB (cxr-ai jobs shows them)")
MSG_NO_RESULTS = ("job {job}: its result objects are no longer in the spool ({folder}; removed by retention, "
                  "[store] keep_hours + retract_keep_hours), so cxr-ai cannot name them; reject them at the "
                  "PACS by hand")
MSG_NOTHING_SENT = ("job {job}: cxr-ai made no SR, SC, Parametric Map or Segmentation for this study; nothing "
                    "to retract at a PACS")
MSG_FHIR_HTTP = "FHIR server {url} answered HTTP {status} to {action}"


@dataclass
class Retraction:
    """What one retraction did (also the audit record, without its time and user)."""

    job_id: str
    study_uid: str
    rejected: list[str] = field(default_factory=list)        # SOP Instance UIDs in the note
    note_uid: str = ""
    note_path: str = ""
    pacs: dict[str, str] = field(default_factory=dict)       # destination -> "sent" / error
    fhir: dict[str, str] = field(default_factory=dict)       # destination -> "N marked" / error
    fhir_marked: int = 0
    worklist_removed: bool = False

    @property
    def ok(self) -> bool:
        return all(v == "sent" for v in self.pacs.values()) and not any(
            v.startswith("error") for v in self.fhir.values())


def result_objects(spool: Spool, job_id: str) -> list[Dataset]:
    """Headers of the SR / SC / PM / SEG objects in a job's result folder (no pixel data)."""
    folder = spool.results / job_id
    if not folder.is_dir():
        raise FileNotFoundError(MSG_NO_RESULTS.format(job=job_id, folder=folder))
    out: list[Dataset] = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if stored_kind(ds) in RETRACTED_KINDS:
            out.append(ds)
    return out


def fhir_bundles(spool: Spool, job_id: str) -> list[dict[str, Any]]:
    folder = spool.results / job_id
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob(LISTENER_FHIR_GLOB))]


def build_rejection_note(objects: Sequence[Dataset], *, description: str = "") -> Dataset:
    """The IOCM rejection note (KOS, title DCM 113001) referencing ``objects`` of one study."""
    if not objects:
        raise ValueError("a rejection note needs at least one object to reject")
    study_uid = str(objects[0].StudyInstanceUID)
    uids = [str(o.SOPInstanceUID) for o in objects]
    series_uid, sop_uid = rejection_note_uids(study_instance_uid=study_uid, rejected_sop_instance_uids=uids)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.REJECTED_FOR_PATIENT_SAFETY,
        referenced_objects=list(objects),
        description=(description or "cxr-ai results withdrawn for patient safety reasons")[:1024],
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=list(objects), content=content, series_instance_uid=series_uid,
        series_number=KOS_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer="cxr-ai",
    )
    note.SeriesDescription = "cxr-ai rejection note (IOCM)"
    note.SoftwareVersions = f"cxr-ai {__version__}"
    return note


def mark_entered_in_error(dest: FhirDestination, bundles: Sequence[dict[str, Any]]) -> int:
    """Set every Observation / DiagnosticReport of ``bundles`` to ``entered-in-error`` on the
    server (found by identifier). Returns how many resources were updated."""
    base = dest.url.rstrip("/")
    headers = dest.headers()
    n = 0
    for bundle in bundles:
        for entry in bundle.get("entry", []):
            resource = entry.get("resource", {})
            kind = resource.get("resourceType")
            if kind not in FHIR_RETRACTED_TYPES:
                continue
            for ident in resource.get("identifier", [])[:1]:
                query = urllib.parse.quote(f"{ident.get('system', '')}|{ident.get('value', '')}", safe="")
                r = requests.get(f"{base}/{kind}?identifier={query}", headers=headers, timeout=dest.timeout)
                if r.status_code != 200:
                    raise DeliveryError(MSG_FHIR_HTTP.format(url=dest.url, status=r.status_code, action=f"{kind} search"))
                for hit in r.json().get("entry", []):
                    found = hit.get("resource", {})
                    if found.get("resourceType") != kind or found.get("status") == ENTERED_IN_ERROR:
                        continue
                    found["status"] = ENTERED_IN_ERROR
                    put = requests.put(f"{base}/{kind}/{found['id']}", data=json.dumps(found), headers=headers,
                                       timeout=dest.timeout)
                    if put.status_code // 100 != 2:
                        raise DeliveryError(MSG_FHIR_HTTP.format(url=dest.url, status=put.status_code,
                                                                 action=f"{kind} update"))
                    n += 1
    return n


def find_studies(store: JobStore, *, study_uid: str | None = None, job_id: str | None = None,
                 accession: str | None = None, worklist: Any = None, spool: Spool | None = None) -> list[StudyRecord]:
    """The studies a ``retract`` selector names (exactly one selector)."""
    if study_uid:
        found = store.find_studies(study_uid=study_uid)
    elif job_id:
        found = store.find_studies(job_id=job_id)
    elif accession:
        uids: set[str] = set()
        if worklist is not None:
            uids |= {s.study_uid for s in worklist.ranked(include_read=True) if s.accession == accession}
        if spool is not None:  # results whose study left the worklist: the SRs name the accession
            for study in store.studies():
                folder = spool.results / study.job_id
                for path in sorted(folder.glob(listener_glob(OutputKind.SR))) if folder.is_dir() else []:
                    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
                    if str(ds.get("AccessionNumber", "")) == accession:
                        uids.add(study.study_uid)
        found = [s for uid in sorted(uids) for s in store.find_studies(study_uid=uid)]
    else:
        raise ValueError("retract needs a study UID, a job id or an accession number")
    return found


def retract_study(study: StudyRecord, *, store: JobStore, spool: Spool, destinations: Sequence[Destination],
                  worklist: Any, audit_log: Path, reason: str, user: str | None = None,
                  out_dir: Path | None = None) -> Retraction:
    """Withdraw one study's results everywhere (see the module docstring)."""
    result = Retraction(job_id=study.job_id, study_uid=study.study_uid)
    objects = result_objects(spool, study.job_id)
    bundles = fhir_bundles(spool, study.job_id)
    paths: list[Path] = []
    if objects:
        by_study: dict[str, list[Dataset]] = {}
        for o in objects:
            by_study.setdefault(str(o.StudyInstanceUID), []).append(o)
        folder = out_dir or spool.results_dir(study.job_id)
        for group in by_study.values():
            note = build_rejection_note(group, description=reason)
            path = Path(folder) / f"KO-{note.SOPInstanceUID}.dcm"
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
            os.close(fd)
            note.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
            paths.append(path)
            result.rejected += [str(o.SOPInstanceUID) for o in group]
            result.note_uid = str(note.SOPInstanceUID)
        result.note_path = str(paths[0])
    else:
        logger.warning(MSG_NOTHING_SENT.format(job=study.job_id))
    for dest in destinations:
        try:
            if isinstance(dest, (DicomDestination, StowDestination)):
                if paths:
                    dest.deliver(paths, job_id=study.job_id)
                    result.pacs[dest.name] = "sent"
            elif isinstance(dest, FhirDestination):
                n = mark_entered_in_error(dest, bundles)
                result.fhir_marked += n
                result.fhir[dest.name] = f"{n} marked {ENTERED_IN_ERROR}"
        except (DeliveryError, OSError, ValueError, requests.RequestException) as exc:
            # recorded in the audit log; the other destinations are still tried
            key = "pacs" if not isinstance(dest, FhirDestination) else "fhir"
            getattr(result, key)[dest.name] = f"error: {type(exc).__name__}: {exc}"
            logger.error("job %s: retraction at %s failed: %s", study.job_id, dest.name, type(exc).__name__)
    if worklist is not None:  # this job's entry only: another patient's study may share the Study UID
        entry = worklist.by_job(study.job_id)
        result.worklist_removed = entry is not None and worklist.remove_study(entry.study_uid,
                                                                             patient_key=entry.patient_key)
    store.mark_retracted(study.study_key)
    AuditLog(audit_log).write(
        "retract", user=user or getpass.getuser(), durable=True,
        outcome="success" if result.ok else "partial",  # which destinations failed: pacs / fhir below
        reason=reason,
        job_id=result.job_id,
        study_uid=result.study_uid,
        rejection_note_uid=result.note_uid,
        rejected_objects=result.rejected,
        pacs=result.pacs,
        fhir=result.fhir,
        worklist_removed=result.worklist_removed,
        cxr_ai_version=__version__,
    )
    logger.warning("job %s: results retracted (%d objects in a rejection note; %d FHIR resources marked %s; %s)",
                   study.job_id, len(result.rejected), result.fhir_marked, ENTERED_IN_ERROR,
                   "all destinations done" if result.ok else "SOME DESTINATIONS FAILED, see the audit log")
    return result
