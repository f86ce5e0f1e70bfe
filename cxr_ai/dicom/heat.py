"""A finding's heatmap as the result writers read it: checked against the source, clipped to
[0, 1], with the source's orientation and pixel spacing read the same way for every object.

The heatmap Secondary Capture (:mod:`cxr_ai.dicom.heatmap`), the Parametric Map
(:mod:`cxr_ai.dicom.parametric_map`) and the Segmentation (:mod:`cxr_ai.dicom.segmentation`)
of one finding read the same map.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset

from cxr_ai.results import FindingResult

DIAGNOSTIC_WARNING = "AI heatmap - not for diagnostic use"

MSG_NO_HEATMAP = (
    "finding {key!r} for instance {sop} carries no heatmap; run the model with "
    "explainability on (config [models] explain = true) or skip heatmap outputs for it"
)
MSG_HEATMAP_SHAPE = (
    "heatmap of finding {key!r} has shape {shape}, but the source image {sop} is {rows} x "
    "{cols}; map it back to the source geometry first (Letterbox.to_source)"
)

_ORIENTATION_LETTERS = set("APRLHF")
_SPACING_RANGE_MM = (0.01, 5.0)


def heat_of(source_ds: Dataset, finding: FindingResult) -> np.ndarray:
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
    return clip01(heat)


def clip01(heat: np.ndarray) -> np.ndarray:
    """``np.clip(np.nan_to_num(heat), 0, 1)`` (NaN and -inf to 0, +inf to 1), read-only use.

    A map already in [0, 1] (what the engine makes) is returned as it is: two reductions, no
    copy. ``min``/``max`` propagate NaN, so a map with NaN takes the clipping path.
    """
    if 0.0 <= float(heat.min()) and float(heat.max()) <= 1.0:
        return heat
    out = np.fmax(heat, np.float32(0.0))  # NaN -> 0 (fmax ignores NaN), -inf -> 0
    np.fmin(out, np.float32(1.0), out=out)  # +inf -> 1
    return out


def valid_spacing(value: object) -> bool:
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return False
    lo, hi = _SPACING_RANGE_MM
    return all(math.isfinite(v) and lo <= v <= hi for v in (row, col))


_OPPOSITE = ({"L", "R"}, {"A", "P"}, {"H", "F"})


def patient_orientation(source_ds: Dataset) -> tuple[str, str] | None:
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
    if abs(float(np.dot(direction(row), direction(col)))) > 0.99:
        return None
    return row, col


#: PatientOrientation letter -> unit vector in the DICOM patient coordinate system (LPS).
LPS = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0),
}


def direction(letters: str) -> list[float]:
    vector = np.sum([LPS[c] for c in letters], axis=0)
    return [float(v) for v in vector / np.linalg.norm(vector)]
