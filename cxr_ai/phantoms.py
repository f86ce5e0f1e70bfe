"""Synthetic chest radiograph studies with known ground truth, written as valid DICOM.

The phantoms serve training of the demo model, accuracy and fairness checks, and the demo.
Everything is deterministic for a given seed: the same :class:`PhantomConfig` writes
byte-identical files (UIDs come from :func:`pydicom.uid.generate_uid` with seed-derived
entropy, dates from the random stream, never from the clock).

Ground-truth model (per study, i.e. per patient visit)
------------------------------------------------------
- **LVEF** (float, %) is latent. ``low_ef = LVEF <= 40`` (the HFrEF boundary). Its prevalence
  is ``PhantomConfig.prevalence_low_ef``, modulated by age (older: more) and sex (men: more).
- **Cardiothoracic ratio** ``ctr`` is the *true* ratio, i.e. what a PA film shows:
  max horizontal heart width / max inner thoracic width. ``cardiomegaly = ctr > 0.5``.
  Low EF makes cardiomegaly likely (P = 0.78); the rest of the cardiomegaly prevalence
  (valvular, hypertensive, pericardial causes) falls on normal-EF patients, so the two labels
  are correlated but not identical in either direction.
- **AP films magnify the heart**: on an AP view the drawn heart is ``ctr * m`` wide with
  ``m`` ~ U(1.05, 1.12) (column ``ctr_apparent``), so an AP film may show an apparent CTR up to
  ~0.55 without cardiomegaly. Labels always come from the true ``ctr``.
- **Congestion signs** (perihilar haze, vascular redistribution, Kerley B lines, small pleural
  effusions blunting a costophrenic angle) appear in ~80 % of low-EF visits (more severe for
  lower LVEF) and in ~6 % of normal-EF visits (label noise: fluid overload, HFpEF).
  Low-EF hearts are also more globular.

Acquisition-quality shift
-------------------------
``PhantomConfig.shift_group`` (e.g. ``{"race": "Black"}``) with ``shift_strength`` in [0, 1]
degrades the images of that group only: more quantum noise, mid-frequency mottle, a scatter
veil (lower contrast) and blur. Column ``shifted`` marks them. This is a real image-quality
difference a model can be worse on, so fairness tooling has something to find.

Files
-----
:func:`generate_studies` writes ``out_dir/study_XXXX/img_YY.dcm`` and ``out_dir/labels.csv``
(one row per instance; columns :data:`LABEL_COLUMNS` first, then extras).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_ai import __version__
from cxr_ai import portable_math as pm
from cxr_ai.dicom.codes import CHEST
from cxr_ai.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "EXTRA_COLUMNS",
    "LABEL_COLUMNS",
    "ChestParams",
    "PhantomConfig",
    "generate_studies",
    "make_phantom_dataset",
    "render_chest",
    "render_image",
    "sample_chest_params",
    "sample_labels",
]

#: SOP Class UIDs (PS3.4 B.5).
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

#: The labels CSV starts with exactly these columns (extras follow).
LABEL_COLUMNS: tuple[str, ...] = (
    "file",
    "patient_id",
    "study_uid",
    "series_uid",
    "sop_uid",
    "accession",
    "modality",
    "view",
    "body_part",
    "frontal_chest",
    "ctr",
    "cardiomegaly",
    "lvef",
    "low_ef",
    "sex",
    "age",
    "race",
    "insurance",
    "shifted",
)
EXTRA_COLUMNS: tuple[str, ...] = (
    "ctr_apparent",
    "congestion",
    "effusion",
    "photometric",
    "bits_stored",
    "rows",
    "columns",
    "pixel_spacing_mm",
    "study_date",
    "visit",
)

CTR_THRESHOLD = 0.5
LOW_EF_THRESHOLD = 40.0
RACES: tuple[str, ...] = ("White", "Black", "Asian", "Hispanic", "Other")
RACE_WEIGHTS: tuple[float, ...] = (0.58, 0.18, 0.09, 0.11, 0.04)
INSURANCES: tuple[str, ...] = ("Medicare", "Medicaid", "Private", "Other")
SHIFT_KEYS: tuple[str, ...] = ("race", "sex", "insurance")
VIEWS: tuple[str, ...] = ("PA", "AP", "LL")
NON_CHEST_PARTS: tuple[str, ...] = ("ABDOMEN", "HAND")
MANUFACTURER = "cxr-ai phantom"
ISSUER = "CXR-AI-PHANTOM"
_UID_TAG = "cxr-ai-phantom"
_REF_SIZE = 2048  # image size at which noise amplitudes are specified
_MAX_WORK = 896  # anatomy is rendered at most at this size, then upsampled

# Coded concepts for DX headers (pydicom's CID 4010 view codes and CID 4031 regions).
_VIEW_CODES = {"PA": codes.SCT.PosteroAnterior, "AP": codes.SCT.AnteroPosterior,
               "LL": codes.SCT.LeftLateral}
_REGION_CODES = {"CHEST": CHEST, "ABDOMEN": codes.SCT.Abdomen, "HAND": codes.SCT.Hand}

_SYLLABLES = ("ka", "lo", "mi", "ra", "ne", "so", "ta", "vi", "do", "re", "lu", "ma", "ko",
              "sa", "te", "ni", "ba", "ve", "ri", "no", "ga", "lin", "mar", "tos", "len")


# ============================================================================================
# Parameters
# ============================================================================================


@dataclass(frozen=True)
class ChestParams:
    """What one synthetic radiograph shows; all geometry in units of half the image size.

    Parameters
    ----------
    view : {"PA", "AP", "LL"}
        Projection. ``LL`` renders a left-lateral chest.
    ctr : float
        True (PA-equivalent) cardiothoracic ratio.
    magnification : float
        Heart magnification of the projection (1 for PA, ~1.05-1.12 for AP).
    globular : float
        0..1, rounding of the cardiac silhouette (dilated left ventricle).
    congestion : float
        0..1, perihilar haze and upper-zone vascular redistribution.
    kerley : float
        0..1, intensity of Kerley B lines at the lateral lung bases.
    effusion_right, effusion_left : float
        0..1, pleural fluid (patient's right is image left on frontal views).
    breast : float
        0..1, breast soft-tissue shadow over the lower zones.
    thorax_width : float
        Inner thoracic half-width.
    inspiration : float
        Lung height factor (AP / supine films are less inspired).
    habitus : float
        0..1, soft-tissue thickness.
    bone : float
        Bone density factor.
    shift_x, shift_y : float
        Patient position (translation).
    quality_shift : float
        0..1, acquisition-quality degradation (noise, mottle, veil, blur).
    noise : float
        Quantum-noise factor.
    """

    view: str = "PA"
    ctr: float = 0.45
    magnification: float = 1.0
    globular: float = 0.0
    congestion: float = 0.0
    kerley: float = 0.0
    effusion_right: float = 0.0
    effusion_left: float = 0.0
    breast: float = 0.0
    thorax_width: float = 0.70
    inspiration: float = 1.0
    habitus: float = 0.5
    bone: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    quality_shift: float = 0.0
    noise: float = 1.0

    @property
    def ctr_apparent(self) -> float:
        """The cardiothoracic ratio as drawn on the image."""
        return float(self.ctr * self.magnification)


@dataclass(frozen=True)
class PhantomConfig:
    """What :func:`generate_studies` writes.

    Parameters
    ----------
    n_studies : int
        Number of studies (patient visits, one folder each).
    seed : int
        Seed of everything: same config, same bytes.
    size : int, optional
        Square image size override (pixels a side), e.g. 512 for fast tests. When ``None``,
        rows and columns are drawn from ``size_range``.
    size_range : (int, int)
        Range of image sides when ``size`` is ``None``.
    prevalence_cardiomegaly, prevalence_low_ef : float
        Approximate per-visit prevalences of the two labels.
    fraction_ap : float
        Fraction of frontal chest studies that are AP (more for sicker patients).
    fraction_lateral : float
        Fraction of PA studies that also carry a left-lateral image.
    fraction_non_chest : float
        Fraction of studies that are not chest (``ABDOMEN`` AP or ``HAND`` PA).
    fraction_repeat_patient : float
        Probability that a patient has more than one study.
    max_studies_per_patient : int
        Upper bound of studies per patient.
    modalities : tuple of {"CR", "DX"}
        Modalities to mix (DX is Digital X-Ray Image Storage - For Presentation).
    fraction_monochrome1 : float
        Fraction of studies stored MONOCHROME1.
    bits_stored : tuple of int
        BitsStored values to mix (12..16; BitsAllocated is 16).
    shift_group : mapping, optional
        Subgroup whose images are degraded, e.g. ``{"race": "Black"}``; keys among
        ``race``, ``sex``, ``insurance``.
    shift_strength : float
        0..1, strength of that degradation.
    """

    n_studies: int = 20
    seed: int = 0
    size: int | None = None
    size_range: tuple[int, int] = (1760, 2500)
    prevalence_cardiomegaly: float = 0.25
    prevalence_low_ef: float = 0.20
    fraction_ap: float = 0.30
    fraction_lateral: float = 0.20
    fraction_non_chest: float = 0.08
    fraction_repeat_patient: float = 0.30
    max_studies_per_patient: int = 4
    modalities: tuple[str, ...] = ("CR", "DX")
    fraction_monochrome1: float = 0.5
    bits_stored: tuple[int, ...] = (12, 14, 15, 16)
    shift_group: Mapping[str, str] | None = field(default=None, hash=False)
    shift_strength: float = 0.0

    def __post_init__(self) -> None:
        if self.n_studies < 1:
            raise ConfigError(f"n_studies must be >= 1, got {self.n_studies}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.size is not None and not 64 <= self.size <= 4096:
            raise ConfigError(f"size must be within 64..4096 pixels, got {self.size}")
        lo, hi = self.size_range
        if not 64 <= lo <= hi <= 4096:
            raise ConfigError(f"size_range must satisfy 64 <= lo <= hi <= 4096, got {self.size_range}")
        for name in ("prevalence_cardiomegaly", "prevalence_low_ef", "fraction_ap",
                     "fraction_lateral", "fraction_non_chest", "fraction_repeat_patient",
                     "fraction_monochrome1", "shift_strength"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1], got {value}")
        if self.max_studies_per_patient < 1:
            raise ConfigError("max_studies_per_patient must be >= 1")
        bad = [m for m in self.modalities if m not in ("CR", "DX")]
        if bad or not self.modalities:
            raise ConfigError(
                f"modalities must be a non-empty subset of ('CR', 'DX'), got {self.modalities}"
            )
        bad_bits = [b for b in self.bits_stored if not 12 <= b <= 16]
        if bad_bits or not self.bits_stored:
            raise ConfigError(f"bits_stored values must be within 12..16, got {self.bits_stored}")
        if self.shift_group is not None:
            unknown = sorted(set(self.shift_group) - set(SHIFT_KEYS))
            if unknown or not self.shift_group:
                raise ConfigError(
                    f"shift_group keys must be among {SHIFT_KEYS}, got {dict(self.shift_group)}"
                )
            object.__setattr__(self, "shift_group", dict(self.shift_group))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "bits_stored", tuple(self.bits_stored))
        object.__setattr__(self, "size_range", tuple(self.size_range))


# ============================================================================================
# Small numerical helpers (all vectorised)
# ============================================================================================


def _ramp(d: np.ndarray | float, width: float) -> np.ndarray:
    """Soft step: 0 for d <= -width/2, 1 for d >= width/2, linear between."""
    return np.clip(np.asarray(d, dtype=np.float32) * np.float32(1.0 / width) + np.float32(0.5), 0.0, 1.0)


def _resize(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres), numpy only."""
    h, w = img.shape
    if (h, w) == (rows, cols):
        return img

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    c0, c1, wc = axis(w, cols)
    tmp = np.take(img, c0, axis=1)
    tmp *= 1.0 - wc
    tmp += np.take(img, c1, axis=1) * wc
    r0, r1, wr = axis(h, rows)
    out = np.take(tmp, r0, axis=0)
    out *= (1.0 - wr)[:, None]
    out += np.take(tmp, r1, axis=0) * wr[:, None]
    return out


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, scale: float,
                  grid: int = 128) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``scale`` (fraction of size).

    Generated on a small grid by FFT filtering, then upsampled bilinearly.
    """
    g = int(min(grid, max(16, 4.0 / max(scale, 1e-3))))
    white = rng.standard_normal((g, g)).astype(np.float32)
    fy = np.fft.fftfreq(g)[:, None]
    fx = np.fft.rfftfreq(g)[None, :]
    sigma = scale * g
    filt = pm.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    field_ = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(g, g)).astype(np.float32)
    field_ /= field_.std() + 1e-8
    return _resize(field_, rows, cols)


def _axes(rows: int, cols: int, p: ChestParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-D normalised coordinates (x right, y down; unit = half the smaller image side),
    shifted by the patient's position. Broadcast ``x[None, :]`` and ``y[:, None]``."""
    s = min(rows, cols) / 2.0
    y = (np.arange(rows, dtype=np.float32) + 0.5 - rows / 2.0) / s
    x = (np.arange(cols, dtype=np.float32) + 0.5 - cols / 2.0) / s
    if p is not None:
        x, y = x - np.float32(p.shift_x), y - np.float32(p.shift_y)
    return x, y


def _grid(rows: int, cols: int, p: ChestParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable coordinates ``X`` (1, cols) and ``Y`` (rows, 1), see :func:`_axes`."""
    x, y = _axes(rows, cols, p)
    return x[None, :], y[:, None]


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Slice of an ascending 1-D coordinate array covering [lo, hi] (may be empty)."""
    i0 = int(np.searchsorted(coords, lo, "left"))
    i1 = int(np.searchsorted(coords, hi, "right"))
    return slice(i0, max(i0, i1))


def _bone_profile(f: np.ndarray) -> np.ndarray:
    """Projected density across a tubular bone; ``f`` in [-1, 1] across it (cortex brighter),
    0 outside."""
    f2 = np.minimum(f * f, 1.0)
    outer = np.sqrt(1.0 - f2)
    inner = np.sqrt(np.clip(0.6 - f2, 0.0, None) * (1.0 / 0.6))
    return outer - 0.55 * inner


def _bands(v: np.ndarray, period: np.ndarray | float, duty: np.ndarray | float) -> np.ndarray:
    """Periodic bone bands along ``v``: the bone profile over a ``duty`` fraction of each
    period, 0 elsewhere."""
    r = v * (1.0 / period) if np.isscalar(period) else v / period
    frac = r - np.floor(r)
    return _bone_profile(frac * (2.0 / duty) - 1.0)


# ============================================================================================
# Rendering
# ============================================================================================


def _finish(d: np.ndarray, p: ChestParams, rows: int, cols: int,
            rng: np.random.Generator) -> np.ndarray:
    """Upsample the anatomy, apply the acquisition (quality shift, noise) and clip to [0, 1]."""
    q = float(np.clip(p.quality_shift, 0.0, 1.0))
    small = min(rows, cols)
    if q > 0:
        # scatter veil: lower, uneven contrast
        veil = 0.5 + 0.15 * _smooth_noise(rng, d.shape[0], d.shape[1], 0.25, grid=32)
        d = d * np.float32(1.0 - 0.30 * q) + np.float32(0.30 * q) * veil
        # mid-frequency mottle (survives downsampling to model input sizes)
        d = d + np.float32(0.035 * q) * _smooth_noise(rng, d.shape[0], d.shape[1], 0.008, grid=256)
    d = _resize(d.astype(np.float32, copy=False), rows, cols)
    # quantum noise: white at full resolution, amplitude specified at the reference size so
    # that images rendered small look like big ones downsampled; denser areas are noisier.
    # A sum of two uniform bytes (triangular, std 104.5) is a cheap stand-in for a Gaussian.
    sigma = 0.022 * p.noise * (1.0 + 2.5 * q) * (small / _REF_SIZE)
    if sigma > 0:
        raw = np.frombuffer(rng.bytes(2 * rows * cols), dtype=np.uint8).reshape(2, rows, cols)
        noise = raw.sum(axis=0, dtype=np.float32)
        noise -= 255.0
        noise *= np.float32(sigma / 104.5)
        noise *= d + np.float32(0.6)
        d += noise
    return np.clip(d, 0.0, 1.0, out=d)


def _work_shape(rows: int, cols: int, p: ChestParams) -> tuple[int, int]:
    """Resolution at which anatomy is rendered (lower for degraded acquisitions: blur)."""
    q = float(np.clip(p.quality_shift, 0.0, 1.0))
    f = min(1.0, _MAX_WORK / max(rows, cols)) / (1.0 + 1.5 * q)
    return max(16, int(round(rows * f))), max(16, int(round(cols * f)))


def render_chest(params: ChestParams, rows: int, cols: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Render a chest radiograph.

    Parameters
    ----------
    params : ChestParams
        Anatomy and acquisition.
    rows, cols : int
        Output size in pixels (any size from ~64 up; small sizes render directly).
    rng : numpy.random.Generator
        Source of texture and noise.

    Returns
    -------
    numpy.ndarray
        float32 ``(rows, cols)`` in [0, 1], 1 = most attenuating (white as presented,
        i.e. MONOCHROME2 sense). Frontal views are displayed with the patient's right on
        image left; lateral views face image left.
    """
    if params.view not in VIEWS:
        raise ValueError(f"unknown view {params.view!r}: expected one of {VIEWS}")
    wr, wc = _work_shape(rows, cols, params)
    if params.view == "LL":
        d = _lateral_anatomy(params, wr, wc, rng)
    else:
        d = _frontal_anatomy(params, wr, wc, rng)
    return _finish(d, params, rows, cols, rng)


def _frontal_anatomy(p: ChestParams, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    xs, ys = _axes(rows, cols, p)
    X, Y = xs[None, :], ys[:, None]
    e = 4.0 / min(rows, cols) + 0.004  # edge softness
    ap = p.view == "AP"
    wt = float(p.thorax_width)
    ax = np.abs(X)
    left = X > 0  # image right = patient's left
    leftf = left.astype(np.float32)
    bone = p.bone

    # --- key levels (1-D where possible) ------------------------------------------------
    y_apex = -0.72 + (0.04 if ap else 0.0)
    y_dome_r = -0.78 + 1.12 * p.inspiration + (0.03 if ap else 0.0)
    y_dome_l = y_dome_r + 0.05
    a_dome, k_dome = 0.40 * wt, 0.80
    dome_top = np.where(left, np.float32(y_dome_l), np.float32(y_dome_r))
    dome = dome_top + k_dome * ((ax - a_dome) / wt) ** 2
    y_cp = y_dome_r + k_dome * 0.36  # costophrenic level
    y_low = y_dome_l + k_dome * 0.5  # below every part of the lungs
    t = np.clip((Y - y_apex) / (y_cp - y_apex), 0.0, 1.0)

    # --- body ---------------------------------------------------------------------------
    wb = wt + 0.09 + 0.09 * p.habitus
    neck = 0.22 + 0.05 * p.habitus
    wflank = wb + 0.03 * np.clip(Y, 0, 1)
    warm = wb + 0.34
    y_sh = -1.02 + 0.30 * pm.power(np.clip((ax - neck) / (warm - neck), 0, 1), 1.5)  # shoulder line
    arm = np.clip((-0.35 - Y) / 0.45, 0, 1)
    wbody = wflank + (warm - wflank) * (arm * arm * (3 - 2 * arm))
    rb = np.minimum(ax / wbody, 1.0)
    body = np.sqrt(1.0 - pm.power(rb, 3)) * _ramp(wbody - ax, 2 * e) * _ramp(Y - y_sh, 2 * e)
    d = (0.31 + 0.08 * p.habitus) * body
    # humeral heads at the upper corners
    hx = wb + 0.06
    rs = _span(ys, -2.0, -0.55)
    if rs.stop > rs.start:
        Ys = Y[rs]
        hum = np.sqrt(np.clip(1.0 - ((ax - hx) ** 2 + ((Ys + 0.80) / 1.1) ** 2) / 0.13**2, 0.0, None))
        neckh = np.sqrt(np.clip(1.0 - ((ax - hx - 0.06) / 0.09) ** 2, 0, None)) * _ramp(Ys + 0.78, 0.05)
        d[rs] += 0.13 * bone * np.maximum(hum, 0.8 * neckh) * body[rs]

    # --- mediastinum and heart ----------------------------------------------------------
    y_knob = -0.30 + (0.03 if ap else 0.0)
    med_r = 0.095 + 0.025 * t
    med_l = (0.075 + 0.085 * pm.exp(-(((Y - y_knob) / 0.065) ** 2))
             + 0.04 * pm.exp(-(((Y - (y_knob + 0.13)) / 0.05) ** 2)))
    med = (med_r + (med_l - med_r) * leftf) * (1.12 if ap else 1.0)
    in_med = _ramp(med - ax, e)

    hw = p.ctr_apparent * wt  # heart half-width (total width = ctr * 2 * wt)
    xc = 0.15 * 2 * hw  # 35 % of the width right of the midline, 65 % left
    r_ax = 0.74 + 0.18 * p.globular  # minor/major axis ratio
    th = math.radians(38.0 - 12.0 * p.globular)  # long axis tilt (apex down-left)
    a_h = hw / math.sqrt(pm.cos(th) ** 2 + (r_ax * pm.sin(th)) ** 2)
    b_h = r_ax * a_h
    dy_apex = (a_h**2 - b_h**2) * pm.sin(th) * pm.cos(th) / hw  # apex below the centre
    x_apex = xc + hw
    dome_at_apex = y_dome_l + k_dome * ((x_apex - a_dome) / wt) ** 2
    dome_at_c = y_dome_l + k_dome * ((xc - a_dome) / wt) ** 2
    yc = min(dome_at_c - 0.25 * b_h, dome_at_apex - 0.03 - dy_apex,
             y_dome_r + k_dome * ((xc - hw - a_dome) / wt) ** 2 - 0.02 - 0.2 * b_h)
    vh = math.sqrt((a_h * pm.sin(th)) ** 2 + (b_h * pm.cos(th)) ** 2)
    hr_, hc_ = _span(ys, yc - vh - 0.02, yc + vh + 0.02), _span(xs, xc - hw - 0.02, xc + hw + 0.02)
    heart = np.zeros((rows, cols), np.float32)
    heart_w = np.zeros((rows, cols), np.float32)
    if hr_.stop > hr_.start and hc_.stop > hc_.start:
        cth, sth = pm.cos(th), pm.sin(th)
        dx_, dy_ = X[:, hc_] - xc, Y[hr_] - yc
        u = dx_ * cth + dy_ * sth
        v = dy_ * cth - dx_ * sth
        rr2 = (u / a_h) ** 2 + (v / b_h) ** 2
        hh = _ramp(1.0 - np.sqrt(rr2), 1.5 * e / max(a_h, 0.05))
        heart[hr_, hc_] = hh
        heart_w[hr_, hc_] = hh * (0.8 + 0.2 * np.sqrt(np.clip(1.0 - rr2, 0, 1)))

    # --- lungs --------------------------------------------------------------------------
    lat = wt * (0.62 + 0.38 * pm.power(pm.sin(np.clip(t * 1.1, 0, 1) * (np.pi / 2)), 0.75))
    a_apex = 0.50 * wt
    top = y_apex + 3.0 * (ax - a_apex) ** 2
    above_dia = _ramp(dome - Y, e)
    lung = _ramp(lat - ax, e) * _ramp(Y - top, e) * above_dia * (1.0 - in_med) * (1.0 - heart)
    # effusions: fluid fills the costophrenic recess with a meniscus climbing laterally
    rs = _span(ys, y_dome_r - 0.40, 2.0)
    for amount, side in ((p.effusion_right, 1.0 - leftf), (p.effusion_left, leftf)):
        if amount <= 0 or rs.stop <= rs.start:
            continue
        yd = y_dome_l if side is leftf else y_dome_r
        level = yd + 0.20 - 0.28 * amount - (0.10 + 0.08 * amount) * pm.power(np.clip(ax / wt, 0, 1), 3)
        fluid = _ramp(Y[rs] - level, 0.05 + 0.03 * amount) * side
        lung[rs] *= 1.0 - fluid
    # lung air: thickest centrally, thinning towards the edges and bases
    depth = (np.sqrt(np.clip((lat - ax) / 0.10, 0.0, 1.0))
             * np.sqrt(np.clip((dome - Y) / 0.16, 0.0, 1.0))
             * np.sqrt(np.clip((Y - top) / 0.10, 0.0, 1.0)))
    d -= 0.25 * lung * (0.55 + 0.45 * depth)
    solid = np.maximum(heart_w, in_med * _ramp(Y - y_apex - 0.02, 0.25))
    d += 0.17 * solid * above_dia
    # abdomen below the diaphragm: solid organs, plus the gastric bubble under the left dome
    below = (1.0 - above_dia) * _ramp(lat - ax, 0.16)
    d += 0.15 * below
    gx, gy = 0.40 * wt, y_dome_l + 0.09
    rs, cs = _span(ys, gy - 0.06, gy + 0.06), _span(xs, gx - 0.11, gx + 0.11)
    if rs.stop > rs.start and cs.stop > cs.start:
        bub = np.clip(1.0 - (((X[:, cs] - gx) / 0.10) ** 2 + ((Y[rs] - gy) / 0.05) ** 2), 0, None)
        d[rs, cs] -= 0.10 * np.sqrt(bub) * _ramp(Y[rs] - gy + 0.01, 0.01) * below[rs, cs]

    # --- trachea, spine -----------------------------------------------------------------
    y_carina = -0.20
    cs = _span(xs, -0.09, 0.09)
    Xc = X[:, cs]
    trachea = np.sqrt(np.clip(1.0 - (Xc / 0.036) ** 2, 0, None)) * _ramp(y_carina - Y, 0.08)
    spine = np.sqrt(np.clip(1.0 - (Xc / 0.065) ** 2, 0, None))
    vert = _bands(Y + 1.0, 0.085, 0.82)
    ped = pm.exp(-(((np.abs(Xc) - 0.045) / 0.012) ** 2)) * np.clip(vert, 0, 1)
    spine_vis = 1.0 - 0.6 * np.maximum(solid[:, cs] * above_dia[:, cs], below[:, cs])
    d[:, cs] += body[:, cs] * (bone * (0.02 + 0.02 * vert + 0.015 * ped) * spine * spine_vis
                               - 0.11 * trachea)

    # --- hila and pulmonary vessels -----------------------------------------------------
    c = p.congestion
    breakup = _ramp(_smooth_noise(rng, rows, cols, 0.025, grid=128) + 0.3, 0.8)
    worms = pm.exp(-((_smooth_noise(rng, rows, cols, 0.018, grid=192) / 0.22) ** 2))
    rs = _span(ys, y_apex - 0.02, y_low)
    for sgn, hx_, hy_ in ((-1.0, -0.19, -0.05), (1.0, 0.18, -0.09)):
        cs = _span(xs, -wt, 0.02) if sgn < 0 else _span(xs, -0.02, wt)
        if rs.stop <= rs.start or cs.stop <= cs.start:
            continue
        dxh, dyh = X[:, cs] - hx_, Y[rs] - hy_
        r = np.sqrt(dxh**2 + dyh**2) + 1e-3
        ang = pm.arctan2(dyh, dxh * sgn)
        lr = pm.log(r)
        sharp = 4.0 + 120.0 * np.minimum(r, 0.7) ** 2
        ves = np.zeros_like(r)
        for k in range(3):
            nk = float(rng.uniform(9, 16))
            ph = float(rng.uniform(0, 2 * np.pi))
            wob = float(rng.uniform(2.0, 4.0))
            g = pm.cos(nk * ang + ph + 0.9 * pm.sin(wob * lr + k))
            ves += pm.exp(sharp * (g - 1.0))
        lung_s = lung[rs, cs]
        brk = breakup[rs, cs]
        hil = pm.exp(-((dxh / 0.075) ** 2 + (dyh / 0.13) ** 2)) * (0.8 + 0.4 * brk)
        upper = np.clip(-dyh / 0.4, 0, 1)
        zone = 1.0 + (1.0 * c - 0.35 * (1.0 - c)) * upper  # upper-zone redistribution
        fade = pm.exp(-r / (0.24 + 0.10 * c)) * _ramp(r - 0.12, 0.10)
        add = (0.08 + 0.05 * c) * hil * (1.0 - in_med[rs, cs])
        add += (0.10 + 0.06 * c) * (0.7 * ves * brk + 0.35 * worms[rs, cs]) * fade * zone * lung_s
        if c > 0:  # perihilar haze (interstitial / alveolar oedema: bat-wing)
            haze = pm.exp(-((dxh / (0.20 + 0.12 * c)) ** 2 + (dyh / 0.30) ** 2))
            add += (0.13 * c) * haze * lung_s
        side = (X[:, cs] > 0) if sgn > 0 else (X[:, cs] <= 0)
        d[rs, cs] += add * side
    # lung parenchyma texture
    d += 0.012 * _smooth_noise(rng, rows, cols, 0.010, grid=256) * lung

    # Kerley B lines: short horizontal lines reaching the pleura at the lateral bases
    rs = _span(ys, y_dome_r - 0.45, y_low)
    if p.kerley > 0 and rs.stop > rs.start:
        Ys = Y[rs]
        inband = _ramp(ax - (lat[rs] - 0.10), 0.03) * _ramp(Ys - (dome_top - 0.35), 0.08)
        kl = _bands(Ys + 5.0 + 0.01 * pm.sin(ax * 40), 0.026, 0.22)
        d[rs] += (0.06 * p.kerley) * kl * inband * lung[rs]

    # breast shadows: soft tissue over the lower zones with a curved lower margin
    by = y_dome_r - 0.04
    rs = _span(ys, by - 0.45, by + 0.30)
    if p.breast > 0 and rs.stop > rs.start:
        Ys = Y[rs]
        rad = np.sqrt(((ax - 0.50 * wt) / 0.36) ** 2 + ((Ys - by) / 0.26) ** 2)
        d[rs] += (0.05 * p.breast) * _ramp(1.0 - rad, 0.25) * _ramp(Ys - by + 0.30, 0.2) * body[rs]

    # --- ribs ---------------------------------------------------------------------------
    uu = ax / wt
    rs = _span(ys, y_apex - 0.15, y_low)
    Ys = Y[rs]
    cage = (_ramp(lat[rs] + 0.06 - ax, 0.04)
            * _ramp(Ys - (y_apex - 0.10) - 2.0 * (ax - a_apex) ** 2, 0.04)
            * _ramp(ax - 0.08, 0.03) * (1.0 - 0.8 * solid[rs] * above_dia[rs]) * (1.0 - 0.6 * below[rs]))
    # posterior ribs: from the spine laterally, rising slightly, then curving down
    vp = Ys - (-0.12 * uu + 0.40 * uu**2) - (y_apex - 0.10) + (0.03 if ap else 0.0)
    vpc = np.clip(vp, 0, 1.6)
    prib = _bands(vpc / 0.080 - 1.1 * vpc**2, 1.0, 0.40 - 0.10 * np.clip(uu, 0, 1))
    prib *= (vp > 0) & (vp < 1.3)
    # anterior ribs: from the lateral wall running medially and down, fading medially
    va = Ys + (0.50 * uu - 0.14 * uu**2) - (y_apex - 0.16)
    arib = _bands(va, 0.14, 0.30) * _ramp(uu - 0.40, 0.25) * ((va > 0.12) & (va < 1.1))
    d[rs] += bone * cage * (0.075 * prib + 0.05 * arib)

    # clavicles: S-shaped bands from the sternal notch up and out to the shoulders
    cx0 = 0.07
    sc = np.clip((ax - cx0) / 0.62, 0, 1.4)
    ycl = -0.64 - 0.12 * sc + 0.03 * pm.sin(sc * np.pi * 1.5) - (0.06 if ap else 0.0)
    hcl = 0.032 + 0.008 * sc
    rs = _span(ys, -0.64 - 0.17 - 0.06 - 0.05, -0.55)
    if rs.stop > rs.start:
        fcl = (Y[rs] - ycl) / hcl
        clav = _bone_profile(fcl) * (_ramp(ax - cx0, 0.03) * _ramp(hx - ax, 0.05))
        d[rs] += 0.11 * bone * clav * body[rs]

    # scapulae: projected over the upper lateral lungs on AP films, lateral to them on PA
    sx = wt * (0.78 if ap else 0.98)
    rs = _span(ys, -0.75, 0.0)
    if rs.stop > rs.start:
        Ys = Y[rs]
        scap = _ramp(ax - sx, 0.03) * _ramp(Ys + 0.70, 0.04) * _ramp(-0.15 - Ys - 0.8 * (ax - sx), 0.04)
        d[rs] += 0.04 * bone * scap * body[rs]

    # soft anatomic inhomogeneity
    d += 0.015 * _smooth_noise(rng, rows, cols, 0.08, grid=64) * body
    return _tone(d)


def _tone(d: np.ndarray) -> np.ndarray:
    """Gentle film-like tone curve; maps the composed density to [0, 1]."""
    d = np.clip(d, 0.0, None)
    return (1.0 - pm.exp(-1.8 * d)) / (1.0 - pm.exp(-1.8 * 0.75))


def _lateral_anatomy(p: ChestParams, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Left-lateral chest: anterior on image left, spine on image right."""
    X, Y = _grid(rows, cols, p)
    e = 4.0 / min(rows, cols) + 0.004
    # body outline: convex anterior chest wall, flatter back
    xa = -0.66 - 0.05 * p.habitus + 0.12 * np.clip(Y + 0.2, 0, 1) ** 2 + 0.25 * np.clip(-0.55 - Y, 0, 1)
    xp = 0.86 + 0.04 * p.habitus
    body = _ramp(X - xa, 2 * e) * _ramp(xp - X, 2 * e)
    thick = np.sqrt(np.clip((X - xa) * (xp - X) / ((xp - xa) / 2) ** 2, 0, 1))
    d = (0.36 + 0.08 * p.habitus) * body * (0.55 + 0.45 * thick)
    # arms raised forwards: soft tissue and both humeri over the upper anterior chest
    for off, w in ((0.0, 0.05), (0.07, 0.045)):
        armd = (X + 0.10 + off) + 0.85 * (Y + 0.50)
        d = d + 0.05 * _ramp(0.14 - np.abs(armd), 0.10) * _ramp(-0.42 - Y, 0.15)
        d = d + 0.07 * p.bone * np.sqrt(np.clip(1 - (armd / w) ** 2, 0, None)) * _ramp(-0.50 - Y, 0.12)
    # lungs: a rounded superellipse cut by the diaphragm
    y_top = -0.55 + 0.80 * p.inspiration  # diaphragm apex
    dia = y_top + 0.40 * ((X + 0.12) / 0.8) ** 2
    lx = (X - 0.10) / 0.62
    ly = (Y - 0.02) / 0.76
    shape = pm.power(np.abs(lx), 2.6) + pm.power(np.clip(-ly, 0, None), 2.2)
    above = _ramp(dia - Y, e)
    lung = _ramp(1.0 - shape, 0.05) * above
    lung2 = _ramp(1.0 - shape, 0.05) * _ramp(dia + 0.05 - Y, e) * (1.0 - above)  # other dome
    # heart: anterior and inferior, sitting on the diaphragm; size follows the CTR
    hs = p.ctr_apparent / 0.45
    ah, bh = 0.30 * hs, 0.23 * pm.power(hs, 0.7)
    hx = -0.52 + ah * 0.95
    hy = y_top + 0.02 - 0.55 * bh
    th = math.radians(-25.0)
    uu = (X - hx) * pm.cos(th) + (Y - hy) * pm.sin(th)
    vv = -(X - hx) * pm.sin(th) + (Y - hy) * pm.cos(th)
    hr = np.sqrt((uu / ah) ** 2 + (vv / bh) ** 2)
    heart = _ramp(1.0 - hr, 0.06) * _ramp(dia + 0.05 - Y, e)
    for amount in (p.effusion_left, p.effusion_right):
        if amount > 0:  # the posterior costophrenic sulcus fills first
            level = dia - 0.30 * amount * pm.power(np.clip(X / 0.6, 0, 1), 1.5)
            fluid = _ramp(Y - level, 0.06) * (X > 0.0)
            lung = lung * (1 - 0.8 * fluid)
            lung2 = lung2 * (1 - 0.8 * fluid)
    air = (0.24 * lung + 0.08 * lung2) * (1.0 - 0.55 * heart)
    d = d - air
    # hila, aortic arch, congestion
    hil = pm.exp(-(((X - 0.10) / 0.10) ** 2 + ((Y + 0.08) / 0.12) ** 2))
    d = d + (0.07 + 0.05 * p.congestion) * hil * lung
    arch = pm.exp(-(((np.sqrt((X - 0.12) ** 2 / 0.8 + (Y + 0.28) ** 2) - 0.17) / 0.04) ** 2))
    d = d + 0.05 * arch * _ramp(-0.2 - Y, 0.1) * lung
    if p.congestion > 0:
        hz = pm.exp(-(((X - 0.05) / 0.35) ** 2 + ((Y + 0.05) / 0.30) ** 2))
        d = d + 0.10 * p.congestion * hz * lung
    # spine: vertebral bodies with end plates (more lucent lower down), posterior elements
    sx = 0.55 + 0.04 * Y
    vert = _bands(Y + 1.0, 0.105, 0.80)
    spine = (_ramp(0.08 - np.abs(X - sx), 0.012) * (0.30 + 0.70 * vert)
             * (1.0 - 0.25 * np.clip(Y + 0.3, 0, 1)))
    post = _ramp(0.05 - np.abs(X - sx - 0.16), 0.04) * np.clip(vert, 0, 1)
    d = d + p.bone * (0.10 * spine + 0.04 * post) * body
    # sternum
    sxs = xa + 0.05
    st = np.clip(1 - ((X - sxs) / 0.025) ** 2, 0, None) * _ramp(Y + 0.55, 0.05) * _ramp(0.20 - Y, 0.05)
    d = d + 0.07 * p.bone * np.sqrt(st)
    # trachea
    tx = 0.0 + 0.12 * (Y + 0.9)
    tr = np.clip(1 - ((X - tx) / 0.04) ** 2, 0, None) * _ramp(-0.16 - Y, 0.06)
    d = d - 0.07 * np.sqrt(tr) * body
    # ribs, faint, obliquely downward-forward, both sides slightly offset
    for off in (0.0, 0.04):
        rib = _bands(Y - 0.30 * X + 1.0 + off, 0.11, 0.30)
        d = d + 0.02 * p.bone * rib * (lung + lung2) * _ramp(X + 0.2, 0.2)
    d = d + 0.015 * _smooth_noise(rng, rows, cols, 0.012, grid=256) * lung
    d = d + 0.015 * _smooth_noise(rng, rows, cols, 0.08, grid=64) * body
    return _tone(d)


def _abdomen_anatomy(p: ChestParams, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """AP abdomen (KUB): lumbar spine, pelvis, lower ribs, bowel gas."""
    X, Y = _grid(rows, cols, p)
    e = 4.0 / min(rows, cols) + 0.004
    ax = np.abs(X)
    wb = 0.86 + 0.08 * p.habitus
    body = np.sqrt(np.clip(1.0 - pm.power(np.clip(ax / wb, 0, 1), 4), 0, 1)) * _ramp(wb - ax, 2 * e)
    d = (0.42 + 0.08 * p.habitus) * body
    # bowel gas: tubular loops (colon frame) and small-bowel bubbles
    g = _smooth_noise(rng, rows, cols, 0.05, grid=96)
    loops = pm.exp(-((g / 0.18) ** 2))
    frame = _ramp(0.72 - ax, 0.1) * _ramp(Y + 0.55, 0.1) * _ramp(0.72 - Y, 0.1)
    b = _smooth_noise(rng, rows, cols, 0.02, grid=128)
    bubbles = _ramp(b - 1.6, 0.3)
    d = d - frame * (0.12 * loops * _ramp(_smooth_noise(rng, rows, cols, 0.1, grid=32), 0.8)
                     + 0.10 * bubbles)
    # lumbar spine
    vert = _bands(Y + 1.3, 0.22, 0.84)
    spine = _ramp(0.10 - ax, 0.015) * (0.4 + 0.6 * vert) * _ramp(0.55 - Y, 0.05)
    ped = sum(pm.exp(-(((X - s * 0.065) / 0.022) ** 2)) for s in (-1, 1)) * np.clip(vert, 0, 1)
    d = d + p.bone * (0.07 + 0.0 * ped) * spine + 0.03 * p.bone * ped * _ramp(0.55 - Y, 0.05)
    # transverse processes
    d = d + 0.03 * p.bone * vert * _ramp(0.19 - ax, 0.02) * _ramp(ax - 0.1, 0.02)
    # pelvis: iliac wings as arcs, sacrum
    for s in (-1.0, 1.0):
        r = np.sqrt(((X - s * 0.42) / 0.36) ** 2 + ((Y - 0.95) / 0.42) ** 2)
        rim = np.clip(1 - ((r - 1.0) / 0.06) ** 2, 0, None)
        wing = _ramp(1.0 - r, 0.04) * 0.5 + rim
        d = d + 0.08 * p.bone * wing * (Y > 0.50) * _ramp(ax - 0.12, 0.05)
    sac = _ramp(0.16 - ax - 0.3 * (Y - 0.55), 0.02) * (Y > 0.55)
    d = d + 0.06 * p.bone * sac
    # lower ribs at the top corners
    rib = _bands(Y + 1.2 - 0.25 * ax, 0.14, 0.3)
    d = d + 0.05 * p.bone * rib * (Y < -0.55) * _ramp(ax - 0.15, 0.05) * body
    # psoas margins and liver
    d = d + 0.04 * _ramp(0.55 - ax - 0.25 * Y, 0.1) * (X < 0) * _ramp(-0.1 - Y, 0.2) * body
    d = d + 0.02 * _smooth_noise(rng, rows, cols, 0.08, grid=64) * body
    return _tone(d)


def _segment(xs: np.ndarray, ys: np.ndarray, a: tuple[float, float], b: tuple[float, float],
             reach: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Distance to segment a-b and the position along it (0..1), computed only in the
    bounding box grown by ``reach``. Returns (row slice, column slice, distance, position)."""
    (ax_, ay_), (bx_, by_) = a, b
    rs = _span(ys, min(ay_, by_) - reach, max(ay_, by_) + reach)
    cs = _span(xs, min(ax_, bx_) - reach, max(ax_, bx_) + reach)
    X, Y = xs[None, cs], ys[rs, None]
    vx, vy = bx_ - ax_, by_ - ay_
    t = np.clip(((X - ax_) * vx + (Y - ay_) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    dx = X - (ax_ + t * vx)
    dy = Y - (ay_ + t * vy)
    return rs, cs, np.sqrt(dx * dx + dy * dy), t


def _hand_anatomy(p: ChestParams, rows: int, cols: int, rng: np.random.Generator,
                  side: str = "L") -> np.ndarray:
    """PA hand: soft tissue silhouette, carpals, metacarpals, phalanges, distal forearm.
    A left hand has its thumb on image right; a right hand is mirrored."""
    xs, ys = _axes(rows, cols, p)
    m = -1.0 if side == "R" else 1.0  # mirror the model's x coordinates
    soft = np.zeros((rows, cols), np.float32)
    bone = np.zeros((rows, cols), np.float32)

    def add_bone(a: tuple[float, float], b: tuple[float, float], w: float, taper: float = 0.0,
                 weight: float = 1.0) -> None:
        rs, cs, dist, t = _segment(xs, ys, (m * a[0], a[1]), (m * b[0], b[1]), w)
        ww = w * (1.0 - taper * pm.sin(np.pi * t))
        np.maximum(bone[rs, cs], weight * _bone_profile(dist / ww), out=bone[rs, cs])

    def add_soft(a: tuple[float, float], b: tuple[float, float], w: float) -> None:
        rs, cs, dist, _ = _segment(xs, ys, (m * a[0], a[1]), (m * b[0], b[1]), w + 0.02)
        np.maximum(soft[rs, cs], _ramp(w - dist, 0.02), out=soft[rs, cs])

    # distal forearm (radius, ulna), wrist and palm soft tissue
    add_bone((-0.16, 1.3), (-0.12, 0.62), 0.07)
    add_bone((0.10, 1.3), (0.10, 0.62), 0.055)
    add_soft((-0.02, 1.3), (-0.02, 0.45), 0.30)
    add_soft((-0.02, 0.35), (-0.02, 0.05), 0.28)
    # carpals
    for cx, cy in ((-0.15, 0.50), (-0.04, 0.52), (0.06, 0.50), (0.14, 0.48), (-0.12, 0.38),
                   (-0.02, 0.38), (0.07, 0.37), (0.16, 0.36)):
        add_bone((cx, cy), (cx, cy + 1e-3), 0.055, weight=0.8)
    # rays: thumb (on image right for a left hand) to little finger
    rays = ((0.20, 0.30, 0.40, -0.05, (0.20, 0.16), 0.042),
            (0.10, 0.28, 0.16, -0.45, (0.30, 0.22, 0.15), 0.036),
            (0.00, 0.28, 0.01, -0.50, (0.33, 0.25, 0.16), 0.036),
            (-0.09, 0.29, -0.14, -0.45, (0.30, 0.22, 0.15), 0.034),
            (-0.18, 0.31, -0.28, -0.33, (0.24, 0.17, 0.13), 0.030))
    for bx0, by0, tipx, tipy, phal, w in rays:
        direction = np.array([tipx - bx0, tipy - by0])
        direction /= np.linalg.norm(direction)
        pos = np.array([bx0, by0])
        pts = [pos]
        for length in (0.30 if w < 0.04 else 0.22, *phal):
            pos = pos + direction * (length + (0.02 if len(pts) > 1 else 0.0))
            pts.append(pos)
        for k in range(len(pts) - 1):
            a0 = pts[k] + direction * 0.012
            b0 = pts[k + 1] - direction * 0.012
            add_bone(tuple(a0), tuple(b0), w * (1.0 - 0.25 * k / len(pts)), taper=0.25)
        add_soft(tuple(pts[1]), tuple(pts[-1]), w * 2.0)
        add_soft(tuple(pts[0]), tuple(pts[1]), w * 2.4)
    d = 0.30 * soft + 0.30 * p.bone * bone
    d += 0.02 * _smooth_noise(rng, rows, cols, 0.05, grid=64) * soft
    return _tone(d + 0.01)


def render_image(params: ChestParams, rows: int, cols: int, rng: np.random.Generator, *,
                 body_part: str = "CHEST", laterality: str = "L") -> np.ndarray:
    """Render any phantom: a chest (see :func:`render_chest`), an ``ABDOMEN`` AP or a ``HAND``
    PA (``laterality`` ``L``/``R``). Same output convention as :func:`render_chest`."""
    if body_part == "CHEST":
        return render_chest(params, rows, cols, rng)
    wr, wc = _work_shape(rows, cols, params)
    if body_part == "ABDOMEN":
        d = _abdomen_anatomy(params, wr, wc, rng)
    elif body_part == "HAND":
        f = min(1.0, 768 / max(wr, wc))
        d = _hand_anatomy(params, max(16, round(wr * f)), max(16, round(wc * f)), rng, side=laterality)
    else:
        raise ValueError(f"unknown body part {body_part!r}: expected CHEST, ABDOMEN or HAND")
    return _finish(d, params, rows, cols, rng)


# ============================================================================================
# Population model
# ============================================================================================


@dataclass(frozen=True)
class _Patient:
    index: int
    patient_id: str
    name: str
    sex: str
    race: str
    insurance: str
    birth_date: _dt.date
    shifted: bool


@dataclass(frozen=True)
class _Instance:
    """Everything needed to render and write one image, and its label row."""

    patient: _Patient
    study_index: int
    visit: int
    image_index: int
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    study_date: _dt.date
    study_time: str
    study_description: str
    series_description: str
    series_number: int
    modality: str
    photometric: str
    bits_stored: int
    rows: int
    cols: int
    spacing: float
    body_part: str
    view: str
    laterality: str  # hand side (L/R); "" otherwise
    age: int
    ctr: float
    lvef: float
    congestion: float
    params: ChestParams
    level_lo: float  # stored-value range as fractions of the maximum
    level_hi: float
    kvp: int
    render_seed: tuple[int, ...]

    @property
    def cardiomegaly(self) -> int:
        return int(self.ctr > CTR_THRESHOLD)

    @property
    def low_ef(self) -> int:
        return int(self.lvef <= LOW_EF_THRESHOLD)

    @property
    def frontal_chest(self) -> int:
        return int(self.body_part == "CHEST" and self.view in ("PA", "AP"))

    def file_name(self, width: int) -> str:
        return f"study_{self.study_index:0{width}d}/img_{self.image_index:02d}.dcm"


def _as_generator(random_state: int | np.random.Generator) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    return np.random.default_rng(random_state)


def _clamp(value: float, lo: float, hi: float) -> float:
    """Scalar clip (np.clip is slow on Python scalars)."""
    return float(min(max(value, lo), hi))


def _rng(*key: int) -> np.random.Generator:
    """Independent generator for a (seed, ...) key: order-independent determinism."""
    return np.random.default_rng(np.random.SeedSequence(entropy=key[0], spawn_key=tuple(key[1:])))


def _uid(*parts: object) -> str:
    """Deterministic UID: pydicom's root + a SHA-512 hash of the parts (PS3.5 B.2 permits
    a registered root with a unique suffix; ``prefix=None`` would ignore the entropy)."""
    return generate_uid(entropy_srcs=[_UID_TAG, *map(str, parts)])


def _fingerprint(config: PhantomConfig) -> str:
    """Everything but ``n_studies`` (so that a larger set extends a smaller one)."""
    fields_ = dataclasses.asdict(config)
    fields_.pop("n_studies")
    if fields_["shift_group"] is not None:
        fields_["shift_group"] = sorted(fields_["shift_group"].items())
    return repr(sorted(fields_.items()))


def _name(rng: np.random.Generator) -> str:
    def word(n: int) -> str:
        return "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), n)).upper()

    return f"{word(int(rng.integers(2, 4)))}^{word(2)}"


def _age_on(birth: _dt.date, day: _dt.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _insurance(rng: np.random.Generator, age: float) -> str:
    if age >= 65:
        probs = (0.82, 0.06, 0.10, 0.02)
    else:
        probs = (0.05, 0.30, 0.52, 0.13)
    return INSURANCES[int(rng.choice(len(INSURANCES), p=probs))]


def _cm_given_low(config: PhantomConfig) -> tuple[float, float]:
    """P(cardiomegaly | low EF) and P(cardiomegaly | normal EF) meeting the prevalences."""
    p_cm, p_low = config.prevalence_cardiomegaly, config.prevalence_low_ef
    a = min(0.78, 0.9 * p_cm / p_low) if p_low > 0 else 0.0
    q = (p_cm - p_low * a) / (1.0 - p_low) if p_low < 1 else 0.0
    return a, _clamp(q, 0.0, 1.0)


def _sample_heart(rng: np.random.Generator, *, config: PhantomConfig, age: float, sex: str
                  ) -> tuple[float, float]:
    """Baseline (LVEF %, true CTR) of a patient."""
    p_low = config.prevalence_low_ef * (0.55 + 0.9 * (age - 18.0) / 77.0) * (1.2 if sex == "M" else 0.8)
    low = rng.random() < min(p_low, 0.95)
    lvef = 15.0 + 25.0 * rng.beta(2.5, 1.5) if low else _clamp(rng.normal(60.0, 6.0), 42.0, 78.0)
    a, q = _cm_given_low(config)
    enlarged = rng.random() < (a if low else q)
    if enlarged:
        ctr = min(0.505 + rng.gamma(2.0, 0.035), 0.75)
    else:
        ctr = _clamp(rng.normal(0.44 + 0.0005 * (age - 50.0), 0.028), 0.33, 0.495)
    return float(lvef), float(ctr)


def _chest_params(rng: np.random.Generator, *, view: str, ctr: float, lvef: float, sex: str,
                  age: float, congestion: float, quality_shift: float) -> ChestParams:
    """Anatomy and acquisition for one chest image of a visit."""
    low = lvef <= LOW_EF_THRESHOLD
    kerley = congestion * rng.uniform(0.6, 1.0) if congestion > 0.45 else 0.0
    eff_r = eff_l = 0.0
    if congestion > 0:
        if rng.random() < 0.15 + 0.6 * congestion:
            eff_r = congestion * rng.uniform(0.35, 0.85)
        if rng.random() < 0.05 + 0.4 * congestion:
            eff_l = congestion * rng.uniform(0.3, 0.7)
    ap = view == "AP"
    return ChestParams(
        view=view,
        ctr=ctr,
        magnification=float(rng.uniform(1.05, 1.12)) if ap else 1.0,
        globular=float(rng.uniform(0.4, 1.0) if low else rng.uniform(0.0, 0.35)),
        congestion=float(congestion),
        kerley=float(kerley),
        effusion_right=float(eff_r),
        effusion_left=float(eff_l),
        breast=float(rng.uniform(0.5, 1.0)) if sex == "F" else 0.0,
        thorax_width=float(rng.uniform(0.64, 0.74)),
        inspiration=float(rng.uniform(0.86, 0.96) if ap else rng.uniform(0.96, 1.06)),
        habitus=float(rng.uniform(0.0, 1.0)),
        bone=_clamp(1.1 - 0.004 * (age - 18.0) * (1.4 if sex == "F" else 1.0)
                           + rng.normal(0, 0.05), 0.6, 1.2),
        shift_x=float(rng.normal(0.0, 0.02)),
        shift_y=float(rng.normal(0.0, 0.02)),
        quality_shift=float(quality_shift),
        noise=float(rng.uniform(0.8, 1.2)),
    )


def _visit_congestion(rng: np.random.Generator, lvef: float) -> float:
    if lvef <= LOW_EF_THRESHOLD:
        if rng.random() < 0.80:
            return _clamp(0.35 + (LOW_EF_THRESHOLD - lvef) / 30.0 + rng.normal(0, 0.12), 0.2, 1.0)
        return 0.0
    return float(rng.uniform(0.2, 0.5)) if rng.random() < 0.06 else 0.0


def _matches(config: PhantomConfig, *, sex: str, race: str, insurance: str) -> bool:
    if not config.shift_group or config.shift_strength <= 0:
        return False
    values = {"sex": sex, "race": race, "insurance": insurance}
    return all(values[k] == v for k, v in config.shift_group.items())


def _plan(config: PhantomConfig) -> list[_Instance]:
    """Sample every study and image of a configuration (no rendering)."""
    fp = _fingerprint(config)
    seed = config.seed
    instances: list[_Instance] = []
    study_index = 0
    patient_index = 0
    while study_index < config.n_studies:
        rng = _rng(seed, patient_index)
        sex = "M" if rng.random() < 0.5 else "F"
        age0 = _clamp(rng.normal(61.0, 16.0), 18.5, 92.0)
        race = RACES[int(rng.choice(len(RACES), p=RACE_WEIGHTS))]
        insurance = _insurance(rng, age0)
        first = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 6 * 365)))
        birth = first - _dt.timedelta(days=int(age0 * 365.25))
        patient = _Patient(
            index=patient_index,
            patient_id=f"PH{seed}-{patient_index:06d}",
            name=_name(rng),
            sex=sex,
            race=race,
            insurance=insurance,
            birth_date=birth,
            shifted=_matches(config, sex=sex, race=race, insurance=insurance),
        )
        n_visits = 1
        if config.max_studies_per_patient > 1 and rng.random() < config.fraction_repeat_patient:
            n_visits = int(rng.integers(2, config.max_studies_per_patient + 1))
        n_visits = min(n_visits, config.n_studies - study_index)
        lvef0, ctr0 = _sample_heart(rng, config=config, age=age0, sex=sex)
        day = first
        for visit in range(n_visits):
            if visit:
                day = day + _dt.timedelta(days=int(rng.integers(20, 300)))
            instances.extend(_plan_study(config, fp, patient, visit, study_index, day, lvef0, ctr0))
            study_index += 1
        patient_index += 1
    return instances


def _plan_study(config: PhantomConfig, fp: str, patient: _Patient, visit: int, study_index: int,
                day: _dt.date, lvef0: float, ctr0: float) -> list[_Instance]:
    seed = config.seed
    rng = _rng(seed, patient.index, visit, 1)
    age = _age_on(patient.birth_date, day)
    lvef = round(_clamp(lvef0 + rng.normal(0.0, 2.0), 10.0, 80.0), 1)
    ctr = round(_clamp(ctr0 + rng.normal(0.0, 0.006), 0.30, 0.78), 4)
    congestion = round(_visit_congestion(rng, lvef), 3)
    sick = lvef <= LOW_EF_THRESHOLD or congestion > 0
    # what was imaged
    views: list[str]
    laterality = ""
    if rng.random() < config.fraction_non_chest:
        body_part = NON_CHEST_PARTS[int(rng.integers(0, len(NON_CHEST_PARTS)))]
        if body_part == "HAND":
            laterality = "L" if rng.random() < 0.5 else "R"
            views = ["PA"]
            description = f"HAND {'LEFT' if laterality == 'L' else 'RIGHT'} PA"
        else:
            views = ["AP"]
            description = "ABDOMEN AP"
    else:
        body_part = "CHEST"
        p_ap = _clamp(config.fraction_ap * (1.6 if sick else 0.85) * (1.2 if age >= 80 else 1.0),
                      0.0, 0.95)
        front = "AP" if rng.random() < p_ap else "PA"
        views = [front]
        if front == "PA" and rng.random() < config.fraction_lateral:
            views.append("LL")
        description = "CHEST PA AND LATERAL" if len(views) == 2 else f"CHEST {front}"
    # acquisition device for the visit
    modality = config.modalities[int(rng.integers(0, len(config.modalities)))]
    photometric = "MONOCHROME1" if rng.random() < config.fraction_monochrome1 else "MONOCHROME2"
    bits = int(config.bits_stored[int(rng.integers(0, len(config.bits_stored)))])
    if config.size is not None:
        rows = cols = int(config.size)
    else:
        lo, hi = config.size_range
        rows = int(rng.integers(lo, hi + 1))
        cols = int(_clamp(round(rows * rng.uniform(0.82, 1.0)), lo, hi))
    spacing = round(float(rng.uniform(350.0, 430.0)) / max(rows, cols), 4)
    hh, mm, ss = int(rng.integers(7, 20)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    study_uid = _uid(fp, seed, "study", patient.index, visit)
    accession = f"A{seed % 1_000_000:06d}{study_index:07d}"[:16]
    level_lo = float(rng.uniform(0.02, 0.10))
    level_hi = float(rng.uniform(0.80, 0.96))
    kvp = int(rng.integers(100, 126)) if body_part == "CHEST" else int(rng.integers(55, 85))
    out = []
    for k, view in enumerate(views):
        img_rng = _rng(seed, patient.index, visit, 2, k)
        q = config.shift_strength if patient.shifted else 0.0
        params = _chest_params(img_rng, view=view if body_part == "CHEST" else "PA", ctr=ctr,
                               lvef=lvef, sex=patient.sex, age=age, congestion=congestion,
                               quality_shift=q)
        out.append(_Instance(
            patient=patient, study_index=study_index, visit=visit, image_index=k,
            study_uid=study_uid,
            series_uid=_uid(fp, seed, "series", patient.index, visit, k),
            sop_uid=_uid(fp, seed, "sop", patient.index, visit, k),
            accession=accession, study_date=day, study_time=f"{hh:02d}{mm:02d}{ss:02d}",
            study_description=description,
            series_description={"PA": "PA", "AP": "AP", "LL": "LATERAL"}[view] if body_part == "CHEST"
            else description,
            series_number=k + 1, modality=modality, photometric=photometric, bits_stored=bits,
            rows=rows, cols=cols, spacing=spacing, body_part=body_part, view=view,
            laterality=laterality, age=age, ctr=ctr, lvef=lvef, congestion=congestion,
            params=params, level_lo=level_lo, level_hi=level_hi, kvp=kvp,
            render_seed=(seed, patient.index, visit, 3, k),
        ))
    return out


def _row(inst: _Instance, width: int) -> dict[str, Any]:
    p = inst.params
    return {
        "file": inst.file_name(width),
        "patient_id": inst.patient.patient_id,
        "study_uid": inst.study_uid,
        "series_uid": inst.series_uid,
        "sop_uid": inst.sop_uid,
        "accession": inst.accession,
        "modality": inst.modality,
        "view": inst.view,
        "body_part": inst.body_part,
        "frontal_chest": inst.frontal_chest,
        "ctr": inst.ctr,
        "cardiomegaly": inst.cardiomegaly,
        "lvef": inst.lvef,
        "low_ef": inst.low_ef,
        "sex": inst.patient.sex,
        "age": inst.age,
        "race": inst.patient.race,
        "insurance": inst.patient.insurance,
        "shifted": int(inst.patient.shifted),
        "ctr_apparent": round(p.ctr_apparent, 4),
        "congestion": inst.congestion,
        "effusion": int(p.effusion_left > 0 or p.effusion_right > 0),
        "photometric": inst.photometric,
        "bits_stored": inst.bits_stored,
        "rows": inst.rows,
        "columns": inst.cols,
        "pixel_spacing_mm": inst.spacing,
        "study_date": inst.study_date.strftime("%Y%m%d"),
        "visit": inst.visit,
    }


def _width(config: PhantomConfig) -> int:
    return max(4, len(str(config.n_studies - 1)))


def sample_labels(config: PhantomConfig) -> pd.DataFrame:
    """The labels table :func:`generate_studies` would write, without rendering anything.

    Cheap (thousands of rows per second): use it to study the label model.
    """
    width = _width(config)
    return pd.DataFrame([_row(i, width) for i in _plan(config)],
                        columns=[*LABEL_COLUMNS, *EXTRA_COLUMNS])


def sample_chest_params(*, n: int, random_state: int | np.random.Generator = 0,
                        prevalence_cardiomegaly: float = 0.25, prevalence_low_ef: float = 0.20,
                        fraction_ap: float = 0.30) -> tuple[list[ChestParams], pd.DataFrame]:
    """Sample ``n`` frontal chest images' parameters and labels, for rendering small images
    directly with :func:`render_chest` (e.g. training without DICOM round trips).

    Returns
    -------
    params : list of ChestParams
    labels : pandas.DataFrame
        Columns ``ctr, cardiomegaly, lvef, low_ef, view, sex, age, congestion``.
    """
    rng = _as_generator(random_state)
    config = PhantomConfig(prevalence_cardiomegaly=prevalence_cardiomegaly,
                           prevalence_low_ef=prevalence_low_ef, fraction_ap=fraction_ap)
    params, rows = [], []
    for _ in range(n):
        sex = "M" if rng.random() < 0.5 else "F"
        age = _clamp(rng.normal(61.0, 16.0), 18.5, 92.0)
        lvef, ctr = _sample_heart(rng, config=config, age=age, sex=sex)
        lvef, ctr = round(lvef, 1), round(ctr, 4)
        congestion = round(_visit_congestion(rng, lvef), 3)
        sick = lvef <= LOW_EF_THRESHOLD or congestion > 0
        view = "AP" if rng.random() < min(0.95, fraction_ap * (1.6 if sick else 0.85)) else "PA"
        params.append(_chest_params(rng, view=view, ctr=ctr, lvef=lvef, sex=sex, age=age,
                                    congestion=congestion, quality_shift=0.0))
        rows.append({"ctr": ctr, "cardiomegaly": int(ctr > CTR_THRESHOLD), "lvef": lvef,
                     "low_ef": int(lvef <= LOW_EF_THRESHOLD), "view": view, "sex": sex,
                     "age": int(age), "congestion": congestion})
    return params, pd.DataFrame(rows)


# ============================================================================================
# DICOM
# ============================================================================================


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _stored_pixels(image: np.ndarray, inst: _Instance) -> np.ndarray:
    """Map a presentation image (1 = white) to stored values of the instance's encoding."""
    vmax = (1 << inst.bits_stored) - 1
    lo, hi = inst.level_lo * vmax, inst.level_hi * vmax
    if inst.photometric == "MONOCHROME1":
        values = hi - image * np.float32(hi - lo)
    else:
        values = lo + image * np.float32(hi - lo)
    return np.clip(np.rint(values), 0, vmax).astype(np.uint16)


def _window(pixels: np.ndarray) -> tuple[int, int]:
    sub = pixels[::4, ::4]
    p_lo, p_hi = np.percentile(sub, [0.5, 99.5])
    width = max(int(round((p_hi - p_lo) * 1.05)), 2)
    return int(round((p_hi + p_lo) / 2.0)), width


_ORIENTATION = {("CHEST", "PA"): ["L", "F"], ("CHEST", "AP"): ["L", "F"], ("CHEST", "LL"): ["P", "F"],
                ("ABDOMEN", "AP"): ["L", "F"], ("HAND", "PA"): ["L", "H"]}


def _dataset(inst: _Instance, pixels: np.ndarray) -> Dataset:
    """Build the CR or DX (For Presentation) dataset of an instance."""
    dx = inst.modality == "DX"
    sop_class = DX_IMAGE_STORAGE_FOR_PRESENTATION if dx else CR_IMAGE_STORAGE
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = inst.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    date = inst.study_date.strftime("%Y%m%d")
    start = _dt.datetime.combine(inst.study_date,
                                 _dt.datetime.strptime(inst.study_time, "%H%M%S").time())
    content_time = (start + _dt.timedelta(minutes=2 + 3 * inst.image_index)).strftime("%H%M%S")

    # SOP Common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = inst.sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = content_time
    # Patient
    pt = inst.patient
    ds.PatientName = pt.name
    ds.PatientID = pt.patient_id
    ds.IssuerOfPatientID = ISSUER
    ds.PatientBirthDate = pt.birth_date.strftime("%Y%m%d")
    ds.PatientSex = pt.sex
    ds.PatientAge = f"{inst.age:03d}Y"
    ds.EthnicGroup = pt.race
    # General Study
    ds.StudyInstanceUID = inst.study_uid
    ds.StudyDate = date
    ds.StudyTime = inst.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{inst.study_index + 1}"
    ds.AccessionNumber = inst.accession
    ds.StudyDescription = inst.study_description
    # General Series (+ CR Series / DX Series)
    ds.Modality = inst.modality
    ds.SeriesInstanceUID = inst.series_uid
    ds.SeriesNumber = inst.series_number
    ds.SeriesDate = date
    ds.SeriesTime = content_time
    ds.SeriesDescription = inst.series_description
    ds.BodyPartExamined = inst.body_part
    ds.ViewPosition = inst.view
    if inst.laterality and not dx:
        ds.Laterality = inst.laterality  # paired body part (General Series, Type 2C)
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Phantom General Hospital"
    ds.ManufacturerModelName = f"{inst.modality} phantom"
    ds.SoftwareVersions = f"cxr-ai {__version__}"
    # General Image / CR Image / DX Image
    ds.InstanceNumber = 1
    ds.PatientOrientation = _ORIENTATION[(inst.body_part, inst.view)]
    ds.ContentDate = date
    ds.ContentTime = content_time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = content_time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.KVP = inst.kvp
    ds.DistanceSourceToDetector = 1000 if inst.view == "AP" else 1800
    ds.ImagerPixelSpacing = [inst.spacing, inst.spacing]
    ds.PixelSpacing = [inst.spacing, inst.spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Phantom: detector pitch, no magnification"
    if dx:
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher values = less beam intensity (MONOCHROME2); +1 the reverse (MONOCHROME1)
        ds.PixelIntensityRelationshipSign = 1 if inst.photometric == "MONOCHROME1" else -1
        ds.PresentationLUTShape = "INVERSE" if inst.photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.ImageLaterality = inst.laterality or "U"
        ds.AnatomicRegionSequence = [_code_item(_REGION_CODES[inst.body_part])]
        ds.ViewCodeSequence = [_code_item(_VIEW_CODES[inst.view])]
        ds.AcquisitionContextSequence = []
        ds.PositionerType = "NONE"
    # Modality LUT (identity) and VOI LUT (window from the image)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    center, width = _window(pixels)
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = "PHANTOM FULL RANGE"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = inst.photometric
    ds.Rows = inst.rows
    ds.Columns = inst.cols
    ds.BitsAllocated = 16
    ds.BitsStored = inst.bits_stored
    ds.HighBit = inst.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def _render_instance(inst: _Instance) -> np.ndarray:
    rng = _rng(*inst.render_seed)
    return render_image(inst.params, inst.rows, inst.cols, rng, body_part=inst.body_part,
                        laterality=inst.laterality or "L")


def _instance_dataset(inst: _Instance) -> Dataset:
    image = _render_instance(inst)
    return _dataset(inst, _stored_pixels(image, inst))


def generate_studies(out_dir: str | Path, config: PhantomConfig | None = None, *,
                     n: int | None = None, seed: int | None = None,
                     size: int | None = None) -> pd.DataFrame:
    """Write synthetic studies and their labels.

    Parameters
    ----------
    out_dir : str or Path
        Output folder; created if missing. Files go to ``study_XXXX/img_YY.dcm`` and
        ``labels.csv``.
    config : PhantomConfig, optional
        What to generate (defaults: ``PhantomConfig()``).
    n, seed, size : int, optional
        Overrides of ``config.n_studies``, ``config.seed`` and ``config.size``.

    Returns
    -------
    pandas.DataFrame
        The labels table (also written to ``out_dir/labels.csv``).
    """
    config = config or PhantomConfig()
    overrides = {k: v for k, v in (("n_studies", n), ("seed", seed), ("size", size)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = _width(config)
    instances = _plan(config)
    rows = []
    for inst in instances:
        path = out / inst.file_name(width)
        path.parent.mkdir(parents=True, exist_ok=True)
        _instance_dataset(inst).save_as(path, enforce_file_format=True)
        rows.append(_row(inst, width))
    table = pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *EXTRA_COLUMNS])
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        table.to_csv(fh, index=False, lineterminator="\n")
    logger.info("wrote %d phantom images in %d studies of %d patients to %s",
                len(table), config.n_studies, table["patient_id"].nunique(), out)
    return table


def make_phantom_dataset(*, modality: str = "CR", photometric: str = "MONOCHROME2",
                         view: str = "PA", body_part: str = "CHEST", size: int = 1024,
                         bits_stored: int = 12, ctr: float | None = None, lvef: float | None = None,
                         sex: str | None = None, age: int | None = None, race: str | None = None,
                         congestion: float | None = None, shift_strength: float = 0.0,
                         random_state: int | np.random.Generator = 0) -> Dataset:
    """One phantom image as a :class:`pydicom.Dataset` (with file meta, ready for ``save_as``).

    Unset clinical parameters are sampled from the default population. ``view`` is ``PA``,
    ``AP`` or ``LL`` for a chest; ``body_part`` ``ABDOMEN`` (AP) or ``HAND`` (PA) makes a
    non-chest image. UIDs are deterministic functions of all arguments and ``random_state``.
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be 'CR' or 'DX', got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 12 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be within 12..16, got {bits_stored}")
    if body_part not in ("CHEST", *NON_CHEST_PARTS):
        raise ValueError(f"body_part must be CHEST, ABDOMEN or HAND, got {body_part!r}")
    if body_part == "CHEST" and view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS} for a chest, got {view!r}")
    rng = _as_generator(random_state)
    key = [int(x) for x in rng.integers(0, 2**31 - 1, 4)]
    sex = sex or ("M" if rng.random() < 0.5 else "F")
    age_f = float(age) if age is not None else _clamp(rng.normal(61.0, 16.0), 18.5, 92.0)
    race = race or RACES[int(rng.choice(len(RACES), p=RACE_WEIGHTS))]
    base_lvef, base_ctr = _sample_heart(rng, config=PhantomConfig(), age=age_f, sex=sex)
    lvef_v = round(float(lvef if lvef is not None else base_lvef), 1)
    ctr_v = round(float(ctr if ctr is not None else base_ctr), 4)
    cong = float(congestion) if congestion is not None else _visit_congestion(rng, lvef_v)
    if body_part == "HAND":
        view, laterality = "PA", ("L" if rng.random() < 0.5 else "R")
    elif body_part == "ABDOMEN":
        view, laterality = "AP", ""
    else:
        laterality = ""
    params = _chest_params(rng, view=view if body_part == "CHEST" else "PA", ctr=ctr_v,
                           lvef=lvef_v, sex=sex, age=age_f, congestion=cong,
                           quality_shift=shift_strength)
    day = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    patient = _Patient(index=key[0], patient_id=f"PHX-{key[0]:010d}", name=_name(rng), sex=sex,
                       race=race, insurance=_insurance(rng, age_f),
                       birth_date=day - _dt.timedelta(days=int(age_f * 365.25)),
                       shifted=shift_strength > 0)
    ident = (modality, photometric, view, body_part, size, bits_stored, ctr_v, lvef_v, sex,
             int(age_f), race, cong, shift_strength, *key)
    description = (f"CHEST {view}" if body_part == "CHEST" else
                   "ABDOMEN AP" if body_part == "ABDOMEN" else
                   f"HAND {'LEFT' if laterality == 'L' else 'RIGHT'} PA")
    inst = _Instance(
        patient=patient, study_index=0, visit=0, image_index=0,
        study_uid=_uid("single", "study", *ident), series_uid=_uid("single", "series", *ident),
        sop_uid=_uid("single", "sop", *ident), accession=f"X{key[1]:09d}",
        study_date=day, study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00",
        study_description=description, series_description=description, series_number=1,
        modality=modality, photometric=photometric, bits_stored=bits_stored, rows=size, cols=size,
        spacing=round(400.0 / size, 4), body_part=body_part, view=view, laterality=laterality,
        age=_age_on(patient.birth_date, day), ctr=ctr_v, lvef=lvef_v, congestion=cong,
        params=params, level_lo=float(rng.uniform(0.02, 0.10)), level_hi=float(rng.uniform(0.80, 0.96)),
        kvp=120 if body_part == "CHEST" else 70, render_seed=tuple(key),
    )
    return _instance_dataset(inst)
