"""Reading real radiographs (pydicom-data) and awkward inputs into Radiograph."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.errors import ReadError


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KR", "RG1_UNCI", "RG1_J2KI"])
def test_rg1_metadata(rg1_paths: dict[str, Path], name: str) -> None:
    rg = read_radiograph(rg1_paths[name])
    ds = pydicom.dcmread(rg1_paths[name], stop_before_pixels=True)
    assert rg.modality == "CR"
    assert rg.body_part == "CHEST"
    assert rg.view_position == "PA"
    assert rg.photometric == "MONOCHROME1" and rg.is_monochrome1
    assert (rg.rows, rg.columns) == (1955, 1841)
    assert rg.bits_stored == 15
    assert rg.sop_instance_uid == ds.SOPInstanceUID
    assert rg.study_instance_uid == ds.StudyInstanceUID
    assert rg.series_instance_uid == ds.SeriesInstanceUID
    assert rg.sop_class_uid == pydicom.uid.ComputedRadiographyImageStorage
    assert rg.sex == "F"
    # RG1 has no PatientAge; its age comes from PatientBirthDate and StudyDate.
    assert "PatientAge" not in ds or not ds.PatientAge
    assert rg.age_years is not None and 60 < rg.age_years < 70
    # RG1's PixelSpacing is 0.000\0.000: invalid, dropped with a warning.
    assert rg.pixel_spacing_mm is None
    assert any("PixelSpacing" in w for w in rg.warnings)
    assert rg.transfer_syntax_uid == str(ds.file_meta.TransferSyntaxUID)


def test_rg1_pairs_decode_identically(rg1_paths: dict[str, Path]) -> None:
    px = {name: read_radiograph(p).pixels() for name, p in rg1_paths.items()}
    assert np.array_equal(px["RG1_UNCR"], px["RG1_J2KR"])
    assert np.array_equal(px["RG1_UNCI"], px["RG1_J2KI"])
    # UNCI is the lossy image, not the original.
    assert not np.array_equal(px["RG1_UNCR"], px["RG1_UNCI"])


@pytest.mark.parametrize(
    "name",
    [
        "JPEG-LL",  # JPEG lossless, process 14 SV1
        "JPGLosslessP14SV1_1s_1f_8b",
        "OBXXXX1A_rle",  # RLE lossless
        "emri_small_RLE",
        "emri_small_jpeg_ls_lossless",  # JPEG-LS
        "MR2_J2KI",  # JPEG 2000 lossy
        "US1_J2KR",  # JPEG 2000 lossless, colour
        "color3d_jpeg_baseline",  # JPEG baseline
        "OBXXXX1A_expb",  # explicit big endian
        "gdcm-US-ALOKA-16",  # implicit little endian
    ],
)
def test_every_transfer_syntax_decodes(data_store_dir: Path, name: str) -> None:
    rg = read_radiograph(data_store_dir / f"{name}.dcm", decode=True)
    px = rg.pixels()
    assert px.shape[:2] == (rg.rows, rg.columns)
    assert np.ptp(px) > 0


def test_patient_age_string_preferred(rg1_paths: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    for raw, years in [("057Y", 57.0), ("006M", 0.5), ("002W", 14 / 365.25), ("010D", 10 / 365.25)]:
        ds.PatientAge = raw
        assert read_radiograph(ds).age_years == pytest.approx(years, abs=1e-3)


def test_absurd_age_is_ignored_with_warning(rg1_paths: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    ds.PatientAge = "999Y"
    del ds.PatientBirthDate
    rg = read_radiograph(ds)
    assert rg.age_years is None
    assert any("PatientAge" in w for w in rg.warnings)


def test_valid_pixel_spacing_is_kept(rg1_paths: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    ds.PixelSpacing = [0.15, 0.15]
    assert read_radiograph(ds).pixel_spacing_mm == (0.15, 0.15)


def test_not_dicom_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(ReadError) as info:
        read_radiograph(path)
    assert info.value.reason == "not_dicom"
    assert "notes.txt" in str(info.value) and "DICOM" in str(info.value)


def test_missing_uid_is_a_clear_error(rg1_paths: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    del ds.StudyInstanceUID
    with pytest.raises(ReadError) as info:
        read_radiograph(ds)
    assert info.value.reason == "missing_uid" and "StudyInstanceUID" in str(info.value)


def test_no_pixel_data(rg1_paths: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    rg = read_radiograph(ds)
    assert not rg.has_pixel_data
    with pytest.raises(ReadError) as info:
        rg.pixels()
    assert info.value.reason == "no_pixel_data"


def test_truncated_native_pixel_data_fails_to_decode(rg1_paths: dict[str, Path]) -> None:
    raw = rg1_paths["RG1_UNCR"].read_bytes()
    rg = read_radiograph(io.BytesIO(raw[: len(raw) // 2]))
    with pytest.raises(ReadError) as info:
        rg.pixels()
    assert info.value.reason == "decode_failed"
    assert "transfer syntax" in str(info.value) and "<stream>" in str(info.value)


def test_truncated_encapsulated_file_is_reported_as_truncated(rg1_paths: dict[str, Path], tmp_path: Path) -> None:
    # pydicom silently returns an empty dataset for this; the reader must not.
    raw = rg1_paths["RG1_J2KR"].read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReadError) as info:
        read_radiograph(path)
    assert info.value.reason == "truncated"
    assert "cut.dcm" in str(info.value) and "re-send" in str(info.value)


def test_reads_bytes_and_raw_dataset_without_preamble(rg1_paths: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
    rg = read_radiograph(rg1_paths["RG1_UNCR"].read_bytes())
    assert rg.sop_instance_uid == ds.SOPInstanceUID
    # A dataset written without preamble and file meta (as it arrives on the wire).
    raw = tmp_path / "raw.dcm"
    del ds.file_meta
    ds.save_as(raw, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert read_radiograph(raw).sop_instance_uid == ds.SOPInstanceUID


def test_sanitized_for_outputs_blanks_invalid_values_without_touching_the_source(rg1_paths: dict[str, Path]) -> None:
    from cxr_ai.dicom.reader import sanitized_for_outputs

    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    same, notes = sanitized_for_outputs(ds)
    assert same is ds and notes == []
    ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.PatientAge = "X", "20231345", "256199", "old"
    clean, notes = sanitized_for_outputs(ds)
    assert clean is not ds and len(notes) == 4
    assert (clean.PatientSex, clean.StudyDate, clean.StudyTime, clean.PatientAge) == ("", "", "", "")
    assert (ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.PatientAge) == ("X", "20231345", "256199", "old")
    assert clean.SOPInstanceUID == ds.SOPInstanceUID and clean.file_meta is ds.file_meta
