"""What the pages show: worklist rows (ranked, filtered, paged) and one study's details.

The ranking is :meth:`cxr_ai.worklist.Worklist.ranked`, the same as ``cxr-ai worklist``;
studies received but not processed yet come after the ranked ones (state from the job store).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_ai.store.jobs import JobStore, StudyState
from cxr_ai.worklist import RankedStudy, Worklist

DISPLAY = {"cardiomegaly": "Cardiomegaly", "low_ef": "Low EF"}
STATES = tuple(s.value for s in StudyState)
FILTER_KEYS = ("finding", "state", "read", "date_from", "date_to", "q")


@dataclass(frozen=True)
class Filters:
    finding: str = ""      # a finding key: only studies positive for it
    state: str = ""        # a StudyState value
    read: str = "unread"   # unread | read | all
    date_from: str = ""    # YYYY-MM-DD (arrival date, server local time)
    date_to: str = ""
    q: str = ""            # accession number or patient ID (exact)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> Filters:
        data = data or {}
        out = {k: str(data.get(k, "") or "").strip()[:64] for k in FILTER_KEYS}
        if out["read"] not in ("unread", "read", "all"):
            out["read"] = "unread"
        if out["state"] not in STATES:
            out["state"] = ""
        for k in ("date_from", "date_to"):
            try:
                dt.date.fromisoformat(out[k])
            except ValueError:
                out[k] = ""
        return cls(**out)

    def to_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in FILTER_KEYS}

    @property
    def active(self) -> bool:
        return self != Filters()


@dataclass
class Row:
    rank: int | None
    job_id: str
    study: RankedStudy | None
    state: str
    arrival_at: float
    wait_minutes: float
    overdue: bool
    read: bool
    findings: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    demographics: dict[str, Any] = field(default_factory=dict)
    accession: str = ""
    tier: str = ""
    study_at: float | None = None  # acquisition (StudyDate + StudyTime), when known


def _day_bounds(text: str, *, end: bool) -> float | None:
    if not text:
        return None
    day = dt.date.fromisoformat(text) + (dt.timedelta(days=1) if end else dt.timedelta())
    return dt.datetime.combine(day, dt.time()).astimezone().timestamp()


def all_rows(worklist: Worklist, store: JobStore, *, now: float | None = None) -> list[Row]:
    """Every study in reading order, read ones included: the ranked worklist, then the job
    store's studies not on it (still in the pipeline, failed), oldest first."""
    now = time.time() if now is None else now
    states = store.job_states()
    rows: list[Row] = []
    seen: set[str] = set()
    for r in worklist.ranked(now=now, include_read=True, include_not_applicable=True):
        seen.add(r.job_id)
        state = states.get(r.job_id, ("", "", 0.0))[0] or ("not_applicable" if not r.findings else "done")
        findings = [{"key": k, "display": DISPLAY.get(k, k.replace("_", " ").capitalize()), **f}
                    for k, f in sorted(r.findings.items())]
        rows.append(Row(rank=r.rank, job_id=r.job_id, study=r, state=state, arrival_at=r.arrival_at,
                        wait_minutes=r.wait_minutes, overdue=r.overdue, read=r.read_at is not None,
                        findings=findings, reason=r.reason, demographics=r.demographics, accession=r.accession,
                        tier=r.tier.name.lower(), study_at=r.acquired_at))
    # read studies after the unread ones (the rank applies to the unread list)
    rows.sort(key=lambda row: row.read)
    rank = 0
    for row in rows:
        if not row.read:
            rank += 1
            row.rank = rank
        else:
            row.rank = None
    for job, (state, reason, created) in sorted(states.items(), key=lambda kv: kv[1][2]):
        if job in seen:  # not on the worklist (yet): still in the pipeline, failed, or being recorded
            continue
        rows.append(Row(rank=None, job_id=job, study=None, state=state, arrival_at=created,
                        wait_minutes=max(0.0, now - created) / 60.0, overdue=False, read=False,
                        reason=reason, tier="pending"))
    return rows


def filter_rows(rows: list[Row], filters: Filters) -> list[Row]:
    """The rows the filters let through, order kept."""
    lo, hi = _day_bounds(filters.date_from, end=False), _day_bounds(filters.date_to, end=True)
    q = filters.q

    def keep(row: Row) -> bool:
        if filters.read == "read" and not row.read or filters.read == "unread" and row.read:
            return False
        if filters.state and row.state != filters.state:
            return False
        if filters.finding and not any(f["key"] == filters.finding and f["positive"] for f in row.findings):
            return False
        if lo is not None and row.arrival_at < lo or hi is not None and row.arrival_at >= hi:
            return False
        if q and q != row.accession and q != str(row.demographics.get("id", "")):
            return False
        return True

    return [r for r in rows if keep(r)]


class RowCache:
    """:func:`all_rows` shared by every open page: computed again when the data changed
    (``version``), but at most once per ``min_interval`` seconds (ranking 10,000 studies takes
    a good fraction of a second of Python, which the listener's threads would feel under a
    stream of arrivals), and at least every ``max_age`` seconds (waits and overdue marks move
    with the clock). An update check that finds no change costs two small queries."""

    def __init__(self, *, min_interval: float = 3.0, max_age: float = 15.0) -> None:
        self.min_interval = min_interval
        self.max_age = max_age
        self._key: str | None = None
        self._at = -1e9
        self._rows: list[Row] = []
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Rank again at the next request (after a change made through the pages themselves)."""
        with self._lock:
            self._at = -1e9

    def get(self, version: str, make) -> tuple[list[Row], str]:  # noqa: ANN001 - a callable returning rows
        """(rows, the version they were computed at)."""
        with self._lock:
            now = time.monotonic()
            age = now - self._at
            if (self._key != version and age >= self.min_interval) or age > self.max_age:
                self._rows = make()
                self._key, self._at = version, now
            return self._rows, self._key or ""


def page_of(rows: list[Row], *, page: int, size: int) -> tuple[list[Row], int, int]:
    """(rows of page ``page`` (1-based, clamped), the page, the number of pages)."""
    pages = max(1, -(-len(rows) // size))
    page = min(max(1, page), pages)
    return rows[(page - 1) * size: page * size], page, pages


def finding_keys(worklist: Worklist) -> list[str]:
    keys = set(worklist.policy.weights)
    return sorted(keys)


# -- one study ----------------------------------------------------------------------------
@dataclass
class StudyView:
    job_id: str
    study_uid: str
    state: str
    reason: str
    ranked: RankedStudy | None
    instances: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    model: str
    not_for_clinical_use: bool
    intended_use: str
    results: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]
    frontal_sop_key: str
    heatmaps: list[str]
    files_removed: bool
    frontal_path: str = ""  # the spooled file of the frontal image
    #: other patients' studies (jobs) received under this Study Instance UID
    shared_uid_jobs: int = 0


_KIND_NAMES = {"SR": "Structured Report (SR)", "SC": "Heatmap capture (SC)", "PM": "Parametric Map (PM)",
               "fhir": "FHIR Bundle", "summary": "Summary (JSON)"}


def study_view(*, job_id: str, store: JobStore, worklist: Worklist, results_dir: Path) -> StudyView | None:
    study = next(iter(store.find_studies(job_id=job_id)), None)
    if study is None:
        return None
    ranked = worklist.by_job(job_id)
    instances, findings = [], []
    model, nfcu, intended, frontal, frontal_path = "", True, "", "", ""
    for inst in store.instances(study.study_key):
        res = inst.result or {}
        instances.append({"sop_key": inst.sop_key, "state": inst.state.value, "reason": inst.reason})
        if res.get("findings") and not frontal:
            frontal, frontal_path = inst.sop_key, inst.path
            model = str(res.get("model", ""))
            nfcu = bool(res.get("not_for_clinical_use", True))
            intended = str(res.get("intended_use", ""))
            findings = [dict(f) for f in res["findings"]]
    results = []
    if results_dir.is_dir():
        for f in sorted(results_dir.iterdir()):
            prefix = f.name.split("-")[0].split(".")[0]
            results.append({"name": f.name, "kind": _KIND_NAMES.get(prefix, prefix), "size": f.stat().st_size})
    deliveries = [{"destination": d.destination, "state": d.state.value, "attempts": d.attempts,
                   "n_objects": len(d.items), "last_error": d.last_error,
                   "sent_at": dt.datetime.fromtimestamp(d.sent_at).strftime("%Y-%m-%d %H:%M:%S") if d.sent_at else ""}
                  for d in store.deliveries(study_key=study.study_key)]
    from cxr_ai.outputs import OutputKind, listener_kind  # the result folder's names

    has_maps = any(listener_kind(str(r["name"])) is OutputKind.PM for r in results)
    heatmaps = sorted({f["key"] for f in findings}) if has_maps else []
    return StudyView(job_id=job_id, study_uid=study.study_uid, state=study.state.value, reason=study.reason,
                     ranked=ranked, instances=instances, findings=findings, model=model,
                     not_for_clinical_use=nfcu, intended_use=intended, results=results, deliveries=deliveries,
                     frontal_sop_key=frontal, heatmaps=heatmaps, files_removed=study.files_removed,
                     frontal_path=frontal_path,
                     shared_uid_jobs=len(store.find_studies(study_uid=study.study_uid)) - 1)
