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
