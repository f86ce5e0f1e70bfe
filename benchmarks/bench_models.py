"""Inference engine throughput against a bare ``model(x)`` loop on the same tensors.

For each network (the shipped demo bundle at its size, and a DenseNet-121 at 224 px with
random weights), the same preprocessed images are pushed through

- **bare**: ``with torch.inference_mode(): model(x)`` over the same batches, and
- **engine**: :meth:`cxr_ai.models.engine.InferenceEngine.predict` (batching, device
  transfer, sigmoid, copies back to NumPy),

``--repeats`` times, each pair back to back in alternating order; the figure of merit is the
median over repeats of engine images/s over bare images/s (goal >= 0.95). Grad-CAM seconds
per image (both findings) are reported beside them.

Run: ``.venv/bin/python benchmarks/bench_models.py [--repeats N]``; writes
``benchmarks/results/models.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_ai.imaging import PixelPipelineSpec
from cxr_ai.models.bundle import FindingSpec, load_bundle, save_bundle
from cxr_ai.models.engine import InferenceEngine, default_bundle_path
from cxr_ai.models.networks import NetworkConfig, build_network

from _common import machine_info, write_result


def _median_rate(fn, n_images: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def bench(bundle, *, n_images: int, batch_size: int, repeats: int, device: str) -> dict:
    engine = InferenceEngine(bundle, device=device, batch_size=batch_size)
    s = bundle.pipeline.size
    rng = np.random.default_rng(0)
    images = rng.random((n_images, 1, s, s), dtype=np.float32)
    batches = [torch.from_numpy(images[i : i + batch_size]) for i in range(0, n_images, batch_size)]
    model = engine.model

    def bare() -> None:
        with torch.inference_mode():
            for x in batches:
                model(x.to(engine.device))
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        engine.predict(images)

    bare(), ours()  # warm-up
    bare_rates, engine_rates, ratios = [], [], []
    for i in range(repeats):  # back to back, order alternating (ABBA), so both see the same load
        first, second = (bare, ours) if i % 2 == 0 else (ours, bare)
        r1, r2 = _median_rate(first, n_images, 1), _median_rate(second, n_images, 1)
        rb, re_ = (r1, r2) if first is bare else (r2, r1)
        bare_rates.append(rb)
        engine_rates.append(re_)
        ratios.append(re_ / rb)
    b, e = statistics.median(bare_rates), statistics.median(engine_rates)
    t0 = time.perf_counter()
    engine.explain(images[:4])
    cam = (time.perf_counter() - t0) / 4
    return {
        "network": f"{bundle.network.architecture} ({bundle.network.head})",
        "input": s,
        "batch_size": batch_size,
        "images": n_images,
        "device": str(engine.device),
        "threads": engine.num_threads,
        "bare_images_per_s": round(b, 2),
        "engine_images_per_s": round(e, 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "gradcam_s_per_image": round(cam, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.json"))
    args = parser.parse_args(argv)
    rows = [bench(load_bundle(default_bundle_path()), n_images=1024, batch_size=32, repeats=args.repeats, device=args.device)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        net = build_network(NetworkConfig(architecture="densenet121", input_size=224))
        path = save_bundle(
            Path(tmp) / "d121", model=net, name="bench-densenet121", version="0", pipeline=PixelPipelineSpec(size=224),
            findings=[FindingSpec("cardiomegaly", "Cardiomegaly", 0.5), FindingSpec("low_ef", "Low EF", 0.5)],
            description="benchmark (random weights)", intended_use="benchmark",
        )
        rows.append(bench(load_bundle(path), n_images=48, batch_size=8, repeats=args.repeats, device=args.device))
    print(f"{'network':28} {'input':>5} {'batch':>5} {'bare img/s':>10} {'engine img/s':>12} {'ratio':>6} {'Grad-CAM s/img':>14}")
    for r in rows:
        print(f"{r['network']:28} {r['input']:>5} {r['batch_size']:>5} {r['bare_images_per_s']:>10.1f} {r['engine_images_per_s']:>12.1f} {r['ratio']:>6.3f} {r['gradcam_s_per_image']:>14.3f}")
    result = {
        "benchmark": "models",
        "goal": "engine/bare ratio >= 0.95",
        "machine": machine_info(),
        "rows": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
