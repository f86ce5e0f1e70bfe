"""Second opinion: one uploaded file in, the model's reading of it out (no web, no store).

A third driver of :class:`cxr_ai.pipeline.Pipeline`, beside the listener and the batch
processor. What it takes:

- **DICOM** (any transfer syntax the reader decodes): the same gate, pixel pipeline, models,
  heatmaps and result objects as the listener. A rejected image (a lateral, a tibia, a CT)
  gets the gate's reason in words. The answer carries the SR, the heatmap SCs, the
  Parametric Maps and the FHIR Bundle as bytes, for download.
- **PNG or JPEG**, 8- or 16-bit grayscale, or RGB whose channels are equal within
  ``rgb_tolerance`` (a grayscale image saved as RGB): its pixels become the same
  :class:`~cxr_ai.dicom.reader.Radiograph` the pipeline reads (a minimal DICOM header made
  here), with its assumptions stated. There is no header to check, so the gate's rules are not
  applied: the answer says "applicability not verified: no DICOM header".

Bad input raises :class:`SecondOpinionError` with a message for the user and a suggested HTTP
status: empty (400), over the size limit (413), not an image (415), truncated (400), too many
pixels claimed (413; checked from the header, before any decoding), several frames (422), a
colour image (422).

Nothing is written anywhere: no job store, worklist, prediction log or outbox (those belong to
the listener's workers; this module never imports them).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_ai.dicom.gate import GateDecision, GateReason
from cxr_ai.dicom.heatmap import overlay_rgb
from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.errors import ReadError
from cxr_ai.imaging import display_array, preprocess
from cxr_ai.outputs import download_fhir_name, download_name
from cxr_ai.pipeline import BROKEN_INPUT_REASONS, InstanceOutcome, InstanceStatus, Pipeline
from cxr_ai.results import ImageResult

logger = logging.getLogger(__name__)

NOT_VERIFIED = "applicability not verified: no DICOM header"
MSG_EMPTY = "{name}: the file is empty; choose a DICOM, PNG or JPEG chest radiograph."
MSG_TOO_BIG = "{name}: the file is {size:.1f} MB; the limit is {limit:.1f} MB. Upload a smaller file."
MSG_NOT_IMAGE = ("{name}: not a DICOM, PNG or JPEG image ({detail}). Upload a DICOM file or a PNG/JPEG "
                 "export of a chest radiograph.")
MSG_FORMAT = "{name}: {fmt} images are not accepted; upload a DICOM file, a PNG or a JPEG."
MSG_PIXELS = ("{name}: the image claims {width} x {height} pixels; at most {limit} pixels a side are "
              "accepted. Export it at a smaller size.")
MSG_FRAMES = "{name}: the file holds {n} frames; upload a single image."
MSG_TRUNCATED_IMAGE = "{name}: the {fmt} data is truncated or corrupt ({detail}); upload the complete file."
MSG_COLOUR = ("{name}: a colour image (the red, green and blue channels differ by up to {diff} levels); "
              "a chest radiograph is grayscale. Upload the radiograph itself.")
MSG_MODE = "{name}: {fmt} pixel mode {mode} is not a grayscale image; upload an 8- or 16-bit grayscale image."
MSG_SMALL = ("{name}: the image is {width} x {height} pixels; at least {limit} pixels a side are needed "
             "for the model to read it.")

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


class SecondOpinionError(Exception):
    """Bad input: ``message`` says what was wrong and what to do; ``status`` is the HTTP status
    a web front end should answer with; ``reason`` a stable code."""

    def __init__(self, reason: str, message: str, *, status: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


@dataclass(frozen=True)
class SecondOpinionSettings:
    """Limits of an upload (``[web] max_upload_mb`` and friends; the gate's sides by default)."""

    max_bytes: int = 50 * 2**20
    max_side: int = 8192
    min_side: int = 256
    #: Largest difference (in 8-bit levels, scaled for 16-bit) between the R, G and B of a pixel
    #: for an RGB image still to count as grayscale.
    rgb_tolerance: int = 2
    #: Long side of the overlay PNG (downsampled, never upsampled).
    overlay_max_side: int = 1024

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SecondOpinionSettings:
        web, gate = config.get("web", {}), config.get("gate", {})
        return cls(max_bytes=int(float(web.get("max_upload_mb", 50.0)) * 2**20),
                   max_side=int(gate.get("max_side", 8192)), min_side=int(gate.get("min_side", 256)),
                   rgb_tolerance=int(web.get("rgb_tolerance", 2)))


@dataclass
class SecondOpinion:
    """The answer for one upload.

    ``accepted`` False: a DICOM the gate rejected; ``reason``/``message`` say why and there are
    no findings. ``status`` is the HTTP status to answer with (200, or 422 for a rejection).
    """

    filename: str
    kind: str  # "dicom" | "png" | "jpeg"
    accepted: bool
    reason: str
    message: str
    status: int
    applicability_verified: bool
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    #: finding key -> PNG of the heatmap over the image (screen size)
    overlays: dict[str, bytes] = field(default_factory=dict, repr=False)
    #: the image as the model saw it (grayscale PNG, screen size): the viewer's base layer
    image_png: bytes = field(default=b"", repr=False)
    #: DICOM uploads only: file name -> bytes (SR, SC, PM as .dcm; the FHIR Bundle as .json)
    downloads: dict[str, bytes] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (without the bytes: their names are listed)."""
        return {"filename": self.filename, "kind": self.kind, "accepted": self.accepted, "reason": self.reason,
                "message": self.message, "applicability_verified": self.applicability_verified,
                "assumptions": self.assumptions, "warnings": self.warnings, "model": self.model,
                "findings": self.findings, "overlays": sorted(self.overlays), "downloads": sorted(self.downloads),
                "timings": self.timings}


def safe_filename(name: str) -> str:
    """The upload's name as shown back (path parts and odd characters dropped, 100 at most)."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return _SAFE_NAME.sub("_", base)[:100] or "upload"


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def second_opinion(data: bytes, filename: str, *, pipeline: Pipeline,
                   settings: SecondOpinionSettings = SecondOpinionSettings()) -> SecondOpinion:
    """The model's answer for one uploaded file (see the module docstring).

    Raises
    ------
    SecondOpinionError
        For input that is not a readable single grayscale image within the limits.
    """
    name = safe_filename(filename)
    if not data:
        raise SecondOpinionError("empty", MSG_EMPTY.format(name=name), status=400)
    if len(data) > settings.max_bytes:
        raise SecondOpinionError("too_large", MSG_TOO_BIG.format(name=name, size=len(data) / 2**20,
                                                                  limit=settings.max_bytes / 2**20), status=413)
    if _is_dicom(data):
        return _dicom(data, name, pipeline=pipeline, settings=settings)
    if name.lower().endswith((".dcm", ".dicom")):
        try:
            return _dicom(data, name, pipeline=pipeline, settings=settings)
        except SecondOpinionError as exc:
            if exc.reason != "not_dicom":
                raise
            try:  # a PNG/JPEG saved under a DICOM name
                return _image(data, name, pipeline=pipeline, settings=settings)
            except SecondOpinionError as image_exc:
                if image_exc.reason != "not_image":
                    raise
            raise
    try:
        return _image(data, name, pipeline=pipeline, settings=settings)
    except SecondOpinionError as exc:
        if exc.reason != "not_image":
            raise
        # no image header: a raw DICOM data set (no preamble, as sent on the wire) is still
        # read; anything else keeps the "not an image" answer
        try:
            return _dicom(data, name, pipeline=pipeline, settings=settings)
        except SecondOpinionError as dicom_exc:
            if dicom_exc.reason != "not_dicom":
                raise
        raise


# -- DICOM ------------------------------------------------------------------------------------
_BROKEN_STATUS = {"not_dicom": 415, "truncated": 400, "decode_failed": 400, "missing_uid": 400,
                  "invalid_uid": 400, "no_pixel_data": 400, "blank_image": 422}


def _dicom(data: bytes, name: str, *, pipeline: Pipeline, settings: SecondOpinionSettings) -> SecondOpinion:
    t0 = time.perf_counter()
    outcome = pipeline.process_instance(data)
    message = outcome.message.replace("<bytes>", name).replace("<dataset>", name)
    if outcome.status is InstanceStatus.FAILED and outcome.reason in {r.value for r in BROKEN_INPUT_REASONS} | {
            "no_pixel_data", "decode_failed"}:
        raise SecondOpinionError(outcome.reason, message, status=_BROKEN_STATUS.get(outcome.reason, 400))
    answer = SecondOpinion(filename=name, kind="dicom", accepted=outcome.processed, reason=outcome.reason or "accepted",
                           message=message, status=200 if outcome.processed else 422, applicability_verified=True,
                           warnings=list(outcome.result.decision.warnings) if outcome.result else [])
    if outcome.status is InstanceStatus.NOT_APPLICABLE:
        return answer
    if outcome.status is InstanceStatus.FAILED:  # the model ran but an output could not be built
        answer.status = 500
        return answer
    _fill_result(answer, outcome, pipeline=pipeline, settings=settings)
    stem = name.rsplit(".", 1)[0] or "upload"
    for kind, n, ds in outcome.outputs.numbered():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        answer.downloads[download_name(stem, kind, n)] = buf.getvalue()
    bundle = outcome.outputs.fhir_json()
    if bundle is not None:
        import json

        answer.downloads[download_fhir_name(stem)] = json.dumps(bundle, indent=1).encode()
    answer.timings["total_s"] = time.perf_counter() - t0
    return answer


def _fill_result(answer: SecondOpinion, outcome: InstanceOutcome, *, pipeline: Pipeline,
                 settings: SecondOpinionSettings) -> None:
    result, rg = outcome.result, outcome.radiograph
    assert result is not None and rg is not None
    model = result.model or pipeline.model_info
    answer.model = {"name": model.name, "version": model.version, "not_for_clinical_use": model.not_for_clinical_use,
                    "intended_use": model.intended_use}
    answer.findings = [f.to_dict() for f in result.findings]
    display, _ = display_array(rg.dataset, rg.pixels(), pipeline.engine.bundle.pipeline)
    scale = min(1.0, settings.overlay_max_side / max(display.shape))
    size = (max(1, round(display.shape[1] * scale)), max(1, round(display.shape[0] * scale)))
    display = _screen(display, size)  # blend at screen size: the browser gets no more
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(display * 255.0), 0, 255).astype(np.uint8)).save(buf, format="PNG",
                                                                                     compress_level=3)
    answer.image_png = buf.getvalue()
    if any(f.heatmap is not None for f in result.findings):
        for f in result.findings:
            if f.heatmap is None:
                continue
            img = Image.fromarray(overlay_rgb(display, _screen(f.heatmap, size)))
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=3)
            answer.overlays[f.key] = buf.getvalue()
    answer.timings.update(outcome.timings)


def _screen(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float image in [0, 1] resampled to ``size`` (width, height) with an area-averaging
    filter (Pillow's BOX: downsampling without aliasing); unchanged at its own size."""
    arr = np.asarray(img, dtype=np.float32)
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BOX), dtype=np.float32)


# -- PNG / JPEG -------------------------------------------------------------------------------
def _image(data: bytes, name: str, *, pipeline: Pipeline, settings: SecondOpinionSettings) -> SecondOpinion:
    t0 = time.perf_counter()
    pixels, fmt, assumptions = read_grayscale_image(data, name, settings=settings)
    size = pipeline.engine.bundle.pipeline.size
    assumptions.append(f"pixel spacing: unknown; the model does not use it (every image is resized to "
                       f"{size} x {size} pixels, letterboxed, regardless of its physical size)")
    ds = image_dataset(pixels)
    rg = read_radiograph(ds)
    rg.source = name
    decision = GateDecision(True, GateReason.ACCEPTED, f"{name}: {NOT_VERIFIED}", (NOT_VERIFIED,))
    outcome = InstanceOutcome(source=name, sop_instance_uid=rg.sop_instance_uid, study_instance_uid=rg.study_instance_uid,
                              status=InstanceStatus.PROCESSED, reason="", message=f"{name}: {NOT_VERIFIED}",
                              radiograph=rg, result=ImageResult(rg.sop_instance_uid, rg.study_instance_uid, decision))
    try:
        pre = preprocess(rg, pipeline.engine.bundle.pipeline)
    except ReadError as exc:
        raise SecondOpinionError(exc.reason, str(exc), status=422) from exc
    if not np.ptp(pre.image) > 0:
        raise SecondOpinionError("blank_image", f"{name}: the image is blank (every pixel has the same value).",
                                 status=422)
    outcome.timings["read_preprocess_s"] = time.perf_counter() - t0
    pipeline.infer([(outcome, pre)])
    answer = SecondOpinion(filename=name, kind=fmt.lower(), accepted=True, reason="accepted",
                           message=f"{name}: read by the model; {NOT_VERIFIED}.", status=200,
                           applicability_verified=False, assumptions=assumptions, warnings=[NOT_VERIFIED])
    _fill_result(answer, outcome, pipeline=pipeline, settings=settings)
    answer.timings["total_s"] = time.perf_counter() - t0
    return answer


def read_grayscale_image(data: bytes, name: str, *,
                         settings: SecondOpinionSettings = SecondOpinionSettings()) -> tuple[np.ndarray, str, list[str]]:
    """A PNG/JPEG upload → (2-D uint8 or uint16 pixels, format, assumptions), checked first
    from its header (format, size, frames), then decoded."""
    try:
        # Reads the header only. Pillow refuses more than twice Image.MAX_IMAGE_PIXELS here
        # (a decompression bomb); the side check below refuses anything over max_side first.
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        width, height = _claimed_size(data)
        raise SecondOpinionError("image_size", MSG_PIXELS.format(name=name, width=width, height=height,
                                                                 limit=settings.max_side), status=413) from exc
    except UnidentifiedImageError as exc:
        raise SecondOpinionError("not_image", MSG_NOT_IMAGE.format(name=name, detail="no known image header"),
                                 status=415) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise SecondOpinionError("not_image", MSG_NOT_IMAGE.format(name=name, detail=type(exc).__name__),
                                 status=415) from exc
    fmt = str(img.format or "?")
    if fmt not in ("PNG", "JPEG", "MPO"):
        raise SecondOpinionError("format", MSG_FORMAT.format(name=name, fmt=fmt), status=415)
    width, height = img.size
    if max(width, height) > settings.max_side:
        raise SecondOpinionError("image_size", MSG_PIXELS.format(name=name, width=width, height=height,
                                                                 limit=settings.max_side), status=413)
    if min(width, height) < settings.min_side:
        raise SecondOpinionError("image_size", MSG_SMALL.format(name=name, width=width, height=height,
                                                                limit=settings.min_side), status=422)
    n_frames = int(getattr(img, "n_frames", 1) or 1)
    if n_frames > 1:
        raise SecondOpinionError("multi_frame", MSG_FRAMES.format(name=name, n=n_frames), status=422)
    fmt = "JPEG" if fmt == "MPO" else fmt
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise SecondOpinionError("truncated", MSG_TRUNCATED_IMAGE.format(name=name, fmt=fmt, detail=str(exc)[:120]),
                                 status=400) from exc
    mode = img.mode
    assumptions = ["photometric: MONOCHROME2 assumed (bright is dense, as the image is displayed); "
                   "an inverted export would be read inverted",
                   "window: the image's own grey levels (0.5-99.5 percentile window), as for a DICOM "
                   "without a VOI window",
                   "patient sex, age and view: unknown (not in the file)"]
    if mode in ("L", "LA"):
        arr = np.asarray(img.getchannel("L") if mode == "LA" else img, dtype=np.uint8)
        bits = 8
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 65535:
            raise SecondOpinionError("mode", MSG_MODE.format(name=name, fmt=fmt, mode=mode), status=422)
        arr = arr.astype(np.uint16)
        bits = 16
    elif mode in ("RGB", "RGBA", "P", "PA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        diff = int(max(np.abs(rgb[..., 0] - rgb[..., 1]).max(), np.abs(rgb[..., 1] - rgb[..., 2]).max()))
        if diff > settings.rgb_tolerance:
            raise SecondOpinionError("colour", MSG_COLOUR.format(name=name, diff=diff), status=422)
        arr = np.rint(rgb.mean(axis=-1)).astype(np.uint8)
        bits = 8
        assumptions.insert(0, f"colour: RGB with equal channels (within {diff} levels) read as grayscale")
    else:
        raise SecondOpinionError("mode", MSG_MODE.format(name=name, fmt=fmt, mode=mode), status=422)
    assumptions.insert(0, f"{fmt}, {bits}-bit grayscale, {width} x {height} pixels")
    return arr, fmt, assumptions


def _claimed_size(data: bytes) -> tuple[int | str, int | str]:
    """(width, height) a PNG or JPEG header claims, read without decoding; ("?", "?") if unknown."""
    import struct

    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:2] == b"\xff\xd8":  # JPEG: the first start-of-frame marker holds the size
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return int(width), int(height)
            i += 2 + length
    return "?", "?"


def image_dataset(pixels: np.ndarray) -> Dataset:
    """A minimal in-memory DICOM dataset around grayscale pixels, so that the image becomes the
    :class:`~cxr_ai.dicom.reader.Radiograph` the pipeline reads. Fresh UIDs, no patient data,
    no modality, body part or view (unknown), MONOCHROME2, no VOI window, no pixel spacing."""
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected 2-D uint8/uint16 pixels, got {pixels.dtype} {pixels.shape}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage  # what an exported image is
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "OT"
    ds.ContentDate = dt.date.today().strftime("%Y%m%d")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(s) for s in pixels.shape)
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds
