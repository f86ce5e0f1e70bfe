"""Ground-truth feed: CSV import and FHIR Observations → truth records (JSON lines), and the
match of truth to logged predictions by study UID, or by patient key within a time window.

FHIR (R4, as the rest of cxr-ai; parsed and validated with ``fhir.resources.R4B``):

- An echocardiography LVEF Observation (LOINC 10230-1, :data:`cxr_ai.dicom.codes.LVEF_MEASUREMENT`)
  with a ``valueQuantity`` in % becomes ``low_ef = LVEF <= cutoff`` (default 40 %, the HFrEF
  boundary the phantoms and the model use).
- A confirmed cardiomegaly finding (SNOMED CT 8186001, :data:`cxr_ai.dicom.codes.CARDIOMEGALY`)
  with ``valueCodeableConcept`` Present/Absent (CID 241) or ``valueBoolean`` becomes the
  cardiomegaly truth. Observations whose ``method`` is "Artificial Intelligence" (DCM 123110)
  or that carry a ``device`` are model outputs (ours included) and are ignored.
- Only ``final``, ``amended`` and ``corrected`` Observations count as confirmed.
- Study: ``derivedFrom``/``partOf`` identifier ``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``.
  Patient: ``subject.identifier``; the issuer is ``assigner.display``, else the issuer that
  ``[fhir] patient_identifier_systems`` maps to the identifier's system, else the system.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_ai.dicom import codes
from cxr_ai.monitoring.log import patient_key

logger = logging.getLogger(__name__)

CONFIRMED_STATUSES = ("final", "amended", "corrected")
DICOM_UID_SYSTEM = "urn:dicom:uid"
MSG_CSV_COLUMNS = (
    "{path}: a ground-truth CSV needs study_uid, or patient_key, or patient_id (+ issuer), and "
    "at least one of cardiomegaly, low_ef, lvef; found {found}."
)


#: Source of truth records made from a radiologist's feedback on the pages: the reader saw the
#: model's answer, so this truth is not independent of the model (reported apart from it).
FEEDBACK_SOURCE = "radiologist, AI shown"
#: Findings a radiograph reading can establish. Low EF needs echocardiography: feedback on it
#: is the reader's opinion only and never becomes truth.
FEEDBACK_TRUTH_FINDINGS = ("cardiomegaly",)
VERDICTS = ("agree", "disagree", "uncertain")


def truth_from_feedback(*, finding: str, verdict: str, model_positive: bool, study_uid: str,
                        patient_key: str | None, reader: str, observed_at: str) -> list[dict[str, Any]]:
    """A radiologist's verdict on the model's call → truth records (empty when it is none).

    ``agree`` keeps the model's call, ``disagree`` flips it, ``uncertain`` gives no truth; only
    :data:`FEEDBACK_TRUTH_FINDINGS` become truth. ``reader`` is a pseudonym.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
    if finding not in FEEDBACK_TRUTH_FINDINGS or verdict == "uncertain":
        return []
    value = int(model_positive) if verdict == "agree" else int(not model_positive)
    return [{"finding": finding, "value": value, "study_uid": study_uid, "patient_key": patient_key,
             "observed_at": observed_at, "source": FEEDBACK_SOURCE, "reader": reader}]


class TruthStore:
    """Append-only JSON-lines store of truth records::

        {"finding", "value" (0/1), "study_uid", "patient_key", "observed_at", "source", "lvef"?}
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def add(self, records: Iterable[Mapping[str, Any]]) -> int:
        lines = [json.dumps(dict(r), separators=(",", ":"), allow_nan=False) + "\n" for r in records]
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
        return len(lines)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def truth_from_csv(path: str | os.PathLike, *, key: bytes, lvef_cutoff: float = 40.0,
                   source: str = "csv") -> list[dict[str, Any]]:
    """Rows of a CSV (one per study, or per instance: deduplicated per study) → truth records.

    Columns: ``study_uid`` and/or ``patient_key`` / ``patient_id`` (+ ``issuer``: hashed here,
    never stored), optional ``observed_at``; truth in ``cardiomegaly`` and/or ``low_ef`` (0/1)
    and/or ``lvef`` (%, → low_ef at ``lvef_cutoff`` when ``low_ef`` is absent). Our phantom
    ``labels.csv`` is such a file.
    """
    table = pd.read_csv(path, dtype=str)
    ids = [c for c in ("study_uid", "patient_key", "patient_id") if c in table]
    vals = [c for c in ("cardiomegaly", "low_ef", "lvef") if c in table]
    if not ids or not vals:
        raise ValueError(MSG_CSV_COLUMNS.format(path=path, found=list(table.columns)))
    if "study_uid" in table:
        table = table.drop_duplicates("study_uid")
    out = []
    for row in table.to_dict("records"):
        pk = row.get("patient_key") or (
            patient_key(key, row.get("issuer") or "", row["patient_id"]) if row.get("patient_id") else None)
        base = {"study_uid": row.get("study_uid") or None, "patient_key": pk,
                "observed_at": row.get("observed_at") or None, "source": source}
        if row.get("cardiomegaly") not in (None, "") and not pd.isna(row.get("cardiomegaly")):
            out.append({**base, "finding": "cardiomegaly", "value": int(float(row["cardiomegaly"]))})
        if row.get("low_ef") not in (None, "") and not pd.isna(row.get("low_ef")):
            out.append({**base, "finding": "low_ef", "value": int(float(row["low_ef"]))})
        elif row.get("lvef") not in (None, "") and not pd.isna(row.get("lvef")):
            lvef = float(row["lvef"])
            out.append({**base, "finding": "low_ef", "value": int(lvef <= lvef_cutoff), "lvef": lvef})
    return out


def _has_code(concept: Any, code: Any) -> bool:
    from cxr_ai.dicom.codes import fhir_system

    system = fhir_system(code)
    return any(c.system == system and c.code == code.value for c in (getattr(concept, "coding", None) or []))


def truth_from_fhir(resource: Mapping[str, Any] | str, *, key: bytes, lvef_cutoff: float = 40.0,
                    issuer_for_system: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One FHIR R4 Observation (dict or JSON), or a Bundle of them, → truth records.

    Raises ``pydantic.ValidationError`` (from ``fhir.resources``) for an invalid resource.
    """
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.observation import Observation

    data = json.loads(resource) if isinstance(resource, str) else dict(resource)
    if data.get("resourceType") == "Bundle":
        bundle = Bundle.model_validate(data)
        out: list[dict[str, Any]] = []
        for entry in bundle.entry or []:
            if entry.resource is not None and entry.resource.get_resource_type() == "Observation":
                out += truth_from_fhir(entry.resource.model_dump(mode="json"), key=key,
                                       lvef_cutoff=lvef_cutoff, issuer_for_system=issuer_for_system)
        return out
    obs = Observation.model_validate(data)
    if obs.status not in CONFIRMED_STATUSES:
        logger.info("Observation %s has status %s, not confirmed; ignored", obs.id, obs.status)
        return []
    if obs.device is not None or (obs.method is not None and _has_code(obs.method, codes.ARTIFICIAL_INTELLIGENCE)):
        return []  # a model output, not ground truth
    study_uid = None
    for ref in (obs.derivedFrom or []) + (obs.partOf or []):
        ident = ref.identifier
        if ident is not None and ident.system == DICOM_UID_SYSTEM and ident.value:
            study_uid = ident.value.removeprefix("urn:oid:")
            break
    pk = None
    if obs.subject is not None and obs.subject.identifier is not None and obs.subject.identifier.value:
        ident = obs.subject.identifier
        issuer = (ident.assigner.display if ident.assigner is not None and ident.assigner.display
                  else (issuer_for_system or {}).get(ident.system or "", ident.system or ""))
        pk = patient_key(key, issuer, ident.value)
    when = obs.effectiveDateTime or (obs.effectivePeriod.start if obs.effectivePeriod else None) or obs.issued
    base = {"study_uid": study_uid, "patient_key": pk,
            "observed_at": when.isoformat() if hasattr(when, "isoformat") else (str(when) if when else None),
            "source": f"fhir:Observation/{obs.id}" if obs.id else "fhir"}
    if _has_code(obs.code, codes.LVEF_MEASUREMENT) and obs.valueQuantity is not None:
        lvef = float(obs.valueQuantity.value)
        return [{**base, "finding": "low_ef", "value": int(lvef <= lvef_cutoff), "lvef": lvef}]
    if _has_code(obs.code, codes.CARDIOMEGALY):
        if obs.valueBoolean is not None:
            return [{**base, "finding": "cardiomegaly", "value": int(obs.valueBoolean)}]
        if obs.valueCodeableConcept is not None:
            if _has_code(obs.valueCodeableConcept, codes.PRESENT):
                return [{**base, "finding": "cardiomegaly", "value": 1}]
            if _has_code(obs.valueCodeableConcept, codes.ABSENT):
                return [{**base, "finding": "cardiomegaly", "value": 0}]
        return [{**base, "finding": "cardiomegaly", "value": 1}]  # a confirmed finding, no value: present
    return []


def match_truth(predictions: pd.DataFrame, truth: Sequence[Mapping[str, Any]], *,
                findings: Sequence[str] = ("cardiomegaly", "low_ef"),
                window_days: float = 30.0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add one truth column per finding to logged predictions.

    A truth record with a study UID matches that study's predictions. When the predictions
    hold that Study UID for more than one patient (a sender reused it), the record matches
    only the predictions of its own patient key, and a record without one matches none
    (counted as ``ambiguous_truth``): truth never lands on another patient's prediction. A
    record without a study UID matches the same patient key's predictions whose study date
    (else log time) lies within ``window_days`` of ``observed_at`` (the nearest wins).
    Returns the frame and match counts.
    """
    out = predictions.copy()
    report: dict[str, Any] = {}
    tframe = pd.DataFrame(list(truth))
    when = pd.to_datetime(out["study_date"].fillna(out["logged_at"].astype(str).str[:10]),
                          errors="coerce", utc=True) if len(out) else pd.Series(dtype="datetime64[ns, UTC]")
    patients = out.groupby("study_uid")["patient_key"].nunique(dropna=False) if len(out) else pd.Series(dtype=int)
    shared = set(patients[patients > 1].index)
    for f in findings:
        out[f] = np.nan
        if tframe.empty:
            report[f] = {"n_truth": 0, "by_study": 0, "by_patient_window": 0, "unmatched_truth": 0,
                         "ambiguous_truth": 0}
            continue
        tf = tframe[tframe["finding"] == f]
        m, unmatched, ambiguous = _by_study(out, tf[tf["study_uid"].notna()], shared)
        out[f] = m.astype(float)
        n_study = int(m.notna().sum())
        by_pt = tf[tf["study_uid"].isna() & tf["patient_key"].notna()]
        n_pt = 0
        if not by_pt.empty and len(out):
            t_obs = pd.to_datetime(by_pt["observed_at"], errors="coerce", utc=True)
            for i in np.flatnonzero(out[f].isna().to_numpy()):
                cand = by_pt[(by_pt["patient_key"] == out["patient_key"].iloc[i]).to_numpy()]
                if cand.empty or pd.isna(when.iloc[i]):
                    continue
                dtd = (t_obs[cand.index] - when.iloc[i]).abs()
                ok = dtd <= pd.Timedelta(days=window_days)
                if ok.any():
                    out.iloc[i, out.columns.get_loc(f)] = float(cand.loc[dtd[ok].idxmin(), "value"])
                    n_pt += 1
            matched_keys = set(out.loc[out[f].notna(), "patient_key"])
            unmatched += int((~by_pt["patient_key"].isin(matched_keys)).sum())
        report[f] = {"n_truth": len(tf), "by_study": n_study, "by_patient_window": n_pt,
                     "unmatched_truth": unmatched, "ambiguous_truth": ambiguous}
    return out, report


def _by_study(out: pd.DataFrame, records: pd.DataFrame, shared: set[str]) -> tuple[pd.Series, int, int]:
    """(value per prediction matched by study, unmatched records, ambiguous records) for truth
    records with a study UID; ``shared``: Study UIDs the predictions hold for several patients."""
    plain = records[~records["study_uid"].isin(shared)].drop_duplicates("study_uid", keep="last")
    m = out["study_uid"].map(plain.set_index("study_uid")["value"])
    unmatched = int((~plain["study_uid"].isin(out["study_uid"])).sum())
    keyed = records[records["study_uid"].isin(shared)]
    ambiguous = int(keyed["patient_key"].isna().sum())
    keyed = keyed[keyed["patient_key"].notna()].drop_duplicates(["study_uid", "patient_key"], keep="last")
    if not keyed.empty:
        value = {(r.study_uid, r.patient_key): r.value for r in keyed.itertuples(index=False)}
        pairs = list(zip(out["study_uid"], out["patient_key"]))
        m = m.where(m.notna(), pd.Series([value.get(p, np.nan) for p in pairs], index=out.index, dtype=float))
        unmatched += len(set(value) - set(pairs))
    return m, unmatched, ambiguous
