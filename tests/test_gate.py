"""The applicability gate on real files: accepts RG1, rejects everything else with its reason."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from cxr_ai.config import load_config
from cxr_ai.dicom.gate import GateReason, GateRules, check_applicability
from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.errors import ConfigError

NON_RADIOGRAPHS = {
    # file -> expected reason
    "693_UNCR": GateReason.MODALITY,  # CT
    "693_J2KR": GateReason.MODALITY,
    "MR2_UNCR": GateReason.MODALITY,  # MR
    "MR-SIEMENS-DICOM-WithOverlays": GateReason.MODALITY,
    "US1_UNCR": GateReason.MODALITY,  # US, colour
    "OBXXXX1A_rle": GateReason.MODALITY,  # US, palette colour
    "JPEG-LL": GateReason.MODALITY,  # NM
    "SC_rgb": GateReason.MODALITY,  # colour secondary capture
    "SC_ybr_full_uncompressed": GateReason.MODALITY,
    "emri_small": GateReason.MODALITY,  # enhanced MR, multi-frame
    "liver": GateReason.MODALITY,  # segmentation
}


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KR", "RG1_UNCI", "RG1_J2KI"])
def test_rg1_accepted(rg1_paths: dict[str, Path], name: str) -> None:
    decision, rg = check_applicability(rg1_paths[name])
    assert decision.accepted, decision.message
    assert decision.reason is GateReason.ACCEPTED
    assert rg is not None and rg.sop_instance_uid


@pytest.mark.parametrize("name", ["RG3_UNCR", "RG3_J2KR", "RG3_UNCI", "RG3_J2KI"])
def test_rg3_tibia_rejected_for_body_part(rg3_paths: dict[str, Path], name: str) -> None:
    decision, _ = check_applicability(rg3_paths[name])
    assert not decision.accepted
    assert decision.reason is GateReason.BODY_PART
    assert "EXTREMITY" in decision.message and "chest" in decision.message


@pytest.mark.parametrize("name,reason", sorted(NON_RADIOGRAPHS.items()))
def test_non_radiographs_rejected(data_store_dir: Path, name: str, reason: GateReason) -> None:
    decision, rg = check_applicability(data_store_dir / f"{name}.dcm")
    assert not decision.accepted
    assert decision.reason is reason
    assert rg is not None and rg.modality in decision.message


def test_every_pydicom_data_file_gets_a_decision(data_store_dir: Path) -> None:
    """Nothing in the corpus crashes the gate; only RG1 is accepted."""
    accepted = []
    for path in sorted(data_store_dir.glob("*.dcm")):
        decision, _ = check_applicability(path)
        assert decision.message
        if decision.accepted:
            accepted.append(path.stem)
    assert sorted(accepted) == ["RG1_J2KI", "RG1_J2KR", "RG1_UNCI", "RG1_UNCR"]


def _rg1(rg1_paths: dict[str, Path]) -> pydicom.Dataset:
    return pydicom.dcmread(rg1_paths["RG1_UNCR"])


def test_lateral_rejected(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1(rg1_paths)
    for view in ("LL", "RL", "LATERAL"):
        ds.ViewPosition = view
        decision, _ = check_applicability(ds)
        assert decision.reason is GateReason.VIEW and view in decision.message


def test_empty_body_part_uses_descriptions(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1(rg1_paths)
    ds.BodyPartExamined = ""
    ds.StudyDescription = "XR ABDOMEN 1 VIEW"
    ds.SeriesDescription = ""
    ds.ProtocolName = ""
    assert check_applicability(ds)[0].reason is GateReason.BODY_PART
    for field, text in [("StudyDescription", "CXR portable"), ("SeriesDescription", "Chest PA"),
                        ("ProtocolName", "THORAX AP")]:
        ds.StudyDescription = ds.SeriesDescription = ds.ProtocolName = ""
        setattr(ds, field, text)
        assert check_applicability(ds)[0].accepted, text


def test_portable_chest_body_part_accepted(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1(rg1_paths)
    for part in ("THORAX", "PORT CHEST", "chest"):
        ds.BodyPartExamined = part
        assert check_applicability(ds)[0].accepted, part


def test_empty_view_position_lateral_description_rejected(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1(rg1_paths)
    ds.ViewPosition = ""
    ds.SeriesDescription = "CHEST LAT"
    assert check_applicability(ds)[0].reason is GateReason.VIEW
    ds.SeriesDescription = "CHEST"
    decision = check_applicability(ds)[0]
    assert decision.accepted and any("ViewPosition" in w for w in decision.warnings)


def test_no_pixel_data_rejected(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1(rg1_paths)
    del ds.PixelData
    decision, _ = check_applicability(ds)
    assert decision.reason is GateReason.NO_PIXEL_DATA


def test_dx_for_processing_rejected(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1(rg1_paths)
    ds.Modality = "DX"
    ds.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForProcessing
    assert check_applicability(ds)[0].reason is GateReason.SOP_CLASS
    ds.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    assert check_applicability(ds)[0].accepted


def test_small_image_rejected(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1(rg1_paths)
    ds.Rows, ds.Columns = 64, 64
    decision, _ = check_applicability(read_radiograph(ds))
    assert decision.reason is GateReason.IMAGE_SIZE and "64x64" in decision.message


def test_non_dicom_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    decision, rg = check_applicability(path)
    assert rg is None
    assert decision.reason is GateReason.NOT_DICOM and "report.pdf" in decision.message


def test_rules_are_data(rg1_paths: dict[str, Path], tmp_path: Path) -> None:
    """A site config can widen or narrow the rules without code changes."""
    cfg = tmp_path / "site.toml"
    cfg.write_text('[gate]\nmodalities = ["DX"]\n')
    rules = GateRules.from_config(load_config(cfg))
    assert check_applicability(rg1_paths["RG1_UNCR"], rules)[0].reason is GateReason.MODALITY
    env_rules = GateRules.from_config(load_config(env={"CXR_AI__GATE__MIN_SIDE": "2000"}))
    assert check_applicability(rg1_paths["RG1_UNCR"], env_rules)[0].reason is GateReason.IMAGE_SIZE


def test_config_typo_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text("[gate]\nmodality = ['CR']\n")
    with pytest.raises(ConfigError, match="unknown setting 'gate.modality'"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_written_site_config_reads_back(tmp_path: Path) -> None:
    from cxr_ai.config import config_to_toml

    path = tmp_path / "site.toml"
    path.write_text(config_to_toml({"gate": {"min_side": 512, "modalities": ["DX"], "accept_unknown_view": False}}))
    rules = GateRules.from_config(load_config(path))
    assert (rules.min_side, rules.modalities, rules.accept_unknown_view) == (512, frozenset({"DX"}), False)
