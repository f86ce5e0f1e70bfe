"""The batch output folder's fixed names, the site's patient pseudonyms and the state database
(what this output folder has finished, per model version)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxr_ai.errors import ConfigError

logger = logging.getLogger("cxr_ai.batch")  # one logger for the package (sites and tests filter on it)

STATE_DB_NAME = "batch-state.sqlite"
KEY_FILE_NAME = "pseudonym.key"
STUDIES_DIR = "studies"
RETRIEVED_DIR = "retrieved"
TMP_PREFIX = ".tmp-"


MSG_KEY_FILE = (
    "pseudonym key file {path} is missing or shorter than 16 bytes; point [batch] "
    "pseudonym_key_file at a file holding the site's secret key (keep it the same across runs)"
)


# ============================================================================================
# Pseudonyms
# ============================================================================================


def load_or_create_key(path: str | os.PathLike, *, create: bool = True) -> bytes:
    """The HMAC key in ``path``; a new random 32-byte key (mode 0600) if absent and ``create``."""
    p = Path(path)
    if p.is_file():
        key = p.read_bytes()
        if len(key) >= 16:
            return key
        raise ConfigError(MSG_KEY_FILE.format(path=p))
    if not create:
        raise ConfigError(MSG_KEY_FILE.format(path=p))
    p.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    logger.info("created a new pseudonym key at %s; keep it to get the same patient keys next time", p)
    return key


def patient_key(patient_id: str, issuer: str, *, key: bytes) -> str:
    """The site's pseudonym of (issuer, PatientID) — the same function and key as the live
    prediction log (:func:`cxr_ai.monitoring.log.patient_key`), so batch tables and live logs
    join; "" without an ID. The issuer is part of the message: same ID, other issuer, other key.
    """
    from cxr_ai.monitoring.log import patient_key as _site_patient_key

    return _site_patient_key(key, issuer, patient_id) if patient_id else ""


# ============================================================================================
# State database
# ============================================================================================


class BatchState:
    """What a batch output folder has finished, keyed by instance + model name + version.

    One writer (the driving process). Each :meth:`record` is one transaction (WAL,
    ``synchronous=FULL``), made only after the instance's output files are renamed into place.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS instances (
                   item_key TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
                   study_uid TEXT NOT NULL, status TEXT NOT NULL, run_id TEXT NOT NULL,
                   finished_at REAL NOT NULL, row_json TEXT NOT NULL, outputs_json TEXT NOT NULL,
                   PRIMARY KEY (item_key, model_name, model_version))"""
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def finished(self, model_name: str, model_version: str) -> set[str]:
        """Keys of instances that need no further run (processed or not applicable)."""
        cur = self._db.execute(
            "SELECT item_key FROM instances WHERE model_name=? AND model_version=? AND status!='failed'",
            (model_name, model_version),
        )
        return {r[0] for r in cur}

    def record(self, *, key: str, row: Mapping[str, Any], outputs: Sequence[str], run_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                    (key, row["model_name"], row["model_version"], row["study_uid"], row["status"], run_id,
                     time.time(), json.dumps(dict(row), default=str), json.dumps(list(outputs))),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def records(self, model_name: str | None = None, model_version: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT item_key, run_id, finished_at, row_json, outputs_json FROM instances"
        args: tuple = ()
        if model_name is not None:
            sql += " WHERE model_name=? AND model_version=?"
            args = (model_name, model_version)
        out = []
        for key, run_id, finished_at, row_json, outputs_json in self._db.execute(sql, args):
            out.append({"key": key, "run_id": run_id, "finished_at": finished_at,
                        "row": json.loads(row_json), "outputs": json.loads(outputs_json)})
        return out
