"""Batch throughput against a bare model forward on the same preprocessed tensors, one run.

For each model — an untrained MONAI DenseNet-121 at 224 px in a throwaway bundle (the figure of
merit: production models are DenseNet-121 class, and only the cost of a forward matters, not
the weights) and the shipped demo bundle (a tiny network) — and one set of phantoms at a
realistic 2048 x 2048 (uncompressed, 16-bit):

1. **Bare forward**: every image is decoded and preprocessed up front; then only
   ``engine.predict`` runs over the stacked tensors (same engine, same batch size) -> images/s,
   best of 3, both as one call with the engine's threads and as the batch driver runs the
   model (its lanes, :func:`cxr_ai.batch.pools.model_plan`); the faster is the reference.
2. **CPU seconds per image by stage**, each stage alone in this process with one PyTorch
   thread (as the driver's lanes and the workers run them): prepare (read, gate, decode, pixel
   pipeline), forward, SR + FHIR objects, write, table row, and for heatmaps the explanation
   (the forward's maps: forward with maps minus forward without, plus mapping them to the
   source geometry; MONAI's GradCAM per finding, the former path, is timed beside it as a
   reference), the extra work of stage 1 (the captures' background, made from the display image
   the model input is made from) and the extra SC + PM objects and their writing. With ``C`` cores, ``C / sum(stages)`` estimates the
   most any driver can reach on this machine (every core busy with nothing but the stages); it
   is reported as the bound.
3. **Batch**: :func:`cxr_ai.batch.pools.run_items` over the files in three output modes — ``table``
   (results table only, no result objects), ``sr_fhir`` (SR + FHIR built and written, heatmaps
   off) and ``heatmaps`` (Grad-CAM + SR + SC + PM + FHIR) — with the stage pool in worker
   processes and in threads (the default, ``pool = "auto"``, picks processes when result
   objects are built, threads for the table only) -> images/s (best of ``--reps``, like the
   forward: interference only slows a run down), ratio to the bare forward, and the CPU
   seconds per image the run really spent (driver + workers, wall clock x cores busy).

Goals: batch >= 0.8 x bare forward (issue 6); explanation cost <= 0.10 x the forward and the
heatmaps batch >= 0.6 x the SR + FHIR batch (issue 20, ``explanation_cost_over_forward`` and
``heatmaps_over_sr_fhir``). Run:
``.venv/bin/python benchmarks/bench_batch.py [--n 24] [--size 2048] [--models densenet121,demo]``;
writes ``benchmarks/results/batch.json``. Measure on a quiet machine (``flock`` the shared lock).
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_result

MODES = ("table", "sr_fhir", "heatmaps")
POOLS = ("processes", "threads")


def _densenet_bundle(tmp: Path) -> Path:
    """An untrained DenseNet-121 (MONAI, 1 channel) at 224 px in a throwaway bundle."""
    import torch

    from cxr_ai.imaging import PixelPipelineSpec
    from cxr_ai.models.bundle import FindingSpec, save_bundle
    from cxr_ai.models.networks import NetworkConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetworkConfig(architecture="densenet121", input_size=224))
    return save_bundle(tmp / "bench-densenet121", model=net, name="bench-densenet121", version="0",
                       findings=[FindingSpec("cardiomegaly", "Cardiomegaly", 0.5),
                                 FindingSpec("low_ef", "Low ejection fraction", 0.5)],
                       pipeline=PixelPipelineSpec(size=224), description="benchmark", intended_use="benchmark")


def _cpu() -> float:
    """CPU seconds of this process and of its finished (joined) children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _per_image(fn: Any, n: int) -> tuple[Any, float, float]:
    """Run ``fn``; return its value, CPU seconds and wall seconds per image."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, (time.process_time() - c) / n, (time.perf_counter() - w) / n


def _forward_rate(eng: Any, x: np.ndarray, *, threads: int, lanes: int = 1) -> float:
    """Best of 3 images/s of ``engine.predict`` over ``x`` (batches of the engine's size), with
    ``lanes`` calls at once of ``threads`` threads each."""
    import concurrent.futures as cf

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    chunks = [x[i : i + eng.batch_size] for i in range(0, len(x), eng.batch_size)]
    try:
        with cf.ThreadPoolExecutor(lanes) as pool:
            list(pool.map(eng.predict, chunks[:lanes]))  # warm-up at this thread count
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                list(pool.map(eng.predict, chunks))
                rates.append(len(x) / (time.perf_counter() - t))
        return max(rates)
    finally:
        torch.set_num_threads(before)


def _stage_costs(pipe: Any, items: list, tmp: Path) -> tuple[dict[str, float], np.ndarray]:
    """CPU seconds per image of each stage, alone and in sequence in this process, with one
    PyTorch thread (as the batch driver's lanes and its workers run them)."""
    import torch

    from cxr_ai import batch
    from cxr_ai.results import HEATMAP_PARTS

    eng = pipe.engine
    keys = batch.pipeline_finding_keys(pipe)
    torch.set_num_threads(1)
    try:
        # warm-up on one image: lazy imports, caches, the MONAI reference's copy of the network
        warm = [pipe.prepare(items[0].path)]
        pipe.infer(warm, explain=True, source_maps=False)
        pipe.build_outputs(warm[0][0])
        pipe.add_heatmaps(warm)
        eng.explain(warm[0][1].image[None], method="monai-gradcam")
        pipe.build_outputs(warm[0][0], parts=HEATMAP_PARTS)
        batch.write_outputs(warm[0][0], tmp / "stage-warm")

        n = len(items)
        # steady state, as the pool prepares: one instance after the other, nothing kept
        _, prep, _ = _per_image(lambda: [batch.prepare(pipe, it, keep_pixels=False).pre.image.mean() for it in items], n)
        preps = [batch.prepare(pipe, it, keep_pixels=False) for it in items]
        pairs = [(p.outcome, p.pre) for p in preps]
        x = np.stack([pre.image for _, pre in pairs]).astype(np.float32)
        _, fwd1, _ = _per_image(lambda: eng.predict(x), n)
        _, fwd1_maps, _ = _per_image(lambda: eng.predict(x, explain=True), n)
        pipe.infer(pairs, explain=False)
        outcomes = [o for o, _ in pairs]
        _, outputs, _ = _per_image(lambda: [pipe.build_outputs(o) for o in outcomes], n)  # SR + FHIR
        _, write, _ = _per_image(lambda: [batch.write_outputs(o, tmp / "stage-sr") for o in outcomes], n)
        _, row, _ = _per_image(lambda: [batch.outcome_row(o, model=pipe.model_info, key=b"k" * 32,
                                                          finding_keys=keys, n_outputs=2) for o in outcomes], n)
        preps = pairs = outcomes = []  # free them before the heatmap batch
        k = min(n, eng.batch_size)  # heatmaps: one batch prices them (pixels kept, as the batch does)
        _, prep_plain, _ = _per_image(lambda: [pipe.prepare(it.path) for it in items[:k]], k)
        pipe.explain = True  # stage 1 as the heatmaps batch runs it: it also makes the captures' background
        try:
            _, prep_hm, _ = _per_image(lambda: [pipe.prepare(it.path) for it in items[:k]], k)
            hm = [pipe.prepare(it.path) for it in items[:k]]
        finally:
            pipe.explain = False
        pipe.infer(hm, explain=True, source_maps=False)  # the forward keeps its maps (model geometry)
        for o, _ in hm:
            pipe.build_outputs(o)
        kept = [o.saliency for o, _ in hm]

        def to_source() -> None:
            for o, s in zip((o for o, _ in hm), kept):
                o.saliency = s
            pipe.add_heatmaps(hm)  # the kept maps to the source geometry, as stage 3 does

        _, source_maps, _ = _per_image(to_source, k)
        _, monai_gradcam, _ = _per_image(
            lambda: eng.explain(np.stack([pre.image for _, pre in hm]), method="monai-gradcam"), k)
        _, outputs_hm, _ = _per_image(lambda: [pipe.build_outputs(o, parts=HEATMAP_PARTS) for o, _ in hm], k)
        _, write_all, _ = _per_image(lambda: [batch.write_outputs(o, tmp / "stage-hm") for o, _ in hm], k)
    finally:
        torch.set_num_threads(eng.num_threads)
    _, fwd_n, _ = _per_image(lambda: eng.predict(x), len(x))
    for d in ("stage-warm", "stage-sr", "stage-hm"):
        shutil.rmtree(tmp / d, ignore_errors=True)
    maps_in_forward = max(0.0, fwd1_maps - fwd1)
    costs = {
        "prepare": prep, "forward_1_thread": fwd1, "forward_engine_threads": fwd_n,
        "outputs_sr_fhir": outputs, "write_sr_fhir": write, "row": row,
        # explanations: the forward's maps (forward with maps - forward without) + mapping them
        # to the source geometry; MONAI's GradCAM per finding (the former path) for reference
        "forward_1_thread_with_maps": fwd1_maps, "maps_in_forward": maps_in_forward,
        "maps_to_source": source_maps, "gradcam": maps_in_forward + source_maps,
        "monai_gradcam_reference": monai_gradcam,
        "prepare_heatmaps_extra": max(0.0, prep_hm - prep_plain),
        "outputs_heatmaps_extra": outputs_hm, "write_heatmaps_extra": max(0.0, write_all - write),
    }
    return {k: round(v, 4) for k, v in costs.items()}, x


def _bounds(costs: dict[str, float], cores: int) -> dict[str, float]:
    """Images/s no driver can beat with ``cores`` cores: cores / CPU seconds per image."""
    need = {"table": costs["prepare"] + costs["forward_1_thread"] + costs["row"]}
    need["sr_fhir"] = need["table"] + costs["outputs_sr_fhir"] + costs["write_sr_fhir"]
    need["heatmaps"] = (need["sr_fhir"] + costs["prepare_heatmaps_extra"] + costs["gradcam"] + costs["outputs_heatmaps_extra"]
                        + costs["write_heatmaps_extra"])
    return {m: round(cores / v, 3) for m, v in need.items()}


def _run_batch(pipe: Any, items: list, out: Path, *, mode: str, pool: str, threads: int) -> dict[str, Any]:
    from cxr_ai import batch

    pipe.explain = mode == "heatmaps"
    c0, t0 = _cpu(), time.perf_counter()
    fins = batch.run_items(pipe, items, out_dir=out, pkey=b"k" * 32, threads=threads, pool=pool,
                           write=mode != "table")
    wall = time.perf_counter() - t0
    cpu = _cpu() - c0  # the pool's processes are joined when run_items returns
    pipe.explain = False
    assert all(f.row["status"] == "processed" for f in fins) and len(fins) == len(items)
    n_files = sum(len(f.outputs) for f in fins)
    shutil.rmtree(out, ignore_errors=True)
    return {"img_s": round(len(fins) / wall, 3), "cpu_s_per_image": round(cpu / len(fins), 4),
            "cores_busy": round(cpu / wall, 2), "files_written": n_files}


def bench_model(name: str, bundle: Path, items: list, tmp: Path, *, threads: int, pools: tuple[str, ...],
                modes: tuple[str, ...], torch_threads: int = 0, lanes: int = 0, reps: int = 2) -> dict[str, Any]:
    from cxr_ai import batch
    from cxr_ai.config import default_config
    from cxr_ai.pipeline import Pipeline

    cfg = default_config()
    cfg["models"]["bundle"] = str(bundle)
    cfg["store"]["root"] = str(tmp / "var")
    cfg["batch"]["torch_threads"] = torch_threads
    cfg["batch"]["model_lanes"] = lanes
    pipe = Pipeline(config=cfg, explain=False)
    eng = pipe.engine
    cores = batch.usable_cores()
    costs, x = _stage_costs(pipe, items, tmp)
    plan = batch.model_plan(pipe)
    forward = _forward_rate(eng, x, threads=eng.num_threads)
    forward_lanes = _forward_rate(eng, x, threads=plan.torch_threads or eng.num_threads, lanes=plan.lanes)
    reference = max(forward, forward_lanes)  # the faster way to run the bare model is the reference
    bounds = _bounds(costs, cores)
    res: dict[str, Any] = {
        "model": eng.model_info.label, "input_size": eng.size, "batch_size": eng.batch_size,
        "engine_threads": eng.num_threads,
        "driver_model_lanes": plan.lanes, "driver_threads_per_lane": plan.torch_threads or eng.num_threads,
        "bare_forward_img_s": round(forward, 3),
        "bare_forward_img_s_driver_lanes": round(forward_lanes, 3),
        "reference_img_s": round(reference, 3),
        "cpu_s_per_image": costs,
        "bound_img_s": bounds,
        "bound_ratio": {m: round(b / reference, 3) for m, b in bounds.items()},
        "explanation_cost_over_forward": round(costs["gradcam"] / costs["forward_1_thread"], 3),
        "monai_gradcam_cost_over_forward": round(costs["monai_gradcam_reference"] / costs["forward_1_thread"], 3),
        "batch": {},
    }
    _run_batch(pipe, items[: eng.batch_size], tmp / "warm", mode="sr_fhir", pool=pools[0], threads=threads)
    res["default_pool"] = {m: batch.pool_kind("auto", write=m != "table") for m in modes}
    for pool in pools:
        res["batch"][pool] = {}
        for mode in modes:
            r = max((_run_batch(pipe, items, tmp / f"out-{pool}-{mode}", mode=mode, pool=pool, threads=threads)
                     for _ in range(reps)), key=lambda m: m["img_s"])  # best of reps, as the forward
            r["ratio"] = round(r["img_s"] / reference, 3)
            r["of_bound"] = round(r["img_s"] / bounds[mode], 3)
            res["batch"][pool][mode] = r
            print(f"  {name:12s} {pool:9s} {mode:8s} {r['img_s']:7.2f} img/s  x{r['ratio']:.3f} of forward, "
                  f"{r['of_bound']:.2f} of the {cores}-core bound", flush=True)
        by = res["batch"][pool]
        if "heatmaps" in by and "sr_fhir" in by:
            res.setdefault("heatmaps_over_sr_fhir", {})[pool] = round(by["heatmaps"]["img_s"] / by["sr_fhir"]["img_s"], 3)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="images (default 24)")
    ap.add_argument("--size", type=int, default=2048, help="phantom side in pixels (default 2048)")
    ap.add_argument("--threads", type=int, default=0, help="stage pool size (default: cores)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="[batch] torch_threads for the batch runs (default 0: automatic)")
    ap.add_argument("--lanes", type=int, default=0, help="[batch] model_lanes (default 0: automatic)")
    ap.add_argument("--reps", type=int, default=2, help="batch runs per measure, the best kept (default 2)")
    ap.add_argument("--models", default="densenet121,demo", help="densenet121 and/or demo (comma-separated)")
    ap.add_argument("--pools", default=",".join(POOLS), help="processes and/or threads")
    ap.add_argument("--modes", default=",".join(MODES), help="table, sr_fhir, heatmaps")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch.json"))
    args = ap.parse_args(argv)

    from cxr_ai import batch
    from cxr_ai.models.engine import default_bundle_path
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        generate_studies(tmp / "ph", PhantomConfig(n_studies=args.n, seed=3, size=args.size, fraction_lateral=0.0,
                                                   fraction_non_chest=0.0, modalities=("DX",)))
        items = batch.scan_inputs([tmp / "ph"]).items
        threads = args.threads or max(2, batch.usable_cores())
        pools = tuple(p for p in args.pools.split(",") if p)
        modes = tuple(m for m in args.modes.split(",") if m)
        bundles = {"densenet121": lambda: _densenet_bundle(tmp), "demo": default_bundle_path}
        results: dict[str, Any] = {}
        for name in args.models.split(","):
            print(f"{name}: stage costs, bare forward, batch runs ...", flush=True)
            results[name] = bench_model(name, Path(bundles[name]()), items, tmp, threads=threads, pools=pools,
                                        modes=modes, torch_threads=args.torch_threads, lanes=args.lanes,
                                        reps=max(1, args.reps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "images": len(items), "image_size": args.size, "stage_pool_size": threads, "cores": batch.usable_cores(),
        "goal_ratio": 0.8, "machine": f"{platform.machine()} {batch.usable_cores()} cores", **machine_info(),
        "note": "ratio = batch img/s / the faster bare forward (one call with the engine's threads, or the "
                "driver's lanes) on the same tensors; bound = cores / the CPU seconds per image of the stages "
                "measured alone (an estimate of the most any driver gets here); cpu_s_per_image and cores_busy: "
                "what the batch run itself spent (driver + workers)",
        "models": results,
    }
    print(f"\n{'model':12s} {'pool':10s} {'mode':8s} {'img/s':>7s} {'x fwd':>6s} {'bound':>6s} {'x fwd':>6s} "
          f"{'cpu s/img':>9s} {'cores':>5s}")
    for name, r in results.items():
        print(f"{name:12s} bare forward: {r['bare_forward_img_s']:.2f} img/s (one call, {r['engine_threads']} threads), "
              f"{r['bare_forward_img_s_driver_lanes']:.2f} ({r['driver_model_lanes']} lanes x "
              f"{r['driver_threads_per_lane']} thread); reference {r['reference_img_s']:.2f}")
        for pool, by_mode in r["batch"].items():
            for mode, m in by_mode.items():
                mark = "*" if r["default_pool"].get(mode) == pool else " "
                print(f"{name:12s} {pool + mark:10s} {mode:8s} {m['img_s']:7.2f} {m['ratio']:6.3f} "
                      f"{r['bound_img_s'][mode]:6.2f} {r['bound_ratio'][mode]:6.3f} {m['cpu_s_per_image']:9.3f} "
                      f"{m['cores_busy']:5.2f}")
        print(f"{name:12s} CPU s/image by stage: " + ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_s_per_image"].items()))
    print("* = the default ([batch] pool = auto)")
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
