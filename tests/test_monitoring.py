"""Live monitoring: pseudonymous prediction log, ground-truth feed (CSV, FHIR), rolling
subgroup metrics equal to the offline evaluator's, and gap / drift alerts.

Probabilities here are SIMULATED from the phantom truth, so that gaps of known size can be
injected; the images, their DICOM headers, the applicability gate and the result objects are
real. The same chain with the real listener and the shipped model is tests/test_fairness_live.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cxr_ai.dicom.gate import GateDecision, GateReason, check_applicability
from cxr_ai.dicom.reader import iter_dicom_files
from cxr_ai.evaluation.evaluate import EvaluationSettings, evaluate_frames
from cxr_ai.evaluation.labels import load_ours
from cxr_ai.evaluation.metrics import MetricSettings
from cxr_ai.evaluation.report import strip_frames
from cxr_ai.evaluation.simulate import simulate_predictions
from cxr_ai.monitoring import (
    MonitorSettings,
    PerformanceMonitor,
    PredictionLog,
    TruthStore,
    match_truth,
    patient_key,
    resolve_pseudonym_key,
    truth_from_csv,
    truth_from_fhir,
)
from cxr_ai.monitoring.log import MSG_SHORT_KEY
from cxr_ai.results import FindingResult, ImageResult, ModelInfo

T0 = dt.datetime(2026, 1, 10, 8, 0, tzinfo=dt.timezone.utc)
MODEL = ModelInfo(name="simulated", version="0.1", device_uid="2.25.1")


def _config(tmp_path, **mon):
    from cxr_ai.config import load_config

    config = load_config(env={})
    config["monitoring"].update(dir=str(tmp_path / "mon"), **mon)
    return config


def test_pseudonym_key_generated_once_persisted_private_and_never_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    config = _config(tmp_path)
    key = resolve_pseudonym_key(config)
    path = tmp_path / "mon" / "pseudonym.key"
    assert path.is_file() and (os.stat(path).st_mode & 0o777) == 0o600
    assert resolve_pseudonym_key(config) == key and len(key) == 64
    assert key.decode() not in caplog.text
    assert patient_key(key, "HOSP", "123") == hmac.new(key, b"HOSP\x1f123", hashlib.sha256).hexdigest()
    assert patient_key(key, "HOSP", "123") != patient_key(key, "OTHER", "123")
    assert resolve_pseudonym_key(_config(tmp_path, pseudonym_key="s3cret-s3cret-s3cret")) == b"s3cret-s3cret-s3cret"
    from cxr_ai.errors import ConfigError

    with pytest.raises(ConfigError, match="shorter than 16"):
        resolve_pseudonym_key(_config(tmp_path, pseudonym_key="short"))
    assert MSG_SHORT_KEY.startswith("[monitoring] pseudonym_key")


def _fhir_lvef(value: float, *, study_uid: str | None = None, patient: tuple[str, str] | None = None,
               when: str = "2026-01-12T10:00:00Z", status: str = "final") -> dict:
    obs = {"resourceType": "Observation", "id": "echo1", "status": status,
           "code": {"coding": [{"system": "http://loinc.org", "code": "10230-1",
                                "display": "Left ventricular Ejection fraction"}]},
           "effectiveDateTime": when,
           "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}
    if study_uid:
        obs["derivedFrom"] = [{"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid",
                                                                      "value": f"urn:oid:{study_uid}"}}]
    if patient:
        obs["subject"] = {"identifier": {"system": "urn:oid:1.2.3", "value": patient[1],
                                         "assigner": {"display": patient[0]}}}
    return obs


def _fhir_cardiomegaly(present: bool, *, study_uid: str, ai: bool = False) -> dict:
    obs = {"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://snomed.info/sct", "code": "8186001", "display": "Cardiomegaly"}]},
           "derivedFrom": [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}}],
           "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct",
                                                "code": "52101004" if present else "272519000"}]}}
    if ai:
        obs["method"] = {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "123110"}]}
    return obs


def test_fhir_observations_become_truth():
    key = b"k" * 32
    assert truth_from_fhir(_fhir_lvef(35.0, study_uid="1.2.3"), key=key) == [
        {"study_uid": "1.2.3", "patient_key": None, "observed_at": "2026-01-12T10:00:00+00:00",
         "source": "fhir:Observation/echo1", "finding": "low_ef", "value": 1, "lvef": 35.0}]
    assert truth_from_fhir(_fhir_lvef(40.0, study_uid="1.2.3"), key=key)[0]["value"] == 1  # at the cut-off
    assert truth_from_fhir(_fhir_lvef(40.0, study_uid="1.2.3"), key=key, lvef_cutoff=35)[0]["value"] == 0
    rec = truth_from_fhir(_fhir_lvef(55.0, patient=("HOSP", "777")), key=key)[0]
    assert rec["patient_key"] == patient_key(key, "HOSP", "777") and rec["value"] == 0 and "777" not in json.dumps(rec)
    assert truth_from_fhir(_fhir_lvef(30.0, study_uid="1", status="preliminary"), key=key) == []
    assert truth_from_fhir(_fhir_cardiomegaly(True, study_uid="9.9"), key=key)[0]["value"] == 1
    assert truth_from_fhir(_fhir_cardiomegaly(False, study_uid="9.9"), key=key)[0]["value"] == 0
    assert truth_from_fhir(_fhir_cardiomegaly(True, study_uid="9.9", ai=True), key=key) == []  # a model output
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": _fhir_lvef(20.0, study_uid="5.5")}, {"resource": _fhir_cardiomegaly(True, study_uid="5.5")}]}
    assert {r["finding"] for r in truth_from_fhir(bundle, key=key)} == {"low_ef", "cardiomegaly"}
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        truth_from_fhir({k: v for k, v in _fhir_lvef(30.0, study_uid="1").items() if k != "code"}, key=key)


def test_patient_key_time_window_matching():
    key = b"k" * 32
    pk = patient_key(key, "HOSP", "777")
    preds = pd.DataFrame({"sop_uid": ["a", "b", "c"], "study_uid": ["s1", "s2", "s3"], "patient_key": [pk, pk, "other"],
                          "study_date": ["2026-01-01", "2026-03-01", "2026-01-01"],
                          "logged_at": pd.to_datetime(["2026-01-01", "2026-03-01", "2026-01-01"], utc=True)})
    truth = truth_from_fhir(_fhir_lvef(30.0, patient=("HOSP", "777"), when="2026-01-20T00:00:00Z"), key=key)
    out, rep = match_truth(preds, truth, findings=("low_ef",), window_days=30)
    assert out["low_ef"].tolist()[0] == 1.0 and np.isnan(out["low_ef"].tolist()[1:]).all()
    assert rep["low_ef"] == {"n_truth": 1, "by_study": 0, "by_patient_window": 1, "unmatched_truth": 0,
                             "ambiguous_truth": 0}
    out, rep = match_truth(preds, truth, findings=("low_ef",), window_days=5)
    assert out["low_ef"].isna().all() and rep["low_ef"]["unmatched_truth"] == 1


def test_truth_never_lands_on_another_patients_prediction_under_a_shared_study_uid():
    """A sender reused Study UID s1 for patients A and B. Truth for A (with A's key) matches A's
    prediction only; truth for s1 without a patient key matches neither (it is ambiguous); an
    ordinary study still matches by its UID alone."""
    pa, pb, pc = "key-a", "key-b", "key-c"
    preds = pd.DataFrame({"sop_uid": ["a", "b", "c"], "study_uid": ["s1", "s1", "s2"], "patient_key": [pa, pb, pc],
                          "study_date": ["2026-01-01"] * 3,
                          "logged_at": pd.to_datetime(["2026-01-01"] * 3, utc=True)})
    truth = [{"finding": "cardiomegaly", "value": 1, "study_uid": "s1", "patient_key": pa, "observed_at": None},
             {"finding": "cardiomegaly", "value": 0, "study_uid": "s1", "patient_key": None, "observed_at": None},
             {"finding": "cardiomegaly", "value": 1, "study_uid": "s2", "patient_key": None, "observed_at": None},
             {"finding": "cardiomegaly", "value": 1, "study_uid": "s1", "patient_key": "key-z", "observed_at": None}]
    out, rep = match_truth(preds, truth, findings=("cardiomegaly",))
    assert out["cardiomegaly"].tolist()[0] == 1.0 and np.isnan(out["cardiomegaly"].tolist()[1])
    assert out["cardiomegaly"].tolist()[2] == 1.0
    assert rep["cardiomegaly"] == {"n_truth": 4, "by_study": 2, "by_patient_window": 0, "unmatched_truth": 1,
                                   "ambiguous_truth": 1}


def _run_live(phantom_dir, log: PredictionLog, *, random_state: int = 0):
    """Drive the real reader + gate over the phantom files, log each result, and return the
    predictions table a batch run would write for the same instances."""
    from cxr_ai.config import load_config
    from cxr_ai.dicom.gate import GateRules

    config = load_config(env={})
    config["gate"]["min_side"] = 64  # small phantoms keep the test fast; every other rule as shipped
    rules = GateRules.from_config(config)
    sim = simulate_predictions(pd.read_csv(phantom_dir / "labels.csv"), random_state=random_state).set_index("sop_uid")
    rows = []
    for i, path in enumerate(p for p in iter_dicom_files(phantom_dir) if p.suffix == ".dcm"):
        decision, rg = check_applicability(path, rules)
        s = sim.loc[rg.sop_instance_uid]
        findings = [FindingResult(key=f, display=f, probability=float(s[f"p_{f}"]), threshold=0.5)
                    for f in ("cardiomegaly", "low_ef")] if decision.accepted else []
        result = ImageResult(rg.sop_instance_uid, rg.study_instance_uid, decision, model=MODEL, findings=findings)
        log.log_prediction(rg, result, logged_at=T0 + dt.timedelta(minutes=i))
        row = {"sop_uid": rg.sop_instance_uid, "study_uid": rg.study_instance_uid, "gate_accepted": decision.accepted,
               "gate_reason": decision.reason.value}
        for f in findings:
            row.update({f"p_{f.key}": f.probability, f"thr_{f.key}": f.threshold, f"pred_{f.key}": f.positive})
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_live_log_and_truth_feed_equal_offline_evaluator(tmp_path):
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    ph = tmp_path / "ph"
    table = generate_studies(ph, PhantomConfig(n_studies=160, seed=31, size=64, shift_group={"race": "Black"},
                                               shift_strength=1.0))
    config = _config(tmp_path)
    log = PredictionLog.from_config(config)
    batch = _run_live(ph, log)
    assert (~batch["gate_accepted"]).sum() > 0  # laterals and non-chest files were really rejected
    # no direct identifiers in the log
    text = log.path.read_text()
    for pid, acc in zip(table["patient_id"], table["accession"]):
        assert pid not in text and acc not in text
    assert "PatientName" not in text and resolve_pseudonym_key(config).decode() not in text
    # ground truth: cardiomegaly from a CSV, low EF from FHIR echo Observations, both by study
    store = TruthStore(tmp_path / "mon" / "truth.jsonl")
    table[["study_uid", "cardiomegaly"]].to_csv(tmp_path / "radiology.csv", index=False)
    store.add(truth_from_csv(tmp_path / "radiology.csv", key=resolve_pseudonym_key(config)))
    studies = table.drop_duplicates("study_uid")
    for uid, lvef in zip(studies["study_uid"], studies["lvef"]):
        store.add(truth_from_fhir(_fhir_lvef(float(lvef), study_uid=uid), key=resolve_pseudonym_key(config)))
    metric = MetricSettings(n_boot=60, random_state=4, min_group_size=20)
    settings = MonitorSettings(attributes=("sex", "age_band", "race"), intersections=(("race", "sex"),),
                               window_days=7, metrics=metric)
    monitor = PerformanceMonitor(log, store, performance_log=tmp_path / "mon" / "performance.jsonl", settings=settings)
    live = monitor.update(now=T0 + dt.timedelta(days=1))
    offline = strip_frames(evaluate_frames(
        batch, load_ours(ph / "labels.csv"), name="live window",
        settings=EvaluationSettings(attributes=settings.attributes, intersections=settings.intersections, metrics=metric)))
    assert live["truth_match"]["low_ef"]["by_study"] == len(batch)  # every logged instance got its truth
    for f in ("cardiomegaly", "low_ef"):
        for attr in ("sex", "age_band", "race", "race × sex"):
            lv = live["result"]["findings"][f]["attributes"][attr]
            off = offline["findings"][f]["attributes"][attr]
            assert lv == off, (f, attr)
    perf = [json.loads(line) for line in (tmp_path / "mon" / "performance.jsonl").read_text().splitlines()]
    assert len(perf) == 1 and perf[0]["n_predictions"] == len(batch)
    values = monitor.metric_values()
    black = offline["findings"]["cardiomegaly"]["attributes"]["race"]["groups"]
    auc = next(g for g in black if g["group"] == "Black")["metrics"]["auroc"]["value"]
    assert values['cxr_ai_subgroup_metric{finding="cardiomegaly",attribute="race",group="Black",metric="auroc"}'] == auc


def _synthetic_log(tmp_path, *, n: int, noisy_group: str | None, start: dt.datetime, seed: int,
                   shift_scores: str | None = None, log: PredictionLog | None = None):
    """Log n synthetic instances (fake radiograph headers, real result objects); truth by study."""
    rng = np.random.default_rng(seed)
    log = log or PredictionLog(tmp_path / "pred.jsonl", key=b"k" * 32)
    truth = []
    for i in range(n):
        race = rng.choice(["White", "Black", "Asian"], p=[0.5, 0.3, 0.2])
        y = int(rng.random() < 0.3)
        sd = 3.0 if race == noisy_group else 0.7
        p = float(1 / (1 + np.exp(-(3 * (y - 0.5) + rng.normal(0, sd)))))
        if race == shift_scores:
            p = float(np.clip(p * 0.5 + 0.5, 0, 1))
        uid = f"2.25.{seed}{i:06d}"
        rg = SimpleNamespace(study_date=None, issuer_of_patient_id="H", patient_id=f"P{i}", sex=rng.choice(["M", "F"]),
                             age_years=float(rng.integers(20, 90)), ethnic_group=race)
        res = ImageResult(uid, uid, GateDecision(True, GateReason.ACCEPTED, "ok"), model=MODEL,
                          findings=[FindingResult("cardiomegaly", "Cardiomegaly", p, 0.5)])
        log.log_prediction(rg, res, logged_at=start + dt.timedelta(minutes=i))
        truth.append({"finding": "cardiomegaly", "value": y, "study_uid": uid, "patient_key": None,
                      "observed_at": None, "source": "test"})
    return log, truth


def test_gap_and_drift_alerts_are_logged_and_exposed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cxr_ai.monitoring.performance")
    store = TruthStore(tmp_path / "truth.jsonl")
    # reference window: nobody's scores shifted; current window: Asian scores drift upward,
    # Black scores are noisy (an accuracy gap)
    log, t1 = _synthetic_log(tmp_path, n=900, noisy_group=None, start=T0 - dt.timedelta(days=10), seed=1)
    log, t2 = _synthetic_log(tmp_path, n=900, noisy_group="Black", start=T0, seed=2, shift_scores="Asian", log=log)
    store.add(t1 + t2)
    settings = MonitorSettings(findings=("cardiomegaly",), attributes=("race",), intersections=(), window_days=7,
                               metrics=MetricSettings(n_boot=100, random_state=0))
    monitor = PerformanceMonitor(log, store, performance_log=tmp_path / "perf.jsonl", settings=settings)
    rec = monitor.update(now=T0 + dt.timedelta(days=1))
    gaps = {(a["group"], a["metric"]) for a in rec["alerts"] if a["kind"] == "gap"}
    # Black: noisy scores, an AUROC gap. Asian: scores pushed up by a monotone map, so the
    # ranking (AUROC) is intact but specificity at the threshold collapses (FPR rises) and the
    # probabilities are no longer calibrated. White: nothing.
    assert ("Black", "auroc") in gaps and ("Asian", "fpr") in gaps and ("Asian", "ece") in gaps
    assert ("Asian", "auroc") not in gaps and not any(g == "White" for g, _ in gaps)
    drift = {a["group"] for a in rec["alerts"] if a["kind"] == "drift"}
    assert "Asian" in drift and "White" not in drift
    values = monitor.metric_values()
    assert values['cxr_ai_fairness_alert{kind="gap",finding="cardiomegaly",attribute="race",group="Black",metric="auroc"}'] == 1.0
    assert values["cxr_ai_fairness_alerts"] == len(rec["alerts"])
    assert "monitoring alert" in caplog.text and "P1" not in caplog.text
    # the reference window alone: no alerts
    quiet = monitor.update(now=T0 - dt.timedelta(days=9) + dt.timedelta(hours=23))
    assert quiet["alerts"] == [] and quiet["n_predictions"] == 900


def test_an_update_reads_each_log_once(tmp_path, monkeypatch):
    """The independent and the feedback figures of one update come from one read of the
    prediction log and of the truth log (both grow without bound on a live service)."""
    store = TruthStore(tmp_path / "truth.jsonl")
    log, truth = _synthetic_log(tmp_path, n=200, noisy_group=None, start=T0, seed=4)
    store.add(truth)
    settings = MonitorSettings(findings=("cardiomegaly",), attributes=("race",), intersections=(), window_days=7,
                               metrics=MetricSettings(n_boot=20, random_state=0))
    monitor = PerformanceMonitor(log, store, performance_log=tmp_path / "perf.jsonl", settings=settings)
    reads = {"predictions": 0, "truth": 0}
    to_frame, records = log.to_frame, store.records

    def counted_frame(*args, **kw):
        reads["predictions"] += 1
        return to_frame(*args, **kw)

    def counted_records(*args, **kw):
        reads["truth"] += 1
        return records(*args, **kw)

    monkeypatch.setattr(log, "to_frame", counted_frame)
    monkeypatch.setattr(store, "records", counted_records)
    record = monitor.update(now=T0 + dt.timedelta(days=1))
    assert record["n_predictions"] == 200 and "result" in record and "feedback" in record
    assert reads == {"predictions": 1, "truth": 1}
