"""The listener keeps the prediction log and the triage worklist up to date (real pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cxr_ai.phantoms import PhantomConfig, generate_studies
from cxr_ai.service import Service
from cxr_ai.worklist import Worklist
from test_service import base_config, send


@pytest.mark.slow
def test_listener_logs_predictions_and_updates_the_worklist(tmp_path: Path, rg3_paths) -> None:
    labels = generate_studies(tmp_path / "ph", PhantomConfig(n_studies=3, seed=11, size=512,
                                                             fraction_lateral=0.0, fraction_non_chest=0.0))
    files = [tmp_path / "ph" / f for f in labels["file"]] + [rg3_paths["RG3_UNCR"]]
    cfg = base_config(tmp_path, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    cfg["workers"]["pipeline"] = "cxr_ai.pipeline:Pipeline"
    svc = Service(cfg, base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, files) == [0] * len(files)
        assert svc.wait_idle(timeout=300, expected_instances=len(files))
    finally:
        svc.stop(grace=5)

    log = tmp_path / "var" / "monitoring" / "predictions.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # one record per readable instance, the rejected tibia included (with its gate outcome)
    assert len(records) == len(files)
    text = log.read_text()
    for pid in labels["patient_id"]:
        assert str(pid) not in text  # pseudonymous keys only
    frame = pd.DataFrame(records)
    assert frame["sop_uid"].is_unique and set(labels["sop_uid"]) <= set(frame["sop_uid"])
    assert frame["patient_key"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert frame.loc[frame["gate_accepted"], "findings"].map(len).eq(2).all()
    assert (~frame["gate_accepted"]).sum() == 1  # the tibia, logged with its gate outcome

    ranked = Worklist(tmp_path / "var" / "worklist.sqlite3").ranked()
    assert sorted(r.study_uid for r in ranked) == sorted(labels["study_uid"])  # the tibia is not on it
    assert all(r.report_uids for r in ranked)
    assert [r.rank for r in ranked] == list(range(1, len(ranked) + 1))
