"""Batch: a SOP Instance UID reused for another patient or study is processed for each, with
results of its own (it used to be dropped as a duplicate); a true repeat is still dropped."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pydicom
from test_batch import config, phantoms, pipeline, tiny_bundle  # noqa: F401 - fixtures

from cxr_ai import batch
from cxr_ai.phantoms import make_phantom_dataset


def test_reused_sop_uid_for_another_patient_is_processed_for_each(config, pipeline, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "in"
    root.mkdir()
    ds = make_phantom_dataset(size=256, random_state=5)
    ds.PatientID = "P-ONE"
    ds.save_as(root / "one.dcm", enforce_file_format=True)
    other_patient = copy.deepcopy(ds)
    other_patient.PatientID = "P-TWO"              # same study UID, same SOP UID, another patient
    other_patient.save_as(root / "two.dcm", enforce_file_format=True)
    other_study = copy.deepcopy(ds)
    other_study.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.4242"   # same patient, another study
    other_study.save_as(root / "three.dcm", enforce_file_format=True)
    ds.save_as(root / "one-again.dcm", enforce_file_format=True)       # a true repeat

    wl = batch.scan_inputs([root])
    assert len(wl.items) == 3 and len({i.key for i in wl.items}) == 3
    assert len(wl.duplicates) == 1 and len(wl.uid_reused) == 2
    cfg = copy.deepcopy(config)
    cfg["monitoring"]["dir"] = str(tmp_path / "mon")
    summary = batch.run_batch(wl, options=batch.BatchOptions(out_dir=tmp_path / "out", progress=False), config=cfg,
                              pipeline=pipeline)
    assert summary.done == 3
    assert "reused for another study or patient" in summary.text()
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(table) == 3 and table["sop_uid"].nunique() == 1
    assert table["patient_key"].nunique() == 2
    srs = [pydicom.dcmread(p) for p in (tmp_path / "out" / batch.STUDIES_DIR).rglob("*_sr1.dcm")]
    assert len(srs) == 3
    assert len({str(sr.SOPInstanceUID) for sr in srs}) == 3
    assert sorted(str(sr.PatientID) for sr in srs) == ["P-ONE", "P-ONE", "P-TWO"]
    # a second run finds all three done (their state keys are distinct and stable)
    again = batch.run_batch(batch.scan_inputs([root]), options=batch.BatchOptions(out_dir=tmp_path / "out",
                                                                                    progress=False),
                            config=cfg, pipeline=pipeline)
    assert again.skipped == 3 and again.done == 0
