"""Metrics and operating thresholds (scikit-learn underneath)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

THRESHOLD_METHODS = ("youden", "sensitivity")


def _valid(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    keep = ~np.isnan(y)
    return y[keep], p[keep]


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC over labelled rows (NaN labels dropped); NaN when one class is absent."""
    y, p = _valid(y, p)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def _rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic (ties averaged): equals roc_auc_score, faster."""
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    ranks = rankdata(p)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auroc_ci(y: np.ndarray, p: np.ndarray, *, n_boot: int = 500, alpha: float = 0.05, random_state: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC (resampling images)."""
    y, p = _valid(y, p)
    rng = np.random.default_rng(random_state)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        stats.append(_rank_auc(yb, p[idx]))
    if not stats:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def choose_threshold(y: np.ndarray, p: np.ndarray, *, method: str = "youden", target_sensitivity: float = 0.9) -> tuple[float, str]:
    """Operating threshold on validation data and a description of how it was chosen.

    - ``youden``: maximises sensitivity + specificity - 1 (Youden's J).
    - ``sensitivity``: the highest threshold whose sensitivity is >= ``target_sensitivity``
      (the most specific operating point that still finds that share of positives).
    """
    y, p = _valid(y, p)
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method {method!r} is not one of {THRESHOLD_METHODS}")
    if len(np.unique(y)) < 2:
        return 0.5, "fixed 0.5 (validation set has one class only)"
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0.0, 1.0)  # roc_curve's first threshold is +inf
    if method == "youden":
        k = int(np.argmax(tpr - fpr))
        return float(thr[k]), f"youden (max J={tpr[k] - fpr[k]:.3f} on validation, n={len(y)})"
    ok = np.nonzero(tpr >= target_sensitivity)[0]
    k = int(ok[0])
    return float(thr[k]), f"sensitivity>={target_sensitivity:.2f} on validation (achieved {tpr[k]:.3f}, specificity {1 - fpr[k]:.3f}, n={len(y)})"


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV at a threshold (positive = p >= threshold)."""
    y, p = _valid(y, p)
    pred = p >= threshold
    pos = y > 0.5
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def finding_metrics(
    y: np.ndarray,
    p: np.ndarray,
    *,
    threshold: float | None = None,
    ci: bool = True,
    random_state: int = 0,
) -> dict[str, Any]:
    """AUROC (+ bootstrap CI), average precision, n, prevalence, and metrics at ``threshold``."""
    yv, pv = _valid(y, p)
    out: dict[str, Any] = {"n": int(len(yv)), "prevalence": float(yv.mean()) if len(yv) else float("nan")}
    out["auroc"] = auroc(yv, pv)
    if not math.isnan(out["auroc"]):
        out["average_precision"] = float(average_precision_score(yv, pv))
        if ci:
            out["auroc_ci95"] = list(bootstrap_auroc_ci(yv, pv, random_state=random_state))
    if threshold is not None:
        out["at_threshold"] = binary_metrics(yv, pv, threshold)
    return out


def all_metrics(
    Y: np.ndarray,
    P: np.ndarray,
    findings: Sequence[str],
    *,
    thresholds: dict[str, float] | None = None,
    ci: bool = True,
    random_state: int = 0,
) -> dict[str, Any]:
    return {
        f: finding_metrics(Y[:, k], P[:, k], threshold=(thresholds or {}).get(f), ci=ci, random_state=random_state)
        for k, f in enumerate(findings)
    }
