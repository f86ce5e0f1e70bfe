"""The triage worklist: studies ranked for reading, kept in SQLite, exported as CSV/JSON/FHIR.

An entry is one study *of one patient*: ``(study_uid, patient_key)`` (the pseudonymous
patient key). A Study Instance UID that a sender reused for two patients gives two entries,
each with its own findings, demographics and rank; they never merge.

Ranking (``[worklist]`` config)
-------------------------------
A study's **score** is the largest ``weight[finding] x probability`` over its *positive*
findings (probability >= the bundle's threshold), over all its instances; 0 without a positive
finding. The order is three tiers:

1. **overdue**: unread studies that have waited at least ``ageing_cap_minutes`` since they
   arrived, longest wait first. Prioritising cuts the mean wait of positives but lengthens the
   worst case for everything else; the cap bounds that worst case (no starvation): an overdue
   negative study rises above a brand-new positive one.
2. **positive**: score descending, then arrival (earlier first);
3. **routine**: arrival order (first in, first out), then score.

FHIR export (choice)
--------------------
One **Task** per unread study (FHIR R4, validated with ``fhir.resources.R4B`` like
:mod:`cxr_ai.fhir`): ``status`` requested, ``intent`` order, ``priority`` from the request
priority value set: ``asap`` for overdue, ``urgent`` for positive, ``routine`` otherwise
(``stat`` is left to clinicians: an AI triage flag is not a stat order). ``focus`` is the
ImagingStudy by identifier (``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``), ``input``
lists the AI DiagnosticReports by identifier (the SR SOP Instance UIDs, as :mod:`cxr_ai.fhir`
identifies them), ``authoredOn`` the arrival, ``restriction.period.end`` the ageing deadline,
``businessStatus`` the rank. A Task (a work item with a priority) rather than a flag on the
DiagnosticReport: worklists and RIS integrations consume Tasks, a report stays a report.

A Task is per entry, not per Study Instance UID: its uuid (the Bundle's ``fullUrl``) is a
UUIDv5 of the study UID and the patient key, so the two entries of a UID shared by two
patients give two Tasks with distinct ids. An entry without a patient key ('') keeps the uuid
of the study UID alone and the identifier ``urn:oid:<StudyInstanceUID>`` (system
``urn:ietf:rfc:3986``) that Tasks had before entries were per patient; an entry with a key is
identified by its own ``urn:uuid:<task uuid>`` (system ``urn:ietf:rfc:3986``), since the study
UID no longer names one Task. ``focus`` stays the ImagingStudy's UID either way.

The listener calls :meth:`Worklist.upsert_study` as each study's results are made; the batch
processor can load its results table (:func:`load_results_table`).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_ai.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS: dict[str, float] = {"cardiomegaly": 1.0, "low_ef": 1.5}
DEFAULT_CAP_MINUTES = 240.0
#: Where a study's wait starts: its acquisition (StudyDate + StudyTime, read as the
#: server's local time), else its receipt; or always its receipt.
WAIT_FROM = ("acquired", "received")

MSG_BAD_WEIGHT = "[worklist] weights: weight of {key!r} must be a number >= 0, got {value!r}"
MSG_BAD_CAP = "[worklist] ageing_cap_minutes must be > 0, got {value!r}"
MSG_BAD_FINDING = (
    "finding {finding!r} for study {study} lacks {missing}; give key, probability and threshold "
    "(a cxr_ai.results.FindingResult or a mapping)"
)
MSG_NO_DB = "no worklist database given: pass --db or set [worklist] path"
MSG_BAD_WAIT_FROM = "[worklist] wait_from must be one of {choices}, got {value!r}"

#: The columns of the first release. A row is one study of one patient: ``(study_uid,
#: patient_key)`` is the primary key (a sender may reuse a Study Instance UID for another
#: patient; their results must never merge). Files of the releases keyed by ``study_uid`` alone
#: are migrated on open (:meth:`Worklist._migrate_schema`).
_BASE_COLUMNS = (
    ("study_uid", "TEXT NOT NULL"),
    ("received_at", "REAL NOT NULL"),
    ("accession", "TEXT NOT NULL"),
    ("patient_key", "TEXT NOT NULL"),
    ("findings_json", "TEXT NOT NULL"),
    ("reports_json", "TEXT NOT NULL"),
    ("read_at", "REAL"),
    ("updated_at", "REAL NOT NULL"),
)
_PRIMARY_KEY = ("study_uid", "patient_key")

#: Columns added after the first release (ALTER TABLE on an older file). ``demographics_json``
#: holds patient name, ID, age and sex for the pages (same file protection as the job store);
#: it is blanked once ``demographics_until`` has passed (``[worklist] demographics_keep_hours``).
_ADDED_COLUMNS = (
    ("job_id", "TEXT NOT NULL DEFAULT ''"),
    ("acquired_at", "REAL"),
    ("reason", "TEXT NOT NULL DEFAULT ''"),
    ("demographics_json", "TEXT NOT NULL DEFAULT ''"),
    ("demographics_until", "REAL"),
)


def _create_table_sql(name: str) -> str:
    columns = ", ".join(f"{c} {decl}" for c, decl in _BASE_COLUMNS + _ADDED_COLUMNS)
    return f"CREATE TABLE {name} ({columns}, PRIMARY KEY ({', '.join(_PRIMARY_KEY)}))"


class Tier(int, enum.Enum):
    OVERDUE = 0
    POSITIVE = 1
    ROUTINE = 2


class TaskPriority(str, enum.Enum):
    """FHIR request-priority codes (http://hl7.org/fhir/request-priority)."""

    ROUTINE = "routine"
    URGENT = "urgent"
    ASAP = "asap"
    STAT = "stat"


TIER_PRIORITY = {Tier.OVERDUE: TaskPriority.ASAP, Tier.POSITIVE: TaskPriority.URGENT, Tier.ROUTINE: TaskPriority.ROUTINE}


@dataclass(frozen=True)
class TriagePolicy:
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    ageing_cap_minutes: float = DEFAULT_CAP_MINUTES
    default_weight: float = 1.0
    wait_from: str = "acquired"

    def __post_init__(self) -> None:
        for k, v in self.weights.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(MSG_BAD_WEIGHT.format(key=k, value=v))
        if not isinstance(self.ageing_cap_minutes, (int, float)) or self.ageing_cap_minutes <= 0:
            raise ConfigError(MSG_BAD_CAP.format(value=self.ageing_cap_minutes))
        if self.wait_from not in WAIT_FROM:
            raise ConfigError(MSG_BAD_WAIT_FROM.format(choices=list(WAIT_FROM), value=self.wait_from))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "TriagePolicy":
        section = (config or {}).get("worklist", config or {})
        return cls(
            weights=dict(section.get("weights", DEFAULT_WEIGHTS)),
            ageing_cap_minutes=float(section.get("ageing_cap_minutes", DEFAULT_CAP_MINUTES)),
            default_weight=float(section.get("default_weight", 1.0)),
            wait_from=str(section.get("wait_from", "acquired")),
        )

    def weight(self, key: str) -> float:
        return float(self.weights.get(key, self.default_weight))


@dataclass
class RankedStudy:
    rank: int
    study_uid: str
    tier: Tier
    priority: TaskPriority
    score: float
    wait_minutes: float
    overdue: bool
    received_at: float
    accession: str
    patient_key: str
    findings: dict[str, dict[str, Any]]
    report_uids: list[str]
    job_id: str = ""
    acquired_at: float | None = None
    reason: str = ""
    read_at: float | None = None
    updated_at: float = 0.0
    demographics: dict[str, Any] = field(default_factory=dict, repr=False)
    #: when the wait started: acquisition or receipt, per :attr:`TriagePolicy.wait_from`
    arrival_at: float = 0.0

    def flat(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "rank": self.rank, "study_uid": self.study_uid, "tier": self.tier.name.lower(),
            "priority": self.priority.value, "score": round(self.score, 6),
            "wait_minutes": round(self.wait_minutes, 2), "overdue": self.overdue,
            "received_at": _iso(self.received_at), "accession": self.accession, "patient_key": self.patient_key,
        }
        for k, f in sorted(self.findings.items()):
            row[f"p_{k}"] = f["probability"]
            row[f"pred_{k}"] = f["positive"]
        row["report_uids"] = " ".join(self.report_uids)
        return row


def _entry_where(study_uid: str, patient_key: str | None) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (and its arguments) for one patient's entry, or every entry of a UID."""
    if patient_key is None:
        return "study_uid=?", (study_uid,)
    return "study_uid=? AND patient_key=?", (study_uid, patient_key)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def _ts(value: float | dt.datetime | None) -> float:
    if value is None:
        return time.time()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ConfigError(f"received_at {value!r} has no time zone; pass an aware datetime or a POSIX time")
        return value.timestamp()
    return float(value)


def _keep_highest(into: dict[str, dict[str, Any]], findings: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``into`` with each finding of ``findings`` whose probability is higher than the one
    it has for that key (or that it lacks)."""
    for f in findings:
        if f["key"] not in into or f["probability"] > into[f["key"]]["probability"]:
            into[f["key"]] = f
    return into


def _finding_dict(f: Any, study: str) -> dict[str, Any]:
    if isinstance(f, Mapping):
        missing = [k for k in ("key", "probability", "threshold") if k not in f]
        if missing:
            raise ValueError(MSG_BAD_FINDING.format(finding=dict(f), study=study, missing=", ".join(missing)))
        key, p, thr = str(f["key"]), float(f["probability"]), float(f["threshold"])
    else:
        key, p, thr = str(f.key), float(f.probability), float(f.threshold)
    return {"key": key, "probability": p, "threshold": thr, "positive": p >= thr}


class Worklist:
    """The persistent triage worklist (SQLite; safe across threads and processes).

    Parameters
    ----------
    path
        Database file (created with its folder).
    policy
        Weights and ageing cap; :class:`TriagePolicy` defaults if None.
    """

    def __init__(self, path: str | Path, *, policy: TriagePolicy | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.policy = policy or TriagePolicy()
        self._lock = threading.Lock()
        #: (study UID, patient key) -> (updated_at, findings, report UIDs, demographics) parsed by
        #: :meth:`ranked`; the findings and demographics dicts are shared between calls (read them,
        #: don't change them)
        self._parsed: dict[tuple[str, str], tuple[float, Any, Any, Any]] = {}
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("BEGIN IMMEDIATE")  # one writer checks and changes the schema at a time
        try:
            self._migrate_schema()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _migrate_schema(self) -> None:
        """Create the table, or bring an older file to today's schema (inside the caller's
        transaction, so a failure leaves the file as it was).

        A file keyed by ``study_uid`` alone is rebuilt (SQLite cannot change a primary key):
        the old table is renamed, the new one created, every row copied with every column it
        has (the columns it lacks take their defaults), the old table dropped and the job index
        recreated. On a file already at today's schema this only checks.
        """
        info = list(self._db.execute("PRAGMA table_info(studies)"))
        if not info:
            self._db.execute(_create_table_sql("studies"))
        else:
            key = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
            have = {r[1] for r in info}
            if key != _PRIMARY_KEY:
                logger.info("worklist %s: re-keying its studies by (study_uid, patient_key)", self.path.name)
                self._db.execute("DROP INDEX IF EXISTS studies_job")
                self._db.execute("ALTER TABLE studies RENAME TO studies_by_uid")
                self._db.execute(_create_table_sql("studies"))
                cols = ", ".join(c for c, _ in _BASE_COLUMNS + _ADDED_COLUMNS if c in have)
                self._db.execute(f"INSERT INTO studies ({cols}) SELECT {cols} FROM studies_by_uid")
                self._db.execute("DROP TABLE studies_by_uid")
            else:
                for name, decl in _ADDED_COLUMNS:
                    if name not in have:
                        self._db.execute(f"ALTER TABLE studies ADD COLUMN {name} {decl}")
        self._db.execute("CREATE INDEX IF NOT EXISTS studies_job ON studies(job_id)")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Worklist":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upsert_study(self, study_uid: str, findings: Iterable[Any], *, received_at: float | dt.datetime | None = None,
                     accession: str = "", patient_key: str = "", report_uid: str = "", job_id: str = "",
                     acquired_at: float | dt.datetime | None = None, reason: str = "",
                     demographics: Mapping[str, Any] | None = None,
                     demographics_keep_seconds: float | None = None) -> None:
        """Add a study of a patient, or merge more results into it (another instance, a re-run).

        An entry is one ``(study_uid, patient_key)``: results merge only into the entry of the
        same Study Instance UID *and* patient key, so a UID a sender reused for another patient
        gives that patient an entry of their own (``patient_key`` '' is an identity too). Per
        finding the highest probability over the entry's instances is kept. The arrival time is
        the earliest one seen, so a late instance does not reset the study's wait.
        ``findings`` are :class:`cxr_ai.results.FindingResult` or mappings with ``key``,
        ``probability``, ``threshold``. ``report_uid`` is the SR SOP Instance UID (also the
        FHIR DiagnosticReport identifier).

        ``job_id`` (the listener's opaque job id, used in page URLs), ``acquired_at`` (StudyDate
        + StudyTime), ``reason`` (why the study is not applicable, when it is not) and
        ``demographics`` (patient name, ID, age, sex: shown on signed-in pages only, kept for
        ``demographics_keep_seconds``; None keeps them) are optional.
        """
        new = _keep_highest({}, (_finding_dict(f, study_uid) for f in findings))  # several instances
        ts = _ts(received_at)
        acq = None if acquired_at is None else _ts(acquired_at)
        demo_json = json.dumps(dict(demographics), sort_keys=True) if demographics else ""
        demo_until = (None if not demographics or demographics_keep_seconds is None
                      else time.time() + demographics_keep_seconds)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT received_at, accession, findings_json, reports_json, job_id, acquired_at,"
                    " reason, demographics_json, demographics_until FROM studies WHERE study_uid=? AND patient_key=?",
                    (study_uid, patient_key)).fetchone()
                if row is not None:
                    reports = json.loads(row[3])
                    ts = min(ts, row[0])
                    accession = accession or row[1]
                    job_id = job_id or row[4]
                    acq = acq if acq is not None else row[5]
                    reason = "" if new else (reason or row[6])
                    if not demo_json:
                        demo_json, demo_until = row[7], row[8]
                    new = _keep_highest(json.loads(row[2]), new.values())
                else:
                    reports = []
                if report_uid and report_uid not in reports:
                    reports.append(report_uid)
                self._db.execute(
                    "INSERT OR REPLACE INTO studies (study_uid, received_at, accession, patient_key, findings_json,"
                    " reports_json, read_at, updated_at, job_id, acquired_at, reason, demographics_json,"
                    " demographics_until) VALUES (?,?,?,?,?,?,"
                    " (SELECT read_at FROM studies WHERE study_uid=? AND patient_key=?),?,?,?,?,?,?)",
                    (study_uid, ts, accession, patient_key, json.dumps(new, sort_keys=True), json.dumps(reports),
                     study_uid, patient_key, time.time(), job_id, acq, "" if new else reason, demo_json, demo_until))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def mark_read(self, study_uid: str, *, patient_key: str | None = None, at: float | None = None,
                  read: bool = True) -> int:
        """Take a study off the worklist (it stays in the database); ``read=False`` puts it back.

        With ``patient_key`` only that patient's entry changes; None changes every entry of the
        Study Instance UID (one per patient). Returns the number of entries changed.
        """
        where, args = _entry_where(study_uid, patient_key)
        with self._lock:
            return self._db.execute(f"UPDATE studies SET read_at=?, updated_at=? WHERE {where}",
                                    (_ts(at) if read else None, time.time(), *args)).rowcount

    def remove_study(self, study_uid: str, *, patient_key: str | None = None) -> bool:
        """Delete a study from the worklist (its results were retracted). True if it was there.

        With ``patient_key`` only that patient's entry goes; None removes every entry of the
        Study Instance UID.
        """
        where, args = _entry_where(study_uid, patient_key)
        with self._lock:
            return self._db.execute(f"DELETE FROM studies WHERE {where}", args).rowcount > 0

    def purge_demographics(self, *, now: float | None = None) -> int:
        """Blank the patient demographics whose retention has passed. Returns how many."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE studies SET demographics_json='', demographics_until=NULL, updated_at=?"
                " WHERE demographics_until IS NOT NULL AND demographics_until<=?", (time.time(), _ts(now)))
            return cur.rowcount

    def last_change(self) -> tuple[int, float]:
        """(number of studies, latest update time): changes when any study arrives or changes."""
        n, t = self._db.execute("SELECT COUNT(*), COALESCE(MAX(updated_at), 0) FROM studies").fetchone()
        return int(n), float(t)

    def by_job(self, job_id: str, *, now: float | dt.datetime | None = None) -> RankedStudy | None:
        """One study by its job id (read and not-applicable ones too), or None.

        Only that row is read; its ``rank`` is 0 (ranking needs every study: :meth:`ranked`).
        """
        if not job_id:
            return None
        entries = self._entries(["job_id=?"], (job_id,), now=now)
        return entries[0][1] if entries else None

    def ranked(self, *, now: float | dt.datetime | None = None, include_read: bool = False,
               include_not_applicable: bool = False) -> list[RankedStudy]:
        """Unread studies in reading order (see the module docstring).

        Studies the models could not read (no findings; ``reason`` says why) are listed only
        with ``include_not_applicable`` (the pages show them, the exports do not).
        """
        where = [] if include_read else ["read_at IS NULL"]
        if not include_not_applicable:
            where.append("findings_json != '{}'")
        entries = self._entries(where, (), now=now)
        entries.sort(key=lambda e: e[0])
        out = []
        for i, (_, r) in enumerate(entries, start=1):
            r.rank = i
            out.append(r)
        return out

    def _entries(self, where: list[str], args: tuple[Any, ...], *,
                 now: float | dt.datetime | None) -> list[tuple[tuple[Any, ...], RankedStudy]]:
        """(sort key, unranked study) of the rows matching ``where`` (SQL conditions, ANDed)."""
        t_now = _ts(now)
        cap_s = self.policy.ageing_cap_minutes * 60.0
        sql = ("SELECT study_uid, received_at, accession, patient_key, findings_json, reports_json, job_id,"
               " acquired_at, reason, read_at, updated_at, demographics_json FROM studies")
        if where:
            sql += " WHERE " + " AND ".join(where)
        entries = []
        acquired_first = self.policy.wait_from == "acquired"
        parsed = self._parsed
        for uid, received0, acc, pkey, fj, rj, job, acq, why, read_at, upd, demo in self._db.execute(sql, args):
            hit = parsed.get((uid, pkey))
            if hit is None or hit[0] != upd:  # parse each row's JSON once per change of the row
                hit = (upd, json.loads(fj), json.loads(rj), json.loads(demo) if demo else {})
                parsed[(uid, pkey)] = hit
            _, findings, reports, demographics = hit
            score = max((self.policy.weight(k) * f["probability"] for k, f in findings.items() if f["positive"]),
                        default=0.0)
            # the wait starts at acquisition when known (and not in the future), else at receipt
            received = acq if acquired_first and acq is not None and acq <= t_now else received0
            wait = max(0.0, t_now - received)
            overdue = wait >= cap_s and read_at is None
            tier = Tier.OVERDUE if overdue else Tier.POSITIVE if score > 0 else Tier.ROUTINE
            if tier is Tier.OVERDUE:
                key = (tier.value, -wait, -score, uid, pkey)
            elif tier is Tier.POSITIVE:
                key = (tier.value, -score, received, uid, pkey)
            else:
                key = (tier.value, received, -score, uid, pkey)
            entries.append((key, RankedStudy(0, uid, tier, TIER_PRIORITY[tier], score, wait / 60.0, overdue,
                                             received0, acc, pkey, findings, list(reports), job_id=job,
                                             acquired_at=acq, reason=why, read_at=read_at, updated_at=upd,
                                             demographics=demographics, arrival_at=received)))
        return entries

    # --- exports ------------------------------------------------------------------------------

    def to_frame(self, **kw: Any):  # noqa: ANN201 - pandas.DataFrame
        import pandas as pd

        return pd.DataFrame([r.flat() for r in self.ranked(**kw)])

    def export_csv(self, path: str | Path, **kw: Any) -> Path:
        p = Path(path)
        self.to_frame(**kw).to_csv(p, index=False)
        return p

    def export_json(self, path: str | Path, **kw: Any) -> Path:
        p = Path(path)
        p.write_text(json.dumps([r.flat() for r in self.ranked(**kw)], indent=1), encoding="utf-8")
        return p

    def fhir_tasks(self, **kw: Any) -> list[Any]:
        """One validated R4 Task per unread entry (``fhir.resources.R4B`` objects)."""
        return [task_for(r, cap_minutes=self.policy.ageing_cap_minutes) for r in self.ranked(**kw)]

    def export_fhir(self, path: str | Path, **kw: Any) -> Path:
        """A FHIR ``collection`` Bundle of the Tasks, in rank order (JSON); one per entry."""
        from fhir.resources.R4B.bundle import Bundle

        cap = self.policy.ageing_cap_minutes
        bundle = Bundle.model_validate({
            "resourceType": "Bundle", "type": "collection", "timestamp": _iso(_ts(kw.get("now"))),
            "entry": [{"fullUrl": f"urn:uuid:{_task_uuid(r.study_uid, patient_key=r.patient_key)}",
                       "resource": task_for(r, cap_minutes=cap).model_dump(mode="json", exclude_none=True)}
                      for r in self.ranked(**kw)],
        })
        p = Path(path)
        p.write_text(bundle.model_dump_json(exclude_none=True), encoding="utf-8")
        return p


def _task_uuid(study_uid: str, *, patient_key: str = "") -> str:
    """The uuid of an entry's Task: of the study UID and the patient key (of the UID alone when
    the entry has no key, as before entries were per patient)."""
    import uuid

    name = f"cxr-ai-worklist-task:{study_uid}" + (f":{patient_key}" if patient_key else "")
    return str(uuid.uuid5(uuid.NAMESPACE_OID, name))


def task_for(r: RankedStudy, *, cap_minutes: float) -> Any:
    """The FHIR R4 Task of a ranked entry (validated by ``fhir.resources.R4B``); its identifier
    is per entry (see "FHIR export (choice)" in the module docstring)."""
    from fhir.resources.R4B.task import Task

    from cxr_ai.fhir import DICOM_UID_SYSTEM, uid_identifier

    positives = [k for k, f in sorted(r.findings.items()) if f["positive"]]
    description = (f"AI triage rank {r.rank}: " + (", ".join(positives) + " suspected" if positives else "no AI finding")
                   + (f"; waiting {r.wait_minutes:.0f} min, past the {cap_minutes:.0f} min cap" if r.overdue else ""))
    data: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [{"system": "urn:ietf:rfc:3986",
                        "value": (f"urn:uuid:{_task_uuid(r.study_uid, patient_key=r.patient_key)}"
                                  if r.patient_key else f"urn:oid:{r.study_uid}")}],
        "status": "requested",
        "intent": "order",
        "priority": r.priority.value,
        "description": description,
        "businessStatus": {"text": f"rank {r.rank}"},
        "focus": {"type": "ImagingStudy", "identifier": uid_identifier(r.study_uid)},
        "authoredOn": _iso(r.received_at),
        "restriction": {"period": {"start": _iso(r.received_at), "end": _iso(r.received_at + cap_minutes * 60)}},
        "input": [
            {"type": {"text": "AI DiagnosticReport"},
             "valueReference": {"type": "DiagnosticReport",
                                "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}}}
            for uid in r.report_uids
        ],
    }
    if not data["input"]:
        del data["input"]
    return Task.model_validate(data)


def acquisition_time(study_date: Any, study_time: Any = "") -> float | None:
    """POSIX time of a DICOM StudyDate (``YYYYMMDD`` or ISO) + StudyTime (``HHMMSS.ffffff``),
    read as the server's local time (DICOM times carry no zone unless TimezoneOffsetFromUTC
    says so); None when the date is missing or unreadable."""
    text = str(study_date or "").strip().replace("-", "")
    if len(text) != 8 or not text.isdigit():
        return None
    digits = "".join(c for c in str(study_time or "").split(".")[0] if c.isdigit())[:6]
    digits = (digits + "000000")[:6] if digits else "000000"
    try:
        when = dt.datetime.strptime(text + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return when.astimezone().timestamp()


def load_results_table(worklist: Worklist, table: Any, *, received_at: float | None = None) -> int:
    """Upsert the processed studies of a batch results table (DataFrame or CSV/Parquet path).

    One entry per study and patient (``study_uid`` + ``patient_key`` when the table has that
    column). Returns the number of entries loaded.

    A study's wait starts at its acquisition (the table's ``study_date`` + ``study_time``),
    else at ``received_at``; the load time is used only when neither is known.
    """
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        p = Path(table)
        table = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(
            p, dtype={"study_uid": str, "sop_uid": str, "report_uid": str, "study_date": str, "study_time": str,
                      "patient_key": str})
    keys = [c[2:] for c in table.columns if c.startswith("p_")]
    n, undated = 0, 0
    loaded_at = time.time()
    processed = table[table["status"] == "processed"]
    if "patient_key" in processed.columns:  # one entry per study and patient
        processed = processed.assign(patient_key=processed["patient_key"].fillna("").astype(str))
        groups = processed.groupby(["study_uid", "patient_key"], sort=True)
    else:
        groups = processed.groupby("study_uid", sort=True)
    for key, group in groups:
        study, patient_key = key if isinstance(key, tuple) else (key, "")
        findings = []
        for _, row in group.iterrows():
            for k in keys:
                if pd.notna(row.get(f"p_{k}")) and pd.notna(row.get(f"thr_{k}")):
                    findings.append({"key": k, "probability": float(row[f"p_{k}"]), "threshold": float(row[f"thr_{k}"])})
        reports = ([str(u) for u in group["report_uid"].dropna().unique() if str(u).strip()]
                   if "report_uid" in group else [])  # the AI reports (SR = DiagnosticReport ids)
        first = group.iloc[0]
        acquired = acquisition_time(first.get("study_date") if pd.notna(first.get("study_date")) else "",
                                    first.get("study_time") if pd.notna(first.get("study_time")) else "")
        if acquired is None and received_at is None:
            undated += 1
        arrival = received_at if received_at is not None else (acquired or loaded_at)
        worklist.upsert_study(str(study), findings, received_at=arrival, acquired_at=acquired,
                              patient_key=patient_key, report_uid=reports[0] if reports else "")
        for uid in reports[1:]:
            worklist.upsert_study(str(study), [], received_at=arrival, patient_key=patient_key, report_uid=uid)
        n += 1
    if undated:
        logger.warning("%d studies have no study date in the table; their wait starts now", undated)
    return n
