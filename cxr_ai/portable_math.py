"""Elementwise exp, log, sin, cos, arctan2 and power that give the same bits on every CPU.

NumPy picks the kernel of its transcendental ufuncs (``exp``, ``log``, ``sin``, ``cos``,
``arctan2``, ``power``) at run time from the CPU's features: a baseline (SSE) loop, an
AVX2/FMA loop, or AVX-512 loops (SVML-derived for float64 on Linux). Each is accurate to a
few units in the last place, but they do not agree with one another: measured with NumPy 2.4
on one machine by masking CPU features (``NPY_DISABLE_CPU_FEATURES``), 10-45 % of float32
results and ~5 % of float64 results of ``exp``/``log``/``pow``/``arctan2`` change by one or two
ULPs. Anything that later rounds such values to integers (stored pixel values) then differs
between machines.

The functions here use only operations that IEEE 754 rounds correctly and that NumPy computes
the same way on every CPU (``+ - * /``, ``sqrt``, ``rint``, ``frexp``, ``ldexp``, comparisons),
in float64: Cody-Waite range reduction and fixed polynomials. Results are accurate to ~1e-15
relative in float64 (~1e-8 before the final rounding for float32 results) and returned in the input's floating dtype (float32 in, float32 out;
Python numbers in, Python float out).
Speed is a few times slower than NumPy's SIMD kernels, which is fine for phantom rendering.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["arctan2", "cos", "exp", "log", "power", "sin"]

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_PIO2_HI = 1.57079632673412561417e00  # pi/2 in three parts (fdlibm), exact products for |n| < 2**20
_PIO2_MID = 6.07710050650619224932e-11
_PIO2_LO = 2.02226624879595063154e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
_PI = 3.14159265358979311600e00
_PI_2 = 1.57079632679489655800e00
_SQRT_HALF = 0.70710678118654757
_LN2 = 0.6931471805599453

# Polynomial coefficients, highest power first, as (float64 results, float32 results): the
# float32 set stops where the truncation error is below 1e-8 relative (a float32 ulp is 6e-8).
# exp: Taylor 1/k! on |r| <= ln2/2 (to r**13 resp. r**8).
_EXP_C = (tuple(1.0 / math.factorial(k) for k in range(13, -1, -1)),
          tuple(1.0 / math.factorial(k) for k in range(8, -1, -1)))
# sin r = r * P(r*r), cos r = Q(r*r) on |r| <= pi/4 (to r**19 / r**20 resp. r**11 / r**12).
_SIN_C = (tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(9, -1, -1)),
          tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(5, -1, -1)))
_COS_C = (tuple((-1) ** k / math.factorial(2 * k) for k in range(10, -1, -1)),
          tuple((-1) ** k / math.factorial(2 * k) for k in range(6, -1, -1)))
# log m = 2 s (1 + z/3 + z**2/5 + ...), z = s*s <= 0.0295 (to z**11 resp. z**5).
_LOG_C = (tuple(1.0 / k for k in range(23, 0, -2)), tuple(1.0 / k for k in range(11, 0, -2)))
# atan u = u (1 - z/3 + z**2/5 - ...), z = u*u <= 0.0396 (to z**13 resp. z**6).
_ATAN_C = (tuple((-1) ** k / (2 * k + 1) for k in range(13, -1, -1)),
           tuple((-1) ** k / (2 * k + 1) for k in range(6, -1, -1)))


def _coeffs(table: tuple[tuple[float, ...], tuple[float, ...]], dtype: np.dtype) -> tuple[float, ...]:
    return table[1] if dtype == np.float32 else table[0]


_F = TypeVar("_F", bound=Callable[..., Any])


def _scalar_in_scalar_out(fn: _F) -> _F:
    """Python numbers in, Python float out (so that NumPy keeps treating it as a weak scalar)."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        out = fn(*args)
        if all(isinstance(a, (int, float)) for a in args):
            return float(out)
        return out

    return wrapper  # type: ignore[return-value]


def _float_dtype(x: np.ndarray) -> np.dtype:
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _out(result: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return result.astype(dtype, copy=False)


def _horner(z: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    acc = np.full_like(z, coeffs[0])
    for c in coeffs[1:]:
        acc *= z
        acc += c
    return acc


@_scalar_in_scalar_out
def exp(x: ArrayLike) -> np.ndarray:
    """``e**x``, elementwise."""
    x = np.asarray(x)
    dtype = _float_dtype(x)
    v = np.clip(x.astype(np.float64), -750.0, 709.0)  # exp(-750) underflows to 0
    n = np.rint(v * _INV_LN2)
    r = (v - n * _LN2_HI) - n * _LN2_LO
    return _out(np.ldexp(_horner(r, _coeffs(_EXP_C, dtype)), n.astype(np.int32)), dtype)


@_scalar_in_scalar_out
def log(x: ArrayLike) -> np.ndarray:
    """Natural logarithm, elementwise (``-inf`` at 0, ``nan`` below 0)."""
    x = np.asarray(x)
    dtype = _float_dtype(x)
    v = x.astype(np.float64)
    m, e = np.frexp(np.where((v > 0) & np.isfinite(v), v, 1.0))  # v = m * 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = np.where(small, m * 2.0, m)  # m in [sqrt(1/2), sqrt(2))
    e = e - small
    s = (m - 1.0) / (m + 1.0)  # |s| <= 0.1716; log m = 2 atanh s
    z = s * s
    series = _horner(z, _coeffs(_LOG_C, dtype))
    out = e * _LN2 + 2.0 * s * series
    out = np.where(v > 0, out, np.where(v == 0, -np.inf, np.nan))
    out = np.where(np.isinf(v) & (v > 0), np.inf, out)
    return _out(out, dtype)


def _reduce_quadrant(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.rint(v * _TWO_OVER_PI)
    r = ((v - n * _PIO2_HI) - n * _PIO2_MID) - n * _PIO2_LO
    return r, n.astype(np.int64) & 3


def _sin_cos_reduced(r: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    z = r * r
    return r * _horner(z, _coeffs(_SIN_C, dtype)), _horner(z, _coeffs(_COS_C, dtype))


@_scalar_in_scalar_out
def sin(x: ArrayLike) -> np.ndarray:
    """Sine (radians), elementwise; arguments up to ~1e5 in magnitude."""
    x = np.asarray(x)
    dtype = _float_dtype(x)
    r, q = _reduce_quadrant(x.astype(np.float64))
    s, c = _sin_cos_reduced(r, dtype)
    out = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return _out(out, dtype)


@_scalar_in_scalar_out
def cos(x: ArrayLike) -> np.ndarray:
    """Cosine (radians), elementwise; arguments up to ~1e5 in magnitude."""
    x = np.asarray(x)
    dtype = _float_dtype(x)
    r, q = _reduce_quadrant(x.astype(np.float64))
    s, c = _sin_cos_reduced(r, dtype)
    out = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    return _out(out, dtype)


@_scalar_in_scalar_out
def arctan2(y: ArrayLike, x: ArrayLike) -> np.ndarray:
    """Angle of the point ``(x, y)`` in ``[-pi, pi]``, elementwise (0 at the origin)."""
    y, x = np.asarray(y), np.asarray(x)
    dtype = np.result_type(_float_dtype(y), _float_dtype(x))
    yv, xv = np.broadcast_arrays(y.astype(np.float64), x.astype(np.float64))
    ay, axv = np.abs(yv), np.abs(xv)
    hi = np.maximum(ay, axv)
    lo = np.minimum(ay, axv)
    t = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 0.0)  # in [0, 1]
    # halve the angle twice: atan t = 2 atan(t / (1 + sqrt(1 + t*t))), |u| <= tan(pi/16)
    u = t / (1.0 + np.sqrt(1.0 + t * t))
    u = u / (1.0 + np.sqrt(1.0 + u * u))
    z = u * u
    series = _horner(z, _coeffs(_ATAN_C, dtype))
    a = 4.0 * u * series  # atan(lo / hi) in [0, pi/4]
    a = np.where(ay > axv, _PI_2 - a, a)
    a = np.where(xv < 0, _PI - a, a)
    a = np.where(np.signbit(yv), -a, a)
    return _out(a, dtype)


@_scalar_in_scalar_out
def power(x: ArrayLike, y: float) -> np.ndarray:
    """``x**y`` for ``x >= 0`` and a scalar exponent; integer exponents multiply exactly."""
    x = np.asarray(x)
    dtype = _float_dtype(x)
    if float(y).is_integer() and 0 <= y <= 16:
        v = x.astype(dtype)
        out = np.ones_like(v)
        for _ in range(int(y)):
            out = out * v
        return out
    v = x.astype(np.float64)
    safe = np.where(v > 0, v, 1.0)
    out = np.where(v > 0, exp(float(y) * log(safe)), 0.0 if y > 0 else np.inf)
    out = np.where(v < 0, np.nan, out)
    return _out(out, dtype)
