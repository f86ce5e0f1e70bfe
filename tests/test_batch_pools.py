"""The batch stage pool: worker processes vs threads give the same results; table-only mode; a
worker that dies is reported and the run resumes; where processes cannot start, threads do."""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pydicom
import pytest
from test_batch import config, phantoms, pipeline, tiny_bundle  # noqa: F401 - shared fixtures

from cxr_ai import batch
from cxr_ai.errors import ConfigError
from cxr_ai.phantoms import PhantomConfig, generate_studies


def _outputs(out: Path) -> list[Path]:
    return sorted(p.relative_to(out) for p in (out / batch.STUDIES_DIR).rglob("*") if p.is_file())


def _pool_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cxr_ai.batch" and "stages in" in r.getMessage()]


@pytest.mark.slow
def test_processes_threads_and_table_only_give_the_same_results(phantoms, config, pipeline, tmp_path: Path,  # noqa: F811
                                                                  caplog) -> None:
    root, labels = phantoms
    wl = batch.scan_inputs([root])
    cfg = copy.deepcopy(config)
    cfg["batch"]["model_lanes"] = 2  # two model calls at once in the process run, one in the thread run
    caplog.set_level(logging.INFO, logger="cxr_ai.batch")
    runs = {}
    for name, pool, write in (("processes", "processes", True), ("threads", "threads", True), ("table", "auto", False)):
        summary = batch.run_batch(wl, options=batch.BatchOptions(out_dir=tmp_path / name, progress=False, pool=pool,
                                                                 write_outputs=write),
                                  config=cfg if name == "processes" else config, pipeline=pipeline)
        assert not summary.failed and summary.done == len(labels)
        runs[name] = pd.read_parquet(tmp_path / name / "results.parquet")
    lines = _pool_lines(caplog)
    assert "in 2 lane(s)" in lines[0] and lines[0].endswith("stages in 2 processes")
    assert "in 1 lane(s)" in lines[1] and lines[1].endswith("stages in 2 threads")
    assert lines[2].endswith("stages in 2 threads")  # auto: threads when no result object is built

    # the same rows, to the bit (same batches, same threads), and the same files
    pd.testing.assert_frame_equal(runs["processes"], runs["threads"], check_exact=True)
    assert _outputs(tmp_path / "processes") == _outputs(tmp_path / "threads")
    assert any(p.name.endswith("_pm1.dcm") for p in _outputs(tmp_path / "processes"))
    # table only: same rows, no result object built or written
    table = runs["table"]
    assert not (tmp_path / "table" / batch.STUDIES_DIR).exists()
    assert (table["n_outputs"] == 0).all()
    same = [c for c in table.columns if c not in ("n_outputs", "report_uid")]  # no objects, no report
    pd.testing.assert_frame_equal(table[same], runs["threads"][same], check_exact=True)

    # heatmaps: both come from the driver's forward; mapped to the source geometry in the
    # workers (processes) or in the model call (threads), they must give the same objects
    from cxr_ai.dicom.sr import read_sr_findings

    for rel in _outputs(tmp_path / "processes"):
        if rel.suffix != ".dcm":
            continue
        a = pydicom.dcmread(tmp_path / "processes" / rel)
        b = pydicom.dcmread(tmp_path / "threads" / rel)
        assert a.SOPClassUID == b.SOPClassUID
        if rel.name.endswith("_sr1.dcm"):
            pa = {f["key"]: f["probability"] for f in read_sr_findings(a)}
            assert pa == {f["key"]: f["probability"] for f in read_sr_findings(b)}
        else:  # SC (RGB) and PM (stored integers): float rounding may move a pixel by one
            # stored step, no more
            diff = np.abs(a.pixel_array.astype(np.int64) - b.pixel_array.astype(np.int64))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (rel, diff.max(), (diff > 0).mean())


def _pool_children() -> list[int]:
    """Processes this one forked (the stage pool's workers share its command line)."""
    me = os.getpid()
    cmdline = Path(f"/proc/{me}/cmdline").read_bytes()
    kids = set()
    for task in Path(f"/proc/{me}/task").iterdir():
        kids.update(int(p) for p in (task / "children").read_text().split())
    return [k for k in kids if Path(f"/proc/{k}/cmdline").exists() and Path(f"/proc/{k}/cmdline").read_bytes() == cmdline]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_dead_worker_is_reported_and_the_run_resumes(config, pipeline, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    root = tmp_path / "ph"
    labels = generate_studies(root, PhantomConfig(n_studies=10, seed=7, size=256, fraction_lateral=0.0,
                                                  fraction_non_chest=0.0))
    wl = batch.scan_inputs([root])
    out = tmp_path / "out"
    real_record = batch.BatchState.record
    killed: list[int] = []

    def record_then_kill(self, **kw):
        real_record(self, **kw)
        if not killed:  # the first instance is recorded: kill the whole pool under the run
            killed.extend(_pool_children())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(batch.BatchState, "record", record_then_kill)
    options = batch.BatchOptions(out_dir=out, progress=False, pool="processes", batch_size=1)
    with pytest.raises(batch.BatchWorkerError) as exc:
        batch.run_batch(wl, options=options, config=config, pipeline=pipeline)
    assert killed, "no worker process was found to kill"
    assert "run the same command again to resume" in str(exc.value)
    monkeypatch.setattr(batch.BatchState, "record", real_record)

    state = batch.BatchState(out / batch.STATE_DB_NAME)
    before = {r["key"]: r for r in state.records()}
    state.close()
    assert 0 < len(before) < len(labels)
    summary = batch.run_batch(wl, options=options, config=config, pipeline=pipeline)
    assert summary.skipped == len(before) and summary.processed == len(labels) - len(before)
    state = batch.BatchState(out / batch.STATE_DB_NAME)
    after = state.records()
    state.close()
    assert sorted(r["key"] for r in after) == sorted(labels["sop_uid"])
    files = sorted(out / p for p in _outputs(out))
    assert not any(p.name.startswith(batch.TMP_PREFIX) for p in files)
    assert files == sorted(out / f for r in after for f in r["outputs"])


def _run_in_daemon(config, items, out_dir, queue) -> None:
    from cxr_ai.pipeline import Pipeline

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("cxr_ai.batch")
    log.addHandler(Keep())
    log.setLevel(logging.INFO)
    pipeline = Pipeline(config=config, explain=True)
    fins = batch.run_items(pipeline, items, out_dir=out_dir, pkey=b"k" * 32, threads=2, pool="processes")
    queue.put((messages, [f.row["status"] for f in fins]))


def test_a_daemonic_process_falls_back_to_threads(phantoms, config, tmp_path: Path) -> None:  # noqa: F811
    """A daemonic process (a Dask worker, a service's child) may not start processes: the batch
    runs its stages in threads there. The daemon is spawned, not forked: a child forked from
    this test process inherits PyTorch's thread-pool state from the tests before it, which
    PyTorch does not support (its threads then fail with "Invalid thread pool")."""
    root, labels = phantoms
    items = batch.scan_inputs([root]).items
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_in_daemon, args=(config, items, tmp_path / "out", queue), daemon=True)
    proc.start()
    try:
        messages, statuses = queue.get(timeout=300)
    finally:
        proc.join(timeout=30)
    assert proc.exitcode == 0
    assert len(statuses) == len(labels) and "failed" not in statuses
    why = batch.MSG_POOL_FALLBACK.split("{")[0]
    assert any(m.startswith(why) and "daemonic" in m for m in messages), messages
    assert any(m.endswith("stages in 2 threads") for m in messages)


def test_bad_pool_settings_have_actionable_errors(phantoms, config, pipeline, tmp_path: Path) -> None:  # noqa: F811
    root, _ = phantoms
    wl = batch.scan_inputs([root])
    with pytest.raises(ConfigError) as exc:
        batch.run_batch(wl, options=batch.BatchOptions(out_dir=tmp_path / "o", progress=False, pool="gpu"),
                        config=config, pipeline=pipeline)
    assert str(exc.value) == batch.MSG_BAD_POOL.format(value="gpu", known=batch.POOL_KINDS)
    with pytest.raises(ConfigError, match="start_method = 'vfork' is not one of"):
        batch.run_items(pipeline, wl.items, out_dir=tmp_path / "o", pkey=b"k" * 32, pool="processes",
                        start_method="vfork")


def test_model_plan() -> None:
    import torch

    def fake(num_threads: int, device: str = "cpu", **batch_cfg):
        return SimpleNamespace(config={"models": {"num_threads": num_threads}, "batch": batch_cfg},
                               engine=SimpleNamespace(device=torch.device(device)))

    cores = batch.usable_cores()
    # automatic on the CPU: one single-threaded lane per core
    assert batch.model_plan(fake(0)) == batch.ModelPlan(lanes=cores, torch_threads=1)
    # an explicit [models] num_threads: one lane, the engine's threads untouched
    assert batch.model_plan(fake(3)) == batch.ModelPlan(lanes=1, torch_threads=None)
    # explicit [batch] settings win
    assert batch.model_plan(fake(0, model_lanes=3, torch_threads=2)) == batch.ModelPlan(lanes=3, torch_threads=2)
    assert batch.model_plan(fake(0, torch_threads=2)) == batch.ModelPlan(lanes=max(1, cores // 2), torch_threads=2)
    # on a GPU: one lane, PyTorch's CPU threads left alone
    assert batch.model_plan(fake(0, device="cuda")) == batch.ModelPlan(lanes=1, torch_threads=None)
    assert batch.pool_kind("auto", write=True) == "processes" and batch.pool_kind("auto", write=False) == "threads"


@pytest.mark.slow
def test_spawned_workers_load_the_pipeline_once_and_agree(phantoms, config, pipeline, tmp_path: Path,  # noqa: F811
                                                          caplog) -> None:
    """start_method = "spawn" (the default off Linux): each worker builds its pipeline from the
    driver's configuration (on the CPU, one thread) and checks it loaded the driver's model."""
    root, _ = phantoms
    wl = batch.scan_inputs([root])
    cfg = copy.deepcopy(config)
    cfg["batch"]["start_method"] = "spawn"
    caplog.set_level(logging.INFO, logger="cxr_ai.batch")
    tables = {}
    for name, pool in (("spawn", "processes"), ("threads", "threads")):
        batch.run_batch(wl, options=batch.BatchOptions(out_dir=tmp_path / name, progress=False, pool=pool),
                        config=cfg, pipeline=pipeline)
        tables[name] = pd.read_parquet(tmp_path / name / "results.parquet")
    assert _pool_lines(caplog)[0].endswith("stages in 2 processes")
    assert not any("not used" in r.getMessage() for r in caplog.records)
    pd.testing.assert_frame_equal(tables["spawn"], tables["threads"], check_exact=True)
    assert _outputs(tmp_path / "spawn") == _outputs(tmp_path / "threads")
