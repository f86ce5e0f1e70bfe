"""Small vectorised helpers the phantom drawings are made of: soft edges (:func:`ramp`),
bands, bone profiles, smooth noise, the image's coordinate axes and resizing."""

from __future__ import annotations

import numpy as np

from cxr_ai import portable_math as pm
from cxr_ai.phantoms.params import ChestParams


def ramp(d: np.ndarray | float, width: float) -> np.ndarray:
    """Soft step: 0 for d <= -width/2, 1 for d >= width/2, linear between."""
    return np.clip(np.asarray(d, dtype=np.float32) * np.float32(1.0 / width) + np.float32(0.5), 0.0, 1.0)


def resize(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
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


def smooth_noise(rng: np.random.Generator, rows: int, cols: int, scale: float,
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
    return resize(field_, rows, cols)


def axes(rows: int, cols: int, p: ChestParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-D normalised coordinates (x right, y down; unit = half the smaller image side),
    shifted by the patient's position. Broadcast ``x[None, :]`` and ``y[:, None]``."""
    s = min(rows, cols) / 2.0
    y = (np.arange(rows, dtype=np.float32) + 0.5 - rows / 2.0) / s
    x = (np.arange(cols, dtype=np.float32) + 0.5 - cols / 2.0) / s
    if p is not None:
        x, y = x - np.float32(p.shift_x), y - np.float32(p.shift_y)
    return x, y


def grid(rows: int, cols: int, p: ChestParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable coordinates ``X`` (1, cols) and ``Y`` (rows, 1), see :func:`axes`."""
    x, y = axes(rows, cols, p)
    return x[None, :], y[:, None]


def span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Slice of an ascending 1-D coordinate array covering [lo, hi] (may be empty)."""
    i0 = int(np.searchsorted(coords, lo, "left"))
    i1 = int(np.searchsorted(coords, hi, "right"))
    return slice(i0, max(i0, i1))


def bone_profile(f: np.ndarray) -> np.ndarray:
    """Projected density across a tubular bone; ``f`` in [-1, 1] across it (cortex brighter),
    0 outside."""
    f2 = np.minimum(f * f, 1.0)
    outer = np.sqrt(1.0 - f2)
    inner = np.sqrt(np.clip(0.6 - f2, 0.0, None) * (1.0 / 0.6))
    return outer - 0.55 * inner


def bands(v: np.ndarray, period: np.ndarray | float, duty: np.ndarray | float) -> np.ndarray:
    """Periodic bone bands along ``v``: the bone profile over a ``duty`` fraction of each
    period, 0 elsewhere."""
    r = v * (1.0 / period) if np.isscalar(period) else v / period
    frac = r - np.floor(r)
    return bone_profile(frac * (2.0 / duty) - 1.0)


def tone(d: np.ndarray) -> np.ndarray:
    """Gentle film-like tone curve; maps the composed density to [0, 1]."""
    d = np.clip(d, 0.0, None)
    return (1.0 - pm.exp(-1.8 * d)) / (1.0 - pm.exp(-1.8 * 0.75))
