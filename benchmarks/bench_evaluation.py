"""Bootstrap CIs of subgroup metrics: the vectorised resampling weights used by
:func:`cxr_ai.evaluation.metrics.group_metrics` against the straightforward way (one
scikit-learn / fairlearn call per metric, per group, per replicate on the resampled rows).

Both are measured in the same run on the same data and the same resamples; the figure of merit
is the speed-up ratio (reference seconds / ours). The replicate values are checked equal.

Run: ``.venv/bin/python benchmarks/bench_evaluation.py [--n 2000] [--n-boot 200]``; writes
``benchmarks/results/evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from fairlearn.metrics import (
    false_negative_rate,
    false_positive_rate,
    true_negative_rate,
    true_positive_rate,
)
from sklearn.metrics import precision_score, roc_auc_score

from cxr_ai.evaluation.metrics import stratified_bootstrap_weights, weighted_metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--groups", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, args.n)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, args.n), 0, 1)
    p = s >= 0.5
    g = rng.integers(0, args.groups, args.n)
    w = stratified_bootstrap_weights(g * 2 + y, n_boot=args.n_boot, random_state=0)

    t = time.perf_counter()
    ours = [weighted_metrics(y[g == k], p[g == k], s[g == k], w[:, g == k]) for k in range(args.groups)]
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    ref = []
    for k in range(args.groups):
        m = g == k
        rows = {"auroc": [], "sensitivity": [], "specificity": [], "fpr": [], "fnr": [], "ppv": []}
        for b in range(args.n_boot):
            idx = np.repeat(np.flatnonzero(m), w[b, m].astype(int))
            yy, pp, ss = y[idx], p[idx], s[idx]
            rows["auroc"].append(roc_auc_score(yy, ss))
            rows["sensitivity"].append(true_positive_rate(yy, pp, pos_label=1))
            rows["specificity"].append(true_negative_rate(yy, pp, pos_label=1))
            rows["fpr"].append(false_positive_rate(yy, pp, pos_label=1))
            rows["fnr"].append(false_negative_rate(yy, pp, pos_label=1))
            rows["ppv"].append(precision_score(yy, pp))
        ref.append(rows)
    t_ref = time.perf_counter() - t
    for o, r in zip(ours, ref):
        for name, vals in r.items():
            np.testing.assert_allclose(o[name], vals, atol=1e-12)
    result = {"n": args.n, "n_boot": args.n_boot, "groups": args.groups, "seconds_ours": t_ours,
              "seconds_reference": t_ref, "speedup": t_ref / t_ours, "replicates_equal": True}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "evaluation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
