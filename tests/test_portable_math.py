"""CPU-independent elementwise math, and phantoms that draw the same pixels on every CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxr_ai import portable_math as pm


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "wide": rng.uniform(-60.0, 60.0, 50_000),
        "unit": rng.uniform(-3.0, 3.0, 50_000),
        "positive": rng.uniform(1e-6, 8.0, 50_000),
        "negative_exp": -rng.uniform(0.0, 700.0, 50_000),
    }


@pytest.mark.parametrize("dtype, rel", [(np.float64, 2e-14), (np.float32, 3e-7)])
def test_agrees_with_numpy_within_its_accuracy(dtype: type, rel: float) -> None:
    x = {k: v.astype(dtype) for k, v in _inputs().items()}
    x["exp_arg"], x["exp_neg"], x["atan_x"] = x["unit"] * dtype(10), x["negative_exp"] / dtype(10), x["wide"] / dtype(20)
    ref = {k: v.astype(np.float64) for k, v in x.items()}  # the same arguments, exactly
    cases = [
        (pm.exp(x["exp_arg"]), np.exp(ref["exp_arg"])),
        (pm.exp(x["exp_neg"]), np.exp(ref["exp_neg"])),
        (pm.log(x["positive"]), np.log(ref["positive"])),
        (pm.power(x["positive"], 0.75), ref["positive"] ** 0.75),
        (pm.power(x["positive"], 2.6), ref["positive"] ** 2.6),
        (pm.arctan2(x["unit"], x["atan_x"]), np.arctan2(ref["unit"], ref["atan_x"])),
    ]
    for got, want in cases:
        assert got.dtype == dtype
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=rel, atol=0)
    for fn, ref_fn in ((pm.sin, np.sin), (pm.cos, np.cos)):
        got = fn(x["wide"])
        assert got.dtype == dtype
        # absolute near the zeros of sin/cos (argument reduction of a large argument)
        np.testing.assert_allclose(got.astype(np.float64), ref_fn(ref["wide"]), rtol=0, atol=rel * 60)


def test_special_values_and_scalars() -> None:
    assert pm.log(np.array([0.0]))[0] == -np.inf
    assert np.isnan(pm.log(np.array([-1.0]))[0])
    np.testing.assert_allclose(pm.power(np.array([0.0, 4.0]), 1.5), [0.0, 8.0], rtol=1e-15)
    assert np.isinf(pm.log(np.array([np.inf]))[0])
    assert pm.power(np.array([3.0], np.float32), 3).tolist() == [27.0]
    assert pm.exp(np.array([-800.0]))[0] == 0.0
    quadrants = pm.arctan2(np.array([0.0, 1.0, 1.0, -1.0, -1.0, 0.0]), np.array([0.0, 1.0, -1.0, -1.0, 1.0, -1.0]))
    np.testing.assert_allclose(quadrants, [0.0, np.pi / 4, 3 * np.pi / 4, -3 * np.pi / 4, -np.pi / 4, np.pi], atol=1e-15)
    value = pm.cos(0.5)
    assert isinstance(value, float) and value == pytest.approx(np.cos(0.5), rel=1e-15)


_DIGEST = r"""
import hashlib, json, sys
import numpy as np
from cxr_ai import portable_math as pm
from cxr_ai.phantoms import make_phantom_dataset

rng = np.random.default_rng(7)
x = rng.uniform(-30.0, 30.0, 20_000)
out = {}
for dt in (np.float32, np.float64):
    v = x.astype(dt)
    parts = [pm.exp(v / 5), pm.log(np.abs(v) + 1e-3), pm.sin(v), pm.cos(v), pm.arctan2(v, v[::-1]), pm.power(np.abs(v), 0.7)]
    out[f"math_{np.dtype(dt).name}"] = hashlib.sha256(b"".join(p.tobytes() for p in parts)).hexdigest()
cases = {
    "pa_congested": dict(view="PA", congestion=0.8, ctr=0.58, random_state=1),
    "ap_shifted": dict(view="AP", shift_strength=0.8, random_state=2),
    "lateral": dict(view="LL", random_state=3),
    "abdomen": dict(body_part="ABDOMEN", view="AP", random_state=4),
    "hand": dict(body_part="HAND", random_state=5),
}
for name, kw in cases.items():
    ds = make_phantom_dataset(size=320, bits_stored=16, **kw)
    out[name] = hashlib.sha256(ds.PixelData).hexdigest()
json.dump(out, sys.stdout)
"""


def _digests(env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_phantom_pixels_do_not_depend_on_the_cpus_simd_features() -> None:
    """NumPy picks SIMD kernels for exp/log/sin/cos/power/arctan2 by CPU feature, and they round
    differently; masking every optional feature this CPU has (NPY_DISABLE_CPU_FEATURES) must not
    change a single stored pixel. This is how a different machine draws the phantoms."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    present = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    if not present:
        pytest.skip("this CPU runs NumPy's baseline kernels only: there is no other kernel to compare with")
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(present)}
    env.pop("NPY_ENABLE_CPU_FEATURES", None)
    native = _digests({k: v for k, v in os.environ.items() if k != "NPY_DISABLE_CPU_FEATURES"})
    baseline = _digests(env)
    assert baseline == native, {k: (native[k][:12], baseline[k][:12]) for k in native if native[k] != baseline.get(k)}
    assert len({hashlib.sha256(v.encode()).hexdigest() for v in native.values()}) == len(native)
