"""Training throughput on the CPU (images/s), with the real training step.

For the demo network (the shipped bundle's architecture at 128 px) and DenseNet-121 at 224 px,
one epoch of :func:`training.train.run_epoch` over in-memory images (the cached-tensor path
training uses) is timed with and without the chest augmentation; the reference, measured in
the same run on the same images, is forward-only inference throughput, so the ratios say what
a training image costs in inference images.

Run: ``.venv/bin/python benchmarks/bench_training.py``; writes
``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import set_track_meta

from cxr_ai.models.bundle import read_metadata
from cxr_ai.models.engine import default_bundle_path
from cxr_ai.models.networks import NetworkConfig, build_network
from training.augment import chest_augmentation
from training.data import ManifestDataset
from training.train import run_epoch

from _common import machine_info, write_result


def bench(cfg: NetworkConfig, *, n: int, batch_size: int) -> dict:
    s = cfg.input_size
    rng = np.random.default_rng(0)
    images = rng.random((n, 1, s, s), dtype=np.float32)
    manifest = pd.DataFrame({"cardiomegaly": rng.integers(0, 2, n).astype(float), "low_ef": rng.integers(0, 2, n).astype(float)})
    torch.manual_seed(0)
    model = build_network(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    out = {"network": cfg.architecture, "input": s, "batch_size": batch_size, "images": n, "threads": torch.get_num_threads()}
    # reference: forward-only inference on the same images
    model.eval()
    with torch.inference_mode():
        model(torch.from_numpy(images[:batch_size]))
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            model(torch.from_numpy(images[i : i + batch_size]))
    out["inference_images_per_s"] = round(n / (time.perf_counter() - t0), 2)
    for name, transform in (("no_augmentation", None), ("augmentation", chest_augmentation(size=s, seed=0))):
        ds = ManifestDataset(manifest, findings=["cardiomegaly", "low_ef"], images=images, transform=transform)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
        run_epoch(model, [next(iter(loader))], optimizer=opt, scaler=scaler, device=torch.device("cpu"), pos_weight=None)  # warm-up
        t0 = time.perf_counter()
        _, seen = run_epoch(model, loader, optimizer=opt, scaler=scaler, device=torch.device("cpu"), pos_weight=None)
        rate = seen / (time.perf_counter() - t0)
        out[f"train_{name}_images_per_s"] = round(rate, 2)
        out[f"train_{name}_ratio_to_inference"] = round(rate / out["inference_images_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "training.json"))
    args = parser.parse_args(argv)
    set_track_meta(False)  # as training.train does
    demo = NetworkConfig.from_dict(read_metadata(default_bundle_path())["cxr_ai"]["network"])
    rows = [bench(demo, n=256, batch_size=32), bench(NetworkConfig(architecture="densenet121", input_size=224), n=32, batch_size=8)]
    print(f"{'network':16} {'input':>5} {'infer img/s':>11} {'train img/s':>11} {'+augment':>9} {'train/infer':>11}")
    for r in rows:
        print(
            f"{r['network']:16} {r['input']:>5} {r['inference_images_per_s']:>11.1f} {r['train_no_augmentation_images_per_s']:>11.1f} "
            f"{r['train_augmentation_images_per_s']:>9.1f} {r['train_no_augmentation_ratio_to_inference']:>11.3f}"
        )
    result = {
        "benchmark": "training",
        "machine": machine_info(),
        "rows": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
