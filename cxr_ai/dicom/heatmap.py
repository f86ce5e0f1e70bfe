"""Heatmaps as DICOM, part 1: an RGB Secondary Capture to look at.

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

The Parametric Map to toggle is in :mod:`cxr_ai.dicom.parametric_map`.
"""

from __future__ import annotations

import functools
import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from cxr_ai.dicom import headers
from cxr_ai.dicom.common import (
    NOT_FOR_CLINICAL_USE,
    SC_SERIES_NUMBER,
    check_source,
    sanitize_lo,
    series_description,
    software_versions,
)
from cxr_ai.dicom.heat import DIAGNOSTIC_WARNING, heat_of, patient_orientation
from cxr_ai.dicom.uids import identity_of
from cxr_ai.results import FindingResult, ModelInfo, format_probability

logger = logging.getLogger(__name__)

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


def _gray_u8(display_image: np.ndarray) -> np.ndarray:
    return _to_u8(np.asarray(display_image, dtype=np.float32))


@functools.lru_cache(maxsize=16)
def _blend_table(colormap: str, max_alpha: float, min_heat: float) -> np.ndarray:
    """The overlay of every 8-bit heat over every 8-bit grey, as packed RGBX (uint32, index
    ``grey * 256 + heat``): Pillow's composite of the palette colour over the grey, through
    the opacity table, run once on the 256 x 256 grid of all pairs. Blending an image is then
    one lookup per pixel, pixel for pixel what the composite gives."""
    palette, opacity = _overlay_luts(colormap, max_alpha, min_heat)
    heat = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1)))  # row: grey, column: heat
    grey = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1)).convert("RGB")
    colour = heat.copy()
    colour.putpalette(palette)  # an "L" image with a palette becomes "P"
    rgb = np.asarray(Image.composite(colour.convert("RGB"), grey, heat.point(opacity)), dtype=np.uint8)
    rgbx = np.zeros((256, 256, 4), dtype=np.uint8)
    rgbx[..., :3] = rgb
    return rgbx.view(np.uint32).reshape(65536)


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
    gray: np.ndarray  # uint8, sc_size(source_shape, max_side)


def sc_display(display_image: np.ndarray, *, max_side: int = 1024) -> ScDisplay:
    """:class:`ScDisplay` of ``display_image`` (:func:`cxr_ai.imaging.display_array`:
    rows x columns, 0-1): area-average resize to :func:`sc_size`, then 8-bit quantisation."""
    if max_side < 64:
        raise ValueError(MSG_OPTIONS.format(name="max_side", bounds=">= 64", value=max_side))
    display = np.asarray(display_image, dtype=np.float32)
    shape = (int(display.shape[0]), int(display.shape[1]))
    return ScDisplay(source_shape=shape, max_side=max_side, gray=_gray_u8(_resize(display, sc_size(shape, max_side))))


def _check_look(max_alpha: float, min_heat: float) -> None:
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(MSG_OPTIONS.format(name="max_alpha", bounds="[0, 1]", value=max_alpha))
    if not 0.0 <= min_heat < 1.0:
        raise ValueError(MSG_OPTIONS.format(name="min_heat", bounds="[0, 1)", value=min_heat))


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
    Both images are quantised to 8 bits first (the output's depth). The blend is Pillow's
    (the colormap as a palette, the opacity as a lookup table, ``Image.composite``), run once
    per look on every pair of 8-bit grey and heat and then looked up per pixel.
    """
    _check_look(max_alpha, min_heat)
    return _blend(_gray_u8(display_image), heat, colormap=colormap, max_alpha=max_alpha, min_heat=min_heat)


def _blend(gray: np.ndarray, heat: np.ndarray, *, colormap: str, max_alpha: float, min_heat: float) -> np.ndarray:
    """:func:`overlay_rgb` over an already quantised 8-bit grey image (options checked)."""
    table = _blend_table(colormap, float(max_alpha), float(min_heat))
    index = gray.astype(np.uint16) << 8
    index |= _to_u8(np.asarray(heat, dtype=np.float32))
    rgbx = np.take(table, index)
    # RGBX -> contiguous RGB in Pillow's unpacker (numpy's strided copy is about twice as slow)
    rows, cols = gray.shape
    return np.asarray(Image.frombuffer("RGBX", (cols, rows), rgbx, "raw", "RGBX", 0, 1).convert("RGB"))


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
    rows, cols = int(source_ds.Rows), int(source_ds.Columns)
    if isinstance(display_image, ScDisplay):
        if display_image.max_side != max_side:
            raise ValueError(MSG_SC_DISPLAY_SIDE.format(made=display_image.max_side, wanted=max_side))
        small, shape = display_image, display_image.source_shape
    else:
        small, shape = None, tuple(np.shape(display_image))
    if shape != (rows, cols):
        raise ValueError(MSG_DISPLAY_SHAPE.format(shape=shape, sop=source_ds.SOPInstanceUID, rows=rows, cols=cols))
    return small if small is not None else sc_display(display_image, max_side=max_side)


def _sc_pixels(source_ds: Dataset, finding: FindingResult, model: ModelInfo, display_image: np.ndarray | ScDisplay,
               *, max_side: int, colormap: str, max_alpha: float, min_heat: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The capture's RGB pixels (the blended image over the text band) and the image's size."""
    if max_side < 64:
        raise ValueError(MSG_OPTIONS.format(name="max_side", bounds=">= 64", value=max_side))
    rows, cols = int(source_ds.Rows), int(source_ds.Columns)
    heat = heat_of(source_ds, finding)
    _check_look(max_alpha, min_heat)
    small = _display_for(display_image, source_ds, max_side=max_side)
    size = sc_size((rows, cols), max_side)
    # what overlay_rgb(_resize(display, size), _resize(heat, size)) gives, with the display
    # resized and quantised once per image (ScDisplay) rather than once per finding
    image = _blend(small.gray, _resize(heat, size), colormap=colormap, max_alpha=max_alpha, min_heat=min_heat)
    return np.concatenate([image, _banner(size[1], sc_text_lines(finding, model))], axis=0), size


def _describe_sc(sc: hd.sc.SCImage, source_ds: Dataset, finding: FindingResult, model: ModelInfo, *,
                 colormap: str, max_alpha: float, size: tuple[int, int]) -> None:
    """The capture's own attributes: what it shows, where it came from, the source's lossy history."""
    rows, cols = int(source_ds.Rows), int(source_ds.Columns)
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
    pixels, size = _sc_pixels(source_ds, finding, model, display_image, max_side=max_side, colormap=colormap,
                              max_alpha=max_alpha, min_heat=min_heat)

    orientation = patient_orientation(source_ds)
    identity = identity_of(source_ds, model.device_uid)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_ds,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or identity.series_uid("sc"),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or identity.sc_uid(finding.key),
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
    _describe_sc(sc, source_ds, finding, model, colormap=colormap, max_alpha=max_alpha, size=size)
    headers.finish(sc, source_ds, model, description=f"{finding.display} heatmap (Grad-CAM) by {model.label}")
    logger.debug(
        "built heatmap SC %s (%s) for instance %s", sc.SOPInstanceUID, finding.key, source_ds.SOPInstanceUID
    )
    return sc
