"""`cxr-ai phantoms --shift-group` from the command line: the shift is real (the shifted
group's pixels differ from an unshifted run with the same seed, nobody else's do), and the
offline evaluator and the live monitor flag that group and no other.

Scores are SIMULATED from the phantom truth (:func:`cxr_ai.evaluation.simulate.simulate_predictions`:
images marked shifted get noisier scores, as a model reading degraded images would); the
images, their DICOM headers and labels come from the command.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from cxr_ai import cli
from cxr_ai.dicom.gate import GateDecision, GateReason
from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.evaluation.evaluate import EvaluationSettings, evaluate_frames
from cxr_ai.evaluation.labels import load_ours
from cxr_ai.evaluation.metrics import MetricSettings
from cxr_ai.evaluation.simulate import simulate_predictions
from cxr_ai.monitoring import MonitorSettings, PerformanceMonitor, PredictionLog, TruthStore
from cxr_ai.results import FindingResult, ImageResult, ModelInfo

SEED = 21
N = 500
T0 = dt.datetime(2026, 1, 10, 8, 0, tzinfo=dt.timezone.utc)
SETTINGS = EvaluationSettings(findings=("cardiomegaly",), attributes=("sex", "race", "insurance"), intersections=(),
                              metrics=MetricSettings(n_boot=300, random_state=0, min_group_size=30))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_phantoms")
    common = ["phantoms", "--n", str(N), "--seed", str(SEED), "--size", "64"]
    assert cli.main([*common, "--out", str(base / "plain")]) == 0
    assert cli.main([*common, "--out", str(base / "shifted"), "--shift-group", "race=Black"]) == 0
    return base / "plain", base / "shifted"


def test_help_shows_the_shift_strength_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["phantoms", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--shift-strength" in text and "(default 1 when --shift-group is given)" in text


def test_shift_strength_without_group_or_zero_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--shift-strength needs --shift-group"):
        cli.main(["phantoms", "--out", str(tmp_path), "--shift-strength", "0.5"])
    with pytest.raises(SystemExit, match="shifts nothing"):
        cli.main(["phantoms", "--out", str(tmp_path), "--shift-group", "race=Black", "--shift-strength", "0"])
    with pytest.raises(SystemExit, match=r"shift_strength must be within \[0, 1\]"):
        cli.main(["phantoms", "--out", str(tmp_path), "--shift-group", "race=Black", "--shift-strength", "2"])


@pytest.mark.slow
def test_cli_shift_changes_the_shifted_group_pixels_only(runs, capsys):
    plain, shifted = runs
    a = pd.read_csv(plain / "labels.csv", dtype={"sop_uid": str})
    b = pd.read_csv(shifted / "labels.csv", dtype={"sop_uid": str})
    assert not a["shifted"].any()
    black = b["race"] == "Black"
    assert black.sum() > 30
    assert b.loc[black, "shifted"].all() and not b.loc[~black, "shifted"].any()
    # same seed, same patients and truth: only the pixels of the shifted group differ
    assert (a["race"] == b["race"]).all() and (a["cardiomegaly"] == b["cardiomegaly"]).all()
    differ = []
    for fa, fb in zip(a["file"], b["file"]):
        pa = pydicom.dcmread(plain / fa).pixel_array
        pb = pydicom.dcmread(shifted / fb).pixel_array
        differ.append(pa.shape != pb.shape or bool(np.any(pa != pb)))
    differ = np.asarray(differ)
    assert differ[black.to_numpy()].all()
    assert not differ[~black.to_numpy()].any()


@pytest.mark.slow
def test_evaluator_flags_the_cli_shifted_group_and_no_other(runs):
    plain, shifted = runs
    for folder, expected in ((shifted, {("race", "Black")}), (plain, set())):
        labels = pd.read_csv(folder / "labels.csv")
        res = evaluate_frames(simulate_predictions(labels, random_state=0), load_ours(folder / "labels.csv"),
                              settings=SETTINGS, name=folder.name)
        flags = {(f["attribute"], f["group"]) for a in res["findings"]["cardiomegaly"]["attributes"].values()
                 for f in a["flagged"]}
        assert flags == expected, (folder.name, flags)


@pytest.mark.slow
def test_monitor_flags_the_cli_shifted_group_and_no_other(runs, tmp_path):
    _, shifted = runs
    labels = pd.read_csv(shifted / "labels.csv", dtype={"sop_uid": str, "study_uid": str})
    pred = simulate_predictions(labels, random_state=0).set_index("sop_uid")
    log = PredictionLog(tmp_path / "pred.jsonl", key=b"k" * 32)
    truth = []
    model = ModelInfo(name="simulated", version="0.1", device_uid="2.25.1")
    for i, row in enumerate(labels.itertuples(index=False)):
        p = pred.loc[row.sop_uid]
        if not p["gate_accepted"]:
            continue
        rg = read_radiograph(shifted / row.file)  # demographics from the command's DICOM headers
        res = ImageResult(rg.sop_instance_uid, rg.study_instance_uid, GateDecision(True, GateReason.ACCEPTED, "ok"),
                          model=model, findings=[FindingResult("cardiomegaly", "Cardiomegaly",
                                                               float(p["p_cardiomegaly"]), 0.5)])
        log.log_prediction(rg, res, logged_at=T0 + dt.timedelta(minutes=i))
        truth.append({"finding": "cardiomegaly", "value": int(row.cardiomegaly), "study_uid": row.study_uid,
                      "patient_key": None, "observed_at": None, "source": "test"})
    store = TruthStore(tmp_path / "truth.jsonl")
    store.add(truth)
    monitor = PerformanceMonitor(log, store, performance_log=tmp_path / "perf.jsonl", settings=MonitorSettings(
        findings=("cardiomegaly",), attributes=("sex", "race"), intersections=(), window_days=30,
        metrics=MetricSettings(n_boot=300, random_state=0, min_group_size=30)))
    rec = monitor.update(now=T0 + dt.timedelta(days=2))
    gaps = {(a["attribute"], a["group"]) for a in rec["alerts"] if a["kind"] == "gap"}
    assert gaps == {("race", "Black")}, rec["alerts"]
