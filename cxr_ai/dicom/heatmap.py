"""Heatmaps as DICOM: an RGB Secondary Capture to look at, a Parametric Map to toggle.

**Secondary Capture** (:func:`build_heatmap_sc`, highdicom ``SCImage.from_ref_dataset``): the
source radiograph as the pixel pipeline displays it (:func:`cxr_ai.imaging.display_array`:
modality LUT, the file's VOI window, MONOCHROME1 inverted, so bone is bright and air dark
whatever the source's photometric interpretation), with the finding's Grad-CAM map blended
over it through a perceptually uniform colormap (``inferno`` by default; opacity grows with
the heat and is zero below ``min_heat``, so cold regions show the plain radiograph). Below the
image a black band carries burned-in text: the finding with its probability and threshold,
"AI heatmap - not for diagnostic use" and the model name and version (plus "NOT FOR CLINICAL
USE" for demo bundles); the band never covers anatomy. The capture is downsampled (area
averaging) so its long side is at most ``max_side``. Header: patient/study copied from the
source, new series, ImageType DERIVED\\SECONDARY, SourceImageSequence to the source,
BodyPartExamined, BurnedInAnnotation YES, the source's PatientOrientation (the capture keeps
the source's orientation: no flip, no rotation) and its lossy-compression history.

**Parametric Map** (:func:`build_parametric_map`, highdicom ``pm.ParametricMap``): the Grad-CAM
map in the *source geometry* (same rows and columns, pixel for pixel), so a viewer can overlay
it on the radiograph and switch it off, which no viewer can do with burned-in SC pixels.
Choice: **one Parametric Map instance per finding**, all in one series. Each is a single
frame with its own Real World Value Mapping, content label and description, so a viewer lists
"CARDIOMEGALY_MAP" and "LOW_EF_MAP" as separate, separately toggleable layers; a single
multi-channel instance would depend on the viewer's support for per-frame value mappings.
Values are stored as 16-bit integers 0-10000 with a Real World Value Mapping of slope 1e-4
(0.0001 resolution, far finer than a Grad-CAM map; half the size of float32), quantity DCM
130404 "Saliency", unit UCUM "1", and a VOI window over the full range.

Projection radiographs (CR, DX) have no Frame of Reference, so highdicom builds the map on
its no-frame-of-reference path: one frame aligned pixel for pixel with the single source
frame, with no plane position or orientation. Pixel Measures are copied from the source
only when its PixelSpacing is plausible (0.01-5 mm); invalid spacing such as RG1's
``0.000\\0.000`` is dropped, never copied into an output.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import textwrap
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from cxr_ai.dicom import codes, headers
from cxr_ai.dicom.common import (
    LO_MAX,
    NOT_FOR_CLINICAL_USE,
    PM_SERIES_NUMBER,
    SC_SERIES_NUMBER,
    check_source,
    sanitize_lo,
    series_description,
    software_versions,
)
from cxr_ai.dicom.uids import ResultIdentity, identity_of
from cxr_ai.results import FindingResult, ModelInfo, format_probability

logger = logging.getLogger(__name__)

#: Parametric Map storage: value v in [0, 1] is stored as round(v * PM_SCALE).
PM_SCALE = 10000
DIAGNOSTIC_WARNING = "AI heatmap - not for diagnostic use"

MSG_NO_HEATMAP = (
    "finding {key!r} for instance {sop} carries no heatmap; run the model with "
    "explainability on (config [models] explain = true) or skip heatmap outputs for it"
)
MSG_HEATMAP_SHAPE = (
    "heatmap of finding {key!r} has shape {shape}, but the source image {sop} is {rows} x "
    "{cols}; map it back to the source geometry first (Letterbox.to_source)"
)
MSG_DISPLAY_SHAPE = (
    "display_image has shape {shape}, but the source image {sop} is {rows} x {cols}; pass "
    "cxr_ai.imaging.display_array(source_ds, pixels) of this source"
)
MSG_SC_DISPLAY_SIDE = (
    "the ScDisplay was made for captures of at most {made} pixels, but this capture is limited to "
    "{wanted}; make it with sc_display(display, max_side={wanted})"
)
MSG_COLORMAP = "unknown colormap {name!r}; use a matplotlib colormap name such as 'inferno' or 'viridis'"
MSG_OPTIONS = "{name} must be in {bounds}, got {value!r}"

_ORIENTATION_LETTERS = set("APRLHF")
_SPACING_RANGE_MM = (0.01, 5.0)


# --- shared checks ---------------------------------------------------------------------------


def _heat(source_ds: Dataset, finding: FindingResult) -> np.ndarray:
    rows, cols = int(source_ds.Rows), int(source_ds.Columns)
    if finding.heatmap is None:
        raise ValueError(MSG_NO_HEATMAP.format(key=finding.key, sop=source_ds.SOPInstanceUID))
    heat = np.asarray(finding.heatmap, dtype=np.float32)
    if heat.shape != (rows, cols):
        raise ValueError(
            MSG_HEATMAP_SHAPE.format(
                key=finding.key, shape=heat.shape, sop=source_ds.SOPInstanceUID, rows=rows, cols=cols
            )
        )
    return heat if _known_in_range(heat) else _clipped(heat)


_IN_RANGE = threading.local()


def _known_in_range(heat: np.ndarray) -> bool:
    """Whether ``heat`` is a map already seen in [0, 1] by this thread (the SC, the Parametric
    Map and the Segmentation of one finding read the same map; it is checked once). Keyed on
    the array object, which callers do not modify."""
    refs = getattr(_IN_RANGE, "refs", ())
    if any(ref() is heat for ref in refs):
        return True
    if not (0.0 <= float(heat.min()) and float(heat.max()) <= 1.0):  # NaN fails both
        return False
    _IN_RANGE.refs = tuple(ref for ref in refs if ref() is not None)[-7:] + (weakref.ref(heat),)
    return True


def _clip01(heat: np.ndarray) -> np.ndarray:
    """``np.clip(np.nan_to_num(heat), 0, 1)`` (NaN and -inf to 0, +inf to 1), read-only use.

    A map already in [0, 1] (what the engine makes) is returned as it is: two reductions, no
    copy. ``min``/``max`` propagate NaN, so a map with NaN takes the clipping path.
    """
    if 0.0 <= float(heat.min()) and float(heat.max()) <= 1.0:
        return heat
    return _clipped(heat)


def _clipped(heat: np.ndarray) -> np.ndarray:
    out = np.fmax(heat, np.float32(0.0))  # NaN -> 0 (fmax ignores NaN), -inf -> 0
    np.fmin(out, np.float32(1.0), out=out)  # +inf -> 1
    return out


def _valid_spacing(value: object) -> bool:
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return False
    lo, hi = _SPACING_RANGE_MM
    return all(math.isfinite(v) and lo <= v <= hi for v in (row, col))


_OPPOSITE = ({"L", "R"}, {"A", "P"}, {"H", "F"})


def _patient_orientation(source_ds: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation if it is a usable pair of directions, else None.

    Each value uses the letters A P R L H F, no letter twice and never both of an opposite
    pair; the two directions must not be parallel.
    """
    value = source_ds.get("PatientOrientation", None)
    try:
        row, col = (str(v).strip().upper() for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    for text in (row, col):
        letters = set(text)
        if not text or not letters <= _ORIENTATION_LETTERS or len(letters) != len(text):
            return None
        if any(pair <= letters for pair in _OPPOSITE):
            return None
    if abs(float(np.dot(_direction(row), _direction(col)))) > 0.99:
        return None
    return row, col


# --- Secondary Capture -----------------------------------------------------------------------


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average resize of a float image to ``(rows, cols)``."""
    if img.shape == size:
        return img.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))  # mode "F"
    fy, ry = divmod(img.shape[0], size[0])
    fx, rx = divmod(img.shape[1], size[1])
    if ry == rx == 0:  # a whole factor (2048 -> 1024): the same box average, about 2.5x faster
        return np.asarray(pil.reduce((fx, fy)), dtype=np.float32)
    return np.asarray(pil.resize((size[1], size[0]), resample=Image.Resampling.BOX), dtype=np.float32)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _banner(width: int, lines: Sequence[str]) -> np.ndarray:
    """A black band with ``lines`` in light text, as wide as the image (uint8 RGB)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = max(10, round(width / 48))
    margin = max(4, size // 2)
    while True:
        font = _font(size)
        widest = max(probe.textlength(line, font=font) for line in lines)
        if widest <= width - 2 * margin or size <= 8:
            break
        size -= 1
    if widest > width - 2 * margin:  # still too wide: wrap
        chars = max(8, int(len(max(lines, key=len)) * (width - 2 * margin) / widest))
        lines = [part for line in lines for part in textwrap.wrap(line, chars)]
    line_h = round(size * 1.3)
    band = Image.new("RGB", (width, 2 * margin + line_h * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        colour = (255, 220, 0) if i == 0 else (235, 235, 235)
        draw.text((margin, margin + i * line_h), line, font=font, fill=colour)
    return np.asarray(band, dtype=np.uint8)


def _to_u8(img: np.ndarray) -> np.ndarray:
    """``rint(clip(img, 0, 1) * 255)`` as uint8, in one temporary."""
    out = np.clip(img, 0.0, 1.0)
    out *= 255.0
    np.rint(out, out=out)
    return out.astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _overlay_luts(colormap: str, max_alpha: float, min_heat: float) -> tuple[list[int], list[int]]:
    """The colormap as a 256-entry RGB palette and the opacity as a 256-entry lookup table
    (8-bit heat in, 8-bit out), computed once per look."""
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(MSG_COLORMAP.format(name=colormap)) from None
    levels = np.linspace(0.0, 1.0, 256)
    palette = _to_u8(cmap(levels)[:, :3]).ravel().tolist()
    opacity = _to_u8(max_alpha * np.clip((levels - min_heat) / (1.0 - min_heat), 0.0, 1.0)).tolist()
    return palette, opacity


def _gray_rgb(display_image: np.ndarray) -> Image.Image:
    return Image.fromarray(_to_u8(np.asarray(display_image, dtype=np.float32))).convert("RGB")


def sc_size(source_shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``(rows, columns)`` of a capture of a ``source_shape`` image: the long side at most
    ``max_side``, never upsampled."""
    rows, cols = source_shape
    scale = min(1.0, max_side / max(rows, cols))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


@dataclass(frozen=True)
class ScDisplay:
    """The radiograph as displayed, at the capture's size, as 8-bit grey RGB: what every
    heatmap SC of one image is blended over (:func:`sc_display`).

    Made once per image. The pipeline makes it in stage 1 from the display image it computes
    for the model anyway, so the result stage neither keeps a full-resolution float copy nor
    computes the display again.
    """

    source_shape: tuple[int, int]
    max_side: int
    gray: Image.Image  # mode "RGB", sc_size(source_shape, max_side)


def sc_display(display_image: np.ndarray, *, max_side: int = 1024) -> ScDisplay:
    """:class:`ScDisplay` of ``display_image`` (:func:`cxr_ai.imaging.display_array`:
    rows x columns, 0-1): area-average resize to :func:`sc_size`, then 8-bit quantisation."""
    if max_side < 64:
        raise ValueError(MSG_OPTIONS.format(name="max_side", bounds=">= 64", value=max_side))
    display = np.asarray(display_image, dtype=np.float32)
    shape = (int(display.shape[0]), int(display.shape[1]))
    return ScDisplay(source_shape=shape, max_side=max_side, gray=_gray_rgb(_resize(display, sc_size(shape, max_side))))


def overlay_rgb(
    display_image: np.ndarray,
    heat: np.ndarray,
    *,
    colormap: str = "inferno",
    max_alpha: float = 0.6,
    min_heat: float = 0.2,
) -> np.ndarray:
    """Blend ``heat`` (0-1) over the grayscale ``display_image`` (0-1); uint8 RGB.

    Opacity is ``max_alpha`` at heat 1, falls linearly to 0 at ``min_heat`` and stays 0 below.
    Both images are quantised to 8 bits first (the output's depth), and the blend runs in
    Pillow's C code: the colormap as a palette, the opacity as a lookup table, then
    ``Image.composite``.
    """
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(MSG_OPTIONS.format(name="max_alpha", bounds="[0, 1]", value=max_alpha))
    if not 0.0 <= min_heat < 1.0:
        raise ValueError(MSG_OPTIONS.format(name="min_heat", bounds="[0, 1)", value=min_heat))
    return _blend(_gray_rgb(display_image), heat, colormap=colormap, max_alpha=max_alpha, min_heat=min_heat)


def _blend(gray: Image.Image, heat: np.ndarray, *, colormap: str, max_alpha: float, min_heat: float) -> np.ndarray:
    """:func:`overlay_rgb` over an already quantised grey RGB image (options checked)."""
    palette, opacity = _overlay_luts(colormap, float(max_alpha), float(min_heat))
    heat_u8 = Image.fromarray(_to_u8(np.asarray(heat, dtype=np.float32)))  # mode "L"
    colour = heat_u8.copy()
    colour.putpalette(palette)  # an "L" image with a palette becomes "P"
    blended = Image.composite(colour.convert("RGB"), gray, heat_u8.point(opacity))
    return np.asarray(blended, dtype=np.uint8)


def _p_text(p: float) -> str:
    text = format_probability(p)
    return text if text[0] in "<>" else f"= {text}"


def sc_text_lines(finding: FindingResult, model: ModelInfo) -> list[str]:
    """The burned-in text (ASCII)."""
    verdict = "POSITIVE" if finding.positive else "negative"
    model_line = model.label + (f"  |  {NOT_FOR_CLINICAL_USE}" if model.not_for_clinical_use else "")
    lines = [
        f"{finding.display}: {verdict}  p {_p_text(finding.probability)} (threshold {finding.threshold:.2f})",
        DIAGNOSTIC_WARNING,
        model_line,
    ]
    return [line.encode("ascii", "replace").decode("ascii") for line in lines]


def _display_for(display_image: np.ndarray | ScDisplay, source_ds: Dataset, *, max_side: int) -> ScDisplay:
    """``display_image`` as the :class:`ScDisplay` of this source and ``max_side``."""
    if isinstance(display_image, ScDisplay):
        if display_image.max_side != max_side:
            raise ValueError(MSG_SC_DISPLAY_SIDE.format(made=display_image.max_side, wanted=max_side))
        shape = display_image.source_shape
    else:
        shape = np.shape(display_image)
    rows, cols = int(source_ds.Rows), int(source_ds.Columns)
    if tuple(shape) != (rows, cols):
        raise ValueError(MSG_DISPLAY_SHAPE.format(shape=tuple(shape), sop=source_ds.SOPInstanceUID, rows=rows, cols=cols))
    if isinstance(display_image, ScDisplay):
        return display_image
    return sc_display(display_image, max_side=max_side)


def build_heatmap_sc(
    source_ds: Dataset,
    finding: FindingResult,
    model: ModelInfo,
    *,
    display_image: np.ndarray | ScDisplay,
    max_side: int = 1024,
    colormap: str = "inferno",
    max_alpha: float = 0.6,
    min_heat: float = 0.2,
    series_instance_uid: str | None = None,
    series_number: int = SC_SERIES_NUMBER,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
) -> hd.sc.SCImage:
    """Build the RGB Secondary Capture of one finding's heatmap over the radiograph.

    Parameters
    ----------
    source_ds
        The image the model read (its metadata; pixels come from ``display_image``).
    finding
        The finding; its ``heatmap`` must be in the source geometry (rows x columns, 0-1).
    model
        The bundle that produced it (burned-in text, header).
    display_image
        :func:`cxr_ai.imaging.display_array` of the source (rows x columns, 0-1, bone bright),
        or its :func:`sc_display` made with the same ``max_side`` (once per image).
    max_side
        Upper bound of the capture's long side (the image is never upsampled).
    colormap, max_alpha, min_heat
        Overlay look, see :func:`overlay_rgb`.

    Raises
    ------
    ValueError
        Missing heatmap, shapes that do not match the source, or bad overlay options.
    """
    check_source(source_ds)
    if max_side < 64:
        raise ValueError(MSG_OPTIONS.format(name="max_side", bounds=">= 64", value=max_side))
    rows, cols = int(source_ds.Rows), int(source_ds.Columns)
    heat = _heat(source_ds, finding)
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(MSG_OPTIONS.format(name="max_alpha", bounds="[0, 1]", value=max_alpha))
    if not 0.0 <= min_heat < 1.0:
        raise ValueError(MSG_OPTIONS.format(name="min_heat", bounds="[0, 1)", value=min_heat))
    small = _display_for(display_image, source_ds, max_side=max_side)
    size = sc_size((rows, cols), max_side)
    # what overlay_rgb(_resize(display, size), _resize(heat, size)) gives, with the display
    # resized and quantised once per image (ScDisplay) rather than once per finding
    image = _blend(small.gray, _resize(heat, size), colormap=colormap, max_alpha=max_alpha, min_heat=min_heat)
    pixels = np.concatenate([image, _banner(size[1], sc_text_lines(finding, model))], axis=0)

    orientation = _patient_orientation(source_ds)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_ds,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or identity_of(source_ds, model.device_uid).series_uid("sc"),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid
        or identity_of(source_ds, model.device_uid).sc_uid(finding.key),
        instance_number=instance_number,
        manufacturer=sanitize_lo(model.manufacturer),
        # highdicom requires an orientation on the PATIENT path; an unknown one is emptied below.
        patient_orientation=orientation or ("L", "F"),
        # series-level: the same for every finding (the finding is named per instance below)
        series_description=series_description("heatmap", model, []),
        manufacturer_model_name=sanitize_lo(model.name),
        software_versions=software_versions(model),
    )
    if orientation is None:
        sc.PatientOrientation = None  # Type 2C: present, empty = unknown
    sc.BodyPartExamined = str(source_ds.get("BodyPartExamined", "") or "CHEST")
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source_ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = source_ds.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = (
        f"Grad-CAM saliency of {finding.display} by {model.label} ({colormap}, max opacity "
        f"{max_alpha:g}) over the source as displayed (VOI window, MONOCHROME1 inverted), "
        f"downsampled {rows}x{cols} to {size[0]}x{size[1]}, text band below"
    )[:1024]
    sc.ImageComments = DIAGNOSTIC_WARNING + (
        f"; {NOT_FOR_CLINICAL_USE}" if model.not_for_clinical_use else ""
    )
    if str(source_ds.get("LossyImageCompression", "")) == "01":
        for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source_ds:
                setattr(sc, keyword, source_ds[keyword].value)
    headers.finish(sc, source_ds, model, description=f"{finding.display} heatmap (Grad-CAM) by {model.label}")
    logger.debug(
        "built heatmap SC %s (%s) for instance %s", sc.SOPInstanceUID, finding.key, source_ds.SOPInstanceUID
    )
    return sc


# --- Parametric Map --------------------------------------------------------------------------

_PIXEL_TAGS = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}
_TYPE2_COPIED = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
)


#: PatientOrientation letter -> unit vector in the DICOM patient coordinate system (LPS).
_LPS = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0),
}
#: The display convention of a frontal chest radiograph: rows run to the patient's left,
#: columns to the feet (PS3.3 C.7.6.1.1.1).
FRONTAL_CHEST_ORIENTATION = ("L", "F")
NOMINAL_SPACING_MM = 1.0


def _direction(letters: str) -> list[float]:
    vector = np.sum([_LPS[c] for c in letters], axis=0)
    return [float(v) for v in vector / np.linalg.norm(vector)]


@dataclass(frozen=True)
class MapGeometry:
    """How a Parametric Map of a projection radiograph is placed (see :func:`map_geometry`)."""

    frame_of_reference_uid: str
    orientation: tuple[str, str]
    orientation_from_source: bool
    pixel_spacing: tuple[float, float]
    spacing_source: str  # "PixelSpacing", "ImagerPixelSpacing" or "nominal"

    def description(self) -> str:
        parts = []
        if not self.orientation_from_source:
            parts.append(
                "source has no valid PatientOrientation; the frontal-chest display convention "
                "L\\F is assumed"
            )
        if self.spacing_source == "nominal":
            parts.append(
                "source pixel spacing unknown or invalid; Pixel Measures carry a nominal "
                f"{NOMINAL_SPACING_MM:g} mm required by the Parametric Map IOD - do not measure on it"
            )
        elif self.spacing_source == "ImagerPixelSpacing":
            parts.append("pixel spacing is the source's Imager Pixel Spacing (detector plane)")
        return "; ".join(parts)


def map_geometry(source_ds: Dataset) -> MapGeometry:
    """The frame of reference a Parametric Map of ``source_ds`` is defined in.

    The Parametric Map IOD requires a Frame of Reference, plane position and orientation and
    pixel measures, which a projection radiograph does not have. The map therefore gets a
    frame of reference of its own: the source's image plane (UID derived from the source's
    SOP Instance UID, study and patient, shared by every map of that image), origin at the first pixel,
    orientation from the source's PatientOrientation (else the frontal-chest convention),
    spacing from the source's PixelSpacing, else its Imager Pixel Spacing, else a nominal
    1 mm that the derivation description says is nominal. Registration with the source is
    pixel for pixel (same matrix, Spatial Locations Preserved YES), independent of these.
    """
    orientation = _patient_orientation(source_ds)
    spacing: tuple[float, float] = (NOMINAL_SPACING_MM, NOMINAL_SPACING_MM)
    spacing_source = "nominal"
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source_ds.get(keyword, None)
        if value is not None and _valid_spacing(value):
            spacing = (float(value[0]), float(value[1]))
            spacing_source = keyword
            break
    return MapGeometry(
        frame_of_reference_uid=ResultIdentity.of(source_ds=source_ds, device_uid="").frame_of_reference_uid(),
        orientation=orientation or FRONTAL_CHEST_ORIENTATION,
        orientation_from_source=orientation is not None,
        pixel_spacing=spacing,
        spacing_source=spacing_source,
    )


def _geometry_source(source_ds: Dataset, geometry: MapGeometry) -> Dataset:
    """The source's metadata as highdicom should see it for the map.

    A copy without pixel data (the source is not modified), with the geometry of
    :func:`map_geometry` in place of the source's (possibly invalid) spacing. Type 2
    patient/study attributes the Parametric Map constructor reads are added empty when absent.
    """
    # Copy the elements (not just the dataset): assigning to a shared element would change
    # the caller's dataset.
    meta = Dataset({elem.tag: copy.copy(elem) for elem in source_ds if elem.tag not in _PIXEL_TAGS})
    if hasattr(source_ds, "file_meta"):
        meta.file_meta = source_ds.file_meta
    for keyword in _TYPE2_COPIED:
        if keyword not in meta:
            setattr(meta, keyword, "")
    row_dir = np.array(_direction(geometry.orientation[0]))
    col_dir = np.array(_direction(geometry.orientation[1]))
    col_dir = col_dir - np.dot(col_dir, row_dir) * row_dir  # orthonormal (oblique orientations)
    col_dir = col_dir / np.linalg.norm(col_dir)
    meta.FrameOfReferenceUID = geometry.frame_of_reference_uid
    meta.PositionReferenceIndicator = ""
    meta.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
    meta.ImagePositionPatient = [0.0, 0.0, 0.0]
    meta.PixelSpacing = list(geometry.pixel_spacing)
    meta.SliceThickness = None
    return meta


def build_parametric_map(
    source_ds: Dataset,
    finding: FindingResult,
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    series_number: int = PM_SERIES_NUMBER,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> hd.pm.ParametricMap:
    """Build the Parametric Map of one finding's heatmap in the source geometry.

    Raises
    ------
    ValueError
        Missing heatmap or a heatmap whose shape is not the source's rows x columns.
    """
    check_source(source_ds)
    heat = _heat(source_ds, finding)
    stored = np.multiply(heat, np.float32(PM_SCALE))  # round(heat * PM_SCALE), one temporary
    np.rint(stored, out=stored)
    stored = stored.astype(np.uint16)
    label = f"{finding.key.upper()}_MAP"[:16]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=finding.key[:16],
        lut_explanation=sanitize_lo(f"{finding.display} Grad-CAM saliency (0-1)"),
        unit=codes.UNITLESS,
        value_range=(0, PM_SCALE),
        slope=1.0 / PM_SCALE,
        intercept=0.0,
        quantity_definition=codes.SALIENCY,
    )
    qualification = (
        hd.ContentQualificationValues.RESEARCH if model.not_for_clinical_use
        else hd.ContentQualificationValues.PRODUCT
    )
    geometry = map_geometry(source_ds)
    pm = hd.pm.ParametricMap(
        source_images=[_geometry_source(source_ds, geometry)],
        pixel_array=stored,
        series_instance_uid=series_instance_uid or identity_of(source_ds, model.device_uid).series_uid("pm"),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid
        or identity_of(source_ds, model.device_uid).pm_uid(finding.key),
        instance_number=instance_number,
        manufacturer=sanitize_lo(model.manufacturer),
        manufacturer_model_name=sanitize_lo(model.name),
        software_versions=software_versions(model),
        device_serial_number=model.device_uid[:LO_MAX],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=PM_SCALE / 2, window_width=PM_SCALE)
        ],
        transfer_syntax_uid=transfer_syntax_uid,
        content_label=label,
        content_description=sanitize_lo(f"{finding.display} Grad-CAM saliency - {DIAGNOSTIC_WARNING}"),
        content_qualification=qualification,
        series_description=series_description("heatmap map", model, []),  # series-level: no finding
    )
    # Frame Anatomy (C.7.6.16.2.8): the chest, an unpaired region. Saying so is what makes
    # the General Series Laterality (Type 2C) not required.
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.CHEST)]
    anatomy.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    derivation = (
        f"Grad-CAM saliency of {finding.display} by {model.label}, pixel for pixel in the "
        "source geometry"
    )
    if geometry.description():
        derivation += "; " + geometry.description()
    for frame in pm.PerFrameFunctionalGroupsSequence:
        for item in frame.get("DerivationImageSequence", []):
            item.DerivationDescription = derivation[:1024]
    headers.finish(pm, source_ds, model, description=f"{finding.display} saliency map (Grad-CAM) by {model.label}")
    logger.debug(
        "built Parametric Map %s (%s) for instance %s", pm.SOPInstanceUID, finding.key, source_ds.SOPInstanceUID
    )
    return pm


def build_parametric_maps(
    source_ds: Dataset,
    findings: Sequence[FindingResult],
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    series_number: int = PM_SERIES_NUMBER,
    first_instance_number: int = 1,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> list[hd.pm.ParametricMap]:
    """One Parametric Map per finding, in one series (see the module docstring for why)."""
    return [
        build_parametric_map(
            source_ds, finding, model,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            instance_number=first_instance_number + i,
            transfer_syntax_uid=transfer_syntax_uid,
        )
        for i, finding in enumerate(findings)
    ]
