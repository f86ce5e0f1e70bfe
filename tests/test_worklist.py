"""The triage worklist: ranking by weighted positive findings, ageing cap, exports, FHIR Tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cxr_ai.errors import ConfigError
from cxr_ai.phantoms import PhantomConfig, generate_studies
from cxr_ai.results import FindingResult
from cxr_ai.worklist import (
    MSG_BAD_CAP,
    MSG_BAD_WEIGHT,
    TaskPriority,
    Tier,
    TriagePolicy,
    Worklist,
    load_results_table,
)

T0 = 1_700_000_000.0  # a fixed "now" origin; times are explicit, never the clock
POLICY = TriagePolicy(weights={"cardiomegaly": 1.0, "low_ef": 2.0}, ageing_cap_minutes=120)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> pd.DataFrame:
    """Phantom studies with known truth: one row per study (frontal chest only)."""
    labels = generate_studies(tmp_path_factory.mktemp("ph"), PhantomConfig(
        n_studies=16, seed=7, size=128, fraction_lateral=0.0, fraction_non_chest=0.0,
        prevalence_cardiomegaly=0.4, prevalence_low_ef=0.3))
    per_study = labels.groupby("study_uid", as_index=False).first()
    per_study["cardiomegaly"] = per_study["cardiomegaly"].astype(bool)
    per_study["low_ef"] = per_study["low_ef"].astype(bool)
    return per_study


def findings_for(row) -> list[FindingResult]:
    """Model-like outputs from the truth: confident on positives, graded by severity."""
    p_cm = 0.55 + 0.4 * min(1.0, (row["ctr"] - 0.5) / 0.15) if row["cardiomegaly"] else 0.2 * row["ctr"]
    p_ef = 0.5 + 0.45 * min(1.0, (40 - row["lvef"]) / 25) if row["low_ef"] else 0.1
    return [FindingResult("cardiomegaly", "Cardiomegaly", float(p_cm), 0.5),
            FindingResult("low_ef", "Low ejection fraction", float(p_ef), 0.5)]


def expected_score(fs: list[FindingResult]) -> float:
    return max((POLICY.weight(f.key) * f.probability for f in fs if f.positive), default=0.0)


def test_phantom_studies_ranked_positive_first_by_weighted_probability(studies, tmp_path: Path) -> None:
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    arrivals = {}
    for i, row in enumerate(studies.itertuples(index=False)):
        arrivals[row.study_uid] = T0 + 60 * i  # one a minute
        wl.upsert_study(row.study_uid, findings_for(row._asdict()), received_at=arrivals[row.study_uid])
    ranked = wl.ranked(now=T0 + 60 * len(studies))  # nobody past the 120 min cap
    truth = {r.study_uid: bool(r.cardiomegaly or r.low_ef) for r in studies.itertuples()}
    assert 0 < sum(truth.values()) < len(studies), "need positives and negatives"
    n_pos = sum(truth.values())
    assert [truth[r.study_uid] for r in ranked] == [True] * n_pos + [False] * (len(studies) - n_pos)
    scores = [r.score for r in ranked[:n_pos]]
    assert scores == sorted(scores, reverse=True)
    for r in ranked:
        row = studies.set_index("study_uid").loc[r.study_uid].to_dict()
        assert r.score == pytest.approx(expected_score(findings_for(row)))
    negatives = [r.study_uid for r in ranked[n_pos:]]
    assert negatives == sorted(negatives, key=lambda u: arrivals[u])  # FIFO among negatives
    assert {r.priority for r in ranked[:n_pos]} == {TaskPriority.URGENT}
    assert {r.priority for r in ranked[n_pos:]} == {TaskPriority.ROUTINE}
    assert [r.rank for r in ranked] == list(range(1, len(studies) + 1))


def test_weights_decide_between_findings(tmp_path: Path) -> None:
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    wl.upsert_study("1.2.3.1", [{"key": "cardiomegaly", "probability": 0.9, "threshold": 0.5}], received_at=T0)
    wl.upsert_study("1.2.3.2", [{"key": "low_ef", "probability": 0.6, "threshold": 0.5}], received_at=T0 + 1)
    assert [r.study_uid for r in wl.ranked(now=T0 + 10)] == ["1.2.3.2", "1.2.3.1"]  # 1.2 > 0.9
    flat = Worklist(tmp_path / "flat.sqlite", policy=TriagePolicy(weights={"cardiomegaly": 1.0, "low_ef": 1.0}))
    flat.upsert_study("1.2.3.1", [{"key": "cardiomegaly", "probability": 0.9, "threshold": 0.5}], received_at=T0)
    flat.upsert_study("1.2.3.2", [{"key": "low_ef", "probability": 0.6, "threshold": 0.5}], received_at=T0 + 1)
    assert [r.study_uid for r in flat.ranked(now=T0 + 10)] == ["1.2.3.1", "1.2.3.2"]


def test_aged_low_priority_study_rises_above_new_positives(studies, tmp_path: Path) -> None:
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    negative = studies[~(studies["cardiomegaly"] | studies["low_ef"])].iloc[0]
    positives = studies[studies["cardiomegaly"] | studies["low_ef"]]
    wl.upsert_study(negative["study_uid"], findings_for(negative.to_dict()), received_at=T0)
    for i, row in enumerate(positives.itertuples(index=False)):
        wl.upsert_study(row.study_uid, findings_for(row._asdict()), received_at=T0 + 100 * 60 + i)
    before = wl.ranked(now=T0 + 119 * 60)  # 1 min under the cap: last
    assert before[-1].study_uid == negative["study_uid"] and before[-1].tier is Tier.ROUTINE
    after = wl.ranked(now=T0 + 120 * 60)  # at the cap: first, above every newer positive
    assert after[0].study_uid == negative["study_uid"]
    assert after[0].tier is Tier.OVERDUE and after[0].priority is TaskPriority.ASAP and after[0].overdue
    assert [r.study_uid for r in after[1:]] == [r.study_uid for r in before[:-1]]
    # once read it leaves the list
    wl.mark_read(negative["study_uid"], at=T0 + 121 * 60)
    assert negative["study_uid"] not in {r.study_uid for r in wl.ranked(now=T0 + 122 * 60)}


def test_upsert_merges_instances_and_keeps_first_arrival(tmp_path: Path) -> None:
    path = tmp_path / "wl.sqlite"
    wl = Worklist(path, policy=POLICY)
    wl.upsert_study("1.9", [{"key": "cardiomegaly", "probability": 0.3, "threshold": 0.5}], received_at=T0, report_uid="2.25.1")
    wl.upsert_study("1.9", [{"key": "cardiomegaly", "probability": 0.8, "threshold": 0.5}], received_at=T0 + 500, report_uid="2.25.2")
    wl.close()
    (r,) = Worklist(path, policy=POLICY).ranked(now=T0 + 600)  # persisted
    assert r.findings["cardiomegaly"]["probability"] == 0.8 and r.findings["cardiomegaly"]["positive"]
    assert r.received_at == T0 and r.wait_minutes == pytest.approx(10.0)
    assert r.report_uids == ["2.25.1", "2.25.2"]


def test_one_upsert_with_several_instances_keeps_each_findings_highest(tmp_path: Path) -> None:
    """The listener and the table loader pass all instances' findings in one call."""
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    wl.upsert_study("1.9", [{"key": "cardiomegaly", "probability": 0.8, "threshold": 0.5},
                            {"key": "cardiomegaly", "probability": 0.3, "threshold": 0.5},
                            {"key": "low_ef", "probability": 0.2, "threshold": 0.5},
                            {"key": "low_ef", "probability": 0.6, "threshold": 0.5}], received_at=T0)
    (r,) = wl.ranked(now=T0 + 1)
    assert r.findings["cardiomegaly"]["probability"] == 0.8 and r.findings["low_ef"]["probability"] == 0.6
    assert r.score == pytest.approx(2.0 * 0.6)


def test_exports_csv_json_and_valid_fhir_tasks(studies, tmp_path: Path) -> None:
    from fhir.resources.R4B.bundle import Bundle

    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    for i, row in enumerate(studies.head(5).itertuples(index=False)):
        wl.upsert_study(row.study_uid, findings_for(row._asdict()), received_at=T0 - 3 * 3600 * (i == 4) + i,
                        report_uid=f"2.25.{1000 + i}")
    now = T0 + 30
    ranked = wl.ranked(now=now)
    table = pd.read_csv(wl.export_csv(tmp_path / "wl.csv", now=now))
    assert list(table["study_uid"]) == [r.study_uid for r in ranked]
    assert {"rank", "priority", "score", "wait_minutes", "overdue", "p_cardiomegaly", "p_low_ef"} <= set(table.columns)
    data = json.loads(wl.export_json(tmp_path / "wl.json", now=now).read_text())
    assert [d["study_uid"] for d in data] == [r.study_uid for r in ranked]
    bundle = Bundle.model_validate_json(wl.export_fhir(tmp_path / "tasks.json", now=now).read_text())
    tasks = [e.resource for e in bundle.entry]
    assert [t.focus.identifier.value for t in tasks] == [f"urn:oid:{r.study_uid}" for r in ranked]
    assert [t.priority for t in tasks] == [r.priority.value for r in ranked]
    assert tasks[0].priority == "asap"  # the one that arrived 3 h ago
    for t, r in zip(tasks, ranked):
        assert t.status == "requested" and t.intent == "order"
        assert t.input[0].valueReference.identifier.value.startswith("urn:oid:2.25.")
        assert f"rank {r.rank}" == t.businessStatus.text


def test_load_batch_results_table(tmp_path: Path) -> None:
    table = pd.DataFrame([
        {"study_uid": "1.5", "sop_uid": "1.5.1", "status": "processed", "patient_key": "ab",
         "p_cardiomegaly": 0.7, "thr_cardiomegaly": 0.5, "p_low_ef": 0.1, "thr_low_ef": 0.5},
        {"study_uid": "1.5", "sop_uid": "1.5.2", "status": "not_applicable", "patient_key": "ab",
         "p_cardiomegaly": None, "thr_cardiomegaly": None, "p_low_ef": None, "thr_low_ef": None},
        {"study_uid": "1.6", "sop_uid": "1.6.1", "status": "processed", "patient_key": "cd",
         "p_cardiomegaly": 0.2, "thr_cardiomegaly": 0.5, "p_low_ef": 0.3, "thr_low_ef": 0.5},
    ])
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    assert load_results_table(wl, table, received_at=T0) == 2
    assert [(r.study_uid, r.patient_key) for r in wl.ranked(now=T0 + 1)] == [("1.5", "ab"), ("1.6", "cd")]


def test_policy_errors_are_actionable() -> None:
    with pytest.raises(ConfigError) as exc:
        TriagePolicy(weights={"low_ef": -1})
    assert str(exc.value) == MSG_BAD_WEIGHT.format(key="low_ef", value=-1)
    with pytest.raises(ConfigError) as exc:
        TriagePolicy(ageing_cap_minutes=0)
    assert str(exc.value) == MSG_BAD_CAP.format(value=0)
    with pytest.raises(ValueError, match="lacks probability"):
        Worklist(":memory:").upsert_study("1.2", [{"key": "low_ef", "threshold": 0.5}])


def test_load_starts_the_wait_at_the_study_time_not_the_load(tmp_path: Path) -> None:
    """A batch table loaded in one go: first in, first out follows the studies' acquisition
    times (study_date + study_time), not the load time (which would fall back to UID order)."""
    from cxr_ai.worklist import acquisition_time

    table = pd.DataFrame([
        {"study_uid": "1.1", "status": "processed", "patient_key": "a", "study_date": "2024-03-02", "study_time": "081500",
         "p_cardiomegaly": 0.1, "thr_cardiomegaly": 0.5},
        {"study_uid": "1.2", "status": "processed", "patient_key": "b", "study_date": "2024-03-01", "study_time": "235900",
         "p_cardiomegaly": 0.2, "thr_cardiomegaly": 0.5},
        {"study_uid": "1.3", "status": "processed", "patient_key": "c", "study_date": "2024-03-02", "study_time": "07",
         "p_cardiomegaly": 0.3, "thr_cardiomegaly": 0.5},
    ])
    path = tmp_path / "results.csv"
    table.to_csv(path, index=False)
    wl = Worklist(tmp_path / "wl.sqlite", policy=TriagePolicy(ageing_cap_minutes=10**9))
    assert load_results_table(wl, path) == 3
    ranked = wl.ranked()
    assert [r.study_uid for r in ranked] == ["1.2", "1.3", "1.1"]
    assert ranked[0].arrival_at == acquisition_time("20240301", "235900")
    assert acquisition_time("", "1200") is None and acquisition_time("2024-13-40") is None


# --- entries are per study and patient: a Study Instance UID reused for two patients ---------

SHARED = "1.2.826.0.1.7"  # one Study Instance UID a sender gave two patients' studies
KEY_A, KEY_B = "a1" * 32, "b2" * 32  # pseudonymous patient keys (HMAC hex)
PERSON_A = {"name": "DOE^ANNA", "id": "PA", "age": 71.0, "sex": "F"}
PERSON_B = {"name": "ROE^BORIS", "id": "PB", "age": 34.0, "sex": "M"}


def two_patients(wl: Worklist) -> None:
    """Patient A (positive) and patient B (negative) under one Study UID, each its own job."""
    wl.upsert_study(SHARED, [{"key": "cardiomegaly", "probability": 0.9, "threshold": 0.5}], received_at=T0 + 5,
                    patient_key=KEY_A, job_id="JA", report_uid="2.25.71", demographics=PERSON_A)
    wl.upsert_study(SHARED, [{"key": "cardiomegaly", "probability": 0.2, "threshold": 0.5},
                             {"key": "low_ef", "probability": 0.3, "threshold": 0.5}], received_at=T0,
                    patient_key=KEY_B, job_id="JB", report_uid="2.25.72", demographics=PERSON_B)


def test_two_patients_under_one_study_uid_are_two_entries_that_never_merge(tmp_path: Path) -> None:
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    two_patients(wl)
    a, b = wl.ranked(now=T0 + 60)
    assert (a.study_uid, a.patient_key, a.job_id) == (SHARED, KEY_A, "JA")
    assert (b.study_uid, b.patient_key, b.job_id) == (SHARED, KEY_B, "JB")
    # each entry has its own patient's findings, demographics, reports and rank
    assert a.findings["cardiomegaly"]["probability"] == 0.9 and "low_ef" not in a.findings
    assert b.findings["cardiomegaly"]["probability"] == 0.2 and b.findings["low_ef"]["probability"] == 0.3
    assert (a.demographics, b.demographics) == (PERSON_A, PERSON_B)
    assert (a.report_uids, b.report_uids) == (["2.25.71"], ["2.25.72"])
    assert (a.rank, a.tier, b.rank, b.tier) == (1, Tier.POSITIVE, 2, Tier.ROUTINE)
    assert (a.received_at, b.received_at) == (T0 + 5, T0)
    assert wl.by_job("JA").demographics == PERSON_A and wl.by_job("JB").demographics == PERSON_B
    # the same study and patient again (another instance) still merges into that patient's entry
    wl.upsert_study(SHARED, [{"key": "low_ef", "probability": 0.8, "threshold": 0.5}], received_at=T0 + 30,
                    patient_key=KEY_B, report_uid="2.25.73")
    a2, b2 = sorted(wl.ranked(now=T0 + 60), key=lambda r: r.job_id)
    assert a2.findings == a.findings and a2.report_uids == ["2.25.71"]
    assert b2.findings["low_ef"]["probability"] == 0.8 and b2.findings["cardiomegaly"]["probability"] == 0.2
    assert b2.report_uids == ["2.25.72", "2.25.73"] and b2.received_at == T0 and b2.demographics == PERSON_B
    # a result without a patient key is an entry of its own, not patient A's or B's
    wl.upsert_study(SHARED, [{"key": "cardiomegaly", "probability": 0.6, "threshold": 0.5}], received_at=T0)
    assert sorted(r.patient_key for r in wl.ranked(now=T0 + 60)) == sorted(["", KEY_A, KEY_B])
    assert wl.by_job("JA").findings == a.findings


def test_mark_read_and_remove_one_patient_or_every_entry_of_a_uid(tmp_path: Path) -> None:
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    two_patients(wl)
    assert wl.mark_read(SHARED, patient_key=KEY_A, at=T0 + 10) == 1
    assert [r.patient_key for r in wl.ranked(now=T0 + 60)] == [KEY_B]
    assert wl.by_job("JA").read_at == T0 + 10 and wl.by_job("JB").read_at is None
    assert wl.mark_read(SHARED, patient_key="someone else") == 0
    assert wl.mark_read(SHARED, at=T0 + 20) == 2  # no key: every entry of the UID
    assert wl.ranked(now=T0 + 60) == []
    assert wl.mark_read(SHARED, patient_key=KEY_B, read=False) == 1
    assert [r.patient_key for r in wl.ranked(now=T0 + 60)] == [KEY_B]
    assert wl.remove_study(SHARED, patient_key=KEY_B) is True
    assert wl.by_job("JB") is None and wl.by_job("JA") is not None
    assert wl.remove_study(SHARED, patient_key=KEY_B) is False
    two_patients(wl)
    assert wl.remove_study(SHARED) is True and wl.ranked(include_read=True) == []


def test_fhir_bundle_has_a_task_per_patient_entry_with_distinct_ids(tmp_path: Path) -> None:
    import uuid

    from fhir.resources.R4B.bundle import Bundle

    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    two_patients(wl)
    wl.upsert_study("1.2.826.0.1.8", [{"key": "low_ef", "probability": 0.1, "threshold": 0.5}], received_at=T0)
    bundle = Bundle.model_validate_json(wl.export_fhir(tmp_path / "tasks.json", now=T0 + 60).read_text())
    urls = [e.fullUrl for e in bundle.entry]
    tasks = [e.resource for e in bundle.entry]
    assert len(tasks) == 3 and len(set(urls)) == 3
    assert [t.focus.identifier.value for t in tasks] == [f"urn:oid:{SHARED}"] * 2 + ["urn:oid:1.2.826.0.1.8"]
    ids = [t.identifier[0].value for t in tasks]
    assert len(set(ids)) == 3 and all(t.identifier[0].system == "urn:ietf:rfc:3986" for t in tasks)
    # a patient's entry is identified by its own Task uuid (= the Bundle fullUrl) ...
    assert ids[:2] == urls[:2] and all(u.startswith("urn:uuid:") for u in urls)
    assert [t.input[0].valueReference.identifier.value for t in tasks[:2]] == ["urn:oid:2.25.71", "urn:oid:2.25.72"]
    # ... an entry without a patient key keeps the ids its Task had when entries were per UID
    assert ids[2] == "urn:oid:1.2.826.0.1.8"
    assert urls[2] == f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, 'cxr-ai-worklist-task:1.2.826.0.1.8')}"
    # the ids are stable: a second export gives the same ones
    again = json.loads(wl.export_fhir(tmp_path / "again.json", now=T0 + 90).read_text())
    assert [e["fullUrl"] for e in again["entry"]] == urls


def test_load_table_gives_each_patient_of_a_shared_study_uid_its_entry_and_reports(tmp_path: Path) -> None:
    row = {"study_uid": "1.5", "status": "processed", "thr_cardiomegaly": 0.5}
    table = pd.DataFrame([
        {**row, "sop_uid": "1.5.1", "patient_key": "ab", "p_cardiomegaly": 0.7, "report_uid": "2.25.1"},
        {**row, "sop_uid": "1.5.2", "patient_key": "ab", "p_cardiomegaly": 0.4, "report_uid": "2.25.2"},
        {**row, "sop_uid": "1.5.3", "patient_key": "cd", "p_cardiomegaly": 0.1, "report_uid": "2.25.3"},
        {**row, "sop_uid": "1.5.4", "patient_key": "cd", "p_cardiomegaly": 0.2, "report_uid": "2.25.4"},
    ])
    path = tmp_path / "results.csv"
    table.to_csv(path, index=False)
    wl = Worklist(tmp_path / "wl.sqlite", policy=POLICY)
    assert load_results_table(wl, path, received_at=T0) == 2
    got = {r.patient_key: r for r in wl.ranked(now=T0 + 1)}
    assert set(got) == {"ab", "cd"}  # no entry without a patient: the extra reports went to theirs
    assert got["ab"].findings["cardiomegaly"]["probability"] == 0.7 and got["ab"].report_uids == ["2.25.1", "2.25.2"]
    assert got["cd"].findings["cardiomegaly"]["probability"] == 0.2 and got["cd"].report_uids == ["2.25.3", "2.25.4"]


def test_cli_mark_read_marks_every_entry_of_a_uid_and_says_it_is_shared(tmp_path: Path, capsys) -> None:
    from cxr_ai.worklist_cli import worklist_main

    db = tmp_path / "wl.sqlite"
    with Worklist(db, policy=POLICY) as wl:
        two_patients(wl)
        wl.upsert_study("1.2.826.0.1.8", [{"key": "low_ef", "probability": 0.1, "threshold": 0.5}], received_at=T0)
    assert worklist_main(["--db", str(db), "--mark-read", SHARED, "--mark-read", "1.2.826.0.1.8"]) == 0
    out = capsys.readouterr().out
    assert f"Study Instance UID {SHARED} is shared by 2 patients' entries; all 2 marked read" in out
    assert "1.2.826.0.1.8 is shared" not in out
    assert "DOE" not in out and "ROE" not in out and KEY_A not in out  # no patient data printed
    with Worklist(db, policy=POLICY) as wl:
        assert wl.ranked() == [] and len(wl.ranked(include_read=True)) == 3


# the schema of the releases keyed by Study Instance UID alone (first release, then with the
# columns added since: job_id, acquired_at, reason, demographics_json, demographics_until)
OLD_SCHEMA_FIRST = """CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY, received_at REAL NOT NULL, accession TEXT NOT NULL,
    patient_key TEXT NOT NULL, findings_json TEXT NOT NULL, reports_json TEXT NOT NULL,
    read_at REAL, updated_at REAL NOT NULL)"""
OLD_ADDED = ["job_id TEXT NOT NULL DEFAULT ''", "acquired_at REAL", "reason TEXT NOT NULL DEFAULT ''",
             "demographics_json TEXT NOT NULL DEFAULT ''", "demographics_until REAL"]


def old_file(path: Path, *, added: int) -> list[dict]:
    """A worklist file as an older release wrote it (with the first ``added`` later columns),
    holding a read entry with demographics and an unread one; returns its rows."""
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(OLD_SCHEMA_FIRST)
    for decl in OLD_ADDED[:added]:
        con.execute(f"ALTER TABLE studies ADD COLUMN {decl}")
    if added:
        con.execute("CREATE INDEX studies_job ON studies(job_id)")
    rows = [
        {"study_uid": SHARED, "received_at": T0, "accession": "ACC1", "patient_key": KEY_A,
         "findings_json": json.dumps({"cardiomegaly": {"key": "cardiomegaly", "probability": 0.9, "threshold": 0.5,
                                                        "positive": True}}),
         "reports_json": json.dumps(["2.25.71"]), "read_at": T0 + 100, "updated_at": T0 + 100,
         "job_id": "JA", "acquired_at": T0 - 50, "reason": "",
         "demographics_json": json.dumps(PERSON_A, sort_keys=True), "demographics_until": T0 + 10**6},
        {"study_uid": "1.2.826.0.1.8", "received_at": T0 + 1, "accession": "", "patient_key": "",
         "findings_json": "{}", "reports_json": "[]", "read_at": None, "updated_at": T0 + 1,
         "job_id": "J8", "acquired_at": None, "reason": "lateral view", "demographics_json": "",
         "demographics_until": None},
    ]
    cols = [c.split()[0] for c in OLD_SCHEMA_FIRST.split("(", 1)[1].split(",")] + \
        [d.split()[0] for d in OLD_ADDED[:added]]
    for row in rows:
        con.execute(f"INSERT INTO studies ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [row[c] for c in cols])
    con.commit()
    con.close()
    return [{c: r[c] for c in cols} for r in rows]


def dump(path: Path) -> tuple[list[dict], list[str], tuple[str, ...]]:
    """(rows, sqlite_master entries, primary key columns) of a worklist file."""
    import sqlite3

    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM studies ORDER BY study_uid, patient_key")]
    master = [f"{r['type']} {r['name']} {r['sql']}" for r in con.execute("SELECT * FROM sqlite_master ORDER BY name")]
    info = con.execute("PRAGMA table_info(studies)").fetchall()
    key = tuple(r["name"] for r in sorted((r for r in info if r["pk"]), key=lambda r: r["pk"]))
    con.close()
    return rows, master, key


@pytest.mark.parametrize("added", [len(OLD_ADDED), 0], ids=["with-demographics", "first-release"])
def test_an_older_file_keyed_by_study_uid_is_migrated_keeping_every_row(tmp_path: Path, added: int) -> None:
    path = tmp_path / "worklist.sqlite3"
    before = old_file(path, added=added)
    assert dump(path)[2] == ("study_uid",)
    Worklist(path, policy=POLICY).close()
    rows, master, key = dump(path)
    assert key == ("study_uid", "patient_key")
    assert not any(" studies_by_uid " in m for m in master)  # the old table is gone
    assert any(m.startswith("index studies_job ") for m in master)
    defaults = {"job_id": "", "acquired_at": None, "reason": "", "demographics_json": "", "demographics_until": None}
    assert rows == sorted(({**defaults, **r} for r in before), key=lambda r: (r["study_uid"], r["patient_key"]))
    # opening the migrated file again changes nothing
    Worklist(path, policy=POLICY).close()
    assert dump(path) == (rows, master, key)
    # the migrated entries work as today's: read state kept, another patient under the UID is its own
    with Worklist(path, policy=POLICY) as wl:
        (old_a,) = [r for r in wl.ranked(now=T0 + 200, include_read=True) if r.patient_key == KEY_A]
        assert old_a.read_at == T0 + 100 and old_a.findings["cardiomegaly"]["probability"] == 0.9
        assert old_a.demographics == (PERSON_A if added else {})
        wl.upsert_study(SHARED, [{"key": "cardiomegaly", "probability": 0.1, "threshold": 0.5}], received_at=T0,
                        patient_key=KEY_B, job_id="JB", demographics=PERSON_B)
        shared = {r.patient_key: r for r in wl.ranked(now=T0 + 200, include_read=True) if r.study_uid == SHARED}
        assert set(shared) == {KEY_A, KEY_B}
        assert shared[KEY_A].findings["cardiomegaly"]["probability"] == 0.9 and shared[KEY_A].read_at == T0 + 100
        assert shared[KEY_B].read_at is None and shared[KEY_B].demographics == PERSON_B
