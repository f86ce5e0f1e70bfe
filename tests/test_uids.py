"""Result identity: deterministic per source instance, study, patient and model; never shared
across patients or studies (a SOP Instance UID reused by a sender must not make one patient's
result replace another's)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.dataset import Dataset

from cxr_ai.dicom.heatmap import build_heatmap_sc
from cxr_ai.dicom.parametric_map import build_parametric_map
from cxr_ai.dicom.sr import build_sr
from cxr_ai.dicom.uids import ResultIdentity, output_uid, patient_study_fingerprint
from cxr_ai.phantoms import make_phantom_dataset
from cxr_ai.results import FindingResult, ModelInfo
from cxr_ai.dicom.uids import is_valid_uid

MODEL = ModelInfo(name="cxr-ai-demo", version="0.1.0", device_uid="2.25.271828182845904523536028747135266249")
MODEL_2 = ModelInfo(name="cxr-ai-demo", version="0.2.0", device_uid="2.25.314159265358979323846264338327950288")


@pytest.fixture(scope="module")
def source() -> Dataset:
    ds = make_phantom_dataset(size=128, random_state=3)
    ds.PatientID = "P-0001"
    ds.IssuerOfPatientID = "HOSP-A"
    return ds


def _variant(ds: Dataset, **changes: str) -> Dataset:
    other = copy.deepcopy(ds)
    for k, v in changes.items():
        setattr(other, k, v)
    return other


def _finding(ds: Dataset) -> FindingResult:
    yy, xx = np.mgrid[0:ds.Rows, 0:ds.Columns].astype(np.float32)
    heat = np.exp(-(((yy - 0.6 * ds.Rows) / 20) ** 2 + ((xx - 0.5 * ds.Columns) / 20) ** 2))
    return FindingResult("cardiomegaly", "Cardiomegaly", 0.81, 0.5, heatmap=heat)


def _all_uids(ds: Dataset, model: ModelInfo = MODEL) -> dict[str, str]:
    finding = _finding(ds)
    sr = build_sr(ds, model, [finding])
    sc = build_heatmap_sc(ds, finding, model, display_image=np.zeros((ds.Rows, ds.Columns), np.float32))
    pm = build_parametric_map(ds, finding, model)
    tracking = sr.ContentSequence  # content tree; tracking UIDs are found by walking it
    uids = {
        "sr": sr.SOPInstanceUID, "sr_series": sr.SeriesInstanceUID,
        "sc": sc.SOPInstanceUID, "sc_series": sc.SeriesInstanceUID,
        "pm": pm.SOPInstanceUID, "pm_series": pm.SeriesInstanceUID,
        "pm_frame_of_reference": pm.FrameOfReferenceUID,
    }
    found = []
    def walk(items):
        for item in items:
            if getattr(item, "ValueType", "") == "UIDREF":
                found.append(item.UID)
            walk(getattr(item, "ContentSequence", []))
    walk(tracking)
    uids["tracking"] = "|".join(sorted(found))
    assert found, "the SR carries tracking UIDs"
    return {k: str(v) for k, v in uids.items()}


def test_result_uids_are_deterministic_and_valid(source):
    first, again = _all_uids(source), _all_uids(copy.deepcopy(source))
    assert first == again  # a resend replaces
    for key, uid in first.items():
        for part in uid.split("|"):
            assert is_valid_uid(part), (key, part)


@pytest.mark.parametrize("changes", [
    {"PatientID": "P-0002"},
    {"IssuerOfPatientID": "HOSP-B"},
    {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.99"},
])
def test_same_sop_uid_for_another_patient_or_study_gives_other_uids(source, changes):
    other = _variant(source, **changes)
    assert other.SOPInstanceUID == source.SOPInstanceUID
    mine, theirs = _all_uids(source), _all_uids(other)
    for key in mine:
        assert mine[key] != theirs[key], key
    # the source reference stays the (shared) SOP Instance UID
    assert build_sr(other, MODEL, [_finding(other)]).SOPInstanceUID != build_sr(source, MODEL, [_finding(source)]).SOPInstanceUID


def test_another_model_version_gives_other_result_uids_but_the_same_frame_of_reference(source):
    a, b = _all_uids(source, MODEL), _all_uids(source, MODEL_2)
    for key in a:
        if key == "pm_frame_of_reference":
            assert a[key] == b[key]  # the image plane is the model's business no more than the patient's
        else:
            assert a[key] != b[key], key


def test_identity_parts_are_joined_unambiguously():
    a = ResultIdentity("1.2.3", "1.2.4", "AB", "C", "2.25.1")
    b = ResultIdentity("1.2.3", "1.2.4", "A", "BC", "2.25.1")
    assert a.sr_uid() != b.sr_uid()
    assert output_uid("ab", "c") != output_uid("a", "bc")
    assert patient_study_fingerprint(study_instance_uid="1.2", patient_id="AB", issuer_of_patient_id="C") != \
        patient_study_fingerprint(study_instance_uid="1.2", patient_id="A", issuer_of_patient_id="BC")
