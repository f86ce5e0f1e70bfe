"""Spool, job store and outbox: durability, state machine, recovery, backoff, dead letters."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from cxr_ai.store import (
    DeliveryState,
    InstanceResult,
    InstanceState,
    JobStore,
    NewDelivery,
    Spool,
    StudyState,
    safe_key,
)
from cxr_ai.dicom.uids import is_valid_uid
from cxr_ai.store import jobs as jobs_mod


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("uid,ok", [
    ("1.2.840.10008.5.1.4.1.1.1", True),
    ("1.2.3", True),
    ("0.1", True),
    ("1.02.3", False),          # leading zero
    ("1..2", False),
    ("../../etc/passwd", False),
    ("1.2.3/../4", False),
    ("1." + "1" * 70, False),   # longer than 64
    ("", False),
    ("1.2.3\x00", False),
])
def test_uid_validation(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok
    key = safe_key(uid)
    assert (key == uid) is ok
    assert "/" not in key and "\x00" not in key and ".." not in key
    if not ok:
        assert key.startswith("h") and len(key) == 41


def test_spool_commit_is_atomic_rename_and_validates_names(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    src = spool.incoming / "x.part"
    src.write_bytes(b"DICM-bytes")
    dest = spool.commit_file(src, study_uid="1.2.3", sop_uid="../../evil")
    assert not src.exists()
    assert dest.read_bytes() == b"DICM-bytes"
    assert dest.parent == spool.instances / "1.2.3"
    assert dest.name.startswith("h") and dest.resolve().is_relative_to(spool.instances)
    # from another folder (possibly another file system): still lands durably
    other = tmp_path / "elsewhere.bin"
    other.write_bytes(b"abc")
    dest2 = spool.commit_file(other, study_uid="1.2.3", sop_uid="1.2.3.4")
    assert dest2.read_bytes() == b"abc" and not list(spool.incoming.glob("*.part"))
    # retention removes the files named (a Study UID's folder may hold another patient's study)
    assert spool.remove_instance_files([dest2]) == 1 and not dest2.exists() and dest.exists()
    assert spool.remove_instance_files([dest, dest2]) == 1 and not dest.parent.exists()
    with pytest.raises(ValueError, match="not an instance file of the spool"):
        spool.remove_instance_files([spool.incoming / "x.dcm"])
    with pytest.raises(ValueError, match="not a safe folder name"):
        spool.results_dir("../J1")


def _record(store: JobStore, spool: Spool, study: str, sop: str) -> None:
    p = spool.write_bytes(b"x", study_uid=study, sop_uid=sop)
    store.record_instance(study_key=safe_key(study), study_uid=study, sop_key=safe_key(sop), sop_uid=sop,
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.1", path=p, size=1, calling_ae="ORTHANC")


def test_study_lifecycle_quiet_period_and_outbox(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs.sqlite3", clock=clock)
    spool = Spool(tmp_path / "spool")
    assert store.schema_version() == jobs_mod.SCHEMA_VERSION
    _record(store, spool, "1.2.3", "1.2.3.1")
    _record(store, spool, "1.2.3", "1.2.3.2")
    assert store.claim_ready() == []            # association still open
    store.association_closed(["1.2.3"], quiet_seconds=2.0)
    clock.t += 1.0
    assert store.claim_ready() == []            # within quiet period
    clock.t += 1.5
    [claim] = store.claim_ready(limit=5)
    assert claim.study.state is StudyState.PROCESSING and len(claim.instances) == 2
    assert claim.study.job_id.startswith("J") and "1.2.3" not in claim.study.job_id
    assert store.claim_ready() == []            # nobody else gets it
    state = store.complete_processing(
        "1.2.3",
        results=[InstanceResult("1.2.3.1", InstanceState.PROCESSED, result={"p": 0.7}),
                 InstanceResult("1.2.3.2", InstanceState.NOT_APPLICABLE, reason="view")],
        deliveries=[NewDelivery("pacs", ["/r/a.dcm"]), NewDelivery("fhir", ["/r/b.json"])],
    )
    assert state is StudyState.SENDING
    [d] = store.due_deliveries("pacs")
    assert d.items == ["/r/a.dcm"] and d.job_id == claim.study.job_id
    # pacs fails twice with exponential backoff, then succeeds
    dstate, _ = store.delivery_failed(d.id, error="refused", max_attempts=5, backoff_initial=2, backoff_max=60)
    assert dstate is DeliveryState.PENDING
    assert store.due_deliveries("pacs") == []
    clock.t += 2.0
    [d] = store.due_deliveries("pacs")
    store.delivery_failed(d.id, error="refused", max_attempts=5, backoff_initial=2, backoff_max=60)
    clock.t += 3.9
    assert store.due_deliveries("pacs") == []   # second wait is 4 s
    clock.t += 0.1
    [d] = store.due_deliveries("pacs")
    assert store.delivery_succeeded(d.id) is StudyState.SENDING    # fhir still pending
    [f] = store.due_deliveries("fhir")
    assert store.delivery_succeeded(f.id) is StudyState.RESULTS_SENT
    assert len(store.finish_sent()) == 1
    assert store.study("1.2.3").state is StudyState.DONE and store.study("1.2.3").results_sent_at is not None
    inst = {i.sop_key: i for i in store.instances("1.2.3")}
    assert inst["1.2.3.1"].result == {"p": 0.7} and inst["1.2.3.2"].reason == "view"
    assert store.counts()["outbox"] == {"pending": 0, "sent": 2, "dead": 0}


def test_dead_letter_is_visible_and_retryable(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs.sqlite3", clock=clock)
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "1.9", "1.9.1")
    store.association_closed(["1.9"], quiet_seconds=0)
    store.claim_ready()
    store.complete_processing("1.9", results=[InstanceResult("1.9.1", InstanceState.PROCESSED)],
                              deliveries=[NewDelivery("pacs", ["/r/a.dcm"])])
    for _ in range(3):
        clock.t += 1000
        [d] = store.due_deliveries("pacs")
        dstate, sstate = store.delivery_failed(d.id, error="connection refused", max_attempts=3,
                                               backoff_initial=1, backoff_max=10)
    assert dstate is DeliveryState.DEAD and sstate is StudyState.FAILED
    assert "pacs" in store.study("1.9").reason
    [dead] = store.deliveries(state=DeliveryState.DEAD)
    assert dead.last_error == "connection refused" and dead.attempts == 3
    assert store.retry_dead(destination="pacs") == 1
    assert store.study("1.9").state is StudyState.SENDING
    [d] = store.due_deliveries("pacs")
    assert store.delivery_succeeded(d.id) is StudyState.RESULTS_SENT


def test_not_applicable_failed_and_retry(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs.sqlite3", clock=clock)
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "1.5", "1.5.1")
    store.association_closed(["1.5"], quiet_seconds=0)
    store.claim_ready()
    assert store.complete_processing("1.5", results=[InstanceResult("1.5.1", InstanceState.NOT_APPLICABLE, "modality")],
                                     deliveries=[]) is StudyState.NOT_APPLICABLE
    _record(store, spool, "1.6", "1.6.1")
    store.association_closed(["1.6"], quiet_seconds=0)
    store.claim_ready()
    assert store.fail_processing("1.6", reason="boom", max_attempts=2) is StudyState.RECEIVED
    [c] = store.claim_ready()
    assert c.study.attempts == 2 and len(c.instances) == 1
    assert store.fail_processing("1.6", reason="boom", max_attempts=2) is StudyState.FAILED
    assert store.instances("1.6")[0].state is InstanceState.FAILED


def test_instance_arriving_during_processing_is_processed_next_round(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs.sqlite3", clock=clock)
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "1.7", "1.7.1")
    store.association_closed(["1.7"], quiet_seconds=0)
    assert len(store.claim_ready()) == 1
    _record(store, spool, "1.7", "1.7.2")                 # late arrival on a new association
    assert store.study("1.7").state is StudyState.PROCESSING
    state = store.complete_processing("1.7", results=[InstanceResult("1.7.1", InstanceState.PROCESSED)],
                                      deliveries=[NewDelivery("folder", ["/r/x"])])
    assert state is StudyState.RECEIVED                    # not ready: its association is open
    assert store.claim_ready() == []
    store.association_closed(["1.7"], quiet_seconds=0)
    [c2] = store.claim_ready()
    assert [i.sop_key for i in c2.instances] == ["1.7.2"]
    assert store.complete_processing("1.7", results=[InstanceResult("1.7.2", InstanceState.PROCESSED)],
                                     deliveries=[]) is StudyState.SENDING   # first delivery pending


def test_recovery_after_crash_requeues_everything_unfinished(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    clock = Clock()
    store = JobStore(db, clock=clock)
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "2.1", "2.1.1")                  # association never closed
    _record(store, spool, "2.2", "2.2.1")
    store.association_closed(["2.2"], quiet_seconds=0)
    store.claim_ready()                                    # 2.2 processing when we "crash"
    store.close()
    store2 = JobStore(db, clock=clock)
    assert store2.recover(quiet_seconds=1.0) == {"requeued_processing": 1, "reopened_received": 1}
    got = {c.study.study_key for c in store2.claim_ready(limit=5)}
    assert got == {"2.2"}
    clock.t += 1.0
    assert {c.study.study_key for c in store2.claim_ready(limit=5)} == {"2.1"}


def test_stale_open_association_is_released(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs.sqlite3", clock=clock)
    _record(store, Spool(tmp_path / "s"), "3.1", "3.1.1")
    assert store.release_stale(max_open_seconds=60, quiet_seconds=2) == 0
    clock.t += 62
    assert store.release_stale(max_open_seconds=60, quiet_seconds=2) == 1
    assert len(store.claim_ready()) == 1


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    JobStore(db).close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(RuntimeError, match="schema version 99, newer than"):
        JobStore(db)


def test_concurrent_claims_never_hand_out_a_study_twice(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    spool = Spool(tmp_path / "spool")
    keys = [f"4.{i}" for i in range(1, 41)]
    for k in keys:
        _record(store, spool, k, k + ".1")
    store.association_closed(keys, quiet_seconds=0)
    got: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            claims = store.claim_ready(limit=3)
            if not claims:
                return
            with lock:
                got.extend(c.study.study_key for c in claims)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(keys)
    mode = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_late_results_after_requeue_are_dropped(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "5.1", "5.1.1")
    store.association_closed(["5.1"], quiet_seconds=0)
    store.claim_ready()
    store.requeue(["5.1"])                                   # shutdown grace expired
    state = store.complete_processing("5.1", results=[InstanceResult("5.1.1", InstanceState.PROCESSED)],
                                      deliveries=[NewDelivery("pacs", ["/r/a.dcm"])])
    assert state is StudyState.RECEIVED and store.deliveries() == []
    [c] = store.claim_ready()
    assert [i.sop_key for i in c.instances] == ["5.1.1"]


def test_idle_worker_may_start_within_the_quiet_period_and_late_instances_make_a_new_round(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs.sqlite3", clock=clock)
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "8.1", "8.1.1")
    assert store.claim_ready(within_quiet=True) == []          # association still open: never
    store.association_closed(["8.1"], quiet_seconds=5.0)
    assert store.claim_ready() == []                           # a normal claim waits out the quiet period
    [c] = store.claim_ready(within_quiet=True)                 # an idle worker need not
    assert [i.sop_key for i in c.instances] == ["8.1.1"]
    _record(store, spool, "8.1", "8.1.2")                      # arrives while processing
    store.complete_processing("8.1", results=[InstanceResult("8.1.1", InstanceState.PROCESSED)], deliveries=[])
    assert store.study("8.1").state is StudyState.RECEIVED
    store.association_closed(["8.1"], quiet_seconds=5.0)
    [c] = store.claim_ready(within_quiet=True)
    assert [i.sop_key for i in c.instances] == ["8.1.2"]


def test_first_results_go_out_while_the_study_is_still_processing(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "6.1", "6.1.1")
    assert store.queue_deliveries("6.1", [NewDelivery("pacs", ["/r/sr.dcm"])]) == 0   # not claimed yet
    store.association_closed(["6.1"], quiet_seconds=0)
    store.claim_ready()
    assert store.queue_deliveries("6.1", [NewDelivery("pacs", ["/r/sr.dcm"]),
                                          NewDelivery("fhir", ["/r/fhir.json"])]) == 2
    assert store.study("6.1").state is StudyState.PROCESSING
    [d] = store.due_deliveries("pacs")
    assert d.items == ["/r/sr.dcm"]
    # sent before the heatmaps exist: the study waits for them, still processing
    assert store.delivery_succeeded(d.id) is StudyState.PROCESSING
    assert store.study("6.1").state is StudyState.PROCESSING
    state = store.complete_processing("6.1", results=[InstanceResult("6.1.1", InstanceState.PROCESSED)],
                                      deliveries=[NewDelivery("pacs", ["/r/sc.dcm", "/r/pm.dcm"]),
                                                  NewDelivery("fhir", ["/r/fhir.json"])])
    assert state is StudyState.SENDING
    # the FHIR file already waiting in the outbox is not queued a second time
    assert [x.items for x in store.deliveries(study_key="6.1", state=DeliveryState.PENDING)] == [
        ["/r/fhir.json"], ["/r/sc.dcm", "/r/pm.dcm"]]
    for dest in ("pacs", "fhir"):
        for x in store.due_deliveries(dest):
            store.delivery_succeeded(x.id)
    assert store.study("6.1").state is StudyState.RESULTS_SENT


def test_first_results_queued_before_a_crash_are_not_sent_twice(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    spool = Spool(tmp_path / "spool")
    _record(store, spool, "7.1", "7.1.1")
    store.association_closed(["7.1"], quiet_seconds=0)
    store.claim_ready()
    store.queue_deliveries("7.1", [NewDelivery("pacs", ["/r/sr.dcm"])])   # PACS down: stays pending
    store.close()
    store = JobStore(tmp_path / "jobs.sqlite3")                          # restart after a kill
    store.recover(quiet_seconds=0)
    [c] = store.claim_ready()
    assert [i.sop_key for i in c.instances] == ["7.1.1"]
    assert store.queue_deliveries("7.1", [NewDelivery("pacs", ["/r/sr.dcm"])]) == 0
    store.complete_processing("7.1", results=[InstanceResult("7.1.1", InstanceState.PROCESSED)],
                              deliveries=[NewDelivery("pacs", ["/r/sr.dcm", "/r/sc.dcm"])])
    items = [i for d in store.deliveries(study_key="7.1") for i in d.items]
    assert sorted(items) == ["/r/sc.dcm", "/r/sr.dcm"]


def test_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.counts()

    def use() -> None:
        store.counts()

    for _ in range(20):                  # like 20 associations, each with its own thread
        t = threading.Thread(target=use)
        t.start()
        t.join()
    store.counts()
    t = threading.Thread(target=use)
    t.start()
    t.join()
    assert store.open_connections() <= 2
