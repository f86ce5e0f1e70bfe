"""Batch throughput against a bare model forward on the same preprocessed tensors, one run.

1. Phantoms at a realistic 2048 x 2048 (uncompressed, 16-bit) are written once.
2. **Bare forward**: every image is decoded and preprocessed up front; then only
   ``engine.predict`` runs over the stacked tensors (same batch size) -> images/s.
3. **Batch**: :func:`cxr_ai.batch.run_items` over the files (decode + gate + pixel pipeline in
   a thread pool overlapping inference, SR + FHIR built and written) -> images/s, heatmaps off
   (the figure of merit, goal >= 0.8 x bare) and on (reported).
4. **Decode pool**: the prepare stage alone with threads vs processes.

The model is the configured / shipped demo bundle when present, else an untrained MONAI
DenseNet-121 at 224 px in a throwaway bundle (same cost per forward; weights don't matter).

Run: ``.venv/bin/python benchmarks/bench_batch.py [--n 16] [--size 2048]``; writes
``benchmarks/results/batch.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _bundle(tmp: Path) -> Path:
    from cxr_ai.models.engine import default_bundle_path

    if default_bundle_path().is_dir():
        return default_bundle_path()
    import torch

    from cxr_ai.imaging import PixelPipelineSpec
    from cxr_ai.models.bundle import FindingSpec, save_bundle
    from cxr_ai.models.networks import NetworkConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetworkConfig(architecture="densenet121", input_size=224))
    return save_bundle(tmp / "bench-bundle", model=net, name="bench-densenet121", version="0",
                       findings=[FindingSpec("cardiomegaly", "Cardiomegaly", 0.5),
                                 FindingSpec("low_ef", "Low ejection fraction", 0.5)],
                       pipeline=PixelPipelineSpec(size=224), description="benchmark", intended_use="benchmark")


def _prepare_only(path: str, bundle_dir: str) -> float:
    """Process-pool task: gate + pixel pipeline of one file (bundle spec re-read per process)."""
    from cxr_ai.dicom.gate import check_applicability
    from cxr_ai.imaging import preprocess
    from cxr_ai.models.bundle import read_metadata

    decision, rg = check_applicability(path)
    from cxr_ai.imaging import PixelPipelineSpec

    spec = PixelPipelineSpec.from_dict(read_metadata(bundle_dir)["cxr_ai"]["pixel_pipeline"])
    return float(preprocess(rg, spec).image.mean()) if decision.accepted else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="images (default 16)")
    ap.add_argument("--size", type=int, default=2048, help="phantom side in pixels (default 2048)")
    ap.add_argument("--threads", type=int, default=0, help="decode threads (default: cores)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch.json"))
    args = ap.parse_args()

    from cxr_ai import batch
    from cxr_ai.config import default_config
    from cxr_ai.phantoms import PhantomConfig, generate_studies
    from cxr_ai.pipeline import Pipeline

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    generate_studies(tmp / "ph", PhantomConfig(n_studies=args.n, seed=3, size=args.size, fraction_lateral=0.0,
                                               fraction_non_chest=0.0, modalities=("DX",)))
    wl = batch.scan_inputs([tmp / "ph"])
    bundle = _bundle(tmp)
    cfg = default_config()
    cfg["models"]["bundle"] = str(bundle)
    cfg["outputs"]["heatmap_sc"] = cfg["outputs"]["parametric_map"] = True
    pipe = Pipeline(config=cfg, explain=False)
    eng = pipe.engine
    threads = args.threads or max(2, batch._cores())

    # 1. the same preprocessed tensors, bare forward
    preps = [batch.prepare(pipe, it) for it in wl.items]
    x = np.stack([p.pre.image for p in preps if p.pre is not None]).astype(np.float32)
    eng.predict(x[: eng.batch_size])  # warm-up
    t = time.perf_counter()
    eng.predict(x)
    forward = len(x) / (time.perf_counter() - t)

    # 2. the batch driver (heatmaps off, then on)
    def run(explain: bool, name: str) -> float:
        pipe.explain = explain
        t0 = time.perf_counter()
        fins = batch.run_items(pipe, wl.items, out_dir=tmp / name, pkey=b"k" * 32, threads=threads)
        assert sum(f.row["status"] == "processed" for f in fins) == len(x)
        return len(fins) / (time.perf_counter() - t0)

    run(False, "warm")
    batch_rate = run(False, "out")
    batch_explain = run(True, "out-explain")

    # 3. the decode stage alone: threads vs processes
    paths = [it.path for it in wl.items]
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: batch.prepare(pipe, batch.WorkItem(p, "", "")), paths))
    thread_rate = len(paths) / (time.perf_counter() - t)
    with cf.ProcessPoolExecutor(threads) as pool:
        list(pool.map(_prepare_only, paths[:threads], [str(bundle)] * threads))  # start the workers
        t = time.perf_counter()
        list(pool.map(_prepare_only, paths, [str(bundle)] * len(paths)))
        process_rate = len(paths) / (time.perf_counter() - t)

    result = {
        "images": len(x), "image_size": args.size, "model": eng.model_info.label, "device": str(eng.device),
        "batch_size": eng.batch_size, "torch_threads": eng.num_threads, "decode_threads": threads,
        "bare_forward_img_s": round(forward, 3),
        "batch_img_s": round(batch_rate, 3),
        "ratio_batch_to_forward": round(batch_rate / forward, 3),
        "goal_ratio": 0.8,
        "batch_with_heatmaps_img_s": round(batch_explain, 3),
        "ratio_with_heatmaps": round(batch_explain / forward, 3),
        "prepare_threads_img_s": round(thread_rate, 3),
        "prepare_processes_img_s": round(process_rate, 3),
        "machine": f"{platform.machine()} {batch._cores()} cores",
    }
    print(f"{'measure':38s} {'img/s':>8s} {'x forward':>10s}")
    print(f"{'bare model forward (same tensors)':38s} {forward:8.2f} {1.0:10.2f}")
    print(f"{'batch, heatmaps off':38s} {batch_rate:8.2f} {batch_rate / forward:10.2f}")
    print(f"{'batch, heatmaps on':38s} {batch_explain:8.2f} {batch_explain / forward:10.2f}")
    print(f"{'decode+preprocess, threads':38s} {thread_rate:8.2f} {thread_rate / forward:10.2f}")
    print(f"{'decode+preprocess, processes':38s} {process_rate:8.2f} {process_rate / forward:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
