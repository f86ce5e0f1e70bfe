"""The batch processor over folders of phantoms and a DICOMDIR: table, outputs, resume, Dask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from cxr_ai import batch
from cxr_ai.batch.cli import batch_main
from cxr_ai.config import default_config
from cxr_ai.errors import ConfigError
from cxr_ai.phantoms import PhantomConfig, generate_studies

REPO = Path(__file__).resolve().parents[1]


def make_tiny_bundle(path: Path) -> Path:
    """A small, untrained but real model bundle (64 px) so that tests run fast on 2 cores."""
    import torch

    from cxr_ai.imaging import PixelPipelineSpec
    from cxr_ai.models.bundle import FindingSpec, save_bundle
    from cxr_ai.models.networks import NetworkConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetworkConfig(architecture="densenet_small", input_size=64))
    return save_bundle(
        path, model=net, name="batch-test", version="0.0.1",
        findings=[FindingSpec("cardiomegaly", "Cardiomegaly", 0.5), FindingSpec("low_ef", "Low ejection fraction", 0.5)],
        pipeline=PixelPipelineSpec(size=64), description="batch tests", intended_use="tests only",
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "batch-test")


@pytest.fixture(scope="session")
def config(tiny_bundle: Path, tmp_path_factory) -> dict:
    cfg = default_config()
    cfg["store"]["root"] = str(tmp_path_factory.mktemp("var"))  # site pseudonym key lives here
    cfg["models"]["bundle"] = str(tiny_bundle)
    cfg["models"]["num_threads"] = 1
    return cfg


@pytest.fixture(scope="session")
def site_toml(tmp_path_factory, tiny_bundle: Path) -> Path:
    p = tmp_path_factory.mktemp("site") / "site.toml"
    p.write_text(f'[models]\nbundle = "{tiny_bundle}"\nnum_threads = 1\nbatch_size = 1\n', encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("phantoms")
    labels = generate_studies(root, PhantomConfig(n_studies=6, seed=11, size=256, fraction_lateral=0.4,
                                                  fraction_non_chest=0.2))
    return root, labels


@pytest.fixture(scope="session")
def pipeline(config: dict):
    from cxr_ai.pipeline import Pipeline

    return Pipeline(config=config, explain=True)


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in (out / batch.STUDIES_DIR).rglob("*") if p.is_file())


def test_folder_batch_table_outputs_and_resume(phantoms, config, pipeline, tmp_path: Path) -> None:
    root, labels = phantoms
    out = tmp_path / "out"
    wl = batch.scan_inputs([root])
    assert len(wl.items) == len(labels)
    assert [Path(p).name for p in wl.ignored] == ["labels.csv"]

    summary = batch.run_batch(wl, options=batch.BatchOptions(out_dir=out, progress=False), config=config,
                              pipeline=pipeline)
    expected_processed = int(labels["frontal_chest"].astype(bool).sum())
    assert summary.processed == expected_processed
    assert sum(summary.not_applicable.values()) == len(labels) - expected_processed
    assert not summary.failed
    assert "not applicable" in summary.text() and "processed:" in summary.text()

    table = pd.read_csv(out / "results.csv")
    parquet = pd.read_parquet(out / "results.parquet")
    for col in ("sop_uid", "study_uid", "patient_key", "model_name", "model_version", "gate_accepted",
                "gate_reason", "p_cardiomegaly", "thr_cardiomegaly", "pred_cardiomegaly", "p_low_ef",
                "thr_low_ef", "pred_low_ef", "status", "message", "sex", "age", "ethnic_group"):
        assert col in table.columns and col in parquet.columns, col
    assert len(table) == len(labels) and table["sop_uid"].is_unique
    assert list(parquet["sop_uid"]) == list(table["sop_uid"])
    merged = table.merge(labels, on="sop_uid")
    assert (merged["gate_accepted"] == merged["frontal_chest"].astype(bool)).all()
    assert set(merged.loc[~merged["gate_accepted"], "gate_reason"]) <= {"view", "body_part"}
    assert (merged["model_version"] == "0.0.1").all()
    accepted = merged[merged["gate_accepted"]]
    assert accepted["p_cardiomegaly"].between(0, 1).all() and accepted["p_low_ef"].between(0, 1).all()
    assert ((accepted["p_cardiomegaly"] >= accepted["thr_cardiomegaly"]) == accepted["pred_cardiomegaly"].astype(bool)).all()
    assert merged["p_cardiomegaly"].isna().sum() == len(labels) - expected_processed
    # pseudonyms: stable per patient, never the PatientID itself
    text = (out / "results.csv").read_text()
    for pid in labels["patient_id"].unique():
        assert str(pid) not in text
    assert (merged.groupby("patient_id")["patient_key"].nunique() == 1).all()
    assert merged["patient_key"].str.fullmatch(r"[0-9a-f]{64}").all()  # HMAC-SHA256, the live log's key

    # result objects: SR (+ SC/PM heatmaps), readable, probabilities match the table
    from cxr_ai.dicom.sr import read_sr_findings

    files = _outputs(out)
    srs = [p for p in files if p.name.endswith("_sr1.dcm")]
    assert len(srs) == expected_processed
    assert not any(p.name.startswith(batch.TMP_PREFIX) for p in files)
    for sr_path in srs:
        ds = pydicom.dcmread(sr_path)
        row = table.set_index("sop_uid").loc[sr_path.name.split("_")[0]]
        assert ds.StudyInstanceUID == row["study_uid"] == sr_path.parent.name
        found = {f["key"]: f for f in read_sr_findings(ds)}
        assert found["cardiomegaly"]["probability"] == pytest.approx(row["p_cardiomegaly"], abs=1e-4)
        assert any(p.name.startswith(sr_path.name.split("_")[0] + "_sc") for p in files)
        assert any(p.name.startswith(sr_path.name.split("_")[0] + "_pm") for p in files)

    # a second run skips everything and leaves outputs and table as they were
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = batch.run_batch(wl, options=batch.BatchOptions(out_dir=out, progress=False), config=config,
                            pipeline=pipeline)
    assert again.skipped == len(labels) and again.done == 0
    assert {p: p.stat().st_mtime_ns for p in _outputs(out)} == mtimes
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), table)

    # --force reprocesses into the same names: no duplicates
    forced = batch.run_batch(wl, options=batch.BatchOptions(out_dir=out, progress=False, force=True),
                             config=config, pipeline=pipeline)
    assert forced.processed == expected_processed and forced.skipped == 0
    assert _outputs(out) == files


def test_dicomdir_lists_the_same_instances(phantoms, tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    root, labels = phantoms
    fs = FileSet()
    for f in labels["file"]:
        fs.add(root / f)
    fs.write(tmp_path / "media")
    wl = batch.scan_inputs([tmp_path / "media" / "DICOMDIR"])
    assert sorted(i.sop_uid for i in wl.items) == sorted(labels["sop_uid"])
    assert all(Path(i.path).is_file() for i in wl.items)
    by_sop = dict(zip(labels["sop_uid"], labels["study_uid"]))
    assert all(by_sop[i.sop_uid] == i.study_uid for i in wl.items)


def test_dry_run_lists_and_writes_nothing(phantoms, site_toml: Path, tmp_path: Path, capsys) -> None:
    root, labels = phantoms
    out = tmp_path / "out"
    assert batch_main([str(root), "--out", str(out), "--config", str(site_toml), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("would process") == len(labels)
    assert f"{len(labels)} of {len(labels)} instances would run" in printed
    assert not (out / "results.csv").exists() and not (out / batch.STUDIES_DIR).exists()


def test_bad_inputs_have_actionable_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        batch.scan_inputs([tmp_path / "nowhere"])
    bad_csv = tmp_path / "s.csv"
    bad_csv.write_text("patient\nX\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        batch.read_study_csv(bad_csv)
    assert str(exc.value) == batch.MSG_CSV_COLUMNS.format(path=bad_csv, known=batch.STUDY_COLUMNS + batch.ACCESSION_COLUMNS)
    with pytest.raises(ConfigError, match="HOST:PORT:AET"):
        batch.parse_peer("localhost:ORTHANC")
    assert batch_main([str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "2", "--scheduler", "tcp://x:1"]) == 2
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        batch.load_or_create_key(short)


def test_patient_key_is_keyed_and_issuer_scoped(tmp_path: Path) -> None:
    key = batch.load_or_create_key(tmp_path / "k")
    assert batch.load_or_create_key(tmp_path / "k") == key and len(key) == 32
    assert oct((tmp_path / "k").stat().st_mode & 0o777) == "0o600"
    a = batch.patient_key("12345", "HOSP_A", key=key)
    assert a == batch.patient_key("12345", "HOSP_A", key=key) and "12345" not in a
    assert a != batch.patient_key("12345", "HOSP_B", key=key)
    assert a != batch.patient_key("12345", "HOSP_A", key=b"another key of 16+ bytes")
    assert batch.patient_key("", "HOSP_A", key=key) == ""


def test_partitions_keep_studies_whole() -> None:
    items = [batch.WorkItem(f"/x/{s}/{i}", f"1.{s}.{i}", f"1.{s}") for s in range(5) for i in range(s + 1)]
    parts = batch.partition_studies(items, n_partitions=3)
    assert sorted(i.sop_uid for p in parts for i in p) == sorted(i.sop_uid for i in items)
    for p in parts:
        for q in parts:
            if p is not q:
                assert not {i.study_uid for i in p} & {i.study_uid for i in q}


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_or_duplicating(site_toml: Path, config, pipeline, tmp_path: Path) -> None:
    root = tmp_path / "ph"
    labels = generate_studies(root, PhantomConfig(n_studies=10, seed=5, size=256, fraction_lateral=0.0,
                                                  fraction_non_chest=0.0))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cxr_ai.batch", str(root), "--out", str(out), "--config", str(site_toml),
           "--no-progress", "--threads", "1", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / batch.STUDIES_DIR).rglob("*_sr1.dcm"))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"batch ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    state = batch.BatchState(out / batch.STATE_DB_NAME)
    before = {r["key"]: r for r in state.records()}
    state.close()
    assert 0 < len(before) < len(labels), "the kill should land halfway"
    done_files = {out / f: (out / f).stat().st_mtime_ns for r in before.values() for f in r["outputs"]}
    assert done_files and all(p.exists() for p in done_files)
    assert not (out / "results.csv").exists()

    wl = batch.scan_inputs([root])
    summary = batch.run_batch(wl, options=batch.BatchOptions(out_dir=out, progress=False), config=config,
                              pipeline=pipeline)
    assert summary.skipped == len(before)
    assert summary.done == len(labels) - len(before) and summary.processed == summary.done
    # nothing finished before the kill was redone
    assert {p: p.stat().st_mtime_ns for p in done_files} == done_files
    state = batch.BatchState(out / batch.STATE_DB_NAME)
    after = {r["key"]: r for r in state.records()}
    state.close()
    assert set(after) == set(labels["sop_uid"])
    assert all(after[k]["run_id"] == before[k]["run_id"] for k in before)
    # exactly one set of outputs per instance, no leftovers of the killed run
    files = _outputs(out)
    assert not any(p.name.startswith(batch.TMP_PREFIX) for p in files)
    recorded = sorted(out / f for r in after.values() for f in r["outputs"])
    assert files == recorded
    assert sorted(p.name.split("_")[0] for p in files if p.name.endswith("_sr1.dcm")) == sorted(labels["sop_uid"])
    table = pd.read_csv(out / "results.csv")
    assert len(table) == len(labels) and table["sop_uid"].is_unique


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_table(phantoms, config, pipeline, tmp_path: Path) -> None:
    root, labels = phantoms
    wl = batch.scan_inputs([root])
    local = batch.run_batch(wl, options=batch.BatchOptions(out_dir=tmp_path / "local", progress=False,
                                                           explain=False), config=config)
    (tmp_path / "dask").mkdir()  # same config, so the same site pseudonym key
    dask = batch.run_batch(wl, options=batch.BatchOptions(out_dir=tmp_path / "dask", progress=False,
                                                          explain=False, workers=2), config=config)
    assert dask.processed == local.processed and dask.not_applicable == local.not_applicable
    a = pd.read_parquet(tmp_path / "local" / "results.parquet")
    b = pd.read_parquet(tmp_path / "dask" / "results.parquet")
    assert len(a) == len(labels)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-7)
    names = lambda root: sorted(p.relative_to(root) for p in _outputs(root))  # noqa: E731
    assert names(tmp_path / "local") == names(tmp_path / "dask")


def test_batch_feeds_the_live_prediction_log(phantoms, config, pipeline, tmp_path: Path) -> None:
    """Batch runs log every instance like the listener does: same schema, same site key."""
    import copy

    from cxr_ai.monitoring.log import PredictionLog

    root, labels = phantoms
    cfg = copy.deepcopy(config)
    cfg["monitoring"]["dir"] = str(tmp_path / "mon")
    batch.run_batch(batch.scan_inputs([root]), options=batch.BatchOptions(out_dir=tmp_path / "out", progress=False,
                                                                          write_outputs=False), config=cfg,
                    pipeline=pipeline)
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    logged = pd.DataFrame(PredictionLog.from_config(cfg).records())
    assert sorted(logged["sop_uid"]) == sorted(table["sop_uid"]) == sorted(labels["sop_uid"])
    merged = logged.merge(table, on="sop_uid", suffixes=("_log", "_table"))
    assert (merged["patient_key_log"] == merged["patient_key_table"]).all()
    accepted = merged[merged["gate_accepted_table"]]
    probs = accepted["findings"].map(lambda f: f["cardiomegaly"]["p"])
    assert probs.to_numpy() == pytest.approx(accepted["p_cardiomegaly"].to_numpy(), abs=1e-6)
    text = (tmp_path / "mon" / "predictions.jsonl").read_text()
    assert not any(str(pid) in text for pid in labels["patient_id"])


def test_duplicate_sop_instance_uids_are_reported_not_dropped_silently(phantoms, tmp_path: Path) -> None:
    import shutil

    root, labels = phantoms
    first = root / labels["file"].iloc[0]
    copy_dir = tmp_path / "copies"
    copy_dir.mkdir()
    shutil.copyfile(first, copy_dir / "again.dcm")
    wl = batch.scan_inputs([root, copy_dir])
    assert len(wl.items) == len(labels)  # the instance is processed once
    assert len(wl.duplicates) == 1 and {Path(p).name for p in wl.duplicates[0]} == {first.name, "again.dcm"}
    summary = batch.BatchSummary(total=len(wl.items), duplicates=wl.duplicates)
    assert "duplicate SOP Instance UID" in summary.text() and "again.dcm" in summary.text()


def test_summary_and_report_name_ignored_files_and_duplicates(phantoms, config, pipeline, tmp_path: Path) -> None:
    """The summary names each non-DICOM file; skipped_inputs.csv next to results.csv lists them
    and every duplicate with the file processed in its place."""
    import shutil

    root, labels = phantoms
    extra = tmp_path / "extra"
    extra.mkdir()
    first = root / labels["file"].iloc[0]
    shutil.copyfile(first, extra / "again.dcm")
    (extra / "notes.txt").write_text("not an image\n", encoding="utf-8")
    out = tmp_path / "out"
    wl = batch.scan_inputs([root, extra])
    summary = batch.run_batch(wl, options=batch.BatchOptions(out_dir=out, progress=False, explain=False),
                              config=config, pipeline=pipeline)
    text = summary.text()
    assert "ignored (not DICOM): 2 files" in text
    assert str(root / "labels.csv") in text and str(extra / "notes.txt") in text
    assert f"{extra / 'again.dcm'} (same instance as {first})" in text
    report = out / batch.SKIPPED_INPUTS_NAME
    assert summary.skipped_report == str(report) and str(report) in text
    assert report.parent == Path(summary.table_csv).parent
    rows = pd.read_csv(report, dtype=str, keep_default_na=False)
    assert list(rows.columns) == ["path", "why", "same_as"]
    assert sorted(map(tuple, rows.to_numpy().tolist())) == sorted([
        (str(root / "labels.csv"), "not DICOM", ""),
        (str(extra / "notes.txt"), "not DICOM", ""),
        (str(extra / "again.dcm"), "duplicate", str(first)),
    ])
    # a later run with nothing skipped leaves a report that says so (header only)
    summary = batch.run_batch(batch.scan_inputs([root / labels["file"].iloc[0]]),
                              options=batch.BatchOptions(out_dir=tmp_path / "out2", progress=False, explain=False),
                              config=config, pipeline=pipeline)
    assert pd.read_csv(tmp_path / "out2" / batch.SKIPPED_INPUTS_NAME).empty
    assert "ignored" not in summary.text()


def test_summary_lists_at_most_twenty_and_points_to_the_report() -> None:
    ignored = [f"/in/junk_{i:02d}.bin" for i in range(25)]
    summary = batch.BatchSummary(ignored_files=25, ignored=ignored, skipped_report="/out/skipped_inputs.csv")
    text = summary.text()
    assert "/in/junk_19.bin" in text and "/in/junk_20.bin" not in text
    assert "... and 5 more (all in /out/skipped_inputs.csv)" in text
