"""The operations view as data, from a real running service (real SCP, job store, router) and a
real monitor: health, queue, dead letters with an audited re-queue, throughput and latency,
fairness tables with "group too small", truth coverage by source, and the SVG plots."""

from __future__ import annotations

import datetime as dt
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cxr_ai import ops, plots
from cxr_ai.evaluation.metrics import MetricSettings
from cxr_ai.monitoring import MonitorSettings, PerformanceMonitor, TruthStore
from cxr_ai.monitoring.truth import FEEDBACK_SOURCE
from cxr_ai.service import Service
from cxr_ai.store.jobs import JobStore, StudyState

from test_monitoring import _synthetic_log
from test_service import StubPipeline, base_config, free_port, send

T0 = dt.datetime(2026, 1, 10, 8, 0, tzinfo=dt.timezone.utc)


def _svg_text(svg: str) -> str:
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg")
    return " ".join(t for t in root.itertext())


def test_health_queue_dead_letters_requeue_throughput_latency(tmp_path: Path, rg1_paths, rg3_paths) -> None:
    cfg = base_config(tmp_path, [
        {"name": "files", "kind": "folder", "path": "out"},
        {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": free_port(), "ae_title": "PACS", "timeout": 5.0},
    ], routing={"max_attempts": 1})
    cfg["monitoring"]["dir"] = str(tmp_path / "mon")
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"], rg3_paths["RG3_UNCR"]]) == [0, 0]
        assert svc.wait_idle(timeout=60, expected_instances=2)
        deadline = time.monotonic() + 60  # the study fails once pacs dead-letters; files may still be sending
        while ops.queue_view(svc.settings.db_path).outbox["sent"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = {h.component: h for h in ops.service_health(svc)}
        assert health["listener"].ok and str(svc.dicom_port) in health["listener"].detail
        assert health["workers"].ok
        assert health["model bundle"].ok and "demo-cxr-phantom" in health["model bundle"].detail
        assert health["disk"].ok and "watermark" in health["disk"].detail
        assert health["destination files"].ok and "1 sent" in health["destination files"].detail
        assert not health["destination pacs"].ok and "1 dead letters" in health["destination pacs"].detail
        assert "last error" in health["destination pacs"].detail
        assert "monitor" in health

        db = svc.settings.db_path
        q = ops.queue_view(db)
        assert q.depth == 0 and q.oldest_queued_seconds is None
        assert q.studies["failed"] == 1 and q.studies["not_applicable"] == 1 and q.outbox["dead"] == 1
        [dead] = ops.dead_letters(db)
        assert dead.destination == "pacs" and dead.attempts == 1 and dead.items == 1 and dead.reason

        tp = ops.throughput(db, window="hour")
        assert sum(tp.instances_received) == 2 and sum(tp.studies_processed) == 2 and sum(tp.results_sent) == 0
        assert len(tp.bin_starts) == 12 and tp.bin_seconds == 300
        assert sum(ops.throughput(db, window="day").instances_received) == 2
        lat = {s.stage: s for s in ops.stage_latency(db)}
        assert lat["receive (association + quiet period)"].n == 2 and lat["queue + pipeline"].n == 2
        assert lat["end to end"].n == 0 and lat["end to end"].p50_s is None  # nothing was delivered everywhere
        assert lat["queue + pipeline"].p50_s >= 0
        for svg in (plots.throughput_svg(tp), plots.latency_svg(list(lat.values()))):
            text = _svg_text(svg)
            assert "no study in this window" in text or "instances received" in text

        # the re-queue button: one dead letter back in the queue, audited
        audit = tmp_path / "audit.jsonl"
        assert ops.requeue_dead(svc.store, audit_path=audit, actor="admin", delivery_ids=[999999]) == 0
        assert ops.requeue_dead(svc.store, audit_path=audit, actor="admin", delivery_ids=[dead.delivery_id]) == 1
        entries = [json.loads(x) for x in audit.read_text().splitlines()]
        assert [(e["user"], e["event"], e["requeued"]) for e in entries] == [("admin", "requeue-dead", 0),
                                                                          ("admin", "requeue-dead", 1)]
        assert all(set(e) >= {"time", "event", "user", "client", "outcome"} for e in entries)
        assert entries[1]["delivery_ids"] == [dead.delivery_id]
    finally:
        svc.stop(grace=2)


def test_queue_view_oldest_queued_and_disk_watermark(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3", clock=lambda: 1000.0)
    store.record_instance(study_key="s1", study_uid="1.2.3", sop_key="i1", sop_uid="1.2.3.4",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.1", path=str(tmp_path / "x"), size=1)
    q = ops.queue_view(tmp_path / "jobs.sqlite3", now=1600.0)
    assert q.depth == 1 and q.oldest_queued_seconds == 600.0 and q.studies[StudyState.RECEIVED.value] == 1
    store.close()
    assert not ops.disk_health(tmp_path, min_free_bytes=2**62).ok
    assert "below" in ops.disk_health(tmp_path, min_free_bytes=2**62).detail
    missing = ops.bundle_health({"models": {"bundle": str(tmp_path / "nope")}})
    assert not missing.ok and "nope" in missing.detail


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fair")
    log, truth = _synthetic_log(tmp, n=600, noisy_group="Black", start=T0, seed=2)
    store = TruthStore(tmp / "truth.jsonl")
    half = len(truth) // 2
    store.add([{**t, "source": "csv"} for t in truth[:half]])
    store.add([{**t, "source": "fhir:Observation/x"} for t in truth[half:half + 100]])
    store.add([{**t, "source": FEEDBACK_SOURCE} for t in truth[half + 100:half + 150]])
    settings = MonitorSettings(findings=("cardiomegaly",), attributes=("sex", "race"),
                               intersections=(("race", "sex"),), window_days=7,
                               metrics=MetricSettings(n_boot=100, random_state=0, min_group_size=40))
    monitor = PerformanceMonitor(log, store, performance_log=tmp / "perf.jsonl", settings=settings)
    record = monitor.update(now=T0 + dt.timedelta(days=1))
    return monitor, record, tmp


def test_fairness_view_tables_gaps_small_groups_and_missing_attributes(monitored) -> None:
    monitor, record, tmp = monitored
    view = ops.fairness_view(record)
    assert view == ops.fairness_view(ops.last_performance_record(tmp / "perf.jsonl"))
    race = view.table("cardiomegaly", "race")
    assert race.available and {g.group for g in race.groups} == {"White", "Black", "Asian"}
    black = next(g for g in race.groups if g.group == "Black")
    assert black.gaps["auroc"].flagged and "FLAGGED" in black.gaps["auroc"].text
    assert black.gaps["auroc"].ci[1] < 0 and black.metrics["auroc"].value is not None
    assert set(black.metrics) == {"auroc", "sensitivity", "fpr", "fnr"}
    assert black.calibration.prob_pred and black.calibration.text.startswith("ECE")
    assert not any(g.gaps["auroc"].flagged for g in race.groups if g.group != "Black")
    assert any(a["group"] == "Black" for a in view.flagged)
    # race x sex: some cells are under min_group_size = 40 and say so, with no number
    inter = view.table("cardiomegaly", "race × sex")
    small = [g for g in inter.groups if g.too_small]
    assert small and all(g.metrics["auroc"].value is None and g.metrics["auroc"].text.startswith(ops.TOO_SMALL)
                         for g in small)
    assert all(not g.gaps["auroc"].flagged and g.calibration.text.startswith(ops.TOO_SMALL) for g in small)
    insurance = view.table("cardiomegaly", "insurance")
    assert not insurance.available and "not recorded" in insurance.note
    age = view.table("cardiomegaly", "age_band")
    assert not age.available and "not among [monitoring] attributes" in age.note
    json.dumps(view.to_dict())  # JSON-ready for an API
    assert ops.fairness_view(None).note == "the monitor has not run yet"

    svg = plots.gap_bars_svg(race, metric="auroc")
    text = _svg_text(svg)
    assert "Black (n=" in text and "flagged" in text and "AUROC gap by race" in text
    assert plots.FLAGGED in svg
    text = _svg_text(plots.gap_bars_svg(inter, metric="auroc"))
    assert ops.TOO_SMALL in text
    text = _svg_text(plots.calibration_svg(race))
    assert "calibration by race" in text and "ECE" in text


def test_truth_coverage_by_source(monitored) -> None:
    monitor, record, _ = monitored
    [cov] = ops.truth_coverage(monitor, now=T0 + dt.timedelta(days=1))
    assert cov.finding == "cardiomegaly" and cov.n_predictions == 600
    # independent truth only: the 50 feedback records (reader saw the model) are counted apart
    assert cov.n_with_truth == 400 and cov.fraction == pytest.approx(400 / 600)
    assert cov.by_source == {"csv": 300, "fhir": 100, "feedback": 50, "other": 0}
    assert cov.truth_records == {"csv": 300, "fhir": 100, "feedback": 50, "other": 0}
    assert [ops.source_kind(s) for s in ("csv", "rad.csv", "fhir:Observation/1", "feedback", "x")] == [
        "csv", "csv", "fhir", "feedback", "other"]
