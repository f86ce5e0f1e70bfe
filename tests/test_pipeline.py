"""The pipeline core on real radiographs with the shipped demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_ai.dicom.sr import read_sr_findings
from cxr_ai.pipeline import InstanceStatus, Pipeline
from cxr_ai.results import HEATMAP_PARTS


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline()


def test_rg1_processed_with_all_outputs(pipeline: Pipeline, rg1_paths: dict[str, Path]) -> None:
    outcome = pipeline.process_instance(rg1_paths["RG1_J2KR"])
    assert outcome.status is InstanceStatus.PROCESSED, outcome.message
    source = pydicom.dcmread(rg1_paths["RG1_J2KR"], stop_before_pixels=True)
    keys = {f.key for f in outcome.result.findings}
    assert keys == {"cardiomegaly", "low_ef"}
    for f in outcome.result.findings:
        assert 0.0 <= f.probability <= 1.0
        assert f.heatmap is not None and f.heatmap.shape == (source.Rows, source.Columns)
    sops = {ds.SOPClassUID for ds in outcome.datasets}
    assert pydicom.uid.Comprehensive3DSRStorage in sops
    assert pydicom.uid.SecondaryCaptureImageStorage in sops
    assert pydicom.uid.ParametricMapStorage in sops
    for ds in outcome.datasets:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    sr = next(ds for ds in outcome.datasets if ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage)
    found = {f["key"]: f for f in read_sr_findings(sr)}
    for f in outcome.result.findings:
        assert found[f.key]["probability"] == pytest.approx(f.probability, abs=1e-4)
    assert outcome.fhir_bundle["resourceType"] == "Bundle"


def test_study_batch_equals_one_by_one(pipeline: Pipeline, rg1_paths: dict[str, Path]) -> None:
    paths = [rg1_paths["RG1_UNCR"], rg1_paths["RG1_UNCI"]]
    batch = pipeline.process_study(paths)
    single = [pipeline.process_instance(p) for p in paths]
    for a, b in zip(batch, single):
        for fa, fb in zip(a.result.findings, b.result.findings):
            assert fa.probability == pytest.approx(fb.probability, abs=1e-5)


_CREATION_TIMES = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
                   "DateOfSecondaryCapture", "TimeOfSecondaryCapture"}


def _without_times(ds: pydicom.Dataset) -> dict:
    return {el.keyword: el.value for el in ds if el.keyword not in _CREATION_TIMES and el.VR != "SQ"}


def test_results_first_then_heatmaps_gives_the_same_objects(pipeline: Pipeline, rg1_paths: dict[str, Path],
                                                             rg3_paths: dict[str, Path]) -> None:
    paths = [rg1_paths["RG1_UNCR"], rg3_paths["RG3_UNCR"], rg1_paths["RG1_UNCI"]]
    at_once = pipeline.process_study(paths)
    handed: list[list[tuple[str, list[str], bool]]] = []

    def on_results(outcomes) -> None:
        handed.append([(o.status.value, [str(ds.Modality) for ds in o.datasets], o.fhir_bundle is not None)
                       for o in outcomes])
        assert all(f.heatmap is None for o in outcomes if o.result for f in o.result.findings)

    phased = pipeline.process_study(paths, on_results=on_results)
    # the callback ran once, with the SR and FHIR of each accepted image and no heatmap object yet
    assert handed == [[("processed", ["SR"], True), ("not_applicable", [], False), ("processed", ["SR"], True)]]
    for a, b in zip(at_once, phased):
        assert a.status is b.status and a.reason == b.reason
        assert [ds.SOPInstanceUID for ds in a.datasets] == [ds.SOPInstanceUID for ds in b.datasets]
        for da, db in zip(a.datasets, b.datasets):
            assert _without_times(da) == _without_times(db)
        if a.result and a.result.findings:
            for fa, fb in zip(a.result.findings, b.result.findings):
                assert fa.probability == fb.probability
                assert (fa.heatmap == fb.heatmap).all()
    assert [str(ds.Modality) for ds in phased[0].datasets] == ["SR", "OT", "OT", "OT", "OT"]


def test_heatmap_captures_over_the_stage_one_display_equal_those_from_the_source(
        pipeline: Pipeline, rg1_paths: dict[str, Path]) -> None:
    """Stage 1 keeps the capture's background (made from the display image it computes for the
    model); the heatmap SCs over it are pixel for pixel those made from the source's pixels."""
    from cxr_ai.dicom.heatmap import ScDisplay
    from cxr_ai.outputs import outputs_for

    outcome, pre = pipeline.prepare(rg1_paths["RG1_UNCR"])
    assert isinstance(outcome.sc_display, ScDisplay)
    pipeline.infer([(outcome, pre)], source_maps=False)
    pipeline.build_outputs(outcome)  # no heatmap yet: the SR and FHIR only, the background is kept
    assert isinstance(outcome.sc_display, ScDisplay)
    pipeline.add_heatmaps([(outcome, pre)])
    pipeline.build_outputs(outcome, parts=HEATMAP_PARTS)
    assert outcome.sc_display is None  # dropped once the captures are made
    got = [ds for ds in outcome.datasets if ds.Modality == "OT" and "PixelData" in ds and ds.SamplesPerPixel == 3]
    source = pydicom.dcmread(rg1_paths["RG1_UNCR"])
    want = outputs_for(outcome.result, source, config=pipeline.config, include=("heatmap_sc",)).heatmap_scs
    assert len(got) == len(want) >= 1
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)


def test_lossless_encodings_give_identical_probabilities(pipeline: Pipeline, rg1_paths: dict[str, Path]) -> None:
    a, b = pipeline.process_study([rg1_paths["RG1_UNCR"], rg1_paths["RG1_J2KR"]])
    assert [f.probability for f in a.result.findings] == [f.probability for f in b.result.findings]


def test_rejections_and_failures_have_reasons(pipeline: Pipeline, rg3_paths: dict[str, Path],
                                              data_store_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 300)
    outcomes = pipeline.process_study([rg3_paths["RG3_UNCR"], data_store_dir / "693_UNCR.dcm", junk])
    assert [(o.status, o.reason) for o in outcomes] == [
        (InstanceStatus.NOT_APPLICABLE, "body_part"),
        (InstanceStatus.NOT_APPLICABLE, "modality"),
        (InstanceStatus.FAILED, "not_dicom"),
    ]
    for o in outcomes:
        assert o.datasets == [] and o.fhir_bundle is None and o.message


def test_undecodable_pixels_fail_with_reason(pipeline: Pipeline, rg1_paths: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    path = tmp_path / "short.dcm"
    ds.save_as(path)
    (outcome,) = pipeline.process_study([path])
    assert outcome.status is InstanceStatus.FAILED and outcome.reason == "decode_failed"
    assert "short.dcm" in outcome.message and outcome.datasets == []
