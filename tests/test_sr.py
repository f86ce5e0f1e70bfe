"""The TID 1500 SR from real radiographs (RG1, each transfer syntax) and a phantom.

Validated by the tools of the field: dicom3tools ``dciodvfy`` (no errors), dcmtk ``dsrdump``
(parses, shows the content tree) and highdicom ``srread`` (round trip of findings,
probabilities, thresholds and the source reference). Also the applicability gate's rejection
path: a rejected image gets no result objects.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cxr_ai.config import default_config
from cxr_ai.dicom import codes
from cxr_ai.dicom.gate import check_applicability
from cxr_ai.dicom.common import (
    LO_MAX,
    MSG_SOURCE_MISSING,
    NOT_FOR_CLINICAL_USE,
    report_uid,
    series_description,
    tracking_uid,
)
from cxr_ai.dicom.sr import MSG_NO_FINDINGS, MSG_NOT_3D_SR, build_sr, read_sr_findings
from cxr_ai.outputs import MSG_NO_MODEL, outputs_for
from cxr_ai.phantoms import make_phantom_dataset
from cxr_ai.results import FindingResult, ImageResult, ModelInfo

# RG1's Referring Physician's Name is the single word "ward"; highdicom warns when copying it.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\" is unlikely:UserWarning")

DEMO = ModelInfo(name="cxr-ai-demo", version="0.1.0", device_uid="2.25.271828182845904523536028747135266249")


def _findings(rows: int | None = None, cols: int | None = None) -> list[FindingResult]:
    heat = None
    if rows is not None and cols is not None:
        yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
        heat = np.exp(-(((yy - 0.6 * rows) / (0.15 * rows)) ** 2 + ((xx - 0.55 * cols) / (0.17 * cols)) ** 2))
    return [
        FindingResult("cardiomegaly", "Cardiomegaly", 0.8312, 0.5, heatmap=heat),
        FindingResult("low_ef", "Low EF", 0.2107, 0.35, heatmap=None if heat is None else heat[::-1].copy()),
    ]


@pytest.fixture(scope="module")
def sources(rg1_paths: dict[str, Path]) -> dict[str, Dataset]:
    """RG1 in each encoding (metadata only) and a DX phantom."""
    out = {name: pydicom.dcmread(path, stop_before_pixels=True) for name, path in rg1_paths.items()}
    out["phantom_DX"] = make_phantom_dataset(modality="DX", photometric="MONOCHROME2", size=512, random_state=7)
    return out


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KR", "RG1_UNCI", "RG1_J2KI", "phantom_DX"])
def test_sr_is_valid_and_round_trips(name, sources, tmp_path, dciodvfy):
    source = sources[name]
    findings = _findings()
    sr = build_sr(source, DEMO, findings)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    report = dciodvfy(path)
    assert report.errors == [], report.output
    assert "Comprehensive3DSR" in report.output

    dump = subprocess.run([shutil.which("dsrdump") or "dsrdump", str(path)], capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stderr
    for text in ("Imaging Measurement Report", "Completion Flag     : COMPLETE",
                 "Verification Flag   : UNVERIFIED", "(8186001,SCT,\"Cardiomegaly\")",
                 "(52101004,SCT,\"Present\")", "(272519000,SCT,\"Absent\")", "Device Observer UID"):
        assert text in dump.stdout, text

    assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)
    rows = read_sr_findings(path)
    assert [r["key"] for r in rows] == ["cardiomegaly", "low_ef"]
    for row, finding in zip(rows, findings):
        assert row["probability"] == pytest.approx(finding.probability)
        assert row["threshold"] == pytest.approx(finding.threshold)
        assert row["present"] is finding.positive
        assert row["finding"] == codes.finding_code(finding.key).value
        assert row["source_sop_instance_uid"] == source.SOPInstanceUID
        assert row["source_sop_class_uid"] == source.SOPClassUID
        assert row["algorithm_name"] == DEMO.name and row["algorithm_version"] == DEMO.version
        assert row["device_uid"] == DEMO.device_uid
        assert row["tracking_uid"] == tracking_uid(source, DEMO.device_uid, finding.key)


def test_sr_header_copies_patient_and_study_and_opens_a_new_series(sources):
    source = sources["RG1_UNCR"]
    sr = build_sr(source, DEMO, _findings())
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "AccessionNumber", "StudyDate", "StudyTime"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == report_uid(source, DEMO.device_uid)
    assert sr.Modality == "SR"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesDescription == f"cxr-ai AI results (Cardiomegaly, Low EF) - {NOT_FOR_CLINICAL_USE}"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # The procedure reported and the observer device, read back with highdicom.
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    observer = content.get_observer_contexts(observer_type=codes.OBSERVER_TYPE_DEVICE)[0]
    assert observer.observer_identifying_attributes.uid == DEMO.device_uid


def test_clinical_bundle_has_no_not_for_clinical_use_warning(sources):
    model = ModelInfo(name="cxr-ai-cardio", version="2.0.0", device_uid="2.25.1", not_for_clinical_use=False)
    sr = build_sr(sources["phantom_DX"], model, _findings())
    assert NOT_FOR_CLINICAL_USE not in sr.SeriesDescription


def test_uids_are_deterministic_and_change_with_the_model(sources):
    source = sources["RG1_J2KI"]
    first, again = build_sr(source, DEMO, _findings()), build_sr(source, DEMO, _findings())
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    newer = ModelInfo(name=DEMO.name, version="0.2.0", device_uid="2.25.314159265358979323846264338327950288")
    other = build_sr(source, newer, _findings())
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    # Valid UIDs: at most 64 characters, 2.25 root, no leading zeros.
    for uid in (first.SOPInstanceUID, first.SeriesInstanceUID, other.SOPInstanceUID):
        assert len(uid) <= 64 and uid.startswith("2.25.") and pydicom.uid.UID(uid).is_valid


def test_series_description_keeps_the_warning_when_shortened():
    long_findings = [FindingResult("cardiomegaly", "Cardiomegaly with a very long display name", 0.9, 0.5)] * 3
    text = series_description("AI results", DEMO, long_findings)
    assert len(text) <= LO_MAX and text.endswith(NOT_FOR_CLINICAL_USE)
    assert series_description("AI results", DEMO, []) == f"cxr-ai AI results - {NOT_FOR_CLINICAL_USE}"


def test_no_findings_is_an_error_that_says_what_to_do(sources):
    source = sources["RG1_UNCR"]
    with pytest.raises(ValueError) as info:
        build_sr(source, DEMO, [])
    assert str(info.value) == MSG_NO_FINDINGS.format(sop=source.SOPInstanceUID)


def test_source_without_uids_is_refused(sources):
    source = Dataset()
    source.update(sources["phantom_DX"])
    del source.SOPInstanceUID
    with pytest.raises(ValueError) as info:
        build_sr(source, DEMO, _findings())
    assert str(info.value) == MSG_SOURCE_MISSING.format(keyword="SOPInstanceUID")


def test_read_sr_findings_refuses_an_image(sources):
    image = sources["RG1_UNCR"]
    with pytest.raises(ValueError) as info:
        read_sr_findings(image)
    assert str(info.value) == MSG_NOT_3D_SR.format(what=image.filename, sop_class=image.SOPClassUID)


# --- all outputs of one image, and the rejection path -----------------------------------------


def test_rejected_image_gets_no_result_objects(data_store_dir, caplog):
    tibia = data_store_dir / "RG3_UNCR.dcm"
    decision, _ = check_applicability(tibia)
    assert not decision.accepted
    result = ImageResult(
        sop_instance_uid="1.2.3", study_instance_uid="1.2", decision=decision, model=DEMO,
        findings=_findings(),  # even if a caller filled findings, a rejection produces nothing
    )
    with caplog.at_level(logging.DEBUG, logger="cxr_ai.outputs"):
        assert outputs_for(result, pydicom.dcmread(tibia, stop_before_pixels=True)) is None
    assert decision.reason.value in caplog.text
    # The reason lives in the result record, for the listener and batch to report.
    assert result.decision.to_dict()["accepted"] is False and result.decision.message


def test_outputs_for_an_accepted_image(rg1_paths, tmp_path):
    decision, rg = check_applicability(rg1_paths["RG1_UNCR"])
    assert decision.accepted and rg is not None
    source = rg.dataset
    findings = _findings(int(source.Rows), int(source.Columns))
    result = ImageResult(
        sop_instance_uid=rg.sop_instance_uid, study_instance_uid=rg.study_instance_uid,
        decision=decision, model=DEMO, findings=findings,
    )
    assert [f.positive for f in findings] == [True, False]
    default = outputs_for(result, source)  # heatmaps for the positive finding only
    assert default is not None and len(default.heatmap_scs) == 1 and len(default.parametric_maps) == 1
    config_all = default_config()
    config_all["outputs"]["heatmaps_for"] = "all"
    outputs = outputs_for(result, source, config=config_all)
    assert outputs is not None and outputs.sr is not None
    assert len(outputs.heatmap_scs) == 2 and len(outputs.parametric_maps) == 2
    assert outputs.fhir_bundle is not None and len(outputs.fhir_bundle.entry) == 4
    kinds = {ds.SOPClassUID.name for ds in outputs.dicom()}
    assert kinds == {"Comprehensive 3D SR Storage", "Secondary Capture Image Storage", "Parametric Map Storage"}
    assert len({ds.SOPInstanceUID for ds in outputs.dicom()}) == 5
    assert {ds.StudyInstanceUID for ds in outputs.dicom()} == {source.StudyInstanceUID}
    paths = outputs.save(tmp_path)
    assert len(paths) == 6 and all(p.stat().st_size > 0 for p in paths)

    config = default_config()
    config["outputs"]["heatmap_sc"] = False
    config["outputs"]["parametric_map"] = False
    slim = outputs_for(result, source, config=config)
    assert slim is not None and slim.heatmap_scs == [] and slim.parametric_maps == []


def test_outputs_for_requires_the_model(rg1_paths):
    decision, rg = check_applicability(rg1_paths["RG1_UNCR"])
    result = ImageResult(sop_instance_uid=rg.sop_instance_uid, study_instance_uid=rg.study_instance_uid,
                         decision=decision, model=None, findings=_findings())
    with pytest.raises(ValueError) as info:
        outputs_for(result, rg.dataset)
    assert str(info.value) == MSG_NO_MODEL.format(sop=rg.sop_instance_uid)
