"""Live monitoring through the real listener equals the offline evaluator over the same studies.

Real parts end to end: phantom DICOM studies with an injected subgroup shift are sent by
C-STORE to the listener running the shipped demo model; the listener's prediction log plus a
ground-truth feed (radiology CSV for cardiomegaly, FHIR echo LVEF Observations for low EF) go
through the live monitor. The same studies run through `cxr-ai batch`, and its results table
goes through the offline evaluator. The subgroup numbers must be the same.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from cxr_ai import batch
from cxr_ai.evaluation.evaluate import EvaluationSettings, evaluate_frames
from cxr_ai.evaluation.labels import load_ours
from cxr_ai.evaluation.metrics import MetricSettings
from cxr_ai.evaluation.report import strip_frames
from cxr_ai.monitoring import (
    MonitorSettings,
    PerformanceMonitor,
    PredictionLog,
    TruthStore,
    resolve_pseudonym_key,
    truth_from_csv,
    truth_from_fhir,
)
from cxr_ai.phantoms import PhantomConfig, generate_studies
from cxr_ai.service import Service
from test_monitoring import _fhir_lvef
from test_service import base_config, send

ATTRS = ("sex", "race")


@pytest.mark.slow
def test_listener_live_metrics_equal_offline_evaluation(tmp_path: Path) -> None:
    ph = tmp_path / "ph"
    labels = generate_studies(ph, PhantomConfig(n_studies=60, seed=5, size=256, shift_group={"race": "Black"},
                                                shift_strength=1.0, fraction_lateral=0.1, fraction_non_chest=0.05))
    files = [ph / f for f in labels["file"]]

    cfg = base_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    cfg["workers"]["pipeline"] = "cxr_ai.pipeline:Pipeline"
    cfg["monitoring"]["dir"] = str(tmp_path / "mon")
    svc = Service(cfg, base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, files) == [0] * len(files)
        assert svc.wait_idle(timeout=600, expected_instances=len(files))
    finally:
        svc.stop(grace=5)

    # offline: the batch processor over the same files (logging elsewhere), then the evaluator
    offline_cfg = copy.deepcopy(cfg)
    offline_cfg["monitoring"]["dir"] = str(tmp_path / "mon-batch")
    summary = batch.run_batch(batch.scan_inputs([ph]), options=batch.BatchOptions(
        out_dir=tmp_path / "batch", progress=False, explain=False, write_outputs=False), config=offline_cfg)
    assert not summary.failed
    table = pd.read_csv(tmp_path / "batch" / "results.csv", dtype={"sop_uid": str, "study_uid": str})
    metric = MetricSettings(n_boot=50, random_state=3, min_group_size=5)
    offline = strip_frames(evaluate_frames(table, load_ours(ph / "labels.csv"), name="offline",
                                           settings=EvaluationSettings(attributes=ATTRS, intersections=(),
                                                                       metrics=metric)))

    # live: the listener's log + ground truth arriving from radiology (CSV) and echo (FHIR)
    key = resolve_pseudonym_key(cfg)
    log = PredictionLog.from_config(cfg)
    logged = pd.DataFrame(log.records())
    assert sorted(logged["sop_uid"]) == sorted(labels["sop_uid"])  # every instance, rejected ones included
    store = TruthStore(tmp_path / "mon" / "truth.jsonl")
    labels[["study_uid", "cardiomegaly"]].drop_duplicates("study_uid").to_csv(tmp_path / "rad.csv", index=False)
    store.add(truth_from_csv(tmp_path / "rad.csv", key=key))
    for uid, lvef in labels.drop_duplicates("study_uid")[["study_uid", "lvef"]].itertuples(index=False):
        store.add(truth_from_fhir(_fhir_lvef(float(lvef), study_uid=uid), key=key))
    monitor = PerformanceMonitor(log, store, performance_log=tmp_path / "mon" / "performance.jsonl",
                                 settings=MonitorSettings(attributes=ATTRS, intersections=(), window_days=7,
                                                          metrics=metric))
    live = monitor.update(now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1))

    for finding in ("cardiomegaly", "low_ef"):
        for attr in ATTRS:
            lv = live["result"]["findings"][finding]["attributes"][attr]["groups"]
            off = offline["findings"][finding]["attributes"][attr]["groups"]
            assert [g["group"] for g in lv] == [g["group"] for g in off]
            for a, b in zip(lv, off):
                assert a["n"] == b["n"], (finding, attr, a["group"])
                for m, v in b["metrics"].items():
                    got = a["metrics"][m]["value"]
                    if v["value"] is None:  # not estimable offline: not estimable live either
                        assert got is None and a["metrics"][m]["status"] == v["status"], (finding, attr, m)
                    else:
                        assert got == pytest.approx(v["value"], abs=1e-6), (finding, attr, a["group"], m)
