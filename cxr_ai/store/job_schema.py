"""The job store's database: its tables, the migrations from older layouts, and opening a
connection (:mod:`cxr_ai.store.jobs` owns the transactions)."""

from __future__ import annotations

import logging
import os
import sqlite3

logger = logging.getLogger(__name__)

#: Version of the database layout, kept in ``PRAGMA user_version`` (and, for the first
#: release, which did not set it, in ``meta.schema_version``). Opening an older store migrates
#: it step by step (:data:`MIGRATIONS`) in one transaction.
SCHEMA_VERSION = 3

MSG_NEWER_SCHEMA = (
    "job store {path} has schema version {found}, newer than this cxr-ai understands "
    "({expected}); upgrade cxr-ai or point [store] db to another file"
)


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_key        TEXT PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    job_id           TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL,
    reason           TEXT NOT NULL DEFAULT '',
    attempts         INTEGER NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    last_received_at REAL NOT NULL,
    ready_at         REAL,
    processed_at     REAL,
    results_sent_at  REAL,
    files_removed    INTEGER NOT NULL DEFAULT 0,
    reason_code      TEXT NOT NULL DEFAULT '',
    retracted_at     REAL,
    patient_fp       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state, ready_at);
CREATE INDEX IF NOT EXISTS studies_uid ON studies(study_uid);
CREATE INDEX IF NOT EXISTS studies_retention ON studies(files_removed, state, updated_at);
CREATE TABLE IF NOT EXISTS instances (
    sop_key       TEXT PRIMARY KEY,
    sop_uid       TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    study_key     TEXT NOT NULL REFERENCES studies(study_key),
    path          TEXT NOT NULL,
    size          INTEGER NOT NULL,
    calling_ae    TEXT NOT NULL DEFAULT '',
    received_at   REAL NOT NULL,
    state         TEXT NOT NULL,
    reason        TEXT NOT NULL DEFAULT '',
    result_json   TEXT,
    patient_fp    TEXT NOT NULL DEFAULT '',
    uid_reused    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_key, state);
CREATE INDEX IF NOT EXISTS instances_sop_uid ON instances(sop_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    study_key       TEXT NOT NULL REFERENCES studies(study_key),
    job_id          TEXT NOT NULL,
    destination     TEXT NOT NULL,
    items           TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    sent_at         REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(destination, state, next_attempt_at);
"""


#: Steps from version N-1 to N (statements run in one transaction with the version bump).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: patient/study fingerprint and SOP Instance UID reuse on instances; a reason code and
    # retraction time on studies.
    2: (
        "ALTER TABLE instances ADD COLUMN patient_fp TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE instances ADD COLUMN uid_reused INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS instances_sop_uid ON instances(sop_uid)",
        "ALTER TABLE studies ADD COLUMN reason_code TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE studies ADD COLUMN retracted_at REAL",
    ),
    # 3: a study is one patient's: the patient/study fingerprint on studies, so a Study
    # Instance UID shared by two patients makes two studies (two jobs) that never merge.
    # A study recorded since version 2 takes the fingerprint of its first instance that has one.
    3: (
        "ALTER TABLE studies ADD COLUMN patient_fp TEXT NOT NULL DEFAULT ''",
        "UPDATE studies SET patient_fp = COALESCE((SELECT i.patient_fp FROM instances i"
        " WHERE i.study_key = studies.study_key AND i.patient_fp != '' ORDER BY i.received_at LIMIT 1), '')",
        "CREATE INDEX IF NOT EXISTS studies_uid ON studies(study_uid)",
        # the two retention steps, looked for every housekeeping round
        "CREATE INDEX IF NOT EXISTS studies_retention ON studies(files_removed, state, updated_at)",
    ),
}


def connect(path: os.PathLike, *, synchronous: str) -> sqlite3.Connection:
    """A connection in WAL mode with ``synchronous`` (``"FULL"`` or ``"NORMAL"``), foreign keys
    on, rows by name, and transactions begun explicitly (``isolation_level=None``)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def stored_version(conn: sqlite3.Connection) -> int:
    """The schema version of the database: 0 for an empty one."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    if not has_meta:
        return version
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return max(version, int(row["value"]) if row else 0)


def init_schema(conn: sqlite3.Connection, *, path: os.PathLike) -> None:
    """Create the tables of an empty database, or migrate an older one step by step, inside
    the caller's transaction; refuse a database newer than :data:`SCHEMA_VERSION`."""
    found = stored_version(conn)
    if found > SCHEMA_VERSION:
        raise RuntimeError(MSG_NEWER_SCHEMA.format(path=path, found=found, expected=SCHEMA_VERSION))
    if found == 0:
        for stmt in SCHEMA.strip().split(";"):
            if stmt.strip():
                conn.execute(stmt)
    else:
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
        if found < SCHEMA_VERSION:
            logger.warning("job store migrated from schema version %d to %d", found, SCHEMA_VERSION)
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE"
                 " SET value=excluded.value", (str(SCHEMA_VERSION),))
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")
