"""The live fairness loop through the running service.

`cxr-ai serve` runs as its own process with the shipped demo model. Phantom studies with an
injected acquisition shift for one group (race=Black, shift_strength 1.0: lower contrast and
blur, see cxr_ai/phantoms/) arrive by C-STORE; the ground truth arrives by `cxr-ai truth load`
from another process; the service notices the new truth and updates its monitor on its own;
`/metrics` then carries a flagged gap for the shifted group and none for any other group.
`cxr-ai monitor` prints the same gap.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr_ai.monitoring import MonitorSettings, PerformanceMonitor, PredictionLog, TruthStore
from cxr_ai.monitoring.runner import (
    FhirTruthPoller,
    MonitorRunner,
    RunnerSettings,
    metric_families,
    split_metric_key,
)
from cxr_ai.monitoring.truth import FEEDBACK_SOURCE, truth_from_feedback
from cxr_ai.net.scu import Peer, send_files
from cxr_ai.phantoms import PhantomConfig, generate_studies
from test_monitoring import _fhir_lvef, _synthetic_log
from test_service import http_get, write_toml

REPO = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 1, 10, 8, 0, tzinfo=dt.timezone.utc)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    return {k: v for k, v in env.items() if not k.startswith("CXR_AI__")}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_ai", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _metrics(port: int) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _alerts(metrics: dict) -> list[dict[str, str]]:
    return [dict(labels) for (name, labels), v in metrics.items() if name == "cxr_ai_fairness_alert" and v == 1.0]


@pytest.mark.slow
def test_phantoms_cstore_truth_cli_scheduled_update_gap_in_metrics(tmp_path: Path) -> None:
    ph = tmp_path / "phantoms"
    labels = generate_studies(ph, PhantomConfig(n_studies=80, seed=7, size=256, shift_group={"race": "Black"},
                                                shift_strength=1.0, fraction_lateral=0.0, fraction_non_chest=0.0))
    files = sorted(ph.rglob("*.dcm"))
    ready = tmp_path / "ready.json"
    cfg = write_toml(tmp_path / "cxr-ai.toml", {
        "listener": {"port": 0, "allowed_calling_aes": ["TESTSCU"], "min_free_mb": 0.0},
        "store": {"root": "var", "quiet_seconds": 0.1},
        "models": {"explain": False},
        "routing": {"destinations": [{"name": "files", "kind": "folder", "path": "out"}]},
        "http": {"port": 0},
        # a scheduled update only every hour: what follows the truth is the truth-triggered one
        "monitoring": {"update_minutes": 60.0, "truth_check_seconds": 0.5, "min_group_size": 10,
                       "n_boot": 100, "attributes": ["sex", "race"], "intersections": []},
    })
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_ai", "serve", "--config", str(cfg), "--ready-file",
                             str(ready)], cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.1)
        ports = json.loads(ready.read_text())
        status = send_files(files, Peer(host="127.0.0.1", port=ports["dicom_port"], ae_title="CXR_AI",
                                        calling_ae="TESTSCU"))
        assert status == [0] * len(files)
        deadline = time.monotonic() + 300
        while True:
            counts = json.loads(http_get(ports["http_port"], "/status")[1])["counts"]["studies"]
            if counts["received"] + counts["processing"] == 0 and sum(counts.values()) == labels["study_uid"].nunique():
                break
            assert time.monotonic() < deadline, counts
            time.sleep(0.5)
        before = _metrics(ports["http_port"])
        assert before[("cxr_ai_monitoring_updates", frozenset())] >= 1  # the update at start
        assert not _alerts(before)
        assert not any(name == "cxr_ai_subgroup_metric" for name, _ in before)  # no truth yet: nothing to show

        truth = _cli("truth", "load", str(ph / "labels.csv"), "--config", str(cfg), cwd=tmp_path)
        assert truth.returncode == 0, truth.stderr
        assert re.search(r"loaded \d+ truth records \(cardiomegaly \d+, low_ef \d+\)", truth.stdout)

        deadline = time.monotonic() + 300
        while True:  # the service updates the monitor by itself once it sees the new truth
            after = _metrics(ports["http_port"])
            if any(name == "cxr_ai_subgroup_metric" for name, _ in after):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        alerts = _alerts(after)
        gaps = [a for a in alerts if a["kind"] == "gap"]
        assert gaps, alerts
        assert {(a["attribute"], a["group"]) for a in gaps} == {("race", "Black")}, gaps
        assert after[("cxr_ai_fairness_alerts", frozenset())] == len(alerts)
        n_black = after[("cxr_ai_subgroup_n", frozenset({("finding", "cardiomegaly"), ("attribute", "race"),
                                                         ("group", "Black")}))]
        assert n_black == (labels.drop_duplicates("study_uid")["race"] == "Black").sum()
        assert "updating the performance monitor" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        log.close()
    assert proc.returncode == 0

    # the same window by hand: `cxr-ai monitor` prints the gap of the shifted group only
    out = _cli("monitor", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    gap_lines = [line for line in out.stdout.splitlines() if line.strip().startswith("GAP ")]
    assert gap_lines and all(" race=Black " in line for line in gap_lines), out.stdout
    assert re.search(r"truth cardiomegaly: 80 matched \(80 by study", out.stdout), out.stdout

    # the operations page's data: the service's last window, flagged for race=Black only
    from cxr_ai import ops

    view = ops.fairness_view(ops.last_performance_record(tmp_path / "var" / "monitoring" / "performance.jsonl"))
    race = view.table("cardiomegaly", "race")
    flagged = {(t.attribute, g.group) for t in view.tables if t.available for g in t.groups
               if any(c.flagged for c in g.gaps.values())}
    assert flagged == {("race", "Black")}, flagged
    assert next(g for g in race.groups if g.group == "Black").n == n_black


def test_runner_updates_on_schedule_and_after_truth(tmp_path: Path) -> None:
    log, truth = _synthetic_log(tmp_path, n=300, noisy_group="Black", start=T0, seed=2)
    store = TruthStore(tmp_path / "truth.jsonl")
    settings = MonitorSettings(findings=("cardiomegaly",), attributes=("race",), intersections=(), window_days=7)
    monitor = PerformanceMonitor(log, store, performance_log=tmp_path / "perf.jsonl", settings=settings)
    runner = MonitorRunner(monitor, settings=RunnerSettings(update_minutes=0.0, truth_check_seconds=0.05),
                           clock=lambda: T0 + dt.timedelta(days=1)).start()
    try:
        _wait(lambda: runner.updates >= 1)  # at start
        assert runner.last_record is not None and "result" not in runner.last_record  # no truth yet
        first = runner.updates
        time.sleep(0.5)
        assert runner.updates == first  # update_minutes = 0: no schedule, nothing new
        store.add(truth)  # as `cxr-ai truth load` does from another process
        _wait(lambda: runner.updates > first)
        assert any(a["kind"] == "gap" and a["group"] == "Black" for a in runner.last_record["alerts"])
        n = runner.updates
        uid = truth[0]["study_uid"]
        feedback = truth_from_feedback(finding="cardiomegaly", verdict="disagree",
                                       model_positive=bool(truth[0]["value"]), study_uid=uid,
                                       patient_key=None, reader="r1", observed_at=T0.isoformat())
        assert runner.add_truth(feedback) == 1  # radiologist feedback, as the study page gives it
        _wait(lambda: runner.updates > n)
        assert store.records()[-1]["source"] == FEEDBACK_SOURCE
    finally:
        runner.stop()
    scheduled = MonitorRunner(monitor, settings=RunnerSettings(update_minutes=0.01, truth_check_seconds=0.05),
                              clock=lambda: T0 + dt.timedelta(days=1)).start()
    try:
        _wait(lambda: scheduled.updates >= 3)  # every 0.6 s
    finally:
        scheduled.stop()
    lines = (tmp_path / "perf.jsonl").read_text().splitlines()
    assert len(lines) == runner.updates + scheduled.updates


def _wait(cond, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_metric_keys_become_prometheus_families() -> None:
    key = 'cxr_ai_subgroup_metric{finding="low_ef",attribute="race",group="Say \\"x\\"",metric="auroc"}'
    assert split_metric_key(key) == ("cxr_ai_subgroup_metric", {"finding": "low_ef", "attribute": "race",
                                                                "group": 'Say "x"', "metric": "auroc"})
    fams = metric_families({key: 0.5, "cxr_ai_fairness_alerts": 2.0})
    assert [f.name for f in fams] == ["cxr_ai_fairness_alerts", "cxr_ai_subgroup_metric"]
    assert fams[1].samples[0].labels["group"] == 'Say "x"' and fams[1].samples[0].value == 0.5


def test_fhir_truth_feed_from_a_real_fhir_server(tmp_path: Path) -> None:
    import requests

    from helpers_orthanc import start_fhir_server

    server = start_fhir_server()
    try:
        base = server.base_url.rstrip("/")
        for uid, lvef in (("1.2.3.1", 30.0), ("1.2.3.2", 55.0)):
            obs = _fhir_lvef(lvef, study_uid=uid)
            obs.pop("id")
            r = requests.post(f"{base}/Observation", json=obs, headers={"Content-Type": "application/fhir+json"},
                              timeout=20)
            assert r.status_code == 201, r.text
        prelim = _fhir_lvef(20.0, study_uid="1.2.3.3", status="preliminary")
        prelim.pop("id")
        assert requests.post(f"{base}/Observation", json=prelim, timeout=20).status_code == 201
        store = TruthStore(tmp_path / "truth.jsonl")
        poller = FhirTruthPoller(url=base, store=store, key=b"k" * 32)
        assert poller.poll() == 2
        got = {r["study_uid"]: (r["value"], r["lvef"]) for r in store.records()}
        assert got == {"1.2.3.1": (1, 30.0), "1.2.3.2": (0, 55.0)}  # the preliminary one is not truth
        assert poller.poll() == 0  # nothing twice
        assert FhirTruthPoller(url=base, store=store, key=b"k" * 32).poll() == 0  # not after a restart either
        # an amended Observation is a new version: read again
        first = requests.get(f"{base}/Observation?code=http://loinc.org|10230-1", timeout=20).json()
        res = next(e["resource"] for e in first["entry"] if e["resource"]["valueQuantity"]["value"] == 55.0)
        res.update(status="amended", valueQuantity={**res["valueQuantity"], "value": 35.0})
        assert requests.put(f"{base}/Observation/{res['id']}", json=res, timeout=20).status_code == 200
        assert poller.poll() == 1
        assert store.records()[-1]["value"] == 1 and store.records()[-1]["lvef"] == 35.0
    finally:
        server.stop()


def test_truth_load_cli_bad_inputs(tmp_path: Path, capsys) -> None:
    from cxr_ai.cli import main

    cfg = write_toml(tmp_path / "c.toml", {"monitoring": {"dir": str(tmp_path / "mon")}})
    assert main(["truth", "load", str(tmp_path / "missing.csv"), "--config", str(cfg)]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    assert main(["truth", "load", str(bad), "--config", str(cfg)]) == 2
    assert "needs study_uid" in capsys.readouterr().err
    ok = tmp_path / "ok.csv"
    ok.write_text("study_uid,lvef\n1.2.3,35\n1.2.4,60\n")
    assert main(["truth", "load", str(ok), "--config", str(cfg)]) == 0
    assert [r["value"] for r in TruthStore(tmp_path / "mon" / "truth.jsonl").records()] == [1, 0]
    assert not PredictionLog(tmp_path / "mon" / "predictions.jsonl", key=b"k" * 32).path.exists()
