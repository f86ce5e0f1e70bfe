"""Backups of the service's state: the job store, the triage worklist and the pseudonym key.

``cxr-ai backup`` may run while the service runs: each SQLite database is copied with SQLite's
online backup API (:meth:`sqlite3.Connection.backup`), which yields a consistent snapshot even
while other connections write (a write during the copy makes it restart on the pages that
changed). The job store is copied first and the worklist second; the worklist is a secondary
record rebuilt from results, so a study finished between the two copies is at worst listed in
one and not the other. The pseudonym key is a file copied as is (mode 0600). A ``manifest.json``
names each file with its SHA-256 and the job store's schema version; the backup folder is
written under a temporary name and renamed when complete, so a backup that exists is whole.

``cxr-ai restore`` checks the manifest, then copies each database back with the same backup
API (the supported way to replace a database that other connections may have open) and the
key file. A job store from an older release is migrated when the service (or ``cxr-ai jobs``)
next opens it. Stop the service before restoring: a running service would go on from the
state it holds in memory (open associations, claimed studies).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_ai import __version__
from cxr_ai.store.job_schema import stored_version

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
JOBS_FILE = "jobs.sqlite3"
WORKLIST_FILE = "worklist.sqlite3"
KEY_FILE = "pseudonym.key"

MSG_EXISTS = "backup folder {path} already exists; choose a new folder (backups are never overwritten)"
MSG_NO_MANIFEST = ("{path} is not a cxr-ai backup (no manifest.json); point --from at a folder made by "
                   "cxr-ai backup")
MSG_CHECKSUM = ("backup file {path} does not match its manifest (SHA-256 differs): the backup is damaged; "
                "restore another one")
MSG_TARGET_EXISTS = ("{path} exists and holds data; restoring would replace it. Stop the service, and run "
                     "again with --force to replace it")
MSG_NO_JOBS = "job store {path} does not exist; nothing to back up (check --config: [store] root / db)"


@dataclass(frozen=True)
class StatePaths:
    """Where the service keeps the state a backup covers (resolved from the configuration)."""

    jobs: Path
    worklist: Path
    #: The pseudonym key file; None when the key is given inline (``[monitoring] pseudonym_key``).
    pseudonym_key: Path | None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _copy_db(src: Path, dest: Path) -> None:
    """Copy a live SQLite database with the online backup API (consistent snapshot)."""
    source = sqlite3.connect(src, timeout=30)
    target = sqlite3.connect(dest)
    try:
        source.execute("PRAGMA busy_timeout=30000")
        source.backup(target, pages=1024)
        # a self-contained file: no WAL beside it
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()
        source.close()


def _user_version(path: Path) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return stored_version(con)
    except sqlite3.DatabaseError:
        return 0
    finally:
        con.close()


def backup(paths: StatePaths, out: str | os.PathLike) -> dict[str, Any]:
    """Write a backup of ``paths`` into the new folder ``out``; returns the manifest."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(MSG_EXISTS.format(path=out))
    if not paths.jobs.is_file():
        raise FileNotFoundError(MSG_NO_JOBS.format(path=paths.jobs))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files: dict[str, dict[str, Any]] = {}
        _copy_db(paths.jobs, work / JOBS_FILE)
        files[JOBS_FILE] = {"kind": "job store", "schema_version": _user_version(work / JOBS_FILE)}
        if paths.worklist.is_file():
            _copy_db(paths.worklist, work / WORKLIST_FILE)
            files[WORKLIST_FILE] = {"kind": "worklist"}
        if paths.pseudonym_key is not None and paths.pseudonym_key.is_file():
            fd = os.open(work / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as dst, open(paths.pseudonym_key, "rb") as src:
                shutil.copyfileobj(src, dst)
            files[KEY_FILE] = {"kind": "pseudonym key"}
        for name, entry in files.items():
            entry["sha256"] = _sha256(work / name)
            entry["bytes"] = (work / name).stat().st_size
        manifest = {"cxr_ai_version": __version__,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "files": files}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("backup written to %s (%s)", out, ", ".join(files))
    return manifest


def read_manifest(backup_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a backup, with every file checked against its SHA-256."""
    folder = Path(backup_dir)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(MSG_NO_MANIFEST.format(path=folder))
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or _sha256(path) != entry.get("sha256"):
            raise ValueError(MSG_CHECKSUM.format(path=path))
    return manifest


def _holds_data(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def restore(backup_dir: str | os.PathLike, paths: StatePaths, *, force: bool = False) -> dict[str, Any]:
    """Restore a backup made by :func:`backup` into ``paths``; returns the manifest.

    Refuses to replace existing data unless ``force``.
    """
    folder = Path(backup_dir)
    manifest = read_manifest(folder)
    files = manifest["files"]
    targets = [(JOBS_FILE, paths.jobs), (WORKLIST_FILE, paths.worklist), (KEY_FILE, paths.pseudonym_key)]
    if not force:
        for name, target in targets:
            if name in files and target is not None and _holds_data(target):
                raise FileExistsError(MSG_TARGET_EXISTS.format(path=target))
    for name, target in targets:
        if name not in files or target is None:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == KEY_FILE:
            tmp = target.with_name(f".{target.name}.restore")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as dst, open(folder / name, "rb") as src:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        else:
            source = sqlite3.connect(f"file:{folder / name}?mode=ro", uri=True)
            dest = sqlite3.connect(target, timeout=30)
            try:
                source.backup(dest)
            finally:
                dest.close()
                source.close()
    logger.info("restored %s from %s", ", ".join(files), folder)
    return manifest
