"""Read a DICOM file or dataset into a :class:`Radiograph`: metadata now, pixels on demand.

The applicability gate looks at metadata only, so a CT or a tibia is rejected without
decoding a single pixel; the pixel pipeline calls :meth:`Radiograph.pixels`, which decodes
once and caches. Decoding uses pydicom's pixel backends: pylibjpeg (OpenJPEG for JPEG 2000,
libjpeg for JPEG lossless/baseline/JPEG-LS), GDCM as the fallback, and pydicom's own RLE and
uncompressed decoders (see README, "Decoders").
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from cxr_ai.errors import ReadError

logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, bytes, BinaryIO, Dataset]

MSG_NOT_DICOM = (
    "{source}: not a DICOM file ({detail}). Send a DICOM Part 10 file (with the 128-byte "
    "preamble and 'DICM' prefix) or a raw dataset in Implicit VR Little Endian."
)
MSG_TRUNCATED = (
    "{source}: the file is truncated or malformed ({detail}). The transfer was probably cut "
    "short; re-send the complete instance."
)
MSG_MISSING_UID = (
    "{source}: the mandatory attribute {keyword} is missing or empty; the sender must "
    "supply it before this instance can be processed."
)
MSG_INVALID_UID = (
    "{source}: {keyword} {value!r} is not a valid DICOM UID (digits and dots, at most 64 "
    "characters, PS3.5 9.1); the sender must fix the instance."
)
MSG_NO_PIXELS = "{source}: the dataset has no Pixel Data (7FE0,0010); there is no image to read."
MSG_DECODE = (
    "{source}: the pixel data could not be decoded ({detail}); transfer syntax "
    "{ts}. Re-send the image uncompressed or in a supported syntax (see README, 'Decoders')."
)

#: Ages (years) outside this range are treated as absent rather than trusted.
MAX_PLAUSIBLE_AGE_YEARS = 130.0


@dataclass
class Radiograph:
    """A DICOM image and the metadata cxr-ai uses. Pixels are decoded lazily."""

    dataset: Dataset
    source: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str | None
    patient_id: str
    issuer_of_patient_id: str
    sex: str | None
    age_years: float | None
    ethnic_group: str | None
    modality: str
    body_part: str
    view_position: str
    image_laterality: str
    photometric: str
    samples_per_pixel: int
    bits_stored: int | None
    rows: int
    columns: int
    number_of_frames: int
    pixel_spacing_mm: tuple[float, float] | None
    manufacturer: str
    accession_number: str
    study_date: dt.date | None
    study_time: str
    study_description: str
    series_description: str
    protocol_name: str
    has_pixel_data: bool
    warnings: list[str] = field(default_factory=list)
    _pixels: np.ndarray | None = field(default=None, repr=False)

    def pixels(self) -> np.ndarray:
        """Stored pixel values of the (first) frame, decoded once and cached.

        Raises
        ------
        ReadError
            ``no_pixel_data`` or ``decode_failed``, with the source and transfer syntax.
        """
        if self._pixels is None:
            if not self.has_pixel_data:
                raise ReadError("no_pixel_data", MSG_NO_PIXELS.format(source=self.source))
            try:
                # decoded without pydicom's own cache on the dataset: this object keeps the one copy,
                # and dropping it (the batch after preprocessing) frees the memory
                arr = pixel_array(self.dataset)
            except Exception as exc:  # decoder plugins raise many types; report them all alike
                raise ReadError(
                    "decode_failed",
                    MSG_DECODE.format(
                        source=self.source, detail=_short(exc), ts=self.transfer_syntax_uid
                    ),
                ) from exc
            if self.number_of_frames > 1 and arr.ndim >= 3:
                arr = arr[0]
            self._pixels = arr
        return self._pixels

    @property
    def is_monochrome1(self) -> bool:
        return self.photometric == "MONOCHROME1"


def read_dataset(source: Source, *, stop_before_pixels: bool = False) -> tuple[Dataset, str]:
    """Parse ``source`` into a pydicom Dataset. Returns ``(dataset, source_label)``."""
    if isinstance(source, Dataset):
        return source, str(getattr(source, "filename", None) or "<dataset>")
    if isinstance(source, (bytes, bytearray)):
        label = "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        label = str(source)
    else:
        label = str(getattr(source, "name", "<stream>"))
    fp: str | os.PathLike | BinaryIO
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with _capture_pydicom_warnings() as caught:
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        # Raw datasets without preamble/prefix are legal on the wire; try once more with force
        # and accept the result only if it parsed into something with a SOP Instance UID.
        ds = _read_forced(fp)
        if ds is None:
            raise ReadError("not_dicom", MSG_NOT_DICOM.format(source=label, detail=_short(exc))) from exc
    except FileNotFoundError:
        raise
    except Exception as exc:  # pydicom raises assorted errors on malformed input
        raise ReadError("not_dicom", MSG_NOT_DICOM.format(source=label, detail=_short(exc))) from exc
    # pydicom reports a file that ends inside an element as a warning and returns what it
    # parsed (for encapsulated pixel data: nothing at all). That is a truncated transfer.
    truncation = [m for m in caught if "End of file" in m]
    if truncation or len(ds) == 0:
        detail = truncation[0] if truncation else "no data elements after the file meta header"
        raise ReadError("truncated", MSG_TRUNCATED.format(source=label, detail=detail[:200]))
    _ensure_transfer_syntax(ds)
    return ds, label


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """A raw dataset (no file meta, as received on the wire) gets the transfer syntax it was
    read with, so its pixel data can be decoded."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit
        else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    )


class _ThreadLocalCapture(logging.Filter):
    """Collects pydicom's parser warnings for the current thread only (thread-safe, unlike
    ``warnings.catch_warnings``); pydicom sends each warning to its logger too."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        bucket = getattr(self.local, "bucket", None)
        if bucket is not None:
            bucket.append(record.getMessage())
        return True


_CAPTURE = _ThreadLocalCapture()
_CAPTURE_LOCK = threading.Lock()


@contextmanager
def _capture_pydicom_warnings() -> Iterator[list[str]]:
    pd_logger = logging.getLogger("pydicom")
    with _CAPTURE_LOCK:
        if _CAPTURE not in pd_logger.filters:
            pd_logger.addFilter(_CAPTURE)
    bucket: list[str] = []
    _CAPTURE.local.bucket = bucket
    try:
        yield bucket
    finally:
        _CAPTURE.local.bucket = None


def _read_forced(fp: str | os.PathLike | BinaryIO) -> Dataset | None:
    if hasattr(fp, "seek"):
        fp.seek(0)  # type: ignore[union-attr]
    try:
        ds = pydicom.dcmread(fp, force=True)
        if not str(ds.get("SOPInstanceUID", "")).strip():
            return None
        ds.SOPClassUID  # noqa: B018 - must parse
        return ds
    except Exception:
        return None


def read_radiograph(source: Source, *, decode: bool = False) -> Radiograph:
    """Read ``source`` (a path, bytes, file object or Dataset) into a :class:`Radiograph`.

    Parameters
    ----------
    source
        A DICOM Part 10 file path, its bytes, an open binary file, or a parsed Dataset.
    decode
        Decode the pixel data now (otherwise on the first :meth:`Radiograph.pixels` call).

    Raises
    ------
    ReadError
        ``not_dicom`` if the input is not DICOM; ``missing_uid`` if SOP/Study/Series
        Instance UID or SOP Class UID is absent; ``decode_failed`` (with ``decode=True``).
    """
    ds, label = read_dataset(source)
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(ds, keyword)
        if not value:
            raise ReadError("missing_uid", MSG_MISSING_UID.format(source=label, keyword=keyword))
        if not is_usable_uid(value):
            raise ReadError("invalid_uid", MSG_INVALID_UID.format(source=label, keyword=keyword, value=value[:80]))

    warnings: list[str] = []
    fm = getattr(ds, "file_meta", None)
    ts = str(fm.TransferSyntaxUID) if fm is not None and "TransferSyntaxUID" in fm else None
    study_date = _parse_date(_text(ds, "StudyDate"))
    rg = Radiograph(
        dataset=ds,
        source=label,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=ts,
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        sex=_parse_sex(_text(ds, "PatientSex")),
        age_years=_parse_age(ds, study_date, warnings),
        ethnic_group=_text(ds, "EthnicGroup") or None,
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        view_position=_text(ds, "ViewPosition").upper(),
        image_laterality=_text(ds, "ImageLaterality").upper(),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        bits_stored=_int(ds, "BitsStored", None),
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        number_of_frames=max(1, _int(ds, "NumberOfFrames", 1)),
        pixel_spacing_mm=_parse_spacing(ds, warnings),
        manufacturer=_text(ds, "Manufacturer"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=study_date,
        study_time=_text(ds, "StudyTime"),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        has_pixel_data=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        warnings=warnings,
    )
    if decode:
        rg.pixels()
    return rg


# --- attribute parsing ----------------------------------------------------------------------

# PS3.5 9.1: components of digits separated by dots, at most 64 characters. Leading zeros in a
# component are technically invalid but common in real archives, so they are tolerated.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_usable_uid(value: str) -> bool:
    """True when ``value`` is digits and dots, at most 64 characters: safe to use in a file name.

    Looser than :func:`cxr_ai.dicom.uids.is_valid_uid` on purpose: a leading zero in a
    component (which some modalities write) does not stop an image from being read.
    """
    return len(value) <= 64 and bool(_UID_RE.match(value))



def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element raises on access; treat it as absent
        return ""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str, default: int | None) -> int | None:  # type: ignore[return]
    try:
        value = ds.get(keyword, None)
        return default if value is None or value == "" else int(value)
    except Exception:
        return default


def _parse_sex(value: str) -> str | None:
    value = value.upper()
    return value if value in {"M", "F", "O"} else None


_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def _parse_age(ds: Dataset, study_date: dt.date | None, warnings: list[str]) -> float | None:
    """Age in years from PatientAge (``nnnY/M/W/D``, PS3.5 AS), else birth and study dates."""
    raw = _text(ds, "PatientAge").upper()
    if raw:
        unit = raw[-1]
        number = raw[:-1]
        if unit in _AGE_UNITS and number.isdigit():
            years = int(number) * _AGE_UNITS[unit]
            if years <= MAX_PLAUSIBLE_AGE_YEARS:
                return round(years, 3)
        warnings.append(f"PatientAge {raw!r} is not a plausible DICOM age string; ignored")
    birth = _parse_date(_text(ds, "PatientBirthDate"))
    if birth and study_date and birth <= study_date:
        years = (study_date - birth).days / 365.25
        if years <= MAX_PLAUSIBLE_AGE_YEARS:
            return round(years, 3)
        warnings.append("age from PatientBirthDate is implausible; ignored")
    return None


def _parse_date(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None
    except ValueError:
        return None


def _parse_spacing(ds: Dataset, warnings: list[str]) -> tuple[float, float] | None:
    """Pixel spacing in mm (PixelSpacing, else ImagerPixelSpacing), or None when invalid.

    Real files carry nonsense such as RG1's ``0.000\\0.000``; such values are dropped with a
    warning and never copied into outputs.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword, None)
        except Exception:
            value = None
        if value is None or value == "":
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            warnings.append(f"{keyword} {value!r} is malformed; ignored")
            continue
        if all(math.isfinite(v) and 0.01 <= v <= 5.0 for v in (row, col)):
            return (row, col)
        warnings.append(f"{keyword} {row}\\{col} is outside 0.01-5 mm; ignored")
    return None


_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate")
_TIME_KEYWORDS = ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "PatientBirthTime")
_TIME_RE = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")


def sanitized_for_outputs(ds: Dataset) -> tuple[Dataset, list[str]]:
    """A copy of ``ds`` whose invalid Type 2 patient/study values are emptied.

    Result objects copy patient and study attributes from the source, and highdicom (rightly)
    refuses invalid ones: PatientSex ``X``, a StudyDate of month 13. Such values are blanked
    (a Type 2 attribute may be empty) rather than failing the whole result. The source is not
    modified: changed elements are new ``DataElement`` objects in a new dataset.

    Returns the dataset (``ds`` itself when nothing needed fixing) and what was blanked.
    """
    fixes: dict[str, str] = {}
    if _text(ds, "PatientSex") and _parse_sex(_text(ds, "PatientSex")) is None:
        fixes["PatientSex"] = ""
    for keyword in _DATE_KEYWORDS:
        value = _text(ds, keyword)
        if value and (_parse_date(value) is None or len(value) != 8):
            fixes[keyword] = ""
    for keyword in _TIME_KEYWORDS:
        value = _text(ds, keyword)
        if value and not _TIME_RE.match(value):
            fixes[keyword] = ""
    age = _text(ds, "PatientAge")
    if age and not re.fullmatch(r"\d{3}[DWMY]", age):
        fixes["PatientAge"] = ""
    if not fixes:
        return ds, []
    clean = Dataset()
    if hasattr(ds, "file_meta"):
        clean.file_meta = ds.file_meta  # the transfer syntax, for decoding the shared pixel data
    for elem in ds:
        clean.add(elem)
    for keyword, value in fixes.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        clean[tag] = pydicom.DataElement(tag, pydicom.datadict.dictionary_VR(tag), value)
    return clean, [f"{k} blanked (invalid value)" for k in fixes]


def iter_dicom_files(root: str | os.PathLike) -> list[Path]:
    """All regular files under ``root`` (recursively), sorted; DICOMDIR files excluded."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
