"""The results table: its columns, one row per instance outcome, and the CSV + Parquet writer."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cxr_ai.batch.state import TMP_PREFIX, patient_key

#: Columns of the results table, in order; ``p_<key>``, ``thr_<key>``, ``pred_<key>`` follow
#: for each finding of the model (e.g. cardiomegaly, low_ef), then :data:`TAIL_COLUMNS`.
TABLE_COLUMNS: tuple[str, ...] = (
    "sop_uid", "study_uid", "series_uid", "patient_key", "source",
    "model_name", "model_version", "gate_accepted", "gate_reason",
)
TAIL_COLUMNS: tuple[str, ...] = ("status", "reason", "message", "sex", "age", "ethnic_group", "n_outputs")
#: Findings every table carries columns for, even before a model reports them.
DEFAULT_FINDINGS: tuple[str, ...] = ("cardiomegaly", "low_ef")


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
        study_time=rg.study_time if rg else "",
        n_outputs=n_outputs,
        report_uid=report_identifier(outcome),
    )
    return row


def report_identifier(outcome: Any) -> str:
    """The identifier of the instance's AI report: the SR's SOP Instance UID, which is also the
    FHIR DiagnosticReport identifier (:mod:`cxr_ai.fhir`); taken from the FHIR bundle when no
    SR was built; ``""`` when no report was made (rejected, failed, ``--no-outputs``)."""
    outputs = outcome.outputs
    if outputs.sr is not None:
        return str(outputs.sr.SOPInstanceUID)
    bundle = outputs.fhir_json() or {}
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "DiagnosticReport":
            for identifier in resource.get("identifier", []):
                value = str(identifier.get("value", ""))
                if value.startswith("urn:oid:"):
                    return value[len("urn:oid:"):]
    return ""


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
