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


# --- BodyPartExamined and descriptions as real archives write them ---------------------------
# Values found in public header collections and public code that reads them:
#   MIDRC  - the body_part_examined vocabulary of the MIDRC data commons (COVID-19-NY-SBU,
#            COVID-19-AR, RICORD, Open-A1/R1), as listed by a public MIDRC download client;
#   PACS   - BodyPartExamined of CR/DX studies in a public research-PACS query script;
#   TCIA   - BodyPartExamined values across TCIA collections (a public TCIA tutorial);
#   MIMIC  - MIMIC-CXR procedure descriptions (MIT-LCP/mimic-code issue 1513);
#   pydicom- headers of the CR files shipped in pydicom's test data (chrJapMulti.dcm,
#            dicomdirtests/77654033/CR*) and NEMA WG04 RG1 (pydicom-data);
#   PS3.16 - DICOM's Body Part Examined defined terms (Annex L, as shipped in highdicom).
FRONTAL_CHEST_BODY_PARTS = [
    "CHEST", "Chest", "THORAX", "Thorax", "CXR", "cxr", "LUNG",  # MIDRC, PACS, TCIA
    "PORT CHEST",  # MIDRC (COVID-19-NY-SBU portable AP films), PACS, TCIA
    "PORTABLE CHEST", "Chest portable", "PEDIATRIC CHEST", "CHEST LUNG",  # MIDRC, PACS
    "CHEST (THORAX)", "CHEST PA X-WISE",  # TCIA, MIDRC
    "XR Chest 1 View Portable", "XR CHEST PA_AP P", "CHEST,2 VIEWS",  # PACS
    "AP PORTABLE CHE",  # TCIA: cut at the 16 characters a CS value holds
]
NON_CHEST_BODY_PARTS = [
    "T SPINE", "TSPINE", "T-spine", "L SPINE", "PORT L SPINE", "PORT C SPINE", "CSPINE",  # PACS, MIDRC
    "CERVICAL_SPINE", "LUMBAR_SPINE", "SPINE THORACOLUM", "CERVICOTHORACIC", "FULL SPINE AP",
    "Scoliosis", "STERNUM", "RIB", "RIBS", "Ribs", "SHOULDER", "SHOULDER_SCAPULA", "CLAVICLE",
    "ABDOMEN", "PORT ABDOMEN", "CHESTABDOMEN", "CHEST_ABDOMEN", "CHEST ABD PELVIS", "CHSTABDPELV",
    "THORAXABD", "NECK CHEST", "CHEST_TO_PELVIS", "CHEST_LOW EXT", "BABYGRAM", "SHUNT SERIES",
    "EXTREMITY", "SKULL", "HEAD",
]


def _rg1_with(rg1_paths: dict[str, Path], **headers: str) -> pydicom.Dataset:
    ds = _rg1(rg1_paths)
    for key in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        setattr(ds, key, "")
    for key, value in headers.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("body_part", FRONTAL_CHEST_BODY_PARTS)
def test_real_frontal_chest_body_parts_accepted(rg1_paths: dict[str, Path], body_part: str) -> None:
    for view in ("PA", "AP"):
        decision = check_applicability(_rg1_with(rg1_paths, BodyPartExamined=body_part, ViewPosition=view))[0]
        assert decision.accepted, decision.message


@pytest.mark.parametrize("body_part", NON_CHEST_BODY_PARTS)
def test_real_non_chest_body_parts_refused(rg1_paths: dict[str, Path], body_part: str) -> None:
    decision = check_applicability(_rg1_with(rg1_paths, BodyPartExamined=body_part, ViewPosition="AP"))[0]
    assert decision.reason is GateReason.BODY_PART, decision.message
    assert repr(body_part.upper()) in decision.message


def test_every_dicom_defined_term_but_chest_is_refused(rg1_paths: dict[str, Path]) -> None:
    """PS3.16 Annex L: of its ~300 Body Part Examined terms, CHEST and THORAX (both SCT 816094009
    Chest), LUNG and HEART pass; every other term, and every code meaning used as the study
    description with BodyPartExamined empty, is refused (THORACICAORTA, TSPINE "Thoracic spine",
    CHESTABDOMEN, NECKCHEST, RIB, SHOULDER, ...)."""
    import json

    import highdicom

    table = json.loads((Path(highdicom.__file__).parent / "_standard" / "anatomic_regions.json").read_text())
    assert len(table) > 250
    by_term, by_meaning = set(), set()
    for term, (_scheme, code, meaning, _laterality) in table.items():
        if check_applicability(_rg1_with(rg1_paths, BodyPartExamined=term))[0].accepted:
            by_term.add(term)
        if check_applicability(_rg1_with(rg1_paths, BodyPartExamined="", StudyDescription=meaning))[0].accepted:
            by_meaning.add(meaning)
    assert table["CHEST"][1] == table["THORAX"][1] == "816094009"
    assert by_term == {"CHEST", "THORAX", "LUNG", "HEART"}
    assert by_meaning == {"Chest", "Lung", "Heart"}


def test_view_position_decides_an_examination_named_pa_and_lateral(rg1_paths: dict[str, Path]) -> None:
    """PACS: "XR CHEST 2 VIEWS PA + LAT" names the examination, which holds a PA image too."""
    for body_part in ("XR CHEST 2 VIEWS PA + LAT", "XR Chest 2 Views PA + Lateral", "CHEST LAT", "CHEST LATERAL"):
        ds = _rg1_with(rg1_paths, BodyPartExamined=body_part, ViewPosition="PA")
        assert check_applicability(ds)[0].accepted, body_part
        ds.ViewPosition = "LL"
        assert check_applicability(ds)[0].reason is GateReason.VIEW
        ds.ViewPosition = ""
        decision = check_applicability(ds)[0]
        assert decision.reason is GateReason.VIEW and "LAT" in decision.message, body_part


def test_real_descriptions_decide_when_body_part_is_empty(rg1_paths: dict[str, Path]) -> None:
    chest = {
        "StudyDescription": ["CHEST (PORTABLE AP)", "THORAX", "Chest", "TORAX PA/AP", "XR Chest 1 View Portable"],
        "SeriesDescription": ["Chest PA PA", "CHEST,SINGLE VIEW"],
    }
    for field, values in chest.items():
        for value in values:
            decision = check_applicability(_rg1_with(rg1_paths, BodyPartExamined="", **{field: value}))[0]
            assert decision.accepted, (value, decision.message)
    not_chest = ["XR C Spine Comp Min 4 Views", "XR SPINE LUMBAR 2-3 VIEWS", "T-spine", "Thoracic spine",
                 "Thoracic aorta", "Chest and Abdomen", "CHEST RIBS", "Neck and Chest", "Shoulder"]
    for value in not_chest:
        decision = check_applicability(_rg1_with(rg1_paths, BodyPartExamined="", StudyDescription=value))[0]
        assert decision.reason is GateReason.BODY_PART, (value, decision.message)


def test_series_naming_another_region_refused_even_if_body_part_says_chest(rg1_paths: dict[str, Path]) -> None:
    ds = _rg1_with(rg1_paths, BodyPartExamined="CHEST", SeriesDescription="T-spine", ViewPosition="AP")
    decision = check_applicability(ds)[0]
    assert decision.reason is GateReason.BODY_PART and "SPINE" in decision.message
    # the study description may span several examinations: it does not refuse a chest image
    ds = _rg1_with(rg1_paths, BodyPartExamined="CHEST", StudyDescription="CHEST AND ABDOMEN", ViewPosition="AP")
    assert check_applicability(ds)[0].accepted


def test_placeholder_body_part_falls_back_to_descriptions(rg1_paths: dict[str, Path]) -> None:
    """MIDRC and TCIA hold "UNKNOWN", "DEFAULT", "UNDEFINED": they say nothing about the region."""
    for placeholder in ("UNKNOWN", "DEFAULT", "UNDEFINED"):
        ds = _rg1_with(rg1_paths, BodyPartExamined=placeholder, SeriesDescription="Chest PA PA")
        decision = check_applicability(ds)[0]
        assert decision.accepted and any(placeholder in w for w in decision.warnings), placeholder
        ds.SeriesDescription = ""
        assert check_applicability(ds)[0].reason is GateReason.BODY_PART


def test_headers_that_say_nothing_are_refused(rg1_paths: dict[str, Path]) -> None:
    """No body part, no view, no descriptions: refused on metadata alone, saying what to set."""
    ds = _rg1_with(rg1_paths, BodyPartExamined="", ViewPosition="")
    decision = check_applicability(ds)[0]
    assert decision.reason is GateReason.BODY_PART
    assert "BodyPartExamined=CHEST" in decision.message


def test_real_cervical_spine_radiographs_refused() -> None:
    """pydicom's dicomdirtests hold a real CR cervical spine series: AP, obliques and lateral."""
    root = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033"
    paths = sorted(p for p in root.glob("CR*/*") if p.is_file())
    assert len(paths) == 3
    for path in paths:
        decision, rg = check_applicability(path)
        assert rg is not None and rg.body_part == "CSPINE"
        assert decision.reason is GateReason.BODY_PART and "CSPINE" in decision.message


def test_pydicom_chest_headers_accepted(rg1_paths: dict[str, Path]) -> None:
    """Header values of pydicom's CR chest file (BodyPartExamined CHEST, PA, "Chest", "Chest PA PA")."""
    src = pydicom.dcmread(pydicom.data.get_charset_files("chrJapMulti.dcm")[0], stop_before_pixels=True)
    ds = _rg1_with(rg1_paths, BodyPartExamined=src.BodyPartExamined, ViewPosition=src.ViewPosition,
                   StudyDescription=src.StudyDescription, SeriesDescription=src.SeriesDescription)
    assert check_applicability(ds)[0].accepted


def test_gate_word_lists_must_not_overlap(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text('[gate]\nbody_part_qualifiers = ["PORTABLE", "CHEST"]\n')
    with pytest.raises(ConfigError, match="CHEST cannot be both in chest_words and in body_part_qualifiers"):
        GateRules.from_config(load_config(cfg))
