"""``cxr-ai backup`` / ``cxr-ai restore``: a consistent copy of the job store, the worklist and
the pseudonym key while writers are busy; restore refuses to overwrite without --force, detects
a damaged backup, and migrates a job store of the first release."""

from __future__ import annotations

import io
import json
import sqlite3
import stat
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from cxr_ai.cli import main as cli_main
from cxr_ai.monitoring.log import resolve_pseudonym_key
from cxr_ai.store.jobs import SCHEMA_VERSION, JobStore
from cxr_ai.worklist import Worklist

V1_DUMP = Path(__file__).parent / "data" / "jobstore_v1.sql"
CT = "1.2.840.10008.5.1.4.1.1.1"


def _site(tmp_path: Path, name: str) -> tuple[Path, Path]:
    root = tmp_path / name / "var"
    site = tmp_path / name / "site.toml"
    site.parent.mkdir(parents=True)
    site.write_text(f'[store]\nroot = "{root}"\n', encoding="utf-8")
    return site, root


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        rc = cli_main(list(argv))
    return rc, out.getvalue()


def test_backup_while_writing_then_restore(tmp_path: Path) -> None:
    site, root = _site(tmp_path, "live")
    store = JobStore(root / "jobs.sqlite3", synchronous="normal")
    key = resolve_pseudonym_key({"store": {"root": str(root)}})
    with Worklist(root / "worklist.sqlite3") as wl:
        for n in range(5):
            wl.upsert_study(f"1.2.5.{n}", [{"key": "cardiomegaly", "probability": 0.1 * n, "threshold": 0.5}])
    stop = threading.Event()
    written = [0]

    def writer() -> None:  # the listener recording instances meanwhile
        while not stop.is_set():
            n = written[0]
            store.record_instance(study_key=f"1.2.6.{n // 10}", study_uid=f"1.2.6.{n // 10}", sop_key=f"1.2.6.{n // 10}.{n}",
                                  sop_uid=f"1.2.6.{n // 10}.{n}", sop_class_uid=CT, path=f"/x/{n}.dcm", size=n,
                                  patient_fp="fp")
            written[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while written[0] < 50:
            stop.wait(0.01)
        before = written[0]
        rc, out = _run("backup", str(tmp_path / "bk"), "--config", str(site))
        after = written[0]
    finally:
        stop.set()
        thread.join()
        store.close()
    assert rc == 0, out
    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"jobs.sqlite3", "worklist.sqlite3", "pseudonym.key"}
    assert manifest["files"]["jobs.sqlite3"]["schema_version"] == SCHEMA_VERSION
    con = sqlite3.connect(tmp_path / "bk" / "jobs.sqlite3")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n_backed = con.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    # a snapshot: every instance row has its study row
    assert con.execute("SELECT COUNT(*) FROM instances WHERE study_key NOT IN (SELECT study_key FROM studies)"
                       ).fetchone()[0] == 0
    con.close()
    assert before <= n_backed <= after
    assert stat.S_IMODE((tmp_path / "bk" / "pseudonym.key").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".bk.*"))  # no half-written folder left
    rc, out = _run("backup", str(tmp_path / "bk"), "--config", str(site))
    assert rc == 2 and "already exists" in out

    # restore into a fresh installation
    site2, root2 = _site(tmp_path, "new")
    rc, out = _run("restore", str(tmp_path / "bk"), "--config", str(site2))
    assert rc == 0, out
    restored = JobStore(root2 / "jobs.sqlite3")
    assert len(restored.instances()) == n_backed and restored.schema_version() == SCHEMA_VERSION
    restored.close()
    with Worklist(root2 / "worklist.sqlite3") as wl:
        assert sorted(s.study_uid for s in wl.ranked()) == [f"1.2.5.{n}" for n in range(5)]
    assert resolve_pseudonym_key({"store": {"root": str(root2)}}) == key
    # existing state is not replaced without --force; a damaged backup is refused
    rc, out = _run("restore", str(tmp_path / "bk"), "--config", str(site2))
    assert rc == 2 and "--force" in out
    with open(tmp_path / "bk" / "worklist.sqlite3", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe")
    rc, out = _run("restore", str(tmp_path / "bk"), "--config", str(site2), "--force")
    assert rc == 2 and "damaged" in out


def test_restore_migrates_a_first_release_job_store(tmp_path: Path) -> None:
    bk = tmp_path / "old-backup"
    site_old, root_old = _site(tmp_path, "old")
    root_old.mkdir(parents=True)
    con = sqlite3.connect(root_old / "jobs.sqlite3")
    con.executescript(V1_DUMP.read_text())
    con.close()
    # cxr-ai backup of a store still on schema 1 (as the previous release left it)
    rc, out = _run("backup", str(bk), "--config", str(site_old))
    assert rc == 0, out
    assert json.loads((bk / "manifest.json").read_text())["files"]["jobs.sqlite3"]["schema_version"] == 1
    site_new, root_new = _site(tmp_path, "upgraded")
    rc, out = _run("restore", str(bk), "--config", str(site_new))
    assert rc == 0 and f"schema version {SCHEMA_VERSION}" in out, out
    store = JobStore(root_new / "jobs.sqlite3")
    assert {s.study_uid for s in store.studies()} == {"1.2.3.1", "1.2.3.2"}
    store.close()
