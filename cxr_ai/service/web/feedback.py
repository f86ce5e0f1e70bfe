"""Radiologists' feedback from the pages: per finding agree / disagree / uncertain, kept in
SQLite (with the reader's pseudonym, never the name), and turned into monitoring truth where a
radiograph reading is a reference standard (cardiomegaly; see
:func:`cxr_ai.monitoring.truth.truth_from_feedback`)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cxr_ai.monitoring.truth import VERDICTS


@dataclass(frozen=True)
class Verdict:
    job_id: str
    finding: str
    verdict: str
    reader: str
    model_positive: bool
    became_truth: bool
    at: float

    @property
    def at_iso(self) -> str:
        return dt.datetime.fromtimestamp(self.at, dt.timezone.utc).isoformat(timespec="seconds")


class FeedbackStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS feedback (
                   id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, study_uid TEXT NOT NULL,
                   finding TEXT NOT NULL, verdict TEXT NOT NULL, reader TEXT NOT NULL,
                   model_positive INTEGER NOT NULL, became_truth INTEGER NOT NULL, at REAL NOT NULL)""")
        self._db.execute("CREATE INDEX IF NOT EXISTS feedback_job ON feedback(job_id)")

    def close(self) -> None:
        self._db.close()

    def add(self, *, job_id: str, study_uid: str, finding: str, verdict: str, reader: str,
            model_positive: bool, became_truth: bool) -> Verdict:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {VERDICTS}")
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO feedback (job_id, study_uid, finding, verdict, reader, model_positive, became_truth, at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (job_id, study_uid, finding, verdict, reader, int(model_positive), int(became_truth), now))
        return Verdict(job_id, finding, verdict, reader, model_positive, became_truth, now)

    def for_job(self, job_id: str) -> list[Verdict]:
        rows = self._db.execute(
            "SELECT job_id, finding, verdict, reader, model_positive, became_truth, at FROM feedback"
            " WHERE job_id=? ORDER BY id", (job_id,)).fetchall()
        return [Verdict(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), r[6]) for r in rows]

    def latest(self, job_id: str, reader: str) -> dict[str, str]:
        """This reader's latest verdict per finding on a study."""
        return {v.finding: v.verdict for v in self.for_job(job_id) if v.reader == reader}
