"""Integration: two patients' radiographs that share one SOP Instance UID (a sender reusing a
UID in another study) both get their own results, and both sets reach a real Orthanc intact.

The listener keeps and processes both instances, logs and counts the reuse (``/metrics``,
``/status``, ``cxr-ai jobs``), and derives each result UID from the patient and study too,
so the second patient's SR, heatmap SC and Parametric Map never replace the first's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import pydicom
import pytest
from helpers_orthanc import start_orthanc
from test_service_orthanc import PM, SC, SR_3D, FixedFindingsPipeline, _netns_or_run

from cxr_ai.cli import main as cli_main
from cxr_ai.config import load_config
from cxr_ai.net.scu import Peer, send_files
from cxr_ai.service import Service
from cxr_ai.service.cli import jobs_main
from cxr_ai.store import StudyState
from cxr_ai.worklist import Worklist


def _two_patients(rg1: Path, out: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """RG1 as two patients in two studies, with the same SOP Instance UID."""
    files = []
    for n, (pid, name) in enumerate((("PAT-A-0001", "Alpha^Ann"), ("PAT-B-0002", "Beta^Bob")), start=1):
        ds = pydicom.dcmread(rg1)
        ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = pid, name, "HOSP"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.1515.{n}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.1515.{n}.1"
        ds.AccessionNumber = f"ACC{n}"
        path = out / f"patient{n}.dcm"
        ds.save_as(path)
        files.append((path, ds))
    assert files[0][1].SOPInstanceUID == files[1][1].SOPInstanceUID
    return files


def _reuse(tmp_path: Path, rg1: Path, caplog) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc", cxr_ai_port=None, senders={"cxr-ai": "CXR_AI"})
    cfg = load_config(env={})
    cfg["listener"].update(port=0, allowed_calling_aes=["TESTSCU"], min_free_mb=0.0)
    cfg["store"].update(root=str(tmp_path / "var"), quiet_seconds=0.2)
    cfg["http"].update(port=0)
    cfg["outputs"].update(heatmaps_for="all")  # a heatmap per finding: every object kind of both patients
    cfg["routing"].update(backoff_initial_seconds=0.5, destinations=[
        {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": "ORTHANC"}])
    svc = Service(cfg, pipeline_factory=FixedFindingsPipeline, base_dir=tmp_path)
    (tmp_path / "in").mkdir()
    files = _two_patients(rg1, tmp_path / "in")
    try:
        svc.start()
        with caplog.at_level(logging.WARNING, logger="cxr_ai.net.scp"):
            assert send_files([p for p, _ in files], Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI",
                                                          calling_ae="TESTSCU")) == [0, 0]
        assert svc.wait_idle(timeout=240, expected_instances=2)
        deadline = time.monotonic() + 60
        while any(s.state is not StudyState.DONE for s in svc.store.studies()) and time.monotonic() < deadline:
            svc.housekeeping()
            time.sleep(0.2)
        studies = svc.store.studies()
        assert len(studies) == 2 and all(s.state is StudyState.DONE for s in studies), (studies, orthanc.log()[-3000:])
        instances = svc.store.instances()
        assert len(instances) == 2 and all(i.uid_reused for i in instances)
        assert len({i.path for i in instances}) == 2
        # logged without PHI, counted, shown
        reuse_logs = [r.getMessage() for r in caplog.records if "another study or patient" in r.getMessage()]
        assert len(reuse_logs) == 1, reuse_logs
        for _, ds in files:
            assert all(str(ds.PatientID) not in m and str(ds.StudyInstanceUID) not in m
                       and str(ds.SOPInstanceUID) not in m for m in reuse_logs)
        metrics = svc.metrics.render().decode()
        assert "cxr_ai_sop_uid_reused_total 1.0" in metrics
        assert "cxr_ai_sop_uid_reused_instances 2.0" in metrics
        status = svc.status()
        assert sorted(r["instances"] for r in status["sop_uid_reused"]) == [1, 1]
        assert {r["job_id"] for r in status["sop_uid_reused"]} == {s.job_id for s in studies}
        # at the PACS: each study holds its patient's source and its own complete set of results
        result_uids: list[set[str]] = []
        for path, src in files:
            [orthanc_study] = orthanc.post("/tools/lookup", str(src.StudyInstanceUID))
            kinds: dict[str, int] = {}
            uids = set()
            for s in orthanc.get(f"/studies/{orthanc_study['ID']}/series"):
                for inst_id in s["Instances"]:
                    tags = orthanc.get(f"/instances/{inst_id}/simplified-tags")
                    assert tags["PatientID"] == src.PatientID and tags["PatientName"] == str(src.PatientName)
                    assert tags["StudyInstanceUID"] == src.StudyInstanceUID
                    kinds[tags["SOPClassUID"]] = kinds.get(tags["SOPClassUID"], 0) + 1
                    uids.add(tags["SOPInstanceUID"])
            assert kinds == {SR_3D: 1, SC: 2, PM: 2}, (path.name, kinds)  # the source went only to cxr-ai
            result_uids.append(uids)
            sr_id = next(i for s in orthanc.get(f"/studies/{orthanc_study['ID']}/series") for i in s["Instances"]
                         if orthanc.get(f"/instances/{i}/simplified-tags")["SOPClassUID"] == SR_3D)
            assert orthanc.get(f"/instances/{sr_id}/simplified-tags")["AccessionNumber"] == src.AccessionNumber
        assert not result_uids[0] & result_uids[1]
        assert len(orthanc.get("/patients")) == 2 and len(orthanc.get("/instances")) == 10
    finally:
        svc.stop(grace=5)
        orthanc.stop()
    # the jobs listing names the reuse (no patient data in it either)
    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(f'[store]\nroot = "{tmp_path / "var"}"\n')
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert jobs_main(["--config", str(cfg_path)]) == 0
    assert "SOP Instance UID reused across studies or patients: 2 instances" in buf.getvalue()
    assert "PAT-A" not in buf.getvalue() and "PAT-B" not in buf.getvalue()


@pytest.mark.slow
def test_two_patients_with_one_sop_uid_both_reach_orthanc_intact(request, tmp_path: Path, rg1_paths, caplog) -> None:
    _netns_or_run(request, lambda: _reuse(tmp_path, rg1_paths["RG1_J2KI"], caplog))


def test_same_study_two_patients_one_sop_uid_are_two_jobs_that_never_merge(tmp_path: Path, rg1_paths,
                                                                           caplog) -> None:
    """The sender mixed two patients under one Study Instance UID (and one SOP Instance UID):
    each patient's image is a job of its own, spooled under its own file name, processed, with
    results, a worklist entry and a study page of its own (delivered here to a folder)."""
    (tmp_path / "in").mkdir()
    files = _two_patients(rg1_paths["RG1_J2KI"], tmp_path / "in")
    second = files[1][1]
    second.StudyInstanceUID = files[0][1].StudyInstanceUID
    second.SeriesInstanceUID = files[0][1].SeriesInstanceUID
    second.save_as(files[1][0])
    cfg = load_config(env={})
    cfg["listener"].update(port=0, allowed_calling_aes=["TESTSCU"], min_free_mb=0.0)
    cfg["store"].update(root=str(tmp_path / "var"), quiet_seconds=0.2)
    cfg["http"].update(port=0)
    cfg["routing"]["destinations"] = [{"name": "files", "kind": "folder", "path": "out"}]
    svc = Service(cfg, pipeline_factory=FixedFindingsPipeline, base_dir=tmp_path)
    try:
        svc.start()
        with caplog.at_level(logging.WARNING, logger="cxr_ai.net.scp"):
            for path, _ in files:  # two associations, as two senders would
                assert send_files([path], Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI",
                                               calling_ae="TESTSCU")) == [0]
            assert svc.wait_idle(timeout=240, expected_instances=2)
        studies = svc.store.studies()
        assert len(studies) == 2 and len({s.job_id for s in studies}) == 2
        assert {s.study_uid for s in studies} == {str(second.StudyInstanceUID)}
        instances = svc.store.instances()
        assert len(instances) == 2 and all(i.uid_reused for i in instances)
        spooled = [Path(i.path) for i in instances]
        assert len(set(spooled)) == 2 and all(p.is_file() for p in spooled)
        # operators see it: /status, /metrics (counted in the job store), the jobs listing below
        assert {r["job_id"] for r in svc.status()["study_uid_shared"]} == {s.job_id for s in studies}
        assert "cxr_ai_study_uid_shared_studies 2.0" in svc.metrics.render().decode()
        shared = [r.getMessage() for r in caplog.records if "Study Instance UID was already received" in r.getMessage()]
        assert len(shared) == 1 and not any(str(ds.PatientID) in shared[0] or str(ds.StudyInstanceUID) in shared[0]
                                            for _, ds in files)
        patients = []
        for study in studies:  # each job: one patient's image, one patient's results
            [inst] = svc.store.instances(study.study_key)
            pid = str(pydicom.dcmread(inst.path, stop_before_pixels=True).PatientID)
            srs = [pydicom.dcmread(p) for p in (tmp_path / "out" / study.job_id).glob("SR-*.dcm")]
            assert [str(sr.PatientID) for sr in srs] == [pid]
            assert len(list((tmp_path / "out" / study.job_id).glob("fhir-*.json"))) == 1
            patients.append(pid)
        assert sorted(patients) == ["PAT-A-0001", "PAT-B-0002"]
        # the worklist: an entry per patient, each with its own patient and its own job
        entries = svc.workers.recorder.worklist.ranked(include_read=True, include_not_applicable=True)
        assert len(entries) == 2 and {e.job_id for e in entries} == {s.job_id for s in studies}
        assert {e.demographics["id"] for e in entries} == {"PAT-A-0001", "PAT-B-0002"}
        assert len({e.patient_key for e in entries}) == 2
        for e in entries:
            study = next(s for s in studies if s.job_id == e.job_id)
            [inst] = svc.store.instances(study.study_key)
            assert e.demographics["id"] == str(pydicom.dcmread(inst.path, stop_before_pixels=True).PatientID)
            assert e.findings["cardiomegaly"]["probability"] == pytest.approx(0.81)
    finally:
        svc.stop(grace=5)
    site = tmp_path / "site.toml"
    site.write_text(f'[store]\nroot = "{tmp_path / "var"}"\n', encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert jobs_main(["--config", str(site)]) == 0
    assert "Study Instance UID received for several patients: 2 studies" in out.getvalue()
    assert all(s.job_id in out.getvalue() for s in studies) and "PAT-" not in out.getvalue()
    # retracting by the shared Study UID is refused (it would withdraw both patients'); by job,
    # only that patient's results and worklist entry go
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli_main(["retract", "--study", str(second.StudyInstanceUID), "--reason", "test",
                         "--config", str(site)]) == 2
    assert "was received for 2 patients" in err.getvalue() and all(s.job_id in err.getvalue() for s in studies)
    assert "PAT-" not in err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the accession leads to the same Study UID: refused too
        assert cli_main(["retract", "--accession", str(files[0][1].AccessionNumber), "--reason", "test",
                         "--config", str(site)]) == 2
    assert "was received for 2 patients" in err.getvalue()
    gone = next(e for e in entries if e.demographics["id"] == "PAT-B-0002")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["retract", "--job", gone.job_id, "--reason", "test", "--config", str(site)]) == 0
    with Worklist(tmp_path / "var" / "worklist.sqlite3") as wl:
        left = wl.ranked(include_read=True, include_not_applicable=True)
    assert [e.demographics["id"] for e in left] == ["PAT-A-0001"]
