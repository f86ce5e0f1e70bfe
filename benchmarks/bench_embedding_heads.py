"""Embedding-head training time on 100,000 x 1,376 random-but-learnable embeddings (CPU).

The size of a CXR Foundation export for a mid-sized hospital archive. Two findings; labels
come from a hidden linear + quadratic rule plus noise, with 10 % of the low-EF labels missing
(masked), so that the heads have something to learn and the validation AUROC shows it.
The figure of merit is the wall time of each torch head (goal <= 30 s on CPU); the
scikit-learn baselines are timed beside them, and each time is also given as a ratio to the
time of one pass of the data through a linear layer measured in the same run (a reference
for the machine's speed).

Run: ``.venv/bin/python benchmarks/bench_embedding_heads.py [--n 100000] [--no-baselines]``;
writes ``benchmarks/results/embedding_heads.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from training.embeddings import ALL_HEADS, TORCH_HEADS, train_heads

from _common import machine_info, write_result


def make_data(n: int, d: int, *, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(random_state)
    X = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((d, 2)).astype(np.float32) / np.sqrt(d)
    z = X @ w
    z[:, 1] += 0.5 * (X[:, 0] * X[:, 1])  # a little non-linearity for the trees and the MLP
    cut = np.array([np.quantile(z[:, 0], 0.75), np.quantile(z[:, 1], 0.85)])  # prevalence ~25 % / ~15 %
    Y = (z + 0.5 * rng.standard_normal(z.shape) > cut).astype(float)
    Y[rng.random(n) < 0.1, 1] = np.nan
    return X, Y


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1376)
    parser.add_argument("--no-baselines", action="store_true", help="time only the torch heads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "embedding_heads.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    X, Y = make_data(args.n, args.dim, random_state=0)
    n_val = args.n // 10
    Xtr, Ytr, Xva, Yva = X[n_val:], Y[n_val:], X[:n_val], Y[:n_val]
    # reference: one pass of all embeddings through a linear layer, same process, same threads
    lin = torch.nn.Linear(args.dim, 2)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(Xtr), 65536):
            lin(torch.from_numpy(Xtr[i : i + 65536]))
    ref = time.perf_counter() - t0
    heads = TORCH_HEADS if args.no_baselines else ALL_HEADS
    results = train_heads(Xtr, Ytr, Xva, Yva, findings=["cardiomegaly", "low_ef"], heads=heads, random_state=0)
    rows = [
        {**r.to_dict(), "ratio_to_reference": round(r.fit_seconds / ref, 1), "goal_s": 30.0 if r.name in TORCH_HEADS else None}
        for r in results
    ]
    print(f"{args.n - n_val} x {args.dim} embeddings, {torch.get_num_threads()} threads; reference linear pass {ref:.3f} s")
    print(f"{'head':16} {'fit s':>8} {'AUROC card.':>11} {'AUROC low-EF':>12} {'x ref':>8}")
    for r in rows:
        print(f"{r['name']:16} {r['fit_seconds']:>8.2f} {r['val_auroc']['cardiomegaly']:>11.4f} {r['val_auroc']['low_ef']:>12.4f} {r['ratio_to_reference']:>8.1f}")
    result = {
        "benchmark": "embedding_heads",
        "goal": "each torch head trains in <= 30 s on CPU",
        "n_train": int(len(Xtr)),
        "n_val": int(n_val),
        "dim": args.dim,
        "threads": torch.get_num_threads(),
        "reference_linear_pass_s": round(ref, 4),
        "machine": machine_info(),
        "rows": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
