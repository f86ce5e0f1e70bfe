"""Integration: Orthanc (Debian) with the deploy/ routing recipe -> cxr-ai -> Orthanc + FHIR.

RG1 (a real chest CR) is stored into Orthanc by C-STORE; Orthanc's Lua script forwards it to
the cxr-ai listener; cxr-ai processes it and sends its SR, heatmap SC and Parametric Map back
to Orthanc by C-STORE and its FHIR transaction Bundle to a real FHIR engine (Medplum). The
test then finds the results in Orthanc's REST API, in RG1's study, for RG1's patient.

Each test re-runs itself inside a private network namespace (only loopback) when the kernel
allows it, because Orthanc cannot be bound to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers_orthanc import (
    free_port,
    in_private_netns,
    private_netns_available,
    rerun_in_private_netns,
    start_fhir_server,
    start_orthanc,
)

from cxr_ai.config import load_config
from cxr_ai.dicom.gate import check_applicability
from cxr_ai.net.scu import Peer, send_files
from cxr_ai.service import Service
from cxr_ai.store import StudyState

SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"    # Comprehensive 3D SR Storage
SC = "1.2.840.10008.5.1.4.1.1.7"           # Secondary Capture Image Storage
PM = "1.2.840.10008.5.1.4.1.1.30"          # Parametric Map Storage
CR = "1.2.840.10008.5.1.4.1.1.1"


class FixedFindingsPipeline:
    """The real gate and the real SR/SC/PM/FHIR writers, with fixed model outputs.

    Stands in for the model only (the real pipeline runs in the second test once its demo
    bundle exists); everything sent to Orthanc and the FHIR server is built by cxr-ai's writers.
    """

    def __init__(self, *, config=None) -> None:
        self.config = config

    def process_study(self, paths, *, on_results=None):  # everything at once: on_results is not needed
        from cxr_ai.outputs import outputs_for
        from cxr_ai.imaging import display_array
        from cxr_ai.pipeline import InstanceOutcome, InstanceStatus
        from cxr_ai.results import FindingResult, ImageResult, ModelInfo

        model = ModelInfo(name="fixed-findings", version="0.0", device_uid="1.2.826.0.1.3680043.10.511.77.1")
        out = []
        for p in paths:
            decision, rg = check_applicability(p)
            if rg is None or not decision.accepted:
                out.append(InstanceOutcome(str(p), rg.sop_instance_uid if rg else "", rg.study_instance_uid if rg else "",
                                           InstanceStatus.NOT_APPLICABLE, decision.reason.value, decision.message))
                continue
            heat = np.zeros((rg.rows, rg.columns), np.float32)
            heat[rg.rows // 3: 2 * rg.rows // 3, rg.columns // 3: 2 * rg.columns // 3] = 1.0
            result = ImageResult(rg.sop_instance_uid, rg.study_instance_uid, decision, model=model,
                                 findings=[FindingResult("cardiomegaly", "Cardiomegaly", 0.81, 0.5, heat),
                                           FindingResult("low_ef", "Low ejection fraction", 0.22, 0.5, heat)])
            display, _ = display_array(rg.dataset, rg.pixels())
            objects = outputs_for(result, rg.dataset, display_image=display, config=self.config)
            outcome = InstanceOutcome(str(p), rg.sop_instance_uid, rg.study_instance_uid, InstanceStatus.PROCESSED,
                                      "", "processed", result=result, radiograph=rg, outputs=objects)
            out.append(outcome)
        return out


def _netns_or_run(request, body) -> None:
    if not in_private_netns() and private_netns_available():
        r = rerun_in_private_netns(request.node.nodeid)
        assert r.returncode == 0, f"in private netns:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if "skipped" in last and "passed" not in last:
            pytest.skip(f"inside the private netns: {last}")
        return
    body()


def _roundtrip(tmp_path: Path, rg1: Path, pipeline_factory, *, results_first: bool = False) -> None:
    fhir = start_fhir_server()
    cxr_port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", cxr_ai_port=cxr_port, senders={"modality": "TESTSCU"})
    cfg = load_config(env={})
    cfg["listener"].update(port=cxr_port, allowed_calling_aes=["ORTHANC"], min_free_mb=0.0)
    cfg["store"].update(root=str(tmp_path / "var"), quiet_seconds=0.2)
    cfg["http"].update(port=0)
    cfg["fhir"].update(default_patient_identifier_system="urn:oid:2.16.840.1.113883.19.5")
    cfg["routing"].update(backoff_initial_seconds=0.5, destinations=[
        {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": "ORTHANC"},
        {"name": "ehr", "kind": "fhir", "url": fhir.base_url, "token": "test-token"},
        {"name": "files", "kind": "folder", "path": "out"},
    ])
    svc = Service(cfg, pipeline_factory=pipeline_factory, base_dir=tmp_path)
    try:
        svc.start()
        src = pydicom.dcmread(rg1, stop_before_pixels=True)
        assert send_files([rg1], Peer(host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC",
                                      calling_ae="TESTSCU")) == [0]
        deadline = time.monotonic() + 60
        while not svc.store.studies():
            assert time.monotonic() < deadline, f"Orthanc did not route RG1 to cxr-ai:\n{orthanc.log()[-4000:]}"
            time.sleep(0.1)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            studies = svc.store.studies()
            if studies and all(s.state in (StudyState.DONE, StudyState.FAILED, StudyState.NOT_APPLICABLE)
                               for s in studies):
                break
            time.sleep(0.2)
        [study] = svc.store.studies()
        assert study.state is StudyState.DONE, (study, svc.store.deliveries(), orthanc.log()[-3000:])
        assert [i.sop_uid for i in svc.store.instances()] == [str(src.SOPInstanceUID)]
        # Orthanc holds RG1 and cxr-ai's results, in RG1's study, for RG1's patient
        [orthanc_study] = orthanc.post("/tools/lookup", str(src.StudyInstanceUID))
        series = orthanc.get(f"/studies/{orthanc_study['ID']}/series")
        sop_classes: dict[str, int] = {}
        for s in series:
            for inst_id in s["Instances"]:
                tags = orthanc.get(f"/instances/{inst_id}/simplified-tags")
                assert tags["PatientID"] == src.PatientID
                assert tags["StudyInstanceUID"] == src.StudyInstanceUID
                sop_classes[tags["SOPClassUID"]] = sop_classes.get(tags["SOPClassUID"], 0) + 1
        assert sop_classes.get(CR) == 1, sop_classes
        assert sop_classes.get(SR_3D, 0) >= 1 and sop_classes.get(SC, 0) >= 1 and sop_classes.get(PM, 0) >= 1, sop_classes
        assert len(orthanc.get("/instances")) == sum(sop_classes.values())    # nothing else, no duplicates
        sent = sorted((tmp_path / "out" / study.job_id).glob("*.dcm"))
        assert len(sent) == sum(sop_classes.values()) - 1
        # the FHIR engine stored (and validated) the Observations of the transaction bundle
        posted = [json.loads(p.read_text()) for p in (tmp_path / "out" / study.job_id).glob("fhir-*.json")]
        assert posted
        n_obs = sum(1 for b in posted for e in b["entry"] if e["resource"]["resourceType"] == "Observation")
        found = fhir.get("Observation")
        assert found["resourceType"] == "Bundle" and len(found.get("entry", [])) == n_obs >= 1
        # every result file went to each destination exactly once; with a pipeline that hands
        # over its findings first, the SR went out in an earlier delivery than the heatmaps
        for dest in ("pacs", "ehr", "files"):
            rows = [[Path(i).name for i in d.items] for d in svc.store.deliveries(study_key=study.study_key)
                    if d.destination == dest]
            names = [n for r in rows for n in r]
            assert len(names) == len(set(names)), rows
            if dest == "pacs" and results_first:
                assert [n[:3] for n in rows[0]] == ["SR-"] and all(n[:3] in ("SC-", "PM-") for n in rows[1]), rows
    finally:
        svc.stop(grace=5)
        orthanc.stop()
        fhir.stop()


@pytest.mark.slow
def test_orthanc_routes_rg1_to_cxr_ai_and_results_come_back(request, tmp_path: Path, rg1_paths) -> None:
    _netns_or_run(request, lambda: _roundtrip(tmp_path, rg1_paths["RG1_UNCR"], FixedFindingsPipeline))


@pytest.mark.slow
def test_orthanc_roundtrip_with_the_real_pipeline(request, tmp_path: Path, rg1_paths) -> None:
    from cxr_ai.pipeline import Pipeline

    pipeline = Pipeline()  # the shipped demo bundle
    _netns_or_run(request, lambda: _roundtrip(tmp_path, rg1_paths["RG1_J2KR"], lambda config=None: pipeline,
                                              results_first=True))


def _stow(tmp_path: Path, rg1: Path) -> None:
    from test_service import StubPipeline

    orthanc = start_orthanc(tmp_path / "orthanc", cxr_ai_port=free_port(), senders={})
    cfg = load_config(env={})
    cfg["listener"].update(port=0, allowed_calling_aes=["TESTSCU"], min_free_mb=0.0)
    cfg["store"].update(root=str(tmp_path / "var"), quiet_seconds=0.1)
    cfg["http"].update(port=0)
    cfg["routing"]["destinations"] = [{"name": "web", "kind": "stow", "url": f"{orthanc.url}/dicom-web"}]
    svc = Service(cfg, pipeline_factory=StubPipeline, base_dir=tmp_path)
    try:
        svc.start()
        assert send_files([rg1], Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI",
                                      calling_ae="TESTSCU")) == [0]
        assert svc.wait_idle(timeout=120, expected_instances=1)
        [study] = svc.store.studies()
        assert study.state is StudyState.DONE, svc.store.deliveries()
        src = pydicom.dcmread(rg1, stop_before_pixels=True)
        [orthanc_study] = orthanc.post("/tools/lookup", str(src.StudyInstanceUID))
        [inst] = orthanc.get(f"/studies/{orthanc_study['ID']}/instances")
        tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
        assert tags["SOPClassUID"] == SC and tags["PatientID"] == src.PatientID
    finally:
        svc.stop(grace=2)
        orthanc.stop()


@pytest.mark.slow
def test_stow_rs_delivery_to_orthanc_dicomweb(request, tmp_path: Path, rg1_paths) -> None:
    _netns_or_run(request, lambda: _stow(tmp_path, rg1_paths["RG1_J2KI"]))
