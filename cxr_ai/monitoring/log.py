"""The prediction log: one JSON line per instance, append-only, no direct identifiers.

A record holds a pseudonymous patient key (HMAC-SHA256 of IssuerOfPatientID + PatientID under
a site key), the study and SOP Instance UIDs (to match ground truth), demographics (sex, age
*band*, ethnic group / normalised race when the header has it), model name and version,
probabilities, thresholds, decisions, gate outcome and timestamps. Never a name, PatientID,
birth date, accession number or the key itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_ai.errors import ConfigError
from cxr_ai.evaluation.labels import (
    DEFAULT_AGE_EDGES,
    UNKNOWN,
    age_band,
    normalise_race,
    normalise_sex,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KEY_BYTES = 32
MSG_BAD_KEY_FILE = (
    "pseudonym key file {path} is empty or unreadable; restore it from backup (changing the key "
    "breaks matching of ground truth to earlier predictions) or delete it to start a new key."
)
MSG_SHORT_KEY = "[monitoring] pseudonym_key is shorter than 16 characters; use a long random secret."


def monitoring_dir(config: Mapping[str, Any]) -> Path:
    """``[monitoring] dir``, default ``<[store] root>/monitoring``."""
    mon = config.get("monitoring", {})
    if mon.get("dir"):
        return Path(mon["dir"])
    return Path(config.get("store", {}).get("root", "var")) / "monitoring"


def pseudonym_key_path(config: Mapping[str, Any]) -> Path | None:
    """The pseudonym key file (``[monitoring] key_file``, default ``<dir>/pseudonym.key``);
    None when the key is given in the configuration itself (``pseudonym_key``)."""
    mon = config.get("monitoring", {})
    if mon.get("pseudonym_key"):
        return None
    return Path(mon.get("key_file") or monitoring_dir(config) / "pseudonym.key")


def resolve_pseudonym_key(config: Mapping[str, Any]) -> bytes:
    """The HMAC key: ``[monitoring] pseudonym_key`` when set, else the key file (default
    ``<dir>/pseudonym.key``), generated with :func:`secrets.token_hex` and written mode 0600 on
    first use. The key is never logged."""
    mon = config.get("monitoring", {})
    path = pseudonym_key_path(config)
    if path is None:
        key = str(mon["pseudonym_key"])
        if len(key) < 16:
            raise ConfigError(MSG_SHORT_KEY)
        return key.encode("utf-8")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; read theirs
        else:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_hex(KEY_BYTES) + "\n")
            logger.info("generated a new pseudonym key in %s (keep it with the logs)", path)
    key_text = path.read_text(encoding="ascii").strip() if path.is_file() else ""
    if not key_text:
        raise ConfigError(MSG_BAD_KEY_FILE.format(path=path))
    return key_text.encode("ascii")


def patient_key(key: bytes, issuer: str | None, patient_id: str | None) -> str:
    """HMAC-SHA256 (hex) of ``issuer`` + U+001F + ``patient_id``: the same patient of the same
    issuer always gets the same key; without the site key it cannot be reversed or recomputed."""
    msg = f"{(issuer or '').strip()}\x1f{(patient_id or '').strip()}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def _iso(t: dt.datetime | None) -> str:
    t = t or dt.datetime.now(dt.timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.isoformat()


class PredictionLog:
    """Append-only JSON-lines prediction log (thread-safe within a process; one ``write`` per
    line in append mode, so concurrent processes do not interleave lines)."""

    def __init__(self, path: str | os.PathLike, *, key: bytes,
                 age_edges: Sequence[int] = DEFAULT_AGE_EDGES) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key
        self._age_edges = tuple(age_edges)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PredictionLog:
        mon = config.get("monitoring", {})
        return cls(monitoring_dir(config) / mon.get("prediction_log", "predictions.jsonl"),
                   key=resolve_pseudonym_key(config))

    def patient_key(self, issuer: str | None, patient_id: str | None) -> str:
        return patient_key(self._key, issuer, patient_id)

    def record_for(self, radiograph: Any, image_result: Any, *, source: str = "listener",
                   logged_at: dt.datetime | None = None) -> dict[str, Any]:
        """The record :meth:`log_prediction` would write (no identifiers)."""
        rg = radiograph
        model = getattr(image_result, "model", None)
        decision = image_result.decision
        sd = rg.study_date
        return {
            "schema": SCHEMA_VERSION,
            "logged_at": _iso(logged_at),
            "study_date": sd.isoformat() if sd else None,
            "source": source,
            "sop_uid": image_result.sop_instance_uid,
            "study_uid": image_result.study_instance_uid,
            "patient_key": self.patient_key(rg.issuer_of_patient_id, rg.patient_id),
            "sex": normalise_sex(rg.sex),
            "age_band": age_band(rg.age_years, edges=self._age_edges),
            "ethnic_group": rg.ethnic_group or None,
            "race": normalise_race(rg.ethnic_group) if rg.ethnic_group else UNKNOWN,
            "model_name": model.name if model else None,
            "model_version": model.version if model else None,
            "gate_accepted": bool(decision.accepted),
            "gate_reason": getattr(decision.reason, "value", str(decision.reason)),
            "findings": {f.key: {"p": float(f.probability), "threshold": float(f.threshold),
                                 "positive": bool(f.positive)} for f in image_result.findings},
        }

    def record_from_row(self, row: Mapping[str, Any], *, source: str = "batch",
                        logged_at: dt.datetime | None = None) -> dict[str, Any]:
        """The same record built from a ``cxr-ai batch`` results-table row (whose
        ``patient_key`` was made with this site key), so batch runs feed the live log too."""
        findings = {}
        for name, value in row.items():
            if name.startswith("p_") and value is not None and value == value:  # not NaN
                key = name[2:]
                findings[key] = {"p": float(value), "threshold": float(row[f"thr_{key}"]),
                                 "positive": bool(row[f"pred_{key}"])}
        ethnic = row.get("ethnic_group") or None
        return {
            "schema": SCHEMA_VERSION,
            "logged_at": _iso(logged_at),
            "study_date": row.get("study_date") or None,
            "source": source,
            "sop_uid": row["sop_uid"],
            "study_uid": row["study_uid"],
            "patient_key": row.get("patient_key", ""),
            "sex": normalise_sex(row.get("sex") or None),
            "age_band": age_band(row.get("age"), edges=self._age_edges),
            "ethnic_group": ethnic,
            "race": normalise_race(ethnic) if ethnic else UNKNOWN,
            "model_name": row.get("model_name"),
            "model_version": row.get("model_version"),
            "gate_accepted": bool(row.get("gate_accepted")),
            "gate_reason": row.get("gate_reason", ""),
            "findings": findings,
        }

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (as built by :meth:`record_for` or :meth:`record_from_row`)."""
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)

    def log_prediction(self, radiograph: Any, image_result: Any, *, source: str = "listener",
                       logged_at: dt.datetime | None = None) -> dict[str, Any]:
        """Append one record for ``image_result`` (a :class:`cxr_ai.results.ImageResult`) read
        from ``radiograph`` (a :class:`cxr_ai.dicom.reader.Radiograph`); returns it."""
        record = self.record_for(radiograph, image_result, source=source, logged_at=logged_at)
        self.append(record)
        return record

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        logger.warning("%s line %d is not JSON (a torn write?); skipped", self.path, n)

    def to_frame(self, *, findings: Sequence[str] = ("cardiomegaly", "low_ef")) -> pd.DataFrame:
        """The log as a predictions table (``cxr-ai batch`` columns + demographics + times)."""
        return records_to_frame(list(self.records()), findings=findings)


def records_to_frame(records: Sequence[Mapping[str, Any]], *,
                     findings: Sequence[str] = ("cardiomegaly", "low_ef")) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {k: r.get(k) for k in ("logged_at", "study_date", "sop_uid", "study_uid", "patient_key",
                                     "sex", "age_band", "race", "model_name", "model_version",
                                     "gate_accepted", "gate_reason")}
        for f in findings:
            fr = r.get("findings", {}).get(f)
            row[f"p_{f}"] = fr["p"] if fr else float("nan")
            row[f"thr_{f}"] = fr["threshold"] if fr else float("nan")
            row[f"pred_{f}"] = fr["positive"] if fr else False
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["logged_at"] = pd.to_datetime(frame["logged_at"], utc=True)
    return frame
