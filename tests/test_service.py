"""The listener service end to end with real peers: SCU in, SCP "PACS" out, SQLite, HTTP.

The model is replaced by :class:`StubPipeline`, which runs the real applicability gate and
builds a real derived DICOM object (a highdicom Secondary Capture referencing the source's
patient and study) for each accepted image, so every hop is real and the tests stay fast.
The real pipeline goes through the same door in tests/test_service_orthanc.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_ai.config import config_to_toml, load_config, load_settings
from cxr_ai.dicom.gate import check_applicability
from cxr_ai.errors import ConfigError
from cxr_ai.outputs import ImageOutputs
from cxr_ai.service.routing import MSG_MISSING_KEY, MSG_UNKNOWN_KIND
from cxr_ai.net.scp import ListenerSettings, StorageSCP
from cxr_ai.net.scu import SCU_HANDLERS, Peer, send_files
from cxr_ai.service import MSG_AE_TITLE, MSG_BAD_PIPELINE, Service, validate_config
from cxr_ai.store import DeliveryState, JobStore, Spool, StudyState

REPO = Path(__file__).resolve().parents[1]


# -- a real (model-free) processing function ---------------------------------------------------
@dataclass
class StubOutcome:
    sop_instance_uid: str
    status: str
    reason: str
    result: Any = None
    outputs: ImageOutputs = field(default_factory=ImageOutputs)


class StubPipeline:
    """Real gate + a real derived object per accepted image (no model).

    ``CXR_AI_TEST_SLOW_FILE``: while that file exists, processing waits (crash tests use it
    to catch the service mid-study).
    """

    def __init__(self, *, config: dict | None = None) -> None:
        self.config = config

    def process_study(self, paths, *, on_results=None):  # everything at once: on_results is not needed
        gate_file = os.environ.get("CXR_AI_TEST_SLOW_FILE")
        while gate_file and Path(gate_file).exists():
            time.sleep(0.05)
        out = []
        for p in paths:
            decision, rg = check_applicability(p)
            if rg is None:
                out.append(StubOutcome("", "failed", decision.reason.value))
                continue
            if not decision.accepted:
                out.append(StubOutcome(rg.sop_instance_uid, "not_applicable", decision.reason.value))
                continue
            with warnings.catch_warnings():
                # RG1's ReferringPhysicianName "ward" has one component; highdicom warns on copy
                warnings.simplefilter("ignore", UserWarning)
                sc = self._derived(rg)
            out.append(StubOutcome(rg.sop_instance_uid, "processed", "", outputs=ImageOutputs(heatmap_scs=[sc])))
        return out

    @staticmethod
    def _derived(rg):
        return hd.sc.SCImage.from_ref_dataset(
            ref_dataset=rg.dataset, pixel_array=np.arange(64 * 64, dtype=np.uint8).reshape(64, 64),
            photometric_interpretation="MONOCHROME2", bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=generate_uid(), series_number=901, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="cxr-ai tests", patient_orientation=("L", "F"),
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)


class PhasedStubPipeline(StubPipeline):
    """Like :class:`StubPipeline`, but hands over a first object per image through
    ``on_results`` (as the real pipeline does with the SR) before the second one is made.

    Output UIDs derive from the source instance, as the real ones do. While
    ``CXR_AI_TEST_SLOW_FILE`` exists, it holds *after* the first results were handed over.
    """

    def process_study(self, paths, *, on_results=None):
        out = []
        for p in paths:
            decision, rg = check_applicability(p)
            if rg is None or not decision.accepted:
                out.append(StubOutcome(rg.sop_instance_uid if rg else "", "not_applicable" if rg else "failed",
                                       decision.reason.value))
                continue
            out.append(StubOutcome(rg.sop_instance_uid, "processed", "",
                                   outputs=ImageOutputs(heatmap_scs=[self._numbered(rg, 1)])))
        if on_results is not None:
            on_results(out)
        gate_file = os.environ.get("CXR_AI_TEST_SLOW_FILE")
        while gate_file and Path(gate_file).exists():
            time.sleep(0.05)
        for o, p in zip(out, paths):
            if o.status == "processed":
                second = ImageOutputs(heatmap_scs=[self._numbered(check_applicability(p)[1], 2)])
                o.outputs = o.outputs.merged(second)
        return out

    @staticmethod
    def _numbered(rg, n: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ds = StubPipeline._derived(rg)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[rg.sop_instance_uid, str(n)])
        ds.InstanceNumber = n
        return ds


# -- helpers ----------------------------------------------------------------------------------
def wait_for(pred, *, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pacs(root: Path, *, port: int = 0) -> StorageSCP:
    """A real C-STORE SCP standing in for the PACS (our own listener, in the test process)."""
    scp = StorageSCP(settings=ListenerSettings(ae_title="PACS", host="127.0.0.1", port=port,
                                               allowed_calling_aes=["CXR_AI"], min_free_bytes=0),
                     spool=Spool(root / "pacs-spool"), store=JobStore(root / "pacs.sqlite3"), quiet_seconds=0)
    scp.start()
    return scp


def base_config(tmp: Path, destinations: list[dict], **sections: dict) -> dict:
    cfg = load_config(env={})
    cfg["listener"].update(port=0, allowed_calling_aes=["TESTSCU", "ORTHANC"], min_free_mb=0.0)
    cfg["store"].update(root=str(tmp / "var"), quiet_seconds=0.1, keep_hours=-1.0)
    cfg["workers"].update(poll_seconds=0.05, pipeline="test_service:StubPipeline", shutdown_grace_seconds=2.0)
    cfg["routing"].update(poll_seconds=0.1, backoff_initial_seconds=0.2, backoff_max_seconds=0.5,
                          max_attempts=50, destinations=destinations)
    cfg["http"].update(port=0)
    cfg["fhir"].update(default_patient_identifier_system="urn:oid:2.16.840.1.113883.19.5")  # HL7's example OID
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def send(port: int, files, *, calling: str = "TESTSCU") -> list[int]:
    return send_files(files, Peer(host="127.0.0.1", port=port, ae_title="CXR_AI", calling_ae=calling))


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ct_path() -> Path:
    return Path(pydicom.data.get_testdata_file("CT_small.dcm"))


# -- tests ------------------------------------------------------------------------------------
def test_receive_process_route_to_pacs_and_folder(tmp_path: Path, rg1_paths, rg3_paths) -> None:
    pacs = start_pacs(tmp_path)
    cfg = base_config(tmp_path, [
        {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"},
        {"name": "files", "kind": "folder", "path": "out"},
    ])
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        files = [rg1_paths["RG1_UNCR"], rg1_paths["RG1_J2KR"], rg3_paths["RG3_UNCR"], ct_path()]
        assert send(svc.dicom_port, files) == [0, 0, 0, 0]
        assert svc.wait_idle(timeout=60, expected_instances=4)
        studies = {s.study_uid: s for s in svc.store.studies()}
        rg1_study = str(pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True).StudyInstanceUID)
        ct_study = str(pydicom.dcmread(ct_path(), stop_before_pixels=True).StudyInstanceUID)
        rg3_study = str(pydicom.dcmread(rg3_paths["RG3_UNCR"], stop_before_pixels=True).StudyInstanceUID)
        assert studies[rg1_study].state is StudyState.DONE
        assert studies[ct_study].state is StudyState.NOT_APPLICABLE
        assert studies[rg3_study].state is StudyState.NOT_APPLICABLE
        reasons = {i.sop_uid: i.reason for i in svc.store.instances()}
        assert reasons[str(pydicom.dcmread(ct_path(), stop_before_pixels=True).SOPInstanceUID)] == "modality"
        assert reasons[str(pydicom.dcmread(rg3_paths["RG3_UNCR"], stop_before_pixels=True).SOPInstanceUID)] == "body_part"
        # the PACS got one derived object per RG1 instance, in RG1's study, for RG1's patient
        got = pacs.store.instances()
        assert len(got) == 2
        src = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
        for inst in got:
            ds = pydicom.dcmread(inst.path)
            assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"   # Secondary Capture Image Storage
        job = studies[rg1_study].job_id
        out = sorted(p.name for p in (tmp_path / "out" / job).iterdir())
        assert len([n for n in out if n.endswith(".dcm")]) == 2 and "summary.json" in out
        # health, metrics, status
        code, body = http_get(svc.http_port, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        code, body = http_get(svc.http_port, "/metrics")
        text = body.decode()
        assert code == 200
        assert 'cxr_ai_cstore_received_total{status="success"} 4.0' in text
        assert 'cxr_ai_instances_processed_total{outcome="processed"} 2.0' in text
        assert 'cxr_ai_studies{state="done"} 1.0' in text
        assert "cxr_ai_queue_depth 0.0" in text
        assert 'cxr_ai_stage_seconds_count{stage="receive"} 4.0' in text
    finally:
        svc.stop(grace=2)
        pacs.stop()


def test_pacs_down_results_wait_in_outbox_then_go_out(tmp_path: Path, rg1_paths) -> None:
    port = free_port()
    cfg = base_config(tmp_path, [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": port,
                                  "ae_title": "PACS", "timeout": 5.0}])
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    pacs = None
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"]]) == [0]
        wait_for(lambda: any(d.attempts >= 2 for d in svc.store.deliveries()), what="two failed attempts")
        [d] = svc.store.deliveries()
        assert d.state is DeliveryState.PENDING and "could not open an association" in d.last_error
        assert svc.store.studies()[0].state is StudyState.SENDING
        # receiving is not blocked by the dead destination
        assert send(svc.dicom_port, [rg1_paths["RG1_UNCR"]]) == [0]
        pacs = start_pacs(tmp_path, port=port)
        assert svc.wait_idle(timeout=60, expected_instances=2)
        assert {d.state for d in svc.store.deliveries()} == {DeliveryState.SENT}
        assert {s.state for s in svc.store.studies()} == {StudyState.DONE}
        assert len(pacs.store.instances()) == 2
    finally:
        svc.stop(grace=2)
        if pacs:
            pacs.stop()


def test_dead_letter_after_max_attempts_is_visible(tmp_path: Path, rg1_paths, capsys) -> None:
    cfg = base_config(tmp_path, [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": free_port(),
                                  "ae_title": "PACS", "timeout": 5.0}], routing={"max_attempts": 2})
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"]]) == [0]
        assert svc.wait_idle(timeout=60, expected_instances=1)
        [study] = svc.store.studies()
        assert study.state is StudyState.FAILED and "pacs" in study.reason
        _, body = http_get(svc.http_port, "/status")
        [dead] = json.loads(body)["dead_letters"]
        assert dead["destination"] == "pacs" and dead["attempts"] == 2 and dead["job_id"] == study.job_id
        _, metrics = http_get(svc.http_port, "/metrics")
        assert "cxr_ai_dead_letters 1.0" in metrics.decode()
        assert 'cxr_ai_deliveries_total{destination="pacs",outcome="dead"} 1.0' in metrics.decode()
    finally:
        svc.stop(grace=2)
    # the CLI shows it and can queue it again
    from cxr_ai.service.cli import jobs_main

    toml = write_toml(tmp_path / "c.toml", {"store": {"root": str(tmp_path / "var")},
                                            "routing": {"destinations": cfg["routing"]["destinations"]}})
    assert jobs_main(["--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert f"DEAD job {study.job_id} -> pacs: 2 attempts" in out
    assert jobs_main(["--config", str(toml), "--retry-dead"]) == 0
    assert "1 dead-lettered deliveries queued again" in capsys.readouterr().out
    store = JobStore(tmp_path / "var" / "jobs.sqlite3")
    assert store.study(study.study_key).state is StudyState.SENDING
    assert [d.state for d in store.deliveries()] == [DeliveryState.PENDING]
    store.close()


def test_config_validation_errors_are_clear(tmp_path: Path) -> None:
    ok = base_config(tmp_path, [])
    validate_config(ok, base_dir=tmp_path)
    bad = base_config(tmp_path, [{"name": "x", "kind": "carrier-pigeon"}])
    with pytest.raises(ConfigError, match="kind 'carrier-pigeon' is not one of dicom, stow, fhir, folder"):
        validate_config(bad, base_dir=tmp_path)
    assert "kind" in MSG_UNKNOWN_KIND
    bad = base_config(tmp_path, [{"name": "pacs", "kind": "dicom", "port": 104, "ae_title": "P"}])
    with pytest.raises(ConfigError, match=r"'pacs' \(kind dicom\) needs the key 'host'"):
        validate_config(bad, base_dir=tmp_path)
    assert MSG_MISSING_KEY.startswith("[[routing.destinations]]")
    bad = base_config(tmp_path, [], listener={"ae_title": "A" * 17})
    with pytest.raises(ConfigError, match="not a valid AE title"):
        validate_config(bad, base_dir=tmp_path)
    assert "AE title" in MSG_AE_TITLE
    bad = base_config(tmp_path, [], listener={"port": 70000})
    with pytest.raises(ConfigError, match=r"\[listener\] port must be a TCP port"):
        validate_config(bad, base_dir=tmp_path)
    bad = base_config(tmp_path, [], store={"quiet_seconds": "soon"})
    with pytest.raises(ConfigError, match=r"\[store\] quiet_seconds must be seconds >= 0, got 'soon'"):
        validate_config(bad, base_dir=tmp_path)
    bad = base_config(tmp_path, [], workers={"idle_start": "yes"})
    with pytest.raises(ConfigError, match=r"\[workers\] idle_start must be true or false, got 'yes'"):
        validate_config(bad, base_dir=tmp_path)
    bad = base_config(tmp_path, [{"name": "ehr", "kind": "fhir", "url": "http://127.0.0.1:1/", "token_env": "NOPE_NOT_SET"}])
    with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
        validate_config(bad, base_dir=tmp_path)
    bad = base_config(tmp_path, [], listener={"tls": True, "tls_cert": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="TLS certificate .*missing.pem does not exist"):
        validate_config(bad, base_dir=tmp_path)
    from cxr_ai.service import import_factory

    with pytest.raises(ConfigError, match="cannot be imported"):
        import_factory("no_such_module_xyz:Pipeline")
    assert "process_study" in MSG_BAD_PIPELINE


def test_fhir_token_is_never_logged_or_shown(tmp_path: Path) -> None:
    from cxr_ai.service.routing import build_destination

    dest = build_destination({"name": "ehr", "kind": "fhir", "url": "http://127.0.0.1:9/fhir", "token": "s3cr3t-token"},
                             calling_ae="CXR_AI", base_dir=tmp_path)
    assert "s3cr3t" not in repr(dest)
    from cxr_ai.service.routing import DeliveryError

    p = tmp_path / "fhir-1.json"
    p.write_text("{}")
    with pytest.raises(DeliveryError) as err:
        dest.deliver([p], job_id="J1")
    assert "s3cr3t" not in str(err.value)


# -- crash and restart (the service as a subprocess) -------------------------------------------
def _spawn(cfg_path: Path, ready: Path, env: dict) -> subprocess.Popen:
    ready.unlink(missing_ok=True)
    return subprocess.Popen([sys.executable, "-m", "cxr_ai.service", "--config", str(cfg_path),
                             "--ready-file", str(ready)], env=env, cwd=cfg_path.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(proc: subprocess.Popen, ready: Path) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ready.exists():
            return json.loads(ready.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("service did not start within 60 s")


def write_toml(path: Path, sections: dict[str, dict]) -> Path:
    path.write_text(config_to_toml(sections))
    return path


def _db_rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        return c.execute(sql).fetchall()


def _crash_setup(tmp_path: Path, pacs, slow: Path, *, pipeline: str) -> tuple[Path, dict, Path, Path]:
    """Site config (one PACS destination), environment, job store path and ready file of a
    service subprocess that a crash test kills."""
    cfg = write_toml(tmp_path / "cxr-ai.toml", {
        "listener": {"port": free_port(), "allowed_calling_aes": ["TESTSCU"], "min_free_mb": 0.0},
        "store": {"root": "var", "quiet_seconds": 0.1, "keep_hours": -1.0},
        "workers": {"pipeline": f"test_service:{pipeline}", "poll_seconds": 0.05},
        "routing": {"poll_seconds": 0.1, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5,
                    "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                                      "ae_title": "PACS"}]},
        "http": {"port": 0},
    })
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]),
               CXR_AI_TEST_SLOW_FILE=str(slow))
    env = {k: v for k, v in env.items() if not k.startswith("CXR_AI__")}
    return cfg, env, tmp_path / "var" / "jobs.sqlite3", tmp_path / "ready.json"


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_sigkill_mid_study_then_restart_loses_nothing(tmp_path: Path, rg1_paths) -> None:
    pacs = start_pacs(tmp_path)
    slow = tmp_path / "hold-processing"
    cfg, env, db, ready = _crash_setup(tmp_path, pacs, slow, pipeline="StubPipeline")
    # Study A: three phantom-free real instances (RG1 in three SOP instances), then released.
    study_a = []
    for i in range(3):
        ds = pydicom.dcmread(rg1_paths["RG1_J2KI"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.511.1.")
        study_a.append(tmp_path / f"a{i}.dcm")
        ds.save_as(study_a[-1])
    # Study B: same patient, a second study, whose association is cut by the crash.
    study_b_uid = generate_uid()
    study_b = []
    for i in range(2):
        ds = pydicom.dcmread(rg1_paths["RG1_J2KI"])
        ds.StudyInstanceUID = study_b_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        study_b.append(tmp_path / f"b{i}.dcm")
        ds.save_as(study_b[-1])
    slow.write_text("hold")
    proc = _spawn(cfg, ready, env)
    try:
        port = _wait_ready(proc, ready)["dicom_port"]
        assert send(port, study_a) == [0, 0, 0]
        wait_for(lambda: _db_rows(db, "SELECT state FROM studies") == [("processing",)], what="study A processing")
        # B: one instance acknowledged on an association that is still open when the process dies
        from pynetdicom import AE, build_context

        ae = AE(ae_title="TESTSCU")
        ae.requested_contexts = [build_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.4.91"])]
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI", evt_handlers=SCU_HANDLERS)
        assert assoc.send_c_store(pydicom.dcmread(study_b[0])).Status == 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # the sender sees no success for the second instance (the association is gone)
        try:
            rsp = assoc.send_c_store(pydicom.dcmread(study_b[1]))
            assert not rsp or rsp.get("Status", None) != 0
        except RuntimeError as exc:
            assert "must be established" in str(exc)
        assoc.abort()
        acknowledged = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study_a + study_b[:1]}
        assert {r[0] for r in _db_rows(db, "SELECT sop_uid FROM instances")} == acknowledged
        assert _db_rows(db, "SELECT COUNT(*) FROM outbox") == [(0,)]
        # restart; processing no longer held; the sender retries what was not acknowledged
        slow.unlink()
        proc = _spawn(cfg, ready, env)
        port = _wait_ready(proc, ready)["dicom_port"]
        assert send(port, study_b[1:]) == [0]
        wait_for(lambda: sorted(_db_rows(db, "SELECT state FROM studies")) == [("done",), ("done",)],
                 what="both studies done after restart")
        # every instance received once, every result delivered
        assert {r[0] for r in _db_rows(db, "SELECT sop_uid FROM instances")} == acknowledged | {
            str(pydicom.dcmread(study_b[1], stop_before_pixels=True).SOPInstanceUID)}
        assert _db_rows(db, "SELECT state, COUNT(*) FROM instances GROUP BY state") == [("processed", 5)]
        results = pacs.store.instances()
        assert len(results) == 5
        sources = {str(ds.StudyInstanceUID) for ds in (pydicom.dcmread(r.path, stop_before_pixels=True) for r in results)}
        assert sources == {str(pydicom.dcmread(study_a[0], stop_before_pixels=True).StudyInstanceUID), study_b_uid}
        for p in (tmp_path / "var" / "spool" / "instances").rglob("*.dcm"):
            assert p.stat().st_size > 1000
        assert len(list((tmp_path / "var" / "spool" / "instances").rglob("*.dcm"))) == 5
        # graceful stop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _kill(proc)
        pacs.stop()


@pytest.mark.slow
def test_sigkill_after_the_first_results_went_out_loses_nothing(tmp_path: Path, rg1_paths) -> None:
    pacs = start_pacs(tmp_path)
    slow = tmp_path / "hold-after-first-results"
    cfg, env, db, ready = _crash_setup(tmp_path, pacs, slow, pipeline="PhasedStubPipeline")
    slow.write_text("hold")
    proc = _spawn(cfg, ready, env)
    try:
        port = _wait_ready(proc, ready)["dicom_port"]
        assert send(port, [rg1_paths["RG1_UNCR"]]) == [0]
        # the first result reaches the PACS while the study is still being processed
        wait_for(lambda: len(pacs.store.instances()) == 1, what="first result in the PACS")
        assert _db_rows(db, "SELECT state FROM studies") == [("processing",)]
        [first] = pacs.store.instances()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        slow.unlink()
        proc = _spawn(cfg, ready, env)
        _wait_ready(proc, ready)
        wait_for(lambda: _db_rows(db, "SELECT state FROM studies") == [("done",)], what="study done after restart")
        # both results are in the PACS, the first one under the same UID as before the crash
        uids = sorted(str(pydicom.dcmread(r.path, stop_before_pixels=True).InstanceNumber) + ":" + r.sop_uid
                      for r in pacs.store.instances())
        assert [u.split(":")[0] for u in uids] == ["1", "2"] and first.sop_uid in {u.split(":")[1] for u in uids}
        assert _db_rows(db, "SELECT state, COUNT(*) FROM outbox GROUP BY state") in ([("sent", 2)], [("sent", 3)])
        assert _db_rows(db, "SELECT state FROM instances") == [("processed",)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _kill(proc)
        pacs.stop()


@pytest.mark.slow
def test_sigterm_requeues_running_study(tmp_path: Path, rg1_paths) -> None:
    slow = tmp_path / "hold-processing"
    cfg = write_toml(tmp_path / "cxr-ai.toml", {
        "listener": {"port": free_port(), "allowed_calling_aes": ["TESTSCU"], "min_free_mb": 0.0},
        "store": {"root": "var", "quiet_seconds": 0.1},
        "workers": {"pipeline": "test_service:StubPipeline", "poll_seconds": 0.05, "shutdown_grace_seconds": 0.5},
        "routing": {"destinations": [{"name": "files", "kind": "folder", "path": "out"}]},
        "http": {"port": 0},
    })
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_AI__")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]), CXR_AI_TEST_SLOW_FILE=str(slow))
    db = tmp_path / "var" / "jobs.sqlite3"
    ready = tmp_path / "ready.json"
    slow.write_text("hold")
    proc = _spawn(cfg, ready, env)
    try:
        port = _wait_ready(proc, ready)["dicom_port"]
        assert send(port, [rg1_paths["RG1_J2KI"]]) == [0]
        wait_for(lambda: _db_rows(db, "SELECT state FROM studies") == [("processing",)], what="processing")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
        assert "re-queued" in log
        assert _db_rows(db, "SELECT state FROM studies") == [("received",)]
        slow.unlink()
        proc = _spawn(cfg, ready, env)
        _wait_ready(proc, ready)
        wait_for(lambda: _db_rows(db, "SELECT state FROM studies") == [("done",)], what="done after restart")
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_deploy_example_config_is_valid(tmp_path: Path) -> None:
    loaded = load_settings(REPO / "deploy" / "cxr-ai.example.toml", env={"CXR_AI_FHIR_TOKEN": "t"})
    s = validate_config(loaded.config, base_dir=tmp_path, secrets=loaded.secrets)
    assert {d.kind for d in s.destinations} == {"dicom", "fhir", "folder"}
    assert s.listener.allowed_calling_aes == ["ORTHANC"]
    orthanc = json.loads((REPO / "deploy" / "orthanc" / "orthanc.json").read_text())
    assert orthanc["DicomModalities"]["cxr-ai"]["AET"] == s.listener.ae_title
    assert orthanc["LuaScripts"][0].endswith("route-to-cxr-ai.lua")
    assert orthanc["RemoteAccessAllowed"] is False


def test_serve_starts_with_no_config_at_all(tmp_path: Path, rg1_paths) -> None:
    """`cxr-ai serve` with embedded defaults: demo pipeline import path, SQLite and folder under ./var."""
    cfg = load_config(env={})
    s = validate_config(cfg, base_dir=tmp_path)
    assert s.db_path == tmp_path / "var" / "jobs.sqlite3" and s.pipeline == "cxr_ai.pipeline:Pipeline"
    assert [d.kind for d in s.destinations] == ["folder"] and s.listener.host == "127.0.0.1"
    cfg["listener"]["port"] = 0
    cfg["http"]["port"] = 0
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"]], calling="STORESCU") == [0]
        assert svc.wait_idle(timeout=60, expected_instances=1)
        assert len(list((tmp_path / "var" / "out").rglob("*.dcm"))) == 1
    finally:
        svc.stop(grace=2)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:
    from cxr_ai.service.cli import demo_main

    assert demo_main(["--n", "2", "--size", "512", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Triage order" in out and "  1. job J" in out
    assert list((tmp_path / "results").rglob("SR-*.dcm"))


def test_spool_reconciliation_re_records_instances_the_database_lost(tmp_path: Path, rg1_paths) -> None:
    """A power loss with sqlite_synchronous=normal may drop the last commits; the fsync'ed
    spool is the source of truth and the service re-records what the database lost."""
    cfg = base_config(tmp_path, [{"name": "files", "kind": "folder", "path": "out"}])
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path)
    svc.start()
    svc.workers.stop(grace=0)        # receive only
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"], rg1_paths["RG1_UNCR"]]) == [0, 0]
    finally:
        svc.stop(grace=0)
    db = tmp_path / "var" / "jobs.sqlite3"
    with sqlite3.connect(db) as c:       # simulate the lost transactions
        c.execute("DELETE FROM instances")
        c.execute("DELETE FROM studies")
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        assert svc.wait_idle(timeout=60, expected_instances=2)
        assert [s.state for s in svc.store.studies()] == [StudyState.DONE]
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2
    finally:
        svc.stop(grace=2)


def test_retention_removes_received_files_and_keeps_result_headers_for_retraction(tmp_path: Path, rg1_paths) -> None:
    cfg = base_config(tmp_path, [{"name": "files", "kind": "folder", "path": "out"}], store={"keep_hours": 0.0})
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"], ct_path()]) == [0, 0]
        assert svc.wait_idle(timeout=60, expected_instances=2)
        wait_for(lambda: all(s.files_removed for s in svc.store.studies()), what="retention")
        assert list(svc.spool.instance_files()) == []
        [sent] = list((tmp_path / "out").rglob("*.dcm"))  # results stay where they were sent, whole
        [kept] = list(svc.spool.results.rglob("*.dcm"))  # and here as a header, for cxr-ai retract
        whole, header = pydicom.dcmread(sent), pydicom.dcmread(kept)
        assert "PixelData" in whole and "PixelData" not in header
        assert kept.stat().st_size < sent.stat().st_size
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID"):
            assert header[keyword].value == whole[keyword].value
    finally:
        svc.stop(grace=2)
    # retract_keep_hours later (0 here) the headers go too
    cfg["store"]["retract_keep_hours"] = 0.0
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        wait_for(lambda: not list(svc.spool.results.iterdir()), what="the result headers' retention")
        assert all(s.files_removed for s in svc.store.studies())
    finally:
        svc.stop(grace=2)


def test_an_idle_service_blanks_worklist_demographics_past_their_retention(tmp_path: Path, monkeypatch) -> None:
    import cxr_ai.service.wiring as wiring

    monkeypatch.setattr(wiring, "SWEEP_SECONDS", 0.5)  # the janitor's once-a-minute sweep, sooner
    cfg = base_config(tmp_path, [{"name": "files", "kind": "folder", "path": "out"}])
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        worklist = svc.workers.recorder.worklist
        person = {"name": "DOE^JANE", "id": "PID9", "age": 50.0, "sex": "F"}
        for job, keep in (("J0001", 0.0), ("J0002", 3600.0)):  # retention over at once / in an hour
            worklist.upsert_study(f"2.25.{job[1:]}", [{"key": "cardiomegaly", "probability": 0.9, "threshold": 0.5}],
                                  received_at=time.time(), job_id=job, demographics=person,
                                  demographics_keep_seconds=keep)
        # no study arrives after these: only the service's own sweep can blank the first
        wait_for(lambda: not worklist.by_job("J0001").demographics, timeout=30, what="the sweep to blank them")
        assert worklist.by_job("J0002").demographics == person
    finally:
        svc.stop(grace=2)


def test_no_phi_or_uids_in_service_logs_at_info(tmp_path: Path, rg1_paths, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO)
    cfg = base_config(tmp_path, [{"name": "files", "kind": "folder", "path": "out"}])
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"]]) == [0]
        assert svc.wait_idle(timeout=60, expected_instances=1)
    finally:
        svc.stop(grace=2)
    ds = pydicom.dcmread(rg1_paths["RG1_J2KI"], stop_before_pixels=True)
    secrets = [str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)]
    ours = [r for r in caplog.records if r.levelno >= logging.INFO
            and r.name.startswith(("cxr_ai.net", "cxr_ai.store", "cxr_ai.service"))]
    assert any("job J" in r.getMessage() for r in ours)
    for r in ours:
        for s in secrets:
            assert s not in r.getMessage(), (r.name, r.getMessage())


def test_broken_pipeline_makes_health_fail_but_receiving_goes_on(tmp_path: Path, rg1_paths) -> None:
    def broken(*, config=None):
        raise RuntimeError("model bundle checksum mismatch")

    svc = Service(base_config(tmp_path, []), pipeline_factory=broken, base_dir=tmp_path).start()
    try:
        wait_for(lambda: svc.workers.errors, what="worker start failure")
        code, body = http_get(svc.http_port, "/healthz")
        health = json.loads(body)
        assert code == 503 and health["status"] == "unhealthy"
        assert "checksum mismatch" in " ".join(health["problems"])
        assert send(svc.dicom_port, [rg1_paths["RG1_J2KI"]]) == [0]
        wait_for(lambda: svc.store.counts()["studies"]["received"] == 1, what="study queued")
    finally:
        svc.stop(grace=1)


def test_service_subcommands_plug_into_the_cli_parser(tmp_path: Path, capsys) -> None:
    import argparse

    from cxr_ai.service.cli import add_service_parsers

    parser = argparse.ArgumentParser(prog="cxr-ai")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_service_parsers(parser.add_subparsers(dest="command"))
    toml = write_toml(tmp_path / "c.toml", {"store": {"root": str(tmp_path / "var")}})
    args = parser.parse_args(["-vv", "jobs", "--config", str(toml)])
    assert args.verbose == 2 and args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["studies"]["received"] == 0
    args = parser.parse_args(["serve", "--config", str(toml), "--log-json"])
    assert args.log_json and args.func.__name__ == "_cmd_serve"
    args = parser.parse_args(["demo", "--n", "2"])
    assert args.n == 2 and args.func.__name__ == "_cmd_demo"


def test_results_go_out_before_the_secondary_records_are_written(tmp_path: Path, rg1_paths) -> None:
    """The prediction log and the worklist are written after a study's results are queued:
    delivery must not wait for them. The router polls only every 30 s here, so the results
    reach the folder while the records are being written only if the worker wakes it first."""
    cfg = base_config(tmp_path, [{"name": "files", "kind": "folder", "path": "out"}],
                      routing={"poll_seconds": 30.0})
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path)
    seen: list[bool] = []
    record = svc.workers.recorder.record

    def slow_record(*args, **kwargs):
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and not list((tmp_path / "out").rglob("*.dcm")):
            time.sleep(0.05)
        seen.append(bool(list((tmp_path / "out").rglob("*.dcm"))))
        return record(*args, **kwargs)

    svc.workers.recorder.record = slow_record
    svc.start()
    try:
        assert send(svc.dicom_port, [rg1_paths["RG1_UNCR"]]) == [0]
        wait_for(lambda: seen, timeout=60, what="the records to be written")
        assert seen == [True], "the results waited for the prediction log and the worklist"
    finally:
        svc.stop(grace=2)
