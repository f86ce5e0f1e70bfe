"""Fault injection on the running listener: FHIR down / 500 / timeout, disk below the
watermark, corrupted job-store rows, a model bundle that is missing. Every study ends
processed or visibly failed; nothing silently disappears.

(SIGKILL during receive and during processing, SIGTERM and PACS down are in
tests/test_service.py; they are not repeated here.)
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_ai.net.common import Status
from cxr_ai.service import Service
from cxr_ai.store import DeliveryState, StudyState
from test_hardening_inputs import pipeline_config, real_pipeline_factory, record, tiny_bundle_dir  # noqa: F401
from test_service import StubPipeline, base_config, free_port, http_get, send, wait_for

TOKEN = "hardening-s3cret-token-0123456789"
RESULTS: dict[str, dict] = {}


class FhirStandIn(BaseHTTPRequestHandler):
    """A loopback FHIR endpoint whose behaviour the test switches: 500, sleep, ok.

    In "ok" mode the body is validated as an R4 transaction Bundle with fhir.resources and
    answered with a transaction-response Bundle; anything invalid gets 400.
    """

    mode = "500"
    received: list[dict] = []
    auth: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).auth.append(self.headers.get("Authorization", ""))
        if self.mode == "sleep":
            time.sleep(3.0)
        if self.mode in ("500", "sleep"):
            self._reply(500, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]})
            return
        from fhir.resources.R4B.bundle import Bundle

        try:
            bundle = Bundle.model_validate(json.loads(body))
            assert bundle.type == "transaction"
        except Exception:  # noqa: BLE001 - answered 400 like a real server
            self._reply(400, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]})
            return
        type(self).received.append(json.loads(body))
        self._reply(200, {"resourceType": "Bundle", "type": "transaction-response",
                          "entry": [{"response": {"status": "201 Created"}} for _ in bundle.entry or []]})

    def _reply(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _rg1_copy(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(dst)
    return dst


@pytest.mark.slow
def test_fhir_down_then_500_then_timeout_then_recovers(tmp_path: Path, tiny_bundle_dir: Path,
                                                       rg1_paths) -> None:
    port = free_port()
    cfg = pipeline_config(tmp_path, tiny_bundle_dir, [
        {"name": "ehr", "kind": "fhir", "url": f"http://127.0.0.1:{port}/fhir", "timeout": 1.0,
         "token_env": "CXR_AI_HARDENING_FHIR_TOKEN"}])
    svc = Service(cfg, secrets={"CXR_AI_HARDENING_FHIR_TOKEN": TOKEN}, pipeline_factory=real_pipeline_factory,
                  base_dir=tmp_path).start()
    server = None
    errors: list[str] = []
    try:
        assert send(svc.dicom_port, [_rg1_copy(rg1_paths["RG1_J2KI"], tmp_path / "a.dcm")]) == [0]

        def last_error_has(text: str) -> bool:
            ds = svc.store.deliveries()
            return bool(ds) and text in (ds[0].last_error or "")

        wait_for(lambda: last_error_has("ConnectionError"), timeout=120, what="FHIR down: connection refused")
        errors.append(svc.store.deliveries()[0].last_error)
        FhirStandIn.mode = "500"
        server = ThreadingHTTPServer(("127.0.0.1", port), FhirStandIn)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        wait_for(lambda: last_error_has("HTTP 500"), timeout=60, what="FHIR answering 500")
        errors.append(svc.store.deliveries()[0].last_error)
        FhirStandIn.mode = "sleep"
        wait_for(lambda: last_error_has("Timeout"), timeout=60, what="FHIR timing out")
        errors.append(svc.store.deliveries()[0].last_error)
        assert svc.store.deliveries()[0].state is DeliveryState.PENDING
        assert svc.store.studies()[0].state is StudyState.SENDING     # waiting, not lost, not failed
        FhirStandIn.mode = "ok"
        assert svc.wait_idle(timeout=120)
        [d] = svc.store.deliveries()
        assert d.state is DeliveryState.SENT and d.attempts >= 3
        assert svc.store.studies()[0].state is StudyState.DONE
        assert len(FhirStandIn.received) == 1
        assert FhirStandIn.auth and set(FhirStandIn.auth) == {f"Bearer {TOKEN}"}
        assert all(TOKEN not in e for e in errors)
        attempts = d.attempts
    finally:
        svc.stop(grace=2)
        if server is not None:
            server.shutdown()
            server.server_close()
    record("fault_fhir", {"faults": ["fhir_down", "fhir_http_500", "fhir_timeout"], "attempts": attempts,
                          "errors_seen": errors, "final": "delivered; study done", "lost": 0})


def test_disk_below_watermark_refuses_then_nothing_lost(tmp_path: Path, rg1_paths) -> None:
    cfg = base_config(tmp_path, [{"name": "files", "kind": "folder", "path": "out"}],
                      listener={"min_free_mb": 1e9})   # a watermark no disk can meet
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        f = _rg1_copy(rg1_paths["RG1_J2KI"], tmp_path / "a.dcm")
        from cxr_ai.net.scu import SendError

        with pytest.raises(SendError, match="0xA700"):
            send(svc.dicom_port, [f])
        assert svc.store.instances() == [] and list(svc.spool.instance_files()) == []
        assert list(svc.spool.incoming.iterdir()) == []
        _, metrics = http_get(svc.http_port, "/metrics")
        assert 'cxr_ai_cstore_received_total{status="out_of_resources"} 1.0' in metrics.decode()
        svc.scp.settings.min_free_bytes = 0          # space returns
        assert send(svc.dicom_port, [f]) == [0]      # the sender's retry
        assert svc.wait_idle(timeout=60, expected_instances=1)
        assert [s.state for s in svc.store.studies()] == [StudyState.DONE]
    finally:
        svc.stop(grace=2)
    record("fault_disk", {"fault": "spool below watermark", "cstore_status": "0xA700 out_of_resources",
                          "after_space_returns": "stored and done", "lost": 0})


def test_corrupted_job_store_rows(tmp_path: Path, rg1_paths) -> None:
    cfg = base_config(tmp_path, [{"name": "files", "kind": "folder", "path": "out"}],
                      routing={"max_attempts": 2})
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        files = [_rg1_copy(rg1_paths["RG1_J2KI"], tmp_path / f"{i}.dcm") for i in range(2)]
        assert send(svc.dicom_port, files) == [0, 0]
        assert svc.wait_idle(timeout=60, expected_instances=2)
    finally:
        svc.stop(grace=2)
    db = tmp_path / "var" / "jobs.sqlite3"
    with sqlite3.connect(db) as c:
        keys = [r[0] for r in c.execute("SELECT study_key FROM studies ORDER BY study_key")]
        c.execute("UPDATE studies SET state='exploded' WHERE study_key=?", (keys[0],))
        # a delivery whose payload is gone
        c.execute("UPDATE outbox SET state='pending', attempts=0, next_attempt_at=0, items=? WHERE study_key=?",
                  (json.dumps([str(tmp_path / "nowhere" / "SC-x.dcm")]), keys[1]))
        c.execute("UPDATE studies SET state='sending' WHERE study_key=?", (keys[1],))
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        code, body = http_get(svc.http_port, "/status")
        assert code == 200, body
        wait_for(lambda: svc.store.study(keys[1]).state is StudyState.FAILED, timeout=60,
                 what="delivery with a missing payload dead-lettered")
        assert "files" in svc.store.study(keys[1]).reason
        bad = svc.store.study(keys[0])
        assert bad.state is StudyState.FAILED and "exploded" in bad.reason
        assert send(svc.dicom_port, [_rg1_copy(rg1_paths["RG1_J2KI"], tmp_path / "new.dcm")]) == [0]
        assert svc.wait_idle(timeout=60, expected_instances=3)
        assert sum(s.state is StudyState.DONE for s in svc.store.studies()) == 1
        code, body = http_get(svc.http_port, "/healthz")
        assert code == 200, body
    finally:
        svc.stop(grace=2)
    record("fault_jobstore", {"faults": ["study row with unknown state", "delivery whose payload file is missing"],
                              "outcome": "both studies FAILED with a reason; service kept serving", "lost": 0})


@pytest.mark.slow
def test_missing_model_bundle_is_visible_and_studies_wait_for_it(tmp_path: Path, tiny_bundle_dir: Path,
                                                                 rg1_paths) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    moved = tmp_path / "bundle-away"
    bundle.rename(moved)                            # the model file disappears before start
    cfg = pipeline_config(tmp_path, bundle, [{"name": "files", "kind": "folder", "path": "out"}])
    cfg["workers"]["pipeline_retry_seconds"] = 0.2
    svc = Service(cfg, pipeline_factory=real_pipeline_factory, base_dir=tmp_path).start()
    try:
        wait_for(lambda: svc.workers.errors, what="worker reports the missing bundle")
        code, body = http_get(svc.http_port, "/healthz")
        health = json.loads(body)
        assert code == 503 and str(bundle) in " ".join(health["problems"]), health
        assert send(svc.dicom_port, [_rg1_copy(rg1_paths["RG1_J2KI"], tmp_path / "a.dcm")]) == [0]
        wait_for(lambda: svc.store.counts()["studies"]["received"] == 1, what="study queued, not lost")
        moved.rename(bundle)                        # the model returns: picked up without a restart
        assert svc.wait_idle(timeout=120, expected_instances=1)
        assert [s.state for s in svc.store.studies()] == [StudyState.DONE]
        assert [i.state.value for i in svc.store.instances()] == ["processed"]
        code, body = http_get(svc.http_port, "/healthz")
        assert code == 200, body
        # while running, removing the bundle folder does not affect the loaded model
        shutil.rmtree(bundle)
        assert send(svc.dicom_port, [_rg1_copy(rg1_paths["RG1_J2KI"], tmp_path / "b.dcm")]) == [0]
        assert svc.wait_idle(timeout=120, expected_instances=2)
        assert [i.state.value for i in svc.store.instances()] == ["processed", "processed"]
    finally:
        svc.stop(grace=2)
    record("fault_model", {"fault": "model bundle missing at start; removed while running",
                           "outcome": "/healthz 503 naming the bundle; study queued; processed once the bundle "
                                      "returned (worker retries, no restart); removal while running: model in memory",
                           "lost": 0})
