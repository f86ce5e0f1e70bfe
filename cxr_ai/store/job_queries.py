"""The job store's reads: studies, instances, deliveries and counts for the pages, the CLI,
``/metrics`` and the service's reconciliation. :class:`~cxr_ai.store.jobs.JobStore` has
them (it derives from :class:`JobQueries`); every state change is in :mod:`cxr_ai.store.jobs`.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence

from cxr_ai.store.job_records import (
    Delivery,
    DeliveryState,
    InstanceRecord,
    InstanceState,
    StudyRecord,
    StudyState,
)


class JobQueries:
    """Read-only queries over the job store's database, on this thread's connection."""

    def _conn(self) -> sqlite3.Connection:
        raise NotImplementedError  # JobStore: this thread's connection

    def study(self, study_key: str) -> StudyRecord | None:
        row = self._conn().execute("SELECT * FROM studies WHERE study_key=?", (study_key,)).fetchone()
        return StudyRecord.from_row(row) if row else None

    def studies(self, *, state: StudyState | Sequence[StudyState] | None = None, since: float | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[StudyRecord]:
        """Studies, optionally in ``state`` (one or several) and updated at or after ``since``."""
        q, args = "SELECT * FROM studies WHERE 1=1", []
        if state is not None:
            states = [state] if isinstance(state, StudyState) else list(state)
            q += f" AND state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        if since is not None:
            q += " AND updated_at>=?"
            args.append(float(since))
        q += " ORDER BY updated_at DESC" if newest_first else " ORDER BY created_at"
        if limit is not None:
            q += " LIMIT ?"
            args.append(int(limit))
        return [StudyRecord.from_row(r) for r in self._conn().execute(q, args).fetchall()]

    def find_studies(self, *, study_uid: str | None = None, job_id: str | None = None) -> list[StudyRecord]:
        """Studies by Study Instance UID or job id (exact match)."""
        if study_uid is not None:
            rows = self._conn().execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchall()
        elif job_id is not None:
            rows = self._conn().execute("SELECT * FROM studies WHERE job_id=?", (job_id,)).fetchall()
        else:
            raise ValueError("find_studies needs study_uid or job_id")
        return [StudyRecord.from_row(r) for r in rows]

    def reused_uid_instances(self) -> list[InstanceRecord]:
        """Instances whose SOP Instance UID was also received for another study or patient."""
        rows = self._conn().execute("SELECT * FROM instances WHERE uid_reused=1 ORDER BY sop_uid, received_at")
        return [InstanceRecord.from_row(r) for r in rows.fetchall()]

    def shared_study_uid_studies(self) -> list[StudyRecord]:
        """Studies whose Study Instance UID was also received for another patient (each
        patient's images are a study of their own), by UID then creation."""
        rows = self._conn().execute(
            "SELECT * FROM studies WHERE study_uid IN (SELECT study_uid FROM studies GROUP BY study_uid"
            " HAVING COUNT(*) > 1) ORDER BY study_uid, created_at").fetchall()
        return [StudyRecord.from_row(r) for r in rows]

    def job_states(self) -> dict[str, tuple[str, str, float]]:
        """job id → (state, reason, created_at) of every study (one light query, for the pages)."""
        cur = self._conn().cursor()
        cur.row_factory = None  # plain tuples: 10,000 rows in a few ms
        return {job: (state, reason, created) for job, state, reason, created in
                cur.execute("SELECT job_id, state, reason, created_at FROM studies")}

    def instances(self, study_key: str | None = None) -> list[InstanceRecord]:
        if study_key is None:
            rows = self._conn().execute("SELECT * FROM instances ORDER BY received_at, sop_key").fetchall()
        else:
            rows = self._conn().execute("SELECT * FROM instances WHERE study_key=? ORDER BY received_at, sop_key",
                                        (study_key,)).fetchall()
        return [InstanceRecord.from_row(r) for r in rows]

    def deliveries(self, *, state: DeliveryState | None = None, study_key: str | None = None) -> list[Delivery]:
        q, args = "SELECT * FROM outbox WHERE 1=1", []
        if state is not None:
            q += " AND state=?"
            args.append(state.value)
        if study_key is not None:
            q += " AND study_key=?"
            args.append(study_key)
        return [Delivery.from_row(r) for r in self._conn().execute(q + " ORDER BY id", args).fetchall()]

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts by state for studies, instances and outbox (for /metrics and the CLI)."""
        conn = self._conn()
        out: dict[str, dict[str, int]] = {}
        for table, enum_ in (("studies", StudyState), ("instances", InstanceState), ("outbox", DeliveryState)):
            got = {r["state"]: r["n"] for r in conn.execute(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")}
            out[table] = {s.value: int(got.get(s.value, 0)) for s in enum_}
        row = conn.execute("SELECT COUNT(*) AS n, COUNT(DISTINCT sop_uid) AS u FROM instances WHERE uid_reused=1").fetchone()
        shared = conn.execute("SELECT COALESCE(SUM(n), 0) AS n FROM (SELECT COUNT(*) AS n FROM studies"
                              " GROUP BY study_uid HAVING COUNT(*) > 1)").fetchone()
        out["identity"] = {"sop_uid_reused_instances": int(row["n"]), "sop_uid_reused_uids": int(row["u"]),
                           "study_uid_shared_studies": int(shared["n"])}
        return out

    def unrecorded_paths(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Those of ``paths`` that no instance row points to (spool reconciliation)."""
        known = {r["path"] for r in self._conn().execute("SELECT path FROM instances")}
        return [str(p) for p in paths if str(p) not in known]

    def next_ready_at(self) -> float | None:
        row = self._conn().execute("SELECT MIN(ready_at) AS t FROM studies WHERE state=? AND ready_at IS NOT NULL",
                                   (StudyState.RECEIVED.value,)).fetchone()
        return row["t"]
