"""Load, scaled down for CI: 8 concurrent associations x 25 instances to the listener
subprocess (benchmarks/bench_load.py runs the full 20 x 50). Every instance stored and
processed; C-ECHO answered while the queue is deep."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from test_hardening_inputs import record

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_concurrent_associations_all_stored_and_processed(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "benchmarks" / "bench_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run_load(assocs=8, instances=25, workdir=tmp_path, size=256, timeout=400)
    record("load_ci", res)
    assert res["errors"] == []
    assert res["outcomes"] == {"0x0000": 200}, res["outcomes"]  # no refusal, no failed C-STORE
    # never acknowledged and lost: every acknowledged SOP Instance UID is in the job store, processed
    assert res["acked_lost"] == 0 and res["acked_by_job_state"] == {"processed": 200}, res["acked_by_job_state"]
    assert not res["processing_timed_out"]
    assert res["stored_pct"] == 100.0 and res["processed_pct"] == 100.0
    assert res["echo_probes"] > 0 and res["echo_ok"] == res["echo_probes"]
    assert res["peak_rss_mib"] > 0
