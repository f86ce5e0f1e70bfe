"""The typed result objects of one image (cxr_ai.outputs): built in two parts and merged, each
object's kind carried to the drivers, and each kind's names on disk.

Built by the real writers from a real radiograph (RG1) with fixed findings and heatmaps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_ai.config import default_config
from cxr_ai.dicom.gate import check_applicability
from cxr_ai.outputs import (
    FHIR_BUNDLE_FILE,
    ImageOutputs,
    OutputKind,
    batch_fhir_name,
    batch_name,
    download_fhir_name,
    download_name,
    listener_fhir_name,
    listener_glob,
    listener_kind,
    listener_name,
    outputs_for,
    stored_kind,
)
from cxr_ai.results import HEATMAP_PARTS, RESULT_PARTS, FindingResult, ImageResult, ModelInfo

pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\" is unlikely:UserWarning")

DEMO = ModelInfo(name="cxr-ai-demo", version="0.1.0", device_uid="2.25.271828182845904523536028747135266249")
K = OutputKind


@pytest.fixture(scope="module")
def built(rg1_paths: dict[str, Path]) -> tuple[ImageResult, pydicom.Dataset, dict]:
    decision, rg = check_applicability(rg1_paths["RG1_UNCR"])
    assert decision.accepted and rg is not None
    rows, cols = rg.rows, rg.columns
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    heat = np.exp(-(((yy - 0.6 * rows) / (0.15 * rows)) ** 2 + ((xx - 0.55 * cols) / (0.17 * cols)) ** 2))
    result = ImageResult(rg.sop_instance_uid, rg.study_instance_uid, decision, model=DEMO, findings=[
        FindingResult("cardiomegaly", "Cardiomegaly", 0.83, 0.5, heatmap=heat),
        FindingResult("low_ef", "Low EF", 0.21, 0.35, heatmap=heat[::-1].copy())])
    config = default_config()
    config["outputs"]["heatmaps_for"] = "all"
    config["outputs"]["segmentation"] = True
    return result, rg.dataset, config


def test_result_parts_then_heatmap_parts_merge_into_one_build(built) -> None:
    result, source, config = built
    whole = outputs_for(result, source, config=config)
    first = outputs_for(result, source, config=config, include=RESULT_PARTS)
    later = outputs_for(result, source, config=config, include=HEATMAP_PARTS)
    assert whole is not None and first is not None and later is not None
    assert [k for k, _ in first.objects()] == [K.SR] and first.fhir_bundle is not None
    assert later.sr is None and later.fhir_bundle is None
    merged = first.merged(later)
    assert [k for k, _ in merged.objects()] == [K.SR, K.SC, K.SC, K.PM, K.PM, K.SEG, K.SEG]
    assert [k for k, _ in merged.objects()] == [k for k, _ in whole.objects()]
    assert [ds.SOPInstanceUID for ds in merged.dicom()] == [ds.SOPInstanceUID for ds in whole.dicom()]
    # the bundle is the result parts' one (its "issued" time is when it was built)
    assert merged.fhir_bundle is first.fhir_bundle and merged.fhir_json() == first.fhir_json()
    assert merged.fhir_json()["resourceType"] == "Bundle"
    # neither part changed
    assert [k for k, _ in first.objects()] == [K.SR] and later.sr is None and later.fhir_json() is None
    assert [(k, n) for k, n, _ in merged.numbered()] == [
        (K.SR, 1), (K.SC, 1), (K.SC, 2), (K.PM, 1), (K.PM, 2), (K.SEG, 1), (K.SEG, 2)]
    assert ImageOutputs().empty and not first.empty and not ImageOutputs(fhir_bundle=first.fhir_bundle).empty


def test_each_kind_is_what_it_is_stored_as(built, tmp_path: Path) -> None:
    result, source, config = built
    outputs = outputs_for(result, source, config=config)
    assert outputs is not None
    for kind, ds in outputs.objects():
        assert ds.SOPClassUID == kind.sop_class_uid and stored_kind(ds) is kind
    paths = outputs.save(tmp_path)
    assert sorted(p.name for p in paths) == sorted([f"{ds.SOPInstanceUID}.dcm" for ds in outputs.dicom()]
                                                   + [FHIR_BUNDLE_FILE])
    back = {str(d.SOPInstanceUID): stored_kind(d)
            for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths if p.suffix == ".dcm")}
    assert back == {str(ds.SOPInstanceUID): kind for kind, ds in outputs.objects()}
    assert stored_kind(source) is None  # a source image is not a result object


def test_names_on_disk_per_kind() -> None:
    assert [listener_name(k, "1.2.3") for k in K] == ["SR-1.2.3.dcm", "SC-1.2.3.dcm", "PM-1.2.3.dcm", "SEG-1.2.3.dcm"]
    assert all(listener_kind(listener_name(k, "1.2.3")) is k for k in K)
    assert listener_glob(K.PM) == "PM-*.dcm" and listener_fhir_name("9.8") == "fhir-9.8.json"
    for other in ("fhir-9.8.json", "summary.json", "KO-1.2.dcm", "SR.dcm", "SR-1.2.json"):
        assert listener_kind(other) is None, other
    assert [batch_name("9.8", k, 2) for k in K] == ["9.8_sr2.dcm", "9.8_sc2.dcm", "9.8_pm2.dcm", "9.8_obj2.dcm"]
    assert batch_fhir_name("9.8") == "9.8_fhir.json"
    assert download_name("chest", K.PM, 1) == "chest-PM-1.dcm" and download_fhir_name("chest") == "chest-fhir-bundle.json"
