"""The phantoms that are not chests, for the gate's negative examples: an abdomen AP and a
hand PA (drawn with the same helpers and finished like a chest by
:func:`cxr_ai.phantoms.drawing.render_image`)."""

from __future__ import annotations

import numpy as np

from cxr_ai import portable_math as pm
from cxr_ai.phantoms.params import ChestParams
from cxr_ai.phantoms.shapes import axes, bands, bone_profile, grid, ramp, smooth_noise, span, tone


def abdomen_anatomy(p: ChestParams, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """AP abdomen (KUB): lumbar spine, pelvis, lower ribs, bowel gas."""
    X, Y = grid(rows, cols, p)
    e = 4.0 / min(rows, cols) + 0.004
    ax = np.abs(X)
    wb = 0.86 + 0.08 * p.habitus
    body = np.sqrt(np.clip(1.0 - pm.power(np.clip(ax / wb, 0, 1), 4), 0, 1)) * ramp(wb - ax, 2 * e)
    d = (0.42 + 0.08 * p.habitus) * body
    # bowel gas: tubular loops (colon frame) and small-bowel bubbles
    g = smooth_noise(rng, rows, cols, 0.05, grid=96)
    loops = pm.exp(-((g / 0.18) ** 2))
    frame = ramp(0.72 - ax, 0.1) * ramp(Y + 0.55, 0.1) * ramp(0.72 - Y, 0.1)
    b = smooth_noise(rng, rows, cols, 0.02, grid=128)
    bubbles = ramp(b - 1.6, 0.3)
    d = d - frame * (0.12 * loops * ramp(smooth_noise(rng, rows, cols, 0.1, grid=32), 0.8)
                     + 0.10 * bubbles)
    # lumbar spine
    vert = bands(Y + 1.3, 0.22, 0.84)
    spine = ramp(0.10 - ax, 0.015) * (0.4 + 0.6 * vert) * ramp(0.55 - Y, 0.05)
    ped = sum(pm.exp(-(((X - s * 0.065) / 0.022) ** 2)) for s in (-1, 1)) * np.clip(vert, 0, 1)
    d = d + p.bone * (0.07 + 0.0 * ped) * spine + 0.03 * p.bone * ped * ramp(0.55 - Y, 0.05)
    # transverse processes
    d = d + 0.03 * p.bone * vert * ramp(0.19 - ax, 0.02) * ramp(ax - 0.1, 0.02)
    # pelvis: iliac wings as arcs, sacrum
    for s in (-1.0, 1.0):
        r = np.sqrt(((X - s * 0.42) / 0.36) ** 2 + ((Y - 0.95) / 0.42) ** 2)
        rim = np.clip(1 - ((r - 1.0) / 0.06) ** 2, 0, None)
        wing = ramp(1.0 - r, 0.04) * 0.5 + rim
        d = d + 0.08 * p.bone * wing * (Y > 0.50) * ramp(ax - 0.12, 0.05)
    sac = ramp(0.16 - ax - 0.3 * (Y - 0.55), 0.02) * (Y > 0.55)
    d = d + 0.06 * p.bone * sac
    # lower ribs at the top corners
    rib = bands(Y + 1.2 - 0.25 * ax, 0.14, 0.3)
    d = d + 0.05 * p.bone * rib * (Y < -0.55) * ramp(ax - 0.15, 0.05) * body
    # psoas margins and liver
    d = d + 0.04 * ramp(0.55 - ax - 0.25 * Y, 0.1) * (X < 0) * ramp(-0.1 - Y, 0.2) * body
    d = d + 0.02 * smooth_noise(rng, rows, cols, 0.08, grid=64) * body
    return tone(d)


def _segment(xs: np.ndarray, ys: np.ndarray, a: tuple[float, float], b: tuple[float, float],
             reach: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Distance to segment a-b and the position along it (0..1), computed only in the
    bounding box grown by ``reach``. Returns (row slice, column slice, distance, position)."""
    (ax_, ay_), (bx_, by_) = a, b
    rs = span(ys, min(ay_, by_) - reach, max(ay_, by_) + reach)
    cs = span(xs, min(ax_, bx_) - reach, max(ax_, bx_) + reach)
    X, Y = xs[None, cs], ys[rs, None]
    vx, vy = bx_ - ax_, by_ - ay_
    t = np.clip(((X - ax_) * vx + (Y - ay_) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    dx = X - (ax_ + t * vx)
    dy = Y - (ay_ + t * vy)
    return rs, cs, np.sqrt(dx * dx + dy * dy), t


def hand_anatomy(p: ChestParams, rows: int, cols: int, rng: np.random.Generator,
                  side: str = "L") -> np.ndarray:
    """PA hand: soft tissue silhouette, carpals, metacarpals, phalanges, distal forearm.
    A left hand has its thumb on image right; a right hand is mirrored."""
    xs, ys = axes(rows, cols, p)
    m = -1.0 if side == "R" else 1.0  # mirror the model's x coordinates
    soft = np.zeros((rows, cols), np.float32)
    bone = np.zeros((rows, cols), np.float32)

    def add_bone(a: tuple[float, float], b: tuple[float, float], w: float, taper: float = 0.0,
                 weight: float = 1.0) -> None:
        rs, cs, dist, t = _segment(xs, ys, (m * a[0], a[1]), (m * b[0], b[1]), w)
        ww = w * (1.0 - taper * pm.sin(np.pi * t))
        np.maximum(bone[rs, cs], weight * bone_profile(dist / ww), out=bone[rs, cs])

    def add_soft(a: tuple[float, float], b: tuple[float, float], w: float) -> None:
        rs, cs, dist, _ = _segment(xs, ys, (m * a[0], a[1]), (m * b[0], b[1]), w + 0.02)
        np.maximum(soft[rs, cs], ramp(w - dist, 0.02), out=soft[rs, cs])

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
    d += 0.02 * smooth_noise(rng, rows, cols, 0.05, grid=64) * soft
    return tone(d + 0.01)
