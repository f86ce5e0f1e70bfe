"""Drawing: chest (frontal, lateral), abdomen and hand images from :class:`ChestParams`."""

from __future__ import annotations

import math
from dataclasses import field

import numpy as np

from cxr_ai import portable_math as pm
from cxr_ai.dicom.codes import CHEST
from cxr_ai.phantoms.params import (
    ChestParams,
    VIEWS,
    _MAX_WORK,
    _REF_SIZE,
)

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


