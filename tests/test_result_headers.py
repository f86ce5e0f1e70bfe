"""Every result object of a study, as a PACS and a viewer receive it: patient and study
attributes identical across all kinds (SR, heatmap SC, Parametric Map), series attributes
identical within each series, the algorithm as contributing equipment, heatmaps only for
positive findings by default, and no probability printed as certainty. Checked with
dicom3tools ``dciodvfy``, dcmtk ``dsrdump`` and highdicom's reader on the real RG1 radiograph.
"""

from __future__ import annotations

import copy
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
from cxr_ai.dicom.gate import GateDecision, GateReason
from cxr_ai.dicom.headers import PATIENT_STUDY_KEYWORDS, SERIES_KEYWORDS
from cxr_ai.dicom.heatmap import sc_text_lines
from cxr_ai.dicom.sr import read_sr_findings
from cxr_ai.outputs import MSG_HEATMAPS_FOR, outputs_for
from cxr_ai.errors import ConfigError
from cxr_ai.fhir import build_bundle
from cxr_ai.results import FindingResult, ImageResult, ModelInfo, format_probability

MODEL = ModelInfo(name="cxr-ai-demo", version="0.3.1", device_uid="2.25.314159265358979323846264338327950288",
                  manufacturer="cxr-ai project")


@pytest.fixture(scope="module")
def source(rg1_paths) -> Dataset:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
    ds.IssuerOfPatientID = "HOSP_A"
    ds.EthnicGroup = "Black"
    ds.PatientAge = "061Y"
    ds.OtherPatientIDsSequence = [Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = "77-1"
    ds.OtherPatientIDsSequence[0].IssuerOfPatientID = "HOSP_B"
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    return ds


def _image(source: Dataset, i: int) -> Dataset:
    ds = copy.deepcopy(source)
    ds.SOPInstanceUID = f"{source.SOPInstanceUID}.{i}"
    return ds


def _findings(ds: Dataset, seed: int) -> list[FindingResult]:
    heat = np.random.default_rng(seed).random((int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    return [FindingResult("cardiomegaly", "Cardiomegaly", 0.9989, 0.5, heatmap=heat),
            FindingResult("low_ef", "Low ejection fraction", 0.0004, 0.35, heatmap=heat)]


def _outputs(source: Dataset, *, heatmaps_for: str, n_images: int = 2, segmentation: bool = True) -> list[Dataset]:
    cfg = default_config()
    cfg["outputs"].update(sc_max_side=256, heatmaps_for=heatmaps_for, segmentation=segmentation)
    objects: list[Dataset] = []
    for i in range(n_images):
        ds = _image(source, i)
        result = ImageResult(ds.SOPInstanceUID, ds.StudyInstanceUID, GateDecision(True, GateReason.ACCEPTED, "ok"),
                             model=MODEL, findings=_findings(ds, i))
        objects += outputs_for(result, ds, config=cfg).dicom()
    return objects


@pytest.fixture(scope="module")
def study_all(source) -> list[Dataset]:
    return _outputs(source, heatmaps_for="all")


def _value(ds: Dataset, keyword: str) -> object:
    if keyword not in ds or ds[keyword].value in (None, "", []):
        return None
    elem = ds[keyword]
    return [item.to_json_dict() for item in elem.value] if elem.VR == "SQ" else str(elem.value)


def test_every_object_kind_is_there(study_all) -> None:
    kinds = sorted({ds.SOPClassUID.name for ds in study_all})
    assert kinds == ["Comprehensive 3D SR Storage", "Parametric Map Storage", "Secondary Capture Image Storage",
                     "Segmentation Storage"]
    assert len(study_all) == 2 * (1 + 2 + 2 + 2)


def test_patient_and_study_attributes_are_the_same_in_every_object(source, study_all) -> None:
    present = [k for k in PATIENT_STUDY_KEYWORDS if _value(source, k) is not None]
    assert {"IssuerOfPatientID", "PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "EthnicGroup",
            "OtherPatientIDsSequence", "PatientAge"} <= set(present)
    for keyword in present:
        values = {ds.SOPClassUID.name: _value(ds, keyword) for ds in study_all}
        assert all(v == _value(source, keyword) for v in values.values()), (keyword, values)
    # the FHIR result names the same patient
    bundle = build_bundle(_image(source, 0), MODEL, _findings(source, 0))
    subject = next(e.resource for e in bundle.entry if e.resource.get_resource_type() == "Observation").subject
    assert subject.identifier.value == str(source.PatientID)


def test_series_attributes_are_identical_within_each_series(study_all) -> None:
    series: dict[str, list[Dataset]] = {}
    for ds in study_all:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    assert len(series) == 4  # one series per object kind per study
    for uid, members in series.items():
        assert len(members) >= 2
        for keyword in SERIES_KEYWORDS:
            values = {str(_value(ds, keyword)) for ds in members}
            assert len(values) == 1, (uid, keyword, values)
        assert len({str(ds.SOPClassUID) for ds in members}) == 1
    # the finding is named per instance instead
    pms = [ds for ds in study_all if ds.SOPClassUID.name == "Parametric Map Storage"]
    assert {ds.ContentLabel for ds in pms} == {"CARDIOMEGALY_MAP", "LOW_EF_MAP"}
    scs = [ds for ds in study_all if ds.SOPClassUID.name == "Secondary Capture Image Storage"]
    assert {"Cardiomegaly", "Low ejection fraction"} <= {ds.DerivationDescription.split(" by ")[0].split(" of ")[1]
                                                         for ds in scs}


def test_contributing_equipment_names_the_algorithm_first(study_all) -> None:
    for ds in study_all:
        items = ds.ContributingEquipmentSequence
        first = items[0]
        purpose = first.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == (codes.PROCESSING_EQUIPMENT.value, "DCM")
        assert first.Manufacturer == MODEL.manufacturer
        assert first.ManufacturerModelName == MODEL.name
        assert first.SoftwareVersions == MODEL.version
        assert first.DeviceUID == MODEL.device_uid
        assert not any("highdicom" in str(item.get("ManufacturerModelName", "")).lower() for item in items)
        assert not any("highdicom" in str(item.get("Manufacturer", "")).lower() for item in items)


def test_heatmaps_for_positive_findings_by_default_and_the_sr_still_reports_absent(source) -> None:
    objects = _outputs(source, heatmaps_for="positive", n_images=1, segmentation=False)
    pms = [ds for ds in objects if ds.SOPClassUID.name == "Parametric Map Storage"]
    scs = [ds for ds in objects if ds.SOPClassUID.name == "Secondary Capture Image Storage"]
    assert [ds.ContentLabel for ds in pms] == ["CARDIOMEGALY_MAP"] and len(scs) == 1
    sr = next(ds for ds in objects if ds.Modality == "SR")
    found = {f["key"]: f for f in read_sr_findings(sr)}
    assert found["low_ef"]["present"] is False and found["low_ef"]["probability"] == pytest.approx(0.0004)
    assert found["cardiomegaly"]["present"] is True
    assert default_config()["outputs"]["heatmaps_for"] == "positive"
    cfg = default_config()
    cfg["outputs"]["heatmaps_for"] = "negative"
    ds = _image(source, 9)
    result = ImageResult(ds.SOPInstanceUID, ds.StudyInstanceUID, GateDecision(True, GateReason.ACCEPTED, "ok"),
                         model=MODEL, findings=_findings(ds, 9))
    with pytest.raises(ConfigError) as info:
        outputs_for(result, ds, config=cfg)
    assert str(info.value) == MSG_HEATMAPS_FOR.format(value="negative")


@pytest.mark.parametrize("p,text", [(0.9989, "> 0.99"), (0.99, "0.99"), (0.995, "> 0.99"), (0.5, "0.50"),
                                    (0.0104, "0.01"), (0.0099, "< 0.01"), (0.0, "< 0.01"), (1.0, "> 0.99")])
def test_probabilities_never_print_as_certainty(p, text) -> None:
    assert format_probability(p) == text


def test_images_and_reports_use_the_bounded_probability(source) -> None:
    cm, ef = _findings(source, 0)
    assert sc_text_lines(cm, MODEL)[0].startswith("Cardiomegaly: POSITIVE  p > 0.99 (threshold 0.50)")
    assert sc_text_lines(ef, MODEL)[0].startswith("Low ejection fraction: negative  p < 0.01 (threshold 0.35)")
    bundle = build_bundle(_image(source, 0), MODEL, [cm, ef])
    report = next(e.resource for e in bundle.entry if e.resource.get_resource_type() == "DiagnosticReport")
    assert "probability > 0.99" in report.conclusion and "probability < 0.01" in report.conclusion
    assert "1.00" not in report.conclusion and "0.00," not in report.conclusion


def test_all_objects_pass_dciodvfy_dsrdump_and_highdicom(study_all, tmp_path, dciodvfy) -> None:
    for ds in study_all:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.errors == [], (ds.SOPClassUID.name, report.errors)
        if ds.Modality == "SR":
            assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)
            dump = subprocess.run([shutil.which("dsrdump") or "dsrdump", str(path)], capture_output=True, text=True,
                                  check=False)
            assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout, dump.stderr
        elif ds.SOPClassUID.name == "Segmentation Storage":
            seg = hd.seg.segread(path)
            assert seg.SegmentationType == "FRACTIONAL" and seg.get("FrameOfReferenceUID") is None
        elif ds.SOPClassUID.name == "Parametric Map Storage":
            assert hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path)).ContentLabel.endswith("_MAP")
        else:
            image = hd.imread(path)  # highdicom reads it back as an image
            assert image.BurnedInAnnotation == "YES" and image.SamplesPerPixel == 3


def test_segmentation_overlays_the_source_pixel_for_pixel(source) -> None:
    """The opt-in Segmentation: one FRACTIONAL frame on the one source frame, found through
    the references a 2D viewer uses (ReferencedSeriesSequence, per-frame Source Image), the
    heat stored to within one 8-bit step; off by default."""
    from cxr_ai.dicom.segmentation import stored_fraction

    assert default_config()["outputs"]["segmentation"] is False
    assert not [d for d in _outputs(source, heatmaps_for="all", n_images=1, segmentation=False)
                if d.SOPClassUID.name == "Segmentation Storage"]
    objects = _outputs(source, heatmaps_for="positive", n_images=1)
    segs = [d for d in objects if d.SOPClassUID.name == "Segmentation Storage"]
    assert len(segs) == 1
    seg = segs[0]
    image = _image(source, 0)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.SeriesInstanceUID
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert (seg.Rows, seg.Columns) == (image.Rows, image.Columns)
    heat = _findings(image, 0)[0].heatmap
    assert np.abs(stored_fraction(seg) - heat).max() <= 0.5 / 255 + 1e-6
    item = seg.SegmentSequence[0]
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.CARDIOMEGALY.value
    assert item.SegmentAlgorithmType == "AUTOMATIC"
