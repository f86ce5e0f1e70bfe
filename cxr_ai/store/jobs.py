"""The job store: instances, studies and the outbox in one embedded SQLite database.

One database file holds everything that must survive a crash, so that a study's move from
"processing" to "sending" and the creation of its outbox deliveries happen in one
transaction. Each thread gets its own connection.

Durability: the database runs in WAL mode. With ``synchronous="full"`` (the default) every
committed change is on disk when a method returns. With ``"normal"`` a commit survives a
crash of the process (SIGKILL) but the last transactions may roll back after a power loss
or kernel crash; that is safe here because received files are fsync'ed in the spool first
and :meth:`JobStore.unrecorded_paths` lets the service re-record any the database lost,
and every other transaction is redone by the recovery rules (re-processing, re-sending).

Study states::

    received ──(association released + quiet period)──▶ processing ──▶ sending ──▶ results_sent ──▶ done
        ▲                                                  │  │                        (retention applied)
        └──────── new instance / restart re-queue ─────────┘  ├─▶ not_applicable (nothing to read)
                                                               └─▶ failed (pipeline error, dead letter)

Job ids (``J`` + 12 hex digits) are pseudonymous handles for logs and folder names; UIDs and
patient data never appear at INFO level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cxr_ai.store.job_records import (ClaimedStudy, Delivery, DeliveryState, InstanceRecord,
                                      InstanceResult, InstanceState, NewDelivery, ReasonCode, StudyRecord, StudyState)
from cxr_ai.store.job_queries import JobQueries
from cxr_ai.store.job_schema import SCHEMA_VERSION, connect, init_schema

#: The states, records and schema version live in :mod:`cxr_ai.store.job_records` and
#: :mod:`cxr_ai.store.job_schema`; they are imported from here throughout the code.
__all__ = [
    "SCHEMA_VERSION", "ClaimedStudy", "Delivery", "DeliveryState",
    "InstanceRecord", "InstanceResult", "InstanceState", "JobStore", "NewDelivery", "ReasonCode", "StudyRecord",
    "StudyState",
]

logger = logging.getLogger(__name__)


class JobStore(JobQueries):
    """SQLite-backed record of instances, studies and deliveries (see module docstring).

    Parameters
    ----------
    path
        Database file; its folder is created.
    clock
        Time source (seconds); tests pass their own to step through quiet periods.
    synchronous
        SQLite ``synchronous`` mode, ``"full"`` or ``"normal"`` (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike, *, clock=time.time, synchronous: str = "full") -> None:
        if synchronous.lower() not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.synchronous = synchronous.upper()
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._local = threading.local()
        # thread -> its connection; connections of finished threads (one per DICOM
        # association) are closed when the next connection is opened, so they never pile up
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._lock = threading.Lock()
        self._init_schema()

    # -- connections ----------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, synchronous=self.synchronous)
            self._local.conn = conn
            with self._lock:
                for thread in [t for t in self._conns if not t.is_alive()]:
                    self._conns.pop(thread).close()
                self._conns[threading.current_thread()] = conn
        return conn

    def open_connections(self) -> int:
        """How many connections are open (one per live thread that used the store)."""
        with self._lock:
            return len(self._conns)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction (takes the write lock at once, so read-then-write is safe)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this store opened (call once all threads are done)."""
        with self._lock:
            for c in self._conns.values():
                c.close()
            self._conns.clear()
        self._local = threading.local()

    def _init_schema(self) -> None:
        with self._tx() as conn:
            init_schema(conn, path=self.path)

    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    # -- receiving ------------------------------------------------------------------------
    def instance_key(self, *, study_key: str, sop_key: str, sop_uid: str, patient_fp: str) -> tuple[str, bool]:
        """The key (and spool file name) under which to keep an instance, and whether its SOP
        Instance UID was already received for another study or patient.

        ``sop_key`` (the safe form of the UID) unless that key is taken by an instance of
        another study or patient: then a key derived from the UID, the study and the patient,
        so both instances are kept and processed. A re-send of the same instance (same UID,
        study and patient) gets the key it had, and replaces it.
        """
        return self._instance_key(self._conn(), study_key=study_key, sop_key=sop_key, sop_uid=sop_uid,
                                  patient_fp=patient_fp)

    @staticmethod
    def _instance_key(conn: sqlite3.Connection, *, study_key: str, sop_key: str, sop_uid: str,
                      patient_fp: str) -> tuple[str, bool]:
        rows = conn.execute("SELECT sop_key, study_key, patient_fp FROM instances WHERE sop_uid=? OR sop_key=?",
                            (sop_uid, sop_key)).fetchall()
        # a row recorded before fingerprints existed (patient_fp '') matches on the study alone
        same = [r for r in rows if r["study_key"] == study_key and r["patient_fp"] in (patient_fp, "")]
        reused = len(same) < len(rows)
        if same:
            return same[0]["sop_key"], reused
        if not any(r["sop_key"] == sop_key for r in rows):
            return sop_key, reused
        digest = hashlib.sha256("\x1f".join((sop_uid, study_key, patient_fp)).encode("utf-8", "surrogateescape"))
        return "h" + digest.hexdigest()[:40], True

    def study_key(self, *, study_uid: str, patient_fp: str, proposed: str) -> tuple[str, bool]:
        """The key of the study (one patient's) an instance of ``study_uid`` belongs to, and
        whether that Study Instance UID was already received for another patient.

        The key of the study recorded for this UID and patient when there is one; else
        ``proposed`` (the safe form of the UID) unless another patient's study has it: then
        a key derived from the UID and the patient, so the two patients' studies are two
        jobs whose results, worklist entries and pages never merge.
        """
        return self._study_key(self._conn(), study_uid=study_uid, patient_fp=patient_fp, proposed=proposed)

    @staticmethod
    def _study_key(conn: sqlite3.Connection, *, study_uid: str, patient_fp: str, proposed: str) -> tuple[str, bool]:
        rows = conn.execute("SELECT study_key, study_uid, patient_fp FROM studies WHERE study_uid=? OR study_key=?",
                            (study_uid, proposed)).fetchall()
        # a study recorded before fingerprints existed (patient_fp '') matches any patient
        same = sorted((r for r in rows if r["study_uid"] == study_uid and r["patient_fp"] in (patient_fp, "")),
                      key=lambda r: r["patient_fp"] != patient_fp)
        shared = any(r["study_uid"] == study_uid and r["patient_fp"] not in (patient_fp, "") for r in rows)
        if same:
            return same[0]["study_key"], shared
        if not any(r["study_key"] == proposed for r in rows):
            return proposed, shared
        digest = hashlib.sha256("\x1f".join(("study", study_uid, patient_fp)).encode("utf-8", "surrogateescape"))
        return "h" + digest.hexdigest()[:40], True

    def record_instance(
        self, *, study_key: str, study_uid: str, sop_key: str, sop_uid: str, sop_class_uid: str,
        path: str | os.PathLike, size: int, calling_ae: str = "", patient_fp: str = "",
    ) -> StudyRecord:
        """Record a durably spooled instance and (re)open its study for processing.

        A study that already finished (or is being sent) goes back to ``received`` so the new
        instance is processed; a study being processed stays ``processing`` and the worker
        leaves the new instance for the next round. Its readiness clock restarts: the study
        is not ready until :meth:`association_closed` (or the open-association timeout).

        ``study_key`` should come from :meth:`study_key` and ``sop_key`` from
        :meth:`instance_key`; should another patient's study or instance have taken them
        meanwhile, the instance is recorded under derived keys instead (never in another
        patient's study, never over another instance). The returned record has the study's key.
        Instances whose SOP Instance UID is shared with another study or patient are marked
        ``uid_reused`` (both of them).
        """
        now = self._clock()
        with self._tx() as conn:
            study_key, _ = self._study_key(conn, study_uid=study_uid, patient_fp=patient_fp, proposed=study_key)
            sop_key, reused = self._instance_key(conn, study_key=study_key, sop_key=sop_key, sop_uid=sop_uid,
                                                 patient_fp=patient_fp)
            row = conn.execute("SELECT * FROM studies WHERE study_key=?", (study_key,)).fetchone()
            if row is not None and not row["patient_fp"] and patient_fp:
                # recorded before studies had fingerprints: from now on it is this patient's
                conn.execute("UPDATE studies SET patient_fp=? WHERE study_key=?", (patient_fp, study_key))
            if row is None:
                conn.execute(
                    "INSERT INTO studies(study_key, study_uid, job_id, state, created_at, updated_at,"
                    " last_received_at, ready_at, patient_fp) VALUES (?,?,?,?,?,?,?,NULL,?)",
                    (study_key, study_uid, _new_job_id(), StudyState.RECEIVED.value, now, now, now, patient_fp),
                )
            elif row["state"] == StudyState.PROCESSING.value:
                conn.execute("UPDATE studies SET last_received_at=?, updated_at=?, ready_at=NULL WHERE study_key=?",
                             (now, now, study_key))
            else:
                conn.execute(
                    "UPDATE studies SET state=?, reason='', reason_code='', last_received_at=?, updated_at=?,"
                    " ready_at=NULL, files_removed=0 WHERE study_key=?",
                    (StudyState.RECEIVED.value, now, now, study_key),
                )
            conn.execute(
                "INSERT INTO instances(sop_key, sop_uid, sop_class_uid, study_key, path, size, calling_ae,"
                " received_at, state, patient_fp, uid_reused) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(sop_key) DO UPDATE SET sop_uid=excluded.sop_uid,"
                " sop_class_uid=excluded.sop_class_uid, study_key=excluded.study_key, path=excluded.path,"
                " size=excluded.size, calling_ae=excluded.calling_ae, received_at=excluded.received_at,"
                " state=excluded.state, reason='', result_json=NULL, patient_fp=excluded.patient_fp,"
                " uid_reused=excluded.uid_reused",
                (sop_key, sop_uid, sop_class_uid, study_key, str(path), int(size), calling_ae, now,
                 InstanceState.RECEIVED.value, patient_fp, int(reused)),
            )
            if reused:
                conn.execute("UPDATE instances SET uid_reused=1 WHERE sop_uid=?", (sop_uid,))
            row = conn.execute("SELECT * FROM studies WHERE study_key=?", (study_key,)).fetchone()
        return StudyRecord.from_row(row)

    def association_closed(self, study_keys: Iterable[str], *, quiet_seconds: float) -> None:
        """The association that sent these studies ended: they become ready after a quiet period."""
        keys = list(dict.fromkeys(study_keys))
        if not keys:
            return
        ready = self._clock() + quiet_seconds
        with self._tx() as conn:
            conn.executemany(
                "UPDATE studies SET ready_at=?, updated_at=? WHERE study_key=? AND state IN (?,?)",
                [(ready, self._clock(), k, StudyState.RECEIVED.value, StudyState.PROCESSING.value) for k in keys],
            )

    def release_stale(self, *, max_open_seconds: float, quiet_seconds: float) -> int:
        """Make ready the studies whose association never closed and that got nothing for a while."""
        now = self._clock()
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE studies SET ready_at=? WHERE state=? AND ready_at IS NULL AND last_received_at<=?",
                (now, StudyState.RECEIVED.value, now - max_open_seconds - quiet_seconds),
            )
            return cur.rowcount

    # -- recovery -------------------------------------------------------------------------
    def recover(self, *, quiet_seconds: float) -> dict[str, int]:
        """After a restart: re-queue interrupted work. Returns counts of what was changed.

        * ``processing`` studies (and their instances) go back to ``received``, ready now;
        * ``received`` studies whose association died with the process get a quiet period.
        Outbox deliveries need nothing: pending rows are simply retried.
        """
        now = self._clock()
        with self._tx() as conn:
            # A row whose state this version does not know (a corrupted or foreign database)
            # would break every listing: fail the study visibly instead, with the state found.
            known = [s.value for s in StudyState]
            marks = ",".join("?" * len(known))
            n_bad = conn.execute(
                f"UPDATE studies SET reason='job store row had an unknown state ' || quote(state) ||"
                f" '; marked failed at start', state=?, reason_code=?, updated_at=? WHERE state NOT IN ({marks})",
                (StudyState.FAILED.value, ReasonCode.UNKNOWN_STATE.value, now, *known),
            ).rowcount
            known_i = [s.value for s in InstanceState]
            conn.execute(
                f"UPDATE instances SET reason='unknown state ' || quote(state), state=? "
                f"WHERE state NOT IN ({','.join('?' * len(known_i))})",
                (InstanceState.FAILED.value, *known_i))
            if n_bad:
                logger.error("%d studies had an unknown state in the job store; marked failed", n_bad)
            n_proc = conn.execute(
                "UPDATE studies SET state=?, ready_at=?, updated_at=? WHERE state=?",
                (StudyState.RECEIVED.value, now, now, StudyState.PROCESSING.value),
            ).rowcount
            conn.execute("UPDATE instances SET state=? WHERE state=?",
                         (InstanceState.RECEIVED.value, InstanceState.PROCESSING.value))
            n_open = conn.execute(
                "UPDATE studies SET ready_at=?, updated_at=? WHERE state=? AND ready_at IS NULL",
                (now + quiet_seconds, now, StudyState.RECEIVED.value),
            ).rowcount
        if n_proc or n_open:
            logger.info("recovered after restart: %d studies re-queued from processing, %d whose "
                        "association had not closed", n_proc, n_open)
        return {"requeued_processing": n_proc, "reopened_received": n_open}

    # -- workers --------------------------------------------------------------------------
    def claim_ready(self, *, limit: int = 1, within_quiet: bool = False) -> list[ClaimedStudy]:
        """Atomically take up to ``limit`` ready studies (oldest first) for processing.

        With ``within_quiet``, a study whose association has been released is taken before
        its quiet period is over (an idle worker need not wait; an instance that arrives later
        is processed in another round).
        """
        now = self._clock()
        claimed: list[ClaimedStudy] = []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT * FROM studies WHERE state=? AND ready_at IS NOT NULL AND (ready_at<=? OR ?)"
                " ORDER BY ready_at LIMIT ?",
                (StudyState.RECEIVED.value, now, bool(within_quiet), int(limit)),
            ).fetchall()
            for row in rows:
                key = row["study_key"]
                conn.execute("UPDATE studies SET state=?, attempts=attempts+1, updated_at=? WHERE study_key=?",
                             (StudyState.PROCESSING.value, now, key))
                conn.execute("UPDATE instances SET state=? WHERE study_key=? AND state=?",
                             (InstanceState.PROCESSING.value, key, InstanceState.RECEIVED.value))
                inst = conn.execute(
                    "SELECT * FROM instances WHERE study_key=? AND state=? ORDER BY received_at, sop_key",
                    (key, InstanceState.PROCESSING.value),
                ).fetchall()
                study = conn.execute("SELECT * FROM studies WHERE study_key=?", (key,)).fetchone()
                claimed.append(ClaimedStudy(StudyRecord.from_row(study), [InstanceRecord.from_row(r) for r in inst]))
        return claimed

    def complete_processing(
        self, study_key: str, *, results: Sequence[InstanceResult], deliveries: Sequence[NewDelivery],
    ) -> StudyState:
        """Record a study's pipeline outcome and queue its deliveries, in one transaction.

        Returns the study's new state.
        """
        now = self._clock()
        with self._tx() as conn:
            current = conn.execute("SELECT state FROM studies WHERE study_key=?", (study_key,)).fetchone()
            if current is None or current["state"] != StudyState.PROCESSING.value:
                # re-queued meanwhile (shutdown grace expired): the next claim redoes it
                logger.warning("results for a study no longer being processed were dropped; it was re-queued")
                return StudyState(current["state"]) if current else StudyState.RECEIVED
            for r in results:
                conn.execute(
                    "UPDATE instances SET state=?, reason=?, result_json=? WHERE sop_key=? AND state=?",
                    (r.state.value, r.reason, json.dumps(r.result) if r.result is not None else None,
                     r.sop_key, InstanceState.PROCESSING.value),
                )
            self._insert_deliveries(conn, study_key, deliveries, now)
            state, code, reason = self._settle(conn, study_key)
            conn.execute("UPDATE studies SET state=?, reason=?, reason_code=?, processed_at=?, updated_at=?"
                         " WHERE study_key=?", (state.value, reason, code, now, now, study_key))
        return state

    def queue_deliveries(self, study_key: str, deliveries: Sequence[NewDelivery]) -> int:
        """Queue deliveries of a study that is still processing (its first results).

        The study stays ``processing``; the routing threads send these at once. Returns how
        many rows were queued: none if the study is no longer being processed (re-queued at
        shutdown; the next claim redoes it), and none for items already waiting in the outbox
        for that destination (a study processed again after a crash).
        """
        now = self._clock()
        with self._tx() as conn:
            current = conn.execute("SELECT state FROM studies WHERE study_key=?", (study_key,)).fetchone()
            if current is None or current["state"] != StudyState.PROCESSING.value:
                return 0
            return self._insert_deliveries(conn, study_key, deliveries, now)

    def _insert_deliveries(self, conn: sqlite3.Connection, study_key: str, deliveries: Sequence[NewDelivery],
                           now: float) -> int:
        """Insert outbox rows, skipping items a pending row of the destination already carries.

        A pending row sends the file as it is when it goes, so a second row for the same file
        would only send it twice.
        """
        job_id = conn.execute("SELECT job_id FROM studies WHERE study_key=?", (study_key,)).fetchone()["job_id"]
        n = 0
        for d in deliveries:
            waiting = {item for r in conn.execute(
                "SELECT items FROM outbox WHERE study_key=? AND destination=? AND state=?",
                (study_key, d.destination, DeliveryState.PENDING.value)) for item in json.loads(r["items"])}
            items = [i for i in d.items if i not in waiting]
            if not items:
                continue
            conn.execute(
                "INSERT INTO outbox(study_key, job_id, destination, items, state, next_attempt_at,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                (study_key, job_id, d.destination, json.dumps(items), DeliveryState.PENDING.value, now, now, now),
            )
            n += 1
        return n

    def fail_processing(self, study_key: str, *, reason: str, max_attempts: int,
                        code: str = ReasonCode.PIPELINE_ERROR.value) -> StudyState:
        """The pipeline raised for this study: retry (back to received) or give up (failed)."""
        now = self._clock()
        with self._tx() as conn:
            row = conn.execute("SELECT attempts FROM studies WHERE study_key=?", (study_key,)).fetchone()
            if row["attempts"] < max_attempts:
                state = StudyState.RECEIVED
                conn.execute("UPDATE instances SET state=? WHERE study_key=? AND state=?",
                             (InstanceState.RECEIVED.value, study_key, InstanceState.PROCESSING.value))
                conn.execute("UPDATE studies SET state=?, reason=?, ready_at=?, updated_at=? WHERE study_key=?",
                             (state.value, reason, now, now, study_key))
            else:
                state = StudyState.FAILED
                conn.execute("UPDATE instances SET state=?, reason=? WHERE study_key=? AND state=?",
                             (InstanceState.FAILED.value, reason, study_key, InstanceState.PROCESSING.value))
                conn.execute("UPDATE studies SET state=?, reason=?, reason_code=?, updated_at=? WHERE study_key=?",
                             (state.value, reason, code, now, study_key))
        return state

    def requeue(self, study_keys: Iterable[str]) -> None:
        """Put studies a worker could not finish (shutdown) back in the queue."""
        now = self._clock()
        with self._tx() as conn:
            for key in study_keys:
                n = conn.execute("UPDATE studies SET state=?, ready_at=?, updated_at=? WHERE study_key=? AND state=?",
                                 (StudyState.RECEIVED.value, now, now, key, StudyState.PROCESSING.value)).rowcount
                if n:
                    conn.execute("UPDATE instances SET state=? WHERE study_key=? AND state=?",
                                 (InstanceState.RECEIVED.value, key, InstanceState.PROCESSING.value))

    def _settle(self, conn: sqlite3.Connection, study_key: str) -> tuple[StudyState, str, str]:
        """The state a study should be in, given its instances and deliveries: (state, code, reason)."""
        inst = {r["state"]: r["n"] for r in conn.execute(
            "SELECT state, COUNT(*) AS n FROM instances WHERE study_key=? GROUP BY state", (study_key,))}
        if inst.get(InstanceState.PROCESSING.value):
            return StudyState.PROCESSING, "", ""
        if inst.get(InstanceState.RECEIVED.value):
            return StudyState.RECEIVED, "", ""
        out = {r["state"]: r["n"] for r in conn.execute(
            "SELECT state, COUNT(*) AS n FROM outbox WHERE study_key=? GROUP BY state", (study_key,))}
        if out.get(DeliveryState.PENDING.value):
            return StudyState.SENDING, "", ""
        if out.get(DeliveryState.DEAD.value):
            dests = [r["destination"] for r in conn.execute(
                "SELECT DISTINCT destination FROM outbox WHERE study_key=? AND state=?", (study_key, DeliveryState.DEAD.value))]
            return (StudyState.FAILED, ReasonCode.DELIVERY_DEAD.value,
                    f"delivery dead-lettered for destination(s): {', '.join(dests)}")
        if inst.get(InstanceState.FAILED.value):
            kinds = self._instance_reasons(conn, study_key, InstanceState.FAILED)
            return (StudyState.FAILED, ReasonCode.INSTANCES_FAILED.value,
                    f"{inst[InstanceState.FAILED.value]} instance(s) failed in the pipeline ({kinds or 'no reason'})")
        if not inst.get(InstanceState.PROCESSED.value):
            kinds = self._instance_reasons(conn, study_key, InstanceState.NOT_APPLICABLE)
            return StudyState.NOT_APPLICABLE, kinds, f"no instance the models may read ({kinds or 'no reason'})"
        return StudyState.RESULTS_SENT, "", ""

    @staticmethod
    def _instance_reasons(conn: sqlite3.Connection, study_key: str, state: InstanceState) -> str:
        """The distinct reasons of a study's instances in ``state``, joined by ``+`` (codes only)."""
        return "+".join(sorted({r["reason"].split(":", 1)[0].strip()[:40] for r in conn.execute(
            "SELECT reason FROM instances WHERE study_key=? AND state=?", (study_key, state.value))
            if r["reason"]}))

    # -- outbox ---------------------------------------------------------------------------
    def due_deliveries(self, destination: str, *, limit: int = 10) -> list[Delivery]:
        rows = self._conn().execute(
            "SELECT * FROM outbox WHERE destination=? AND state=? AND next_attempt_at<=? ORDER BY next_attempt_at, id LIMIT ?",
            (destination, DeliveryState.PENDING.value, self._clock(), int(limit)),
        ).fetchall()
        return [Delivery.from_row(r) for r in rows]

    def delivery_succeeded(self, delivery_id: int) -> StudyState:
        now = self._clock()
        with self._tx() as conn:
            conn.execute("UPDATE outbox SET state=?, attempts=attempts+1, sent_at=?, updated_at=?, last_error='' WHERE id=?",
                         (DeliveryState.SENT.value, now, now, delivery_id))
            return self._after_delivery(conn, delivery_id, now)

    def delivery_failed(self, delivery_id: int, *, error: str, max_attempts: int,
                        backoff_initial: float, backoff_max: float) -> tuple[DeliveryState, StudyState]:
        """Record a failed attempt: schedule the next with exponential backoff, or dead-letter."""
        now = self._clock()
        with self._tx() as conn:
            row = conn.execute("SELECT attempts FROM outbox WHERE id=?", (delivery_id,)).fetchone()
            attempts = row["attempts"] + 1
            if attempts >= max_attempts:
                dstate = DeliveryState.DEAD
                nxt = now
            else:
                dstate = DeliveryState.PENDING
                nxt = now + min(backoff_max, backoff_initial * (2 ** (attempts - 1)))
            conn.execute("UPDATE outbox SET state=?, attempts=?, next_attempt_at=?, last_error=?, updated_at=? WHERE id=?",
                         (dstate.value, attempts, nxt, error[:2000], now, delivery_id))
            return dstate, self._after_delivery(conn, delivery_id, now)

    def _after_delivery(self, conn: sqlite3.Connection, delivery_id: int, now: float) -> StudyState:
        key = conn.execute("SELECT study_key FROM outbox WHERE id=?", (delivery_id,)).fetchone()["study_key"]
        current = StudyState(conn.execute("SELECT state FROM studies WHERE study_key=?", (key,)).fetchone()["state"])
        if current != StudyState.SENDING:
            return current  # new instances arrived meanwhile: the worker settles it later
        state, code, reason = self._settle(conn, key)
        if state != current:
            sent_at = now if state == StudyState.RESULTS_SENT else None
            conn.execute("UPDATE studies SET state=?, reason=?, reason_code=?, results_sent_at=COALESCE(?, "
                         "results_sent_at), updated_at=? WHERE study_key=?", (state.value, reason, code, sent_at,
                                                                              now, key))
        return state

    def retry_dead(self, *, destination: str | None = None, ids: Sequence[int] | None = None) -> int:
        """Put dead-lettered deliveries back in the queue (operator action after a fix): all,
        one destination's, or those with the given outbox ids."""
        now = self._clock()
        with self._tx() as conn:
            q = "SELECT id, study_key FROM outbox WHERE state=?"
            args: list[Any] = [DeliveryState.DEAD.value]
            if destination:
                q += " AND destination=?"
                args.append(destination)
            if ids is not None:
                q += f" AND id IN ({','.join('?' * len(ids))})" if ids else " AND 0"
                args += [int(i) for i in ids]
            rows = conn.execute(q, args).fetchall()
            for r in rows:
                conn.execute("UPDATE outbox SET state=?, attempts=0, next_attempt_at=?, updated_at=? WHERE id=?",
                             (DeliveryState.PENDING.value, now, now, r["id"]))
                conn.execute("UPDATE studies SET state=?, reason='', reason_code='', updated_at=? WHERE study_key=?"
                             " AND state=?",
                             (StudyState.SENDING.value, now, r["study_key"], StudyState.FAILED.value))
            return len(rows)

    # -- retention ------------------------------------------------------------------------
    def finish_sent(self) -> list[StudyRecord]:
        """Move ``results_sent`` studies to ``done``; returns them (for retention)."""
        now = self._clock()
        with self._tx() as conn:
            rows = conn.execute("SELECT * FROM studies WHERE state=?", (StudyState.RESULTS_SENT.value,)).fetchall()
            conn.execute("UPDATE studies SET state=?, updated_at=? WHERE state=?",
                         (StudyState.DONE.value, now, StudyState.RESULTS_SENT.value))
        return [StudyRecord.from_row(r) for r in rows]

    # studies.files_removed: 0 all kept; 1 received files gone and results cut down to
    # headers; 2 the headers gone too.
    def expired_files(self, *, keep_seconds: float) -> list[StudyRecord]:
        """Done / not-applicable studies whose spool files are older than ``keep_seconds``.

        Failed studies keep their files so an operator can fix the cause and retry.
        """
        return self._retention_due(files_removed=0, keep_seconds=keep_seconds)

    def mark_files_removed(self, study_key: str) -> None:
        """The study's received files are gone and its results cut down to headers."""
        self._set_files_removed(study_key, 1)

    def expired_results(self, *, keep_seconds: float) -> list[StudyRecord]:
        """Studies whose files were removed and whose result headers are older than
        ``keep_seconds`` (from the study's last change)."""
        return self._retention_due(files_removed=1, keep_seconds=keep_seconds)

    def mark_results_removed(self, study_key: str) -> None:
        """The study's result headers are gone too."""
        self._set_files_removed(study_key, 2)

    def _retention_due(self, *, files_removed: int, keep_seconds: float) -> list[StudyRecord]:
        rows = self._conn().execute(
            "SELECT * FROM studies WHERE state IN (?,?) AND files_removed=? AND updated_at<=?",
            (StudyState.DONE.value, StudyState.NOT_APPLICABLE.value, files_removed, self._clock() - keep_seconds),
        ).fetchall()
        return [StudyRecord.from_row(r) for r in rows]

    def _set_files_removed(self, study_key: str, value: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE studies SET files_removed=? WHERE study_key=?", (value, study_key))

    # -- results withdrawn ----------------------------------------------------------------
    def mark_retracted(self, study_key: str) -> None:
        """Record that the study's results were withdrawn (``cxr-ai retract``)."""
        now = self._clock()
        with self._tx() as conn:
            conn.execute("UPDATE studies SET retracted_at=?, updated_at=? WHERE study_key=?", (now, now, study_key))


def _new_job_id() -> str:
    return "J" + secrets.token_hex(6)
