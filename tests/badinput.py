"""A corpus of bad (and awkward-but-valid) inputs, each with its expected outcome.

Built from real files (pydicom-data's RG1, RG3, CT, MR, US, NM, SC) by deliberate damage, so
every case is reproducible. Used by the pipeline tests, the listener's C-STORE tests and the
batch tests: each case must end in its expected state with a reason, and nothing may crash.
"""

from __future__ import annotations

import copy
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

PROCESSED = "processed"
NOT_APPLICABLE = "not_applicable"
FAILED = "failed"


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    status: str  # expected InstanceStatus value
    reason: str  # expected reason ("" for processed)
    #: False when the bytes are not a dataset a DICOM peer could send over C-STORE
    #: (e.g. a text file): those are for file-based drivers (batch) only.
    sendable: bool = True


def _rg1(data: Path) -> Dataset:
    return pydicom.dcmread(data / "RG1_UNCR.dcm")


def build_corpus(out: Path, data: Path) -> list[Case]:
    """Write every case under ``out`` and return them. ``data`` is pydicom-data's folder."""
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    base = _rg1(data)
    raw_uncr = (data / "RG1_UNCR.dcm").read_bytes()
    raw_j2kr = (data / "RG1_J2KR.dcm").read_bytes()
    counter = iter(range(1, 10_000))

    def write_bytes(name: str, payload: bytes, status: str, reason: str, sendable: bool = False) -> None:
        path = out / f"{name}.dcm"
        path.write_bytes(payload)
        cases.append(Case(name, path, status, reason, sendable))

    def variant(name: str, edit: Callable[[Dataset], object], status: str, reason: str, *,
                new_uid: bool = True, **save: object) -> None:
        ds = copy.deepcopy(base)
        if new_uid:  # each case is its own instance (the listener keys on SOP Instance UID)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{base.SOPInstanceUID}.{next(counter)}"
        edit(ds)
        path = out / f"{name}.dcm"
        if ds.file_meta.get("TransferSyntaxUID") == ExplicitVRBigEndian:
            # pydicom writes retired big-endian files only when asked explicitly
            pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        else:
            ds.save_as(path, **save)  # type: ignore[arg-type]
        cases.append(Case(name, path, status, reason))

    def mislabelled(name: str, meta_ts: str, status: str, reason: str) -> None:
        """Native explicit-VR-LE body under a file meta that claims ``meta_ts``."""
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = f"{base.SOPInstanceUID}.{next(counter)}"
        body = io.BytesIO()
        ds.preamble = None  # RG1's preamble is a TIFF header (a dual-personality file)
        ds.file_meta = FileMetaDataset()
        ds.save_as(body, enforce_file_format=False, implicit_vr=False, little_endian=True)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = meta_ts
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        head = io.BytesIO()
        head.write(bytes(128) + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        path = out / f"{name}.dcm"
        path.write_bytes(head.getvalue() + body.getvalue())
        cases.append(Case(name, path, status, reason))

    def copy_file(name: str, src: str, status: str, reason: str) -> None:
        path = out / f"{name}.dcm"
        shutil.copyfile(data / f"{src}.dcm", path)
        cases.append(Case(name, path, status, reason))

    # --- not DICOM at all ---------------------------------------------------------------------
    write_bytes("text_file", b"Patient report: see attached.\n" * 40, FAILED, "not_dicom")
    write_bytes("empty_file", b"", FAILED, "not_dicom")
    write_bytes("random_bytes", np.random.default_rng(0).bytes(20_000), FAILED, "not_dicom")
    write_bytes("png_header", b"\x89PNG\r\n\x1a\n" + bytes(2000), FAILED, "not_dicom")
    write_bytes("preamble_only", bytes(128) + b"DICM", FAILED, "truncated")
    write_bytes("zip_file", b"PK\x03\x04" + bytes(500), FAILED, "not_dicom")

    # --- truncated ----------------------------------------------------------------------------
    write_bytes("truncated_native_half", raw_uncr[: len(raw_uncr) // 2], FAILED, "decode_failed")
    # cut inside the dataset before the Study Instance UID: reported as that missing attribute
    write_bytes("truncated_native_in_header", raw_uncr[:600], FAILED, "missing_uid")
    write_bytes("truncated_j2k_half", raw_j2kr[: len(raw_j2kr) // 2], FAILED, "truncated")
    write_bytes("truncated_j2k_tail", raw_j2kr[:-64], FAILED, "truncated")
    write_bytes("truncated_in_file_meta", raw_uncr[:200], FAILED, "truncated")

    # --- encodings that are valid: must be processed ------------------------------------------
    def to_implicit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    def strip_meta(ds: Dataset) -> None:
        ds.file_meta.clear()
        ds.preamble = None

    variant("preambleless_implicit", strip_meta, PROCESSED, "",
            enforce_file_format=False, implicit_vr=True, little_endian=True)
    variant("implicit_vr_little_endian", to_implicit, PROCESSED, "")

    def big_endian(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = ds.pixel_array.astype(">u2").tobytes()

    variant("explicit_big_endian", big_endian, PROCESSED, "")

    def deflated(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    variant("deflated", deflated, PROCESSED, "")
    variant("rle_lossless", lambda ds: ds.compress(RLELossless), PROCESSED, "")
    copy_file("jpeg2000_lossless", "RG1_J2KR", PROCESSED, "")
    copy_file("jpeg2000_lossy", "RG1_J2KI", PROCESSED, "")

    # --- mislabelled / unsupported transfer syntaxes ------------------------------------------
    mislabelled("native_labelled_jpeg2000", JPEG2000Lossless, FAILED, "decode_failed")
    mislabelled("native_labelled_mpeg2", "1.2.840.10008.1.2.4.100", FAILED, "decode_failed")

    def j2k_labelled_native(ds: Dataset) -> None:
        j2k = pydicom.dcmread(data / "RG1_J2KR.dcm")
        ds.PixelData = pydicom.encaps.generate_fragments(j2k.PixelData).__next__()[:1000]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    variant("jpeg2000_labelled_native", j2k_labelled_native, FAILED, "decode_failed")

    # --- missing or broken attributes ---------------------------------------------------------
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        variant(f"missing_{keyword}", lambda ds, k=keyword: delattr(ds, k), FAILED, "missing_uid")
    variant("missing_SOPInstanceUID", lambda ds: delattr(ds, "SOPInstanceUID"), FAILED, "missing_uid", new_uid=False)
    variant("uid_path_traversal", lambda ds: setattr(ds, "SOPInstanceUID", "../../etc/passwd"), FAILED, "invalid_uid")
    variant("uid_with_slash_study", lambda ds: setattr(ds, "StudyInstanceUID", "1.2.3/../../x"), FAILED, "invalid_uid")
    variant("uid_too_long", lambda ds: setattr(ds, "SeriesInstanceUID", "1." + "2" * 80), FAILED, "invalid_uid")
    variant("missing_modality", lambda ds: delattr(ds, "Modality"), NOT_APPLICABLE, "modality")
    variant("missing_rows", lambda ds: delattr(ds, "Rows"), NOT_APPLICABLE, "image_size")
    variant("no_pixel_data", lambda ds: delattr(ds, "PixelData"), NOT_APPLICABLE, "no_pixel_data")

    def short_pixels(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 4]

    variant("pixel_data_short", short_pixels, FAILED, "decode_failed")

    def huge_claim(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 60000

    variant("huge_rows_columns_claim", huge_claim, NOT_APPLICABLE, "image_size")

    def mild_oversize(ds: Dataset) -> None:
        ds.Rows, ds.Columns = 4000, 4000  # plausible size, but the data does not match

    variant("rows_columns_mismatch", mild_oversize, FAILED, "decode_failed")

    def tiny(ds: Dataset) -> None:
        ds.Rows, ds.Columns = 64, 64
        ds.PixelData = bytes(64 * 64 * 2)

    variant("tiny_image", tiny, NOT_APPLICABLE, "image_size")

    def sliver(ds: Dataset) -> None:
        arr = ds.pixel_array[:300, :]
        ds.Rows, ds.Columns = arr.shape
        ds.PixelData = np.ascontiguousarray(arr).tobytes()

    variant("extreme_aspect_ratio", sliver, NOT_APPLICABLE, "image_size")

    def blank(ds: Dataset) -> None:
        ds.PixelData = np.full((ds.Rows, ds.Columns), 1234, np.uint16).tobytes()

    variant("blank_image", blank, FAILED, "blank_image")

    def zero_slope(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0, 100, "US"

    variant("rescale_slope_zero", zero_slope, FAILED, "blank_image")

    def multi_frame(ds: Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData + ds.PixelData

    variant("multi_frame", multi_frame, NOT_APPLICABLE, "multi_frame")

    def rgb(ds: Dataset) -> None:
        arr = (ds.pixel_array >> 7).astype(np.uint8)
        ds.PixelData = np.repeat(arr[..., None], 3, axis=2).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7

    variant("colour_rgb_cr", rgb, NOT_APPLICABLE, "not_grayscale")
    variant("palette_colour_label", lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"),
            NOT_APPLICABLE, "not_grayscale")

    # --- wrong images -------------------------------------------------------------------------
    for src in ("693_UNCR", "MR2_UNCR", "US1_UNCR", "JPEG-LL", "SC_rgb", "emri_small", "OBXXXX1A_rle"):
        copy_file(f"wrong_modality_{src}", src, NOT_APPLICABLE, "modality")
    for src in ("RG3_UNCR", "RG3_J2KI"):
        copy_file(f"tibia_{src}", src, NOT_APPLICABLE, "body_part")
    variant("lateral_chest", lambda ds: setattr(ds, "ViewPosition", "LL"), NOT_APPLICABLE, "view")
    variant("lateral_word_view", lambda ds: setattr(ds, "ViewPosition", "LATERAL"), NOT_APPLICABLE, "view")

    def dx_processing(ds: Dataset) -> None:
        ds.Modality = "DX"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForProcessing

    variant("dx_for_processing", dx_processing, NOT_APPLICABLE, "sop_class")

    def no_body_part_no_text(ds: Dataset) -> None:
        ds.BodyPartExamined = ""
        for k in ("StudyDescription", "SeriesDescription", "ProtocolName"):
            if k in ds:
                delattr(ds, k)

    variant("no_body_part_no_description", no_body_part_no_text, NOT_APPLICABLE, "body_part")

    # --- awkward but valid: must be processed -------------------------------------------------
    def no_window(ds: Dataset) -> None:
        del ds.WindowCenter, ds.WindowWidth

    variant("monochrome1_without_window", no_window, PROCESSED, "")
    variant("window_width_zero", lambda ds: setattr(ds, "WindowWidth", 0), PROCESSED, "")
    variant("absurd_age_999Y", lambda ds: setattr(ds, "PatientAge", "999Y"), PROCESSED, "")
    variant("absurd_age_text", lambda ds: setattr(ds, "PatientAge", "old"), PROCESSED, "")
    variant("birth_after_study", lambda ds: setattr(ds, "PatientBirthDate", "21000101"), PROCESSED, "")
    variant("invalid_study_date", lambda ds: setattr(ds, "StudyDate", "20231345"), PROCESSED, "")
    variant("sex_unknown_value", lambda ds: setattr(ds, "PatientSex", "X"), PROCESSED, "")

    def utf8_names(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen=山田^太郎"
        ds.InstitutionName = "Hôpital Saint-Éloi"

    variant("non_ascii_names", utf8_names, PROCESSED, "")

    def latin1(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Ærøskøbing^Åse"

    variant("latin1_names", latin1, PROCESSED, "")
    variant("long_patient_name", lambda ds: setattr(ds, "PatientName", "A" * 64 + "^" + "B" * 60), PROCESSED, "")
    variant("negative_pixel_spacing", lambda ds: setattr(ds, "PixelSpacing", [-0.1, 0.1]), PROCESSED, "")

    def empty_view(ds: Dataset) -> None:
        ds.ViewPosition = ""

    variant("empty_view_position", empty_view, PROCESSED, "")

    def desc_only(ds: Dataset) -> None:
        ds.BodyPartExamined = ""
        ds.StudyDescription = "XR CHEST PA"

    variant("body_part_from_description", desc_only, PROCESSED, "")
    variant("body_part_thorax", lambda ds: setattr(ds, "BodyPartExamined", "THORAX"), PROCESSED, "")

    def as_dx(ds: Dataset) -> None:
        ds.Modality = "DX"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"

    variant("dx_for_presentation", as_dx, PROCESSED, "")

    # duplicate SOP Instance UID with different content: each file alone is processable; the
    # listener/batch decide what a duplicate means (see their tests).
    def dup(ds: Dataset) -> None:
        arr = ds.pixel_array.copy()
        arr[:100, :100] = 0
        ds.PixelData = arr.tobytes()

    variant("duplicate_sop_uid_other_content", dup, PROCESSED, "", new_uid=False)
    return cases
