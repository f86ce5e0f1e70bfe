"""Drawing: chest (frontal, lateral), abdomen and hand images from :class:`ChestParams`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxr_ai import portable_math as pm
from cxr_ai.dicom.codes import CHEST
from cxr_ai.phantoms.regions import abdomen_anatomy, hand_anatomy
from cxr_ai.phantoms.shapes import (
    axes as _axes,
    bands as _bands,
    bone_profile as _bone_profile,
    grid as _grid,
    ramp as _ramp,
    resize as _resize,
    smooth_noise as _smooth_noise,
    span as _span,
    tone as _tone,
)
from cxr_ai.phantoms.params import (
    ChestParams,
    VIEWS,
    _MAX_WORK,
    _REF_SIZE,
)

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


@dataclass(frozen=True)
class _Frontal:
    """The grid and key levels the parts of a frontal chest are drawn on (:func:`_frontal_frame`)."""

    p: ChestParams
    rows: int
    cols: int
    xs: np.ndarray
    ys: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    e: float                # edge softness
    ap: bool
    wt: float               # thorax half-width
    ax: np.ndarray          # |X|
    left: np.ndarray        # image right = patient's left
    leftf: np.ndarray
    bone: float
    y_apex: float           # lung apex
    y_dome_r: float         # diaphragm domes, right and left
    y_dome_l: float
    a_dome: float
    k_dome: float
    dome_top: np.ndarray
    dome: np.ndarray        # the diaphragm, per column
    y_low: float            # below every part of the lungs
    t: np.ndarray           # 0 at the apex to 1 at the costophrenic level
    lat: np.ndarray         # the lungs' lateral margin, per row
    a_apex: float
    above_dia: np.ndarray   # above the diaphragm


def _frontal_anatomy(p: ChestParams, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A PA or AP chest, part by part (the order is the order of the random draws)."""
    f = _frontal_frame(p, rows, cols)
    d, body, hx = _body(f)
    in_med, heart, heart_w = _mediastinum_and_heart(f)
    lung, solid, below = _lungs(f, d, in_med=in_med, heart=heart, heart_w=heart_w)
    _trachea_and_spine(f, d, body=body, solid=solid, below=below)
    _hila_and_vessels(f, d, rng, lung=lung, in_med=in_med)
    _kerley_and_breasts(f, d, lung=lung, body=body)
    _ribs(f, d, solid=solid, below=below)
    _clavicles_and_scapulae(f, d, body=body, hx=hx)
    # soft anatomic inhomogeneity
    d += 0.015 * _smooth_noise(rng, rows, cols, 0.08, grid=64) * body
    return _tone(d)


def _frontal_frame(p: ChestParams, rows: int, cols: int) -> _Frontal:
    """The grid, the lung apex, diaphragm domes and costophrenic level (1-D where possible)."""
    xs, ys = _axes(rows, cols, p)
    X, Y = xs[None, :], ys[:, None]
    e = 4.0 / min(rows, cols) + 0.004  # edge softness
    ap = p.view == "AP"
    wt = float(p.thorax_width)
    ax = np.abs(X)
    left = X > 0  # image right = patient's left
    y_apex = -0.72 + (0.04 if ap else 0.0)
    y_dome_r = -0.78 + 1.12 * p.inspiration + (0.03 if ap else 0.0)
    y_dome_l = y_dome_r + 0.05
    a_dome, k_dome = 0.40 * wt, 0.80
    dome_top = np.where(left, np.float32(y_dome_l), np.float32(y_dome_r))
    dome = dome_top + k_dome * ((ax - a_dome) / wt) ** 2
    y_cp = y_dome_r + k_dome * 0.36  # costophrenic level
    y_low = y_dome_l + k_dome * 0.5  # below every part of the lungs
    t = np.clip((Y - y_apex) / (y_cp - y_apex), 0.0, 1.0)
    lat = wt * (0.62 + 0.38 * pm.power(pm.sin(np.clip(t * 1.1, 0, 1) * (np.pi / 2)), 0.75))
    return _Frontal(p=p, rows=rows, cols=cols, xs=xs, ys=ys, X=X, Y=Y, e=e, ap=ap, wt=wt, ax=ax, left=left,
                    leftf=left.astype(np.float32), bone=p.bone, y_apex=y_apex, y_dome_r=y_dome_r,
                    y_dome_l=y_dome_l, a_dome=a_dome, k_dome=k_dome, dome_top=dome_top, dome=dome, y_low=y_low,
                    t=t, lat=lat, a_apex=0.50 * wt, above_dia=_ramp(dome - Y, e))


def _body(f: _Frontal) -> tuple[np.ndarray, np.ndarray, float]:
    """The body outline with shoulders and arms, and the humeral heads at the upper corners."""
    p, wt, ax, Y, e = f.p, f.wt, f.ax, f.Y, f.e
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
    rs = _span(f.ys, -2.0, -0.55)
    if rs.stop > rs.start:
        Ys = Y[rs]
        hum = np.sqrt(np.clip(1.0 - ((ax - hx) ** 2 + ((Ys + 0.80) / 1.1) ** 2) / 0.13**2, 0.0, None))
        neckh = np.sqrt(np.clip(1.0 - ((ax - hx - 0.06) / 0.09) ** 2, 0, None)) * _ramp(Ys + 0.78, 0.05)
        d[rs] += 0.13 * f.bone * np.maximum(hum, 0.8 * neckh) * body[rs]
    return d, body, hx


def _mediastinum_and_heart(f: _Frontal) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mediastinum (with the aortic knob) and the heart, an ellipse tilted apex down-left
    that sits on the left dome."""
    p, ap, wt, ax, X, Y, e, xs, ys = f.p, f.ap, f.wt, f.ax, f.X, f.Y, f.e, f.xs, f.ys
    y_dome_l, y_dome_r, k_dome, a_dome = f.y_dome_l, f.y_dome_r, f.k_dome, f.a_dome
    y_knob = -0.30 + (0.03 if ap else 0.0)
    med_r = 0.095 + 0.025 * f.t
    med_l = (0.075 + 0.085 * pm.exp(-(((Y - y_knob) / 0.065) ** 2))
             + 0.04 * pm.exp(-(((Y - (y_knob + 0.13)) / 0.05) ** 2)))
    med = (med_r + (med_l - med_r) * f.leftf) * (1.12 if ap else 1.0)
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
    heart = np.zeros((f.rows, f.cols), np.float32)
    heart_w = np.zeros((f.rows, f.cols), np.float32)
    if hr_.stop > hr_.start and hc_.stop > hc_.start:
        cth, sth = pm.cos(th), pm.sin(th)
        dx_, dy_ = X[:, hc_] - xc, Y[hr_] - yc
        u = dx_ * cth + dy_ * sth
        v = dy_ * cth - dx_ * sth
        rr2 = (u / a_h) ** 2 + (v / b_h) ** 2
        hh = _ramp(1.0 - np.sqrt(rr2), 1.5 * e / max(a_h, 0.05))
        heart[hr_, hc_] = hh
        heart_w[hr_, hc_] = hh * (0.8 + 0.2 * np.sqrt(np.clip(1.0 - rr2, 0, 1)))
    return in_med, heart, heart_w


def _lungs(f: _Frontal, d: np.ndarray, *, in_med: np.ndarray, heart: np.ndarray,
           heart_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lung fields (less effusions), their air, the solid heart and mediastinum, and the
    abdomen below the diaphragm with the gastric bubble under the left dome."""
    p, wt, ax, X, Y, e, xs, ys = f.p, f.wt, f.ax, f.X, f.Y, f.e, f.xs, f.ys
    dome, leftf, lat, above_dia = f.dome, f.leftf, f.lat, f.above_dia
    top = f.y_apex + 3.0 * (ax - f.a_apex) ** 2
    lung = _ramp(lat - ax, e) * _ramp(Y - top, e) * above_dia * (1.0 - in_med) * (1.0 - heart)
    # effusions: fluid fills the costophrenic recess with a meniscus climbing laterally
    rs = _span(ys, f.y_dome_r - 0.40, 2.0)
    for amount, side in ((p.effusion_right, 1.0 - leftf), (p.effusion_left, leftf)):
        if amount <= 0 or rs.stop <= rs.start:
            continue
        yd = f.y_dome_l if side is leftf else f.y_dome_r
        level = yd + 0.20 - 0.28 * amount - (0.10 + 0.08 * amount) * pm.power(np.clip(ax / wt, 0, 1), 3)
        fluid = _ramp(Y[rs] - level, 0.05 + 0.03 * amount) * side
        lung[rs] *= 1.0 - fluid
    # lung air: thickest centrally, thinning towards the edges and bases
    depth = (np.sqrt(np.clip((lat - ax) / 0.10, 0.0, 1.0))
             * np.sqrt(np.clip((dome - Y) / 0.16, 0.0, 1.0))
             * np.sqrt(np.clip((Y - top) / 0.10, 0.0, 1.0)))
    d -= 0.25 * lung * (0.55 + 0.45 * depth)
    solid = np.maximum(heart_w, in_med * _ramp(Y - f.y_apex - 0.02, 0.25))
    d += 0.17 * solid * above_dia
    # abdomen below the diaphragm: solid organs, plus the gastric bubble under the left dome
    below = (1.0 - above_dia) * _ramp(lat - ax, 0.16)
    d += 0.15 * below
    gx, gy = 0.40 * wt, f.y_dome_l + 0.09
    rs, cs = _span(ys, gy - 0.06, gy + 0.06), _span(xs, gx - 0.11, gx + 0.11)
    if rs.stop > rs.start and cs.stop > cs.start:
        bub = np.clip(1.0 - (((X[:, cs] - gx) / 0.10) ** 2 + ((Y[rs] - gy) / 0.05) ** 2), 0, None)
        d[rs, cs] -= 0.10 * np.sqrt(bub) * _ramp(Y[rs] - gy + 0.01, 0.01) * below[rs, cs]
    return lung, solid, below


def _trachea_and_spine(f: _Frontal, d: np.ndarray, *, body: np.ndarray, solid: np.ndarray,
                       below: np.ndarray) -> None:
    X, Y = f.X, f.Y
    y_carina = -0.20
    cs = _span(f.xs, -0.09, 0.09)
    Xc = X[:, cs]
    trachea = np.sqrt(np.clip(1.0 - (Xc / 0.036) ** 2, 0, None)) * _ramp(y_carina - Y, 0.08)
    spine = np.sqrt(np.clip(1.0 - (Xc / 0.065) ** 2, 0, None))
    vert = _bands(Y + 1.0, 0.085, 0.82)
    ped = pm.exp(-(((np.abs(Xc) - 0.045) / 0.012) ** 2)) * np.clip(vert, 0, 1)
    spine_vis = 1.0 - 0.6 * np.maximum(solid[:, cs] * f.above_dia[:, cs], below[:, cs])
    d[:, cs] += body[:, cs] * (f.bone * (0.02 + 0.02 * vert + 0.015 * ped) * spine * spine_vis
                               - 0.11 * trachea)


def _hila_and_vessels(f: _Frontal, d: np.ndarray, rng: np.random.Generator, *, lung: np.ndarray,
                      in_med: np.ndarray) -> None:
    """Hila and pulmonary vessels (with upper-zone redistribution and perihilar haze in
    congestion), then the lung parenchyma's texture."""
    p, wt, X, Y, xs, ys, rows, cols = f.p, f.wt, f.X, f.Y, f.xs, f.ys, f.rows, f.cols
    c = p.congestion
    breakup = _ramp(_smooth_noise(rng, rows, cols, 0.025, grid=128) + 0.3, 0.8)
    worms = pm.exp(-((_smooth_noise(rng, rows, cols, 0.018, grid=192) / 0.22) ** 2))
    rs = _span(ys, f.y_apex - 0.02, f.y_low)
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


def _kerley_and_breasts(f: _Frontal, d: np.ndarray, *, lung: np.ndarray, body: np.ndarray) -> None:
    """Kerley B lines at the lateral bases, and breast shadows over the lower zones."""
    p, ax, Y, ys = f.p, f.ax, f.Y, f.ys
    # Kerley B lines: short horizontal lines reaching the pleura at the lateral bases
    rs = _span(ys, f.y_dome_r - 0.45, f.y_low)
    if p.kerley > 0 and rs.stop > rs.start:
        Ys = Y[rs]
        inband = _ramp(ax - (f.lat[rs] - 0.10), 0.03) * _ramp(Ys - (f.dome_top - 0.35), 0.08)
        kl = _bands(Ys + 5.0 + 0.01 * pm.sin(ax * 40), 0.026, 0.22)
        d[rs] += (0.06 * p.kerley) * kl * inband * lung[rs]

    # breast shadows: soft tissue over the lower zones with a curved lower margin
    by = f.y_dome_r - 0.04
    rs = _span(ys, by - 0.45, by + 0.30)
    if p.breast > 0 and rs.stop > rs.start:
        Ys = Y[rs]
        rad = np.sqrt(((ax - 0.50 * f.wt) / 0.36) ** 2 + ((Ys - by) / 0.26) ** 2)
        d[rs] += (0.05 * p.breast) * _ramp(1.0 - rad, 0.25) * _ramp(Ys - by + 0.30, 0.2) * body[rs]


def _ribs(f: _Frontal, d: np.ndarray, *, solid: np.ndarray, below: np.ndarray) -> None:
    """Posterior and anterior ribs inside the cage, fainter over the heart and abdomen."""
    ap, wt, ax, Y, y_apex = f.ap, f.wt, f.ax, f.Y, f.y_apex
    uu = ax / wt
    rs = _span(f.ys, y_apex - 0.15, f.y_low)
    Ys = Y[rs]
    cage = (_ramp(f.lat[rs] + 0.06 - ax, 0.04)
            * _ramp(Ys - (y_apex - 0.10) - 2.0 * (ax - f.a_apex) ** 2, 0.04)
            * _ramp(ax - 0.08, 0.03) * (1.0 - 0.8 * solid[rs] * f.above_dia[rs]) * (1.0 - 0.6 * below[rs]))
    # posterior ribs: from the spine laterally, rising slightly, then curving down
    vp = Ys - (-0.12 * uu + 0.40 * uu**2) - (y_apex - 0.10) + (0.03 if ap else 0.0)
    vpc = np.clip(vp, 0, 1.6)
    prib = _bands(vpc / 0.080 - 1.1 * vpc**2, 1.0, 0.40 - 0.10 * np.clip(uu, 0, 1))
    prib *= (vp > 0) & (vp < 1.3)
    # anterior ribs: from the lateral wall running medially and down, fading medially
    va = Ys + (0.50 * uu - 0.14 * uu**2) - (y_apex - 0.16)
    arib = _bands(va, 0.14, 0.30) * _ramp(uu - 0.40, 0.25) * ((va > 0.12) & (va < 1.1))
    d[rs] += f.bone * cage * (0.075 * prib + 0.05 * arib)


def _clavicles_and_scapulae(f: _Frontal, d: np.ndarray, *, body: np.ndarray, hx: float) -> None:
    ap, wt, ax, Y, ys, bone = f.ap, f.wt, f.ax, f.Y, f.ys, f.bone
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


def render_image(params: ChestParams, rows: int, cols: int, rng: np.random.Generator, *,
                 body_part: str = "CHEST", laterality: str = "L") -> np.ndarray:
    """Render any phantom: a chest (see :func:`render_chest`), an ``ABDOMEN`` AP or a ``HAND``
    PA (``laterality`` ``L``/``R``). Same output convention as :func:`render_chest`."""
    if body_part == "CHEST":
        return render_chest(params, rows, cols, rng)
    wr, wc = _work_shape(rows, cols, params)
    if body_part == "ABDOMEN":
        d = abdomen_anatomy(params, wr, wc, rng)
    elif body_part == "HAND":
        f = min(1.0, 768 / max(wr, wc))
        d = hand_anatomy(params, max(16, round(wr * f)), max(16, round(wc * f)), rng, side=laterality)
    else:
        raise ValueError(f"unknown body part {body_part!r}: expected CHEST, ABDOMEN or HAND")
    return _finish(d, params, rows, cols, rng)


