"""Job store: schema version and migration of the first release's store, SOP Instance UID reuse
across studies and patients (both instances kept), reason codes and the listings."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from cxr_ai.store.jobs import (
    SCHEMA_VERSION,
    InstanceResult,
    InstanceState,
    JobStore,
    NewDelivery,
    ReasonCode,
    StudyState,
)

V1_DUMP = Path(__file__).parent / "data" / "jobstore_v1.sql"
CT = "1.2.840.10008.5.1.4.1.1.1"


def _v1_store(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.executescript(V1_DUMP.read_text())
    con.close()
    return path


def test_a_first_release_store_is_migrated_and_keeps_its_rows(tmp_path):
    db = _v1_store(tmp_path / "jobs.sqlite3")
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 0
        assert "patient_fp" not in {r[1] for r in con.execute("PRAGMA table_info(instances)")}
    store = JobStore(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 3
        studies = {s.study_uid: s for s in store.studies()}
        assert set(studies) == {"1.2.3.1", "1.2.3.2"}
        assert studies["1.2.3.1"].state is StudyState.SENDING
        assert studies["1.2.3.2"].state is StudyState.NOT_APPLICABLE
        assert studies["1.2.3.2"].reason_code == ""  # not known to the old release
        assert [d.items for d in store.deliveries()] == [["SR-x.dcm"]]
        # the migrated store works: a re-send of an old instance replaces it (same key), not a reuse
        key, reused = store.instance_key(study_key="1.2.3.1", sop_key="1.2.3.1.1", sop_uid="1.2.3.1.1",
                                         patient_fp="fp-a")
        assert (key, reused) == ("1.2.3.1.1", False)
        store.record_instance(study_key="1.2.3.1", study_uid="1.2.3.1", sop_key=key, sop_uid="1.2.3.1.1",
                              sop_class_uid=CT, path="/x.dcm", size=1, patient_fp="fp-a")
        assert [i.sop_key for i in store.instances("1.2.3.1")] == ["1.2.3.1.1"]
        assert store.counts()["identity"]["sop_uid_reused_instances"] == 0
    finally:
        store.close()
    # opened again: nothing to migrate, same version
    again = JobStore(db)
    assert again.schema_version() == SCHEMA_VERSION
    again.close()


def _record(store: JobStore, *, study: str, sop: str, fp: str) -> str:
    """As the listener records a received instance: its study's key, its key, then the record."""
    study_key, _ = store.study_key(study_uid=study, patient_fp=fp, proposed=study)
    key, _ = store.instance_key(study_key=study_key, sop_key=sop, sop_uid=sop, patient_fp=fp)
    record = store.record_instance(study_key=study_key, study_uid=study, sop_key=key, sop_uid=sop,
                                   sop_class_uid=CT, path=f"/spool/{study}/{key}.dcm", size=10, patient_fp=fp)
    assert record.study_key == study_key
    return key


@pytest.mark.parametrize("second", [("1.2.9.2", "fp-b"), ("1.2.9.1", "fp-b"), ("1.2.9.2", "fp-a")],
                         ids=["other-study-other-patient", "same-study-other-patient", "other-study-same-patient"])
def test_a_reused_sop_uid_keeps_both_instances(tmp_path, second):
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        first = _record(store, study="1.2.9.1", sop="1.2.9.0.7", fp="fp-a")
        other = _record(store, study=second[0], sop="1.2.9.0.7", fp=second[1])
        assert first == "1.2.9.0.7" and other != first and other.startswith("h")
        rows = store.instances()
        assert len(rows) == 2 and all(r.uid_reused for r in rows)
        # the same Study UID for another patient is a study of its own (a derived key)
        uid_of = {s.study_key: s.study_uid for s in store.studies()}
        assert {(uid_of[r.study_key], r.patient_fp) for r in rows} == {("1.2.9.1", "fp-a"), second}
        assert len({r.study_key for r in rows}) == 2
        same_study = second[0] == "1.2.9.1"  # the same Study UID for another patient: two studies share it
        assert store.counts()["identity"] == {"sop_uid_reused_instances": 2, "sop_uid_reused_uids": 1,
                                              "study_uid_shared_studies": 2 if same_study else 0}
        assert len(store.shared_study_uid_studies()) == (2 if same_study else 0)
        # a re-send of either replaces it (same key), and adds no instance
        assert _record(store, study=second[0], sop="1.2.9.0.7", fp=second[1]) == other
        assert _record(store, study="1.2.9.1", sop="1.2.9.0.7", fp="fp-a") == first
        assert len(store.instances()) == 2
    finally:
        store.close()


def test_a_study_uid_shared_by_two_patients_makes_two_studies_that_never_merge(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        _record(store, study="1.2.7.1", sop="1.2.7.1.1", fp="fp-a")
        assert store.study_key(study_uid="1.2.7.1", patient_fp="fp-b", proposed="1.2.7.1")[1] is True
        _record(store, study="1.2.7.1", sop="1.2.7.1.2", fp="fp-b")
        _record(store, study="1.2.7.1", sop="1.2.7.1.3", fp="fp-a")  # more of the first patient's images
        studies = store.find_studies(study_uid="1.2.7.1")
        assert len(studies) == 2 and len({s.job_id for s in studies}) == 2
        by_key = {s.study_key: sorted(i.sop_uid for i in store.instances(s.study_key)) for s in studies}
        assert by_key == {"1.2.7.1": ["1.2.7.1.1", "1.2.7.1.3"],
                          next(k for k in by_key if k != "1.2.7.1"): ["1.2.7.1.2"]}
        assert all(i.patient_fp == ("fp-a" if i.study_key == "1.2.7.1" else "fp-b") for i in store.instances())
        # two senders asking for the plain key before either recorded: the second still gets its own study
        s1, _ = store.study_key(study_uid="1.2.7.2", patient_fp="fp-a", proposed="1.2.7.2")
        s2, _ = store.study_key(study_uid="1.2.7.2", patient_fp="fp-b", proposed="1.2.7.2")
        assert s1 == s2 == "1.2.7.2"
        got = [store.record_instance(study_key=s1, study_uid="1.2.7.2", sop_key=f"1.2.7.2.{n}", sop_uid=f"1.2.7.2.{n}",
                                     sop_class_uid=CT, path=f"/spool/1.2.7.2/{n}.dcm", size=1, patient_fp=fp).study_key
               for n, fp in ((1, "fp-a"), (2, "fp-b"))]
        assert got[0] == "1.2.7.2" and got[1].startswith("h") and len(got[1]) == 41
    finally:
        store.close()


def test_a_study_recorded_before_fingerprints_becomes_its_next_patients(tmp_path):
    db = _v1_store(tmp_path / "jobs.sqlite3")
    store = JobStore(db)
    try:
        # 1.2.3.1 was recorded by the first release, without a patient fingerprint
        assert _record(store, study="1.2.3.1", sop="1.2.3.1.5", fp="fp-a") == "1.2.3.1.5"
        assert [s.study_key for s in store.find_studies(study_uid="1.2.3.1")] == ["1.2.3.1"]
        _record(store, study="1.2.3.1", sop="1.2.3.1.6", fp="fp-b")  # now another patient's: a study of its own
        assert len(store.find_studies(study_uid="1.2.3.1")) == 2
    finally:
        store.close()


def test_a_version_2_store_gives_its_studies_their_first_instances_fingerprint(tmp_path):
    """Migrated to version 3, a study recorded by version 2 is its patient's: another patient's
    image under the same Study UID becomes a study of its own, not part of it."""
    import cxr_ai.store.job_schema as schema

    db = tmp_path / "jobs.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(V1_DUMP.read_text())
    for stmt in schema.MIGRATIONS[2]:
        con.execute(stmt)
    con.execute("UPDATE instances SET patient_fp='fp-a' WHERE study_key='1.2.3.1'")
    con.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    con.execute("PRAGMA user_version=2")
    con.commit()
    con.close()
    store = JobStore(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        _record(store, study="1.2.3.1", sop="1.2.3.1.7", fp="fp-b")
        studies = store.find_studies(study_uid="1.2.3.1")
        assert len(studies) == 2 and [i.patient_fp for i in store.instances("1.2.3.1")] == ["fp-a"]
    finally:
        store.close()


def test_a_resend_for_the_same_patient_and_study_is_no_reuse(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        assert _record(store, study="1.2.9.1", sop="1.2.9.0.8", fp="fp-a") == "1.2.9.0.8"
        assert _record(store, study="1.2.9.1", sop="1.2.9.0.8", fp="fp-a") == "1.2.9.0.8"
        assert not store.reused_uid_instances()
        assert store.counts()["identity"]["sop_uid_reused_instances"] == 0
    finally:
        store.close()


def test_a_race_for_one_key_never_overwrites_the_other_patient(tmp_path):
    """Two senders both asked for the plain key before either recorded: the second gets its own."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        k1, _ = store.instance_key(study_key="1.2.9.1", sop_key="1.2.9.0.9", sop_uid="1.2.9.0.9", patient_fp="fp-a")
        k2, _ = store.instance_key(study_key="1.2.9.2", sop_key="1.2.9.0.9", sop_uid="1.2.9.0.9", patient_fp="fp-b")
        assert k1 == k2
        for study, fp in (("1.2.9.1", "fp-a"), ("1.2.9.2", "fp-b")):
            store.record_instance(study_key=study, study_uid=study, sop_key=k1, sop_uid="1.2.9.0.9",
                                  sop_class_uid=CT, path=f"/spool/{study}/x.dcm", size=1, patient_fp=fp)
        rows = store.instances()
        assert len(rows) == 2 and {r.study_key for r in rows} == {"1.2.9.1", "1.2.9.2"}
    finally:
        store.close()


def test_failed_and_not_applicable_studies_carry_reason_codes_and_are_listed(tmp_path):
    now = [1000.0]
    store = JobStore(tmp_path / "jobs.sqlite3", clock=lambda: now[0])
    try:
        for n in (1, 2, 3):
            _record(store, study=f"1.2.8.{n}", sop=f"1.2.8.{n}.1", fp="fp")
        store.association_closed(["1.2.8.1", "1.2.8.2", "1.2.8.3"], quiet_seconds=0)
        claims = {c.study.study_key: c for c in store.claim_ready(limit=3)}
        store.complete_processing("1.2.8.1", results=[InstanceResult("1.2.8.1.1", InstanceState.NOT_APPLICABLE,
                                                                     "body_part")], deliveries=[])
        store.complete_processing("1.2.8.2", results=[InstanceResult("1.2.8.2.1", InstanceState.FAILED,
                                                                     "decode_error")], deliveries=[])
        now[0] = 2000.0
        assert store.fail_processing("1.2.8.3", reason="pipeline error: boom", max_attempts=1) is StudyState.FAILED
        assert len(claims) == 3
        by = {s.study_key: s for s in store.studies()}
        assert (by["1.2.8.1"].state, by["1.2.8.1"].reason_code) == (StudyState.NOT_APPLICABLE, "body_part")
        assert (by["1.2.8.2"].state, by["1.2.8.2"].reason_code) == (StudyState.FAILED,
                                                                    ReasonCode.INSTANCES_FAILED.value)
        assert "decode_error" in by["1.2.8.2"].reason
        assert by["1.2.8.3"].reason_code == ReasonCode.PIPELINE_ERROR.value
        failed = store.studies(state=StudyState.FAILED)
        assert {s.study_key for s in failed} == {"1.2.8.2", "1.2.8.3"}
        assert [s.study_key for s in store.studies(state=StudyState.FAILED, since=1500.0)] == ["1.2.8.3"]
        recent = store.studies(state=(StudyState.FAILED, StudyState.NOT_APPLICABLE), newest_first=True, limit=2)
        assert recent[0].study_key == "1.2.8.3" and len(recent) == 2
        from cxr_ai.store.listing import recent_problems

        shown = recent_problems(store)
        assert [(r["job_id"], r["state"], r["reason_code"]) for r in shown["recent_problems"]][0] == (
            by["1.2.8.3"].job_id, "failed", "pipeline_error")
        assert {r["reason_code"] for r in shown["recent_problems"]} == {"pipeline_error", "instances_failed",
                                                                       "body_part"}
        assert shown["sop_uid_reused"] == []
        # a new instance re-opens the study and clears its reason
        _record(store, study="1.2.8.2", sop="1.2.8.2.2", fp="fp")
        assert store.study("1.2.8.2").reason_code == ""
    finally:
        store.close()


def test_deliveries_queued_with_new_delivery(tmp_path):
    """The outbox still takes NewDelivery rows after the schema change (smoke of the v2 layout)."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        _record(store, study="1.2.7.1", sop="1.2.7.1.1", fp="fp")
        store.association_closed(["1.2.7.1"], quiet_seconds=0)
        store.claim_ready()
        store.complete_processing("1.2.7.1", results=[InstanceResult("1.2.7.1.1", InstanceState.PROCESSED)],
                                  deliveries=[NewDelivery("pacs", ["a.dcm"])])
        assert store.study("1.2.7.1").state is StudyState.SENDING
    finally:
        store.close()


def test_jobs_command_lists_failed_and_not_applicable_with_reasons(tmp_path, capsys):
    from cxr_ai.cli import main as cli_main

    root = tmp_path / "var"
    site = tmp_path / "site.toml"
    site.write_text(f'[store]\nroot = "{root}"\n', encoding="utf-8")
    store = JobStore(root / "jobs.sqlite3")
    try:
        for n in (1, 2, 3):
            _record(store, study=f"1.2.8.{n}", sop=f"1.2.8.{n}.1", fp="fp")
        store.association_closed(["1.2.8.1", "1.2.8.2", "1.2.8.3"], quiet_seconds=0)
        store.claim_ready(limit=3)
        store.complete_processing("1.2.8.1", results=[InstanceResult("1.2.8.1.1", InstanceState.NOT_APPLICABLE,
                                                                     "body_part")], deliveries=[])
        store.complete_processing("1.2.8.2", results=[InstanceResult("1.2.8.2.1", InstanceState.FAILED,
                                                                     "decode_error")], deliveries=[])
        store.complete_processing("1.2.8.3", results=[InstanceResult("1.2.8.3.1", InstanceState.PROCESSED)],
                                  deliveries=[])
        jobs = {s.study_key: s.job_id for s in store.studies()}
    finally:
        store.close()
    capsys.readouterr()
    assert cli_main(["jobs", "--config", str(site), "--state", "failed", "--state", "not_applicable",
                     "--since", "1h", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"')]
    listed = {r["job_id"]: r for r in rows if "job_id" in r}
    assert set(listed) == {jobs["1.2.8.1"], jobs["1.2.8.2"]}
    assert listed[jobs["1.2.8.1"]]["reason_code"] == "body_part"
    assert listed[jobs["1.2.8.2"]]["reason_code"] == "instances_failed" and "decode_error" in listed[jobs["1.2.8.2"]]["reason"]
    assert cli_main(["jobs", "--config", str(site), "--state", "failed", "--since", "2000-01-01"]) == 0
    text = capsys.readouterr().out
    assert f"FAILED          job {jobs['1.2.8.2']}" in text and "[instances_failed]" in text
    assert jobs["1.2.8.1"] not in text
    # a --since in the future lists nothing; a bad one says what it takes
    assert cli_main(["jobs", "--config", str(site), "--state", "failed", "--since", "2999-01-01", "--json"]) == 0
    assert '"job_id"' not in capsys.readouterr().out
    import pytest as _pytest

    with _pytest.raises(SystemExit):
        cli_main(["jobs", "--config", str(site), "--since", "yesterday"])
    assert "neither an ISO date/time" in capsys.readouterr().err


def test_any_arrival_order_keeps_one_study_per_study_uid_and_patient(tmp_path_factory):
    """Whatever order images of a few Study UIDs and patients arrive in, and whether the
    listener's key lookup raced another sender (the proposed key is stale), every (Study UID,
    patient) pair is exactly one study, and no study holds two patients' images."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    arrivals = st.lists(st.tuples(st.sampled_from(["1.2.5.1", "1.2.5.2"]), st.sampled_from(["fp-a", "fp-b", "fp-c"]),
                                  st.booleans()), min_size=1, max_size=12)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(arrivals)
    def check(seq):
        store = JobStore(tmp_path_factory.mktemp("order") / "jobs.sqlite3")
        try:
            for n, (uid, fp, stale) in enumerate(seq):
                proposed = uid if stale else store.study_key(study_uid=uid, patient_fp=fp, proposed=uid)[0]
                key, _ = store.instance_key(study_key=proposed, sop_key=f"{uid}.{n}", sop_uid=f"{uid}.{n}", patient_fp=fp)
                store.record_instance(study_key=proposed, study_uid=uid, sop_key=key, sop_uid=f"{uid}.{n}",
                                      sop_class_uid=CT, path=f"/spool/{uid}/{n}.dcm", size=1, patient_fp=fp)
            studies = store.studies()
            assert len(studies) == len({(uid, fp) for uid, fp, _ in seq})
            for s in studies:
                fps = {i.patient_fp for i in store.instances(s.study_key)}
                assert len(fps) == 1
            assert len(store.instances()) == len(seq)
        finally:
            store.close()

    check()
