"""``cxr-ai retract`` against a real Orthanc and the real FHIR engine: the IOCM rejection note
(KOS, DCM 113001) reaches the PACS in the study and references every SR / SC / PM, passes
dciodvfy; the Observations and DiagnosticReport become entered-in-error on the FHIR server;
the study leaves the worklist; the audit log records it (no patient data)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pydicom
import pytest
from helpers_orthanc import start_fhir_server, start_orthanc
from test_service_orthanc import PM, SC, SR_3D, FixedFindingsPipeline, _netns_or_run

from cxr_ai.cli import main as cli_main
from cxr_ai.config import load_config
from cxr_ai.net.scu import Peer, send_files
from cxr_ai.service import Service
from cxr_ai.store import StudyState
from cxr_ai.store.jobs import JobStore
from cxr_ai.worklist import Worklist

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _retract(tmp_path: Path, rg1: Path, dciodvfy) -> None:
    fhir = start_fhir_server()
    orthanc = start_orthanc(tmp_path / "orthanc", cxr_ai_port=None, senders={"cxr-ai": "CXR_AI"})
    try:  # every server this test started is stopped, whatever fails
        root = tmp_path / "var"
        site = tmp_path / "site.toml"
        site.write_text(
            f'[listener]\nport = 0\nallowed_calling_aes = ["TESTSCU"]\nmin_free_mb = 0.0\n'
            f'[store]\nroot = "{root}"\nquiet_seconds = 0.2\n[http]\nport = 0\n'
            f'[fhir]\ndefault_patient_identifier_system = "urn:oid:2.16.840.1.113883.19.5"\n'
            f'[outputs]\nheatmaps_for = "all"\n'
            f'[routing]\nbackoff_initial_seconds = 0.5\ndestinations = [\n'
            f' {{name = "pacs", kind = "dicom", host = "127.0.0.1", port = {orthanc.dicom_port}, ae_title = "ORTHANC"}},\n'
            f' {{name = "ehr", kind = "fhir", url = "{fhir.base_url}"}},\n]\n', encoding="utf-8")
        cfg = load_config(site, env={})
        svc = Service(cfg, pipeline_factory=FixedFindingsPipeline, base_dir=tmp_path)
        src = pydicom.dcmread(rg1, stop_before_pixels=True)
        try:
            svc.start()
            assert send_files([rg1], Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI",
                                          calling_ae="TESTSCU")) == [0]
            assert svc.wait_idle(timeout=240, expected_instances=1)
            [study] = svc.store.studies()
            assert study.state in (StudyState.RESULTS_SENT, StudyState.DONE), svc.store.deliveries()
            with Worklist(root / "worklist.sqlite3") as wl:
                assert [s.study_uid for s in wl.ranked()] == [str(src.StudyInstanceUID)]
            observations = fhir.get("Observation")["entry"]
            assert observations and all(e["resource"]["status"] == "preliminary" for e in observations)

            # withdraw it, by accession number, while the service runs
            out = io.StringIO()
            with redirect_stdout(out):
                rc = cli_main(["retract", "--accession", str(src.AccessionNumber), "--reason", "wrong patient (test)",
                               "--config", str(site)])
            assert rc == 0, out.getvalue()
            summary = json.loads(out.getvalue().strip().splitlines()[-1])
            assert summary["job_id"] == study.job_id and summary["rejected_objects"] == 5
            assert summary["pacs"] == {"pacs": "sent"} and summary["fhir"] == {"ehr": "3 marked entered-in-error"}
            assert summary["worklist_removed"] is True
        finally:
            svc.stop(grace=5)
        # the PACS holds the rejection note in the study, referencing every result object
        [orthanc_study] = orthanc.post("/tools/lookup", str(src.StudyInstanceUID))
        by_class: dict[str, list[str]] = {}
        for s in orthanc.get(f"/studies/{orthanc_study['ID']}/series"):
            for inst_id in s["Instances"]:
                tags = orthanc.get(f"/instances/{inst_id}/simplified-tags")
                by_class.setdefault(tags["SOPClassUID"], []).append(inst_id)
        assert {k: len(v) for k, v in by_class.items()} == {SR_3D: 1, SC: 2, PM: 2, KOS: 1}
        import urllib.request

        with urllib.request.urlopen(f"{orthanc.url}/instances/{by_class[KOS][0]}/file", timeout=20) as r:
            note = pydicom.dcmread(io.BytesIO(r.read()))
        title = note.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
            "113001", "DCM", "Rejected for Patient Safety Reasons")
        assert note.PatientID == src.PatientID and note.StudyInstanceUID == src.StudyInstanceUID
        referenced = {str(i.ReferencedSOPInstanceUID) for item in note.CurrentRequestedProcedureEvidenceSequence
                      for series in item.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
        sent = set()
        for kind in (SR_3D, SC, PM):
            for inst_id in by_class[kind]:
                sent.add(orthanc.get(f"/instances/{inst_id}/simplified-tags")["SOPInstanceUID"])
        assert referenced == sent and len(sent) == 5
        in_tree = {str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for c in note.ContentSequence
                   if "ReferencedSOPSequence" in c}
        assert in_tree == sent
        [note_file] = (root / "spool" / "results" / summary["job_id"]).glob("KO-*.dcm")
        report = dciodvfy(note_file)
        assert not report.errors, report.output

        # FHIR: every Observation and the DiagnosticReport are entered-in-error
        for kind, n in (("Observation", 2), ("DiagnosticReport", 1)):
            entries = fhir.get(kind)["entry"]
            assert len(entries) == n and all(e["resource"]["status"] == "entered-in-error" for e in entries), entries
        # the worklist no longer lists it; the job store and the audit log say what was done
        with Worklist(root / "worklist.sqlite3") as wl:
            assert wl.ranked(include_read=True) == []
        store = JobStore(root / "jobs.sqlite3")
        assert store.studies()[0].retracted_at is not None
        store.close()
        [line] = (root / "audit.jsonl").read_text().splitlines()
        audit = json.loads(line)
        assert audit["event"] == "retract" and audit["reason"] == "wrong patient (test)"
        assert audit["outcome"] == "success" and audit["client"] == "" and audit["user"]
        assert audit["job_id"] == summary["job_id"] and sorted(audit["rejected_objects"]) == sorted(sent)
        assert audit["pacs"] == {"pacs": "sent"} and audit["worklist_removed"] is True
        assert str(src.PatientID) not in line and str(src.PatientName) not in line
        # a retraction that names nothing known fails clearly
        err = io.StringIO()
        from contextlib import redirect_stderr

        with redirect_stderr(err):
            assert cli_main(["retract", "--job", "Jnothing", "--reason", "x", "--config", str(site)]) == 2
        assert "no study in the job store matches job Jnothing" in err.getvalue()
    finally:
        orthanc.stop()
        fhir.stop()


@pytest.mark.slow
def test_retract_withdraws_results_at_orthanc_and_fhir(request, tmp_path: Path, rg1_paths, dciodvfy) -> None:
    _netns_or_run(request, lambda: _retract(tmp_path, rg1_paths["RG1_J2KI"], dciodvfy))


def test_rejection_note_names_every_result_object_kind_segmentations_included(tmp_path: Path, rg1_paths,
                                                                             dciodvfy) -> None:
    """A withdrawn study's Segmentations ([outputs] segmentation = true) must be rejected with
    its SR, SCs and PMs: a SEG left at the PACS would still outline the withdrawn finding."""
    import numpy as np

    from cxr_ai.config import default_config
    from cxr_ai.outputs import OutputKind, listener_name, outputs_for, stored_kind
    from cxr_ai.results import FindingResult, ImageResult, ModelInfo
    from cxr_ai.retract import build_rejection_note, result_objects
    from cxr_ai.store.spool import Spool
    from cxr_ai.dicom.gate import check_applicability

    decision, rg = check_applicability(rg1_paths["RG1_UNCR"])
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
    rows, cols = int(ds.Rows), int(ds.Columns)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    heat = np.exp(-(((yy - 0.6 * rows) / (0.15 * rows)) ** 2 + ((xx - 0.55 * cols) / (0.17 * cols)) ** 2))
    model = ModelInfo(name="cxr-ai-test", version="0.0.1", device_uid="2.25.314159265358979323846")
    result = ImageResult(rg.sop_instance_uid, rg.study_instance_uid, decision, model=model,
                         findings=[FindingResult("cardiomegaly", "Cardiomegaly", 0.9, 0.5, heatmap=heat)])
    cfg = default_config()
    cfg["outputs"]["segmentation"] = True
    objects = outputs_for(result, ds, config=cfg)
    spool = Spool(tmp_path / "spool")
    for kind, obj in objects.objects():
        obj.save_as(spool.results_dir("J1") / listener_name(kind, str(obj.SOPInstanceUID)), enforce_file_format=True)
    found = result_objects(spool, "J1")
    assert sorted(stored_kind(o).name for o in found) == ["PM", "SC", "SEG", "SR"]
    note = build_rejection_note(found)
    referenced = {str(item.ReferencedSOPInstanceUID) for series in note.CurrentRequestedProcedureEvidenceSequence[0]
                  .ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert referenced == {str(o.SOPInstanceUID) for o in found}
    assert str(objects.segmentations[0].SOPInstanceUID) in referenced
    path = tmp_path / "kos.dcm"
    note.save_as(path, enforce_file_format=True)
    assert dciodvfy(path).errors == []


def test_retract_after_retention_withdraws_the_objects_from_their_headers(tmp_path: Path, rg1_paths) -> None:
    """Past [store] keep_hours the received image and the results' pixel data are gone; the
    headers kept for retract_keep_hours still let retract name every SR, SC and PM in the
    rejection note it sends to the PACS (a real C-STORE SCP here)."""
    from test_service import base_config, start_pacs, wait_for

    pacs = start_pacs(tmp_path)
    dest = {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
    cfg = base_config(tmp_path, [dest], store={"keep_hours": 0.0})
    cfg["outputs"].update(heatmaps_for="all")
    svc = Service(cfg, pipeline_factory=FixedFindingsPipeline, base_dir=tmp_path)
    try:
        svc.start()
        assert send_files([rg1_paths["RG1_J2KI"]], Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI",
                                                        calling_ae="TESTSCU")) == [0]
        assert svc.wait_idle(timeout=120, expected_instances=1)
        wait_for(lambda: all(s.files_removed for s in svc.store.studies()), what="retention")
        [study] = svc.store.studies()
        kept = [pydicom.dcmread(p) for p in (svc.spool.results / study.job_id).glob("*.dcm")]
        assert kept and not any("PixelData" in ds for ds in kept)
        sent = {str(i.sop_uid) for i in pacs.store.instances()}
        assert {str(ds.SOPInstanceUID) for ds in kept} == sent and len(sent) == 5  # SR, 2 SC, 2 PM
    finally:
        svc.stop(grace=5)
    site = tmp_path / "site.toml"
    site.write_text(f'[store]\nroot = "{tmp_path / "var"}"\n\n[[routing.destinations]]\nname = "pacs"\n'
                    f'kind = "dicom"\nhost = "127.0.0.1"\nport = {pacs.port}\nae_title = "PACS"\n', encoding="utf-8")
    try:
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli_main(["retract", "--job", study.job_id, "--reason", "wrong patient (test)",
                             "--config", str(site)]) == 0
        summary = json.loads(out.getvalue().strip().splitlines()[-1])
        assert summary["pacs"] == {"pacs": "sent"} and summary["rejected_objects"] == 5
        [note] = [i for i in pacs.store.instances() if i.sop_class_uid == KOS]
        kos = pydicom.dcmread(note.path)
        referenced = {str(item.ReferencedSOPInstanceUID) for series in kos.CurrentRequestedProcedureEvidenceSequence[0]
                      .ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
        assert referenced == sent
    finally:
        pacs.stop()
