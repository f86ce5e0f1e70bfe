"""Screen-size images for the study page: the frontal radiograph as displayed (the pixel
pipeline's display steps, :func:`cxr_ai.imaging.display_array`) and the heatmap of one finding
from the study's Parametric Map, as PNG. Full-resolution DICOM never leaves the server."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

# cxr_ai.imaging and cxr_ai.dicom.heatmap (MONAI, highdicom) are imported when an image is
# first drawn: the service's pipeline has usually loaded them already, and the pages alone
# should not add them to the process.


class ImageCache:
    """A small LRU of rendered PNGs (rendering a 2k x 2k radiograph takes a fraction of a second)."""

    def __init__(self, *, entries: int = 32) -> None:
        self.entries = entries
        self._data: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: tuple, make) -> bytes:  # noqa: ANN001 - a callable returning bytes
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        data = make()
        with self._lock:
            self._data[key] = data
            while len(self._data) > self.entries:
                self._data.popitem(last=False)
        return data


def _fit(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    rows, cols = shape
    scale = min(1.0, max_side / max(rows, cols))
    return max(1, round(cols * scale)), max(1, round(rows * scale))  # PIL size: (width, height)


def radiograph_png(path: str | Path, *, max_side: int) -> bytes:
    """The radiograph at ``path`` as an 8-bit grey PNG no larger than ``max_side``."""
    from cxr_ai.imaging import display_array

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = pixels[0]
    img, _ = display_array(ds, pixels)
    u8 = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out = Image.fromarray(u8, mode="L").resize(_fit(u8.shape, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def pm_finding(path: Path) -> str:
    """The finding key of a Parametric Map written by :mod:`cxr_ai.dicom.parametric_map` (from its label)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.get("ContentLabel", "")).removesuffix("_MAP").lower()


def display_size(path: str | Path, *, max_side: int) -> tuple[int, int]:
    """(width, height) at which :func:`radiograph_png` renders the image at ``path``."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return _fit((int(ds.Rows), int(ds.Columns)), max_side)


def heatmap_png(path: Path, *, size: tuple[int, int]) -> bytes:
    """The Parametric Map at ``path`` as a coloured, transparent PNG of ``size`` (width, height)
    over the displayed radiograph (alpha follows the value)."""
    from matplotlib import colormaps

    from cxr_ai.dicom.parametric_map import PM_SCALE

    ds = pydicom.dcmread(path)
    heat = np.asarray(ds.pixel_array, dtype=np.float32)
    if heat.ndim == 3:
        heat = heat[0]
    heat = np.clip(heat / PM_SCALE, 0.0, 1.0)
    heat = np.asarray(Image.fromarray(heat, mode="F").resize(size, Image.BILINEAR))
    rgba = colormaps["jet"](heat)
    rgba[..., 3] = np.clip(heat * 1.25, 0.0, 1.0)
    out = Image.fromarray((rgba * 255.0 + 0.5).astype(np.uint8), mode="RGBA")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
