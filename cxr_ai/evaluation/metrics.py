"""Subgroup metrics, gaps, bootstrap confidence intervals and calibration.

Point estimates come from fairlearn's :class:`~fairlearn.metrics.MetricFrame` over
scikit-learn / fairlearn metric functions. Bootstrap replicates reuse the same definitions
through resampling weights (a bootstrap resample is the original sample with integer
multiplicities, so each replicate metric equals the library metric on the resampled rows; the
test-suite checks this against scikit-learn with ``sample_weight``).

Metric definitions (positive class = the finding present, at the bundle's threshold):

- ``auroc``: :func:`sklearn.metrics.roc_auc_score` of the probability.
- ``sensitivity`` (TPR), ``specificity`` (TNR), ``fpr``, ``fnr``: fairlearn's
  ``true_positive_rate`` etc.
- ``ppv``: :func:`sklearn.metrics.precision_score`; ``npv``: the same of the negative
  decision. Both follow each group's prevalence (Bayes), so a model that is equally good
  for every group still shows PPV/NPV gaps wherever prevalence differs: they are reported
  beside each group's ``prevalence`` and are not flagged unless asked (``flag_metrics``).
- ``ece``: expected calibration error (:func:`expected_calibration_error`).
- Underdiagnosis: Seyyed-Kalantari et al. (Nat Med 2021) define underdiagnosis as the
  false-positive rate of the *"No Finding"* decision: the model calls a patient healthy who
  has a finding. For one finding, the "no finding" decision is the negative decision, and its
  false-positive rate is P(decision negative | finding present) = **FNR of the finding**.
  So ``fnr`` *is* underdiagnosis (one column, not two; ``underdiagnosis`` is accepted as an
  alias wherever metrics are named). For a model with a real "No Finding" head, the paper's
  quantity is its FPR; pass that head as its own finding.

Harm is flagged by default only on metrics that do not depend on prevalence
(:data:`DEFAULT_FLAG_METRICS`): AUROC, FNR (= underdiagnosis; TPR carries the same
information), FPR (specificity likewise) and calibration error.

A metric that a group's data cannot define (AUROC with one class; TPR/FNR without positives;
specificity/FPR without negatives; PPV with no positive decisions) is reported as ``None``
with a status string starting ``not estimable``, never as NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    false_negative_rate,
    false_positive_rate,
    true_negative_rate,
    true_positive_rate,
)
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_score, roc_auc_score

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("auroc", "sensitivity", "specificity", "fpr", "fnr", "ece", "ppv", "npv")
HIGHER_IS_BETTER: dict[str, bool] = {
    "auroc": True, "sensitivity": True, "specificity": True, "ppv": True, "npv": True,
    "fpr": False, "fnr": False, "ece": False,
}
#: Metrics whose value does not depend on a group's prevalence: harm is flagged on these by
#: default (TPR and specificity are 1 - FNR and 1 - FPR, so flagging them too would count
#: each gap twice).
DEFAULT_FLAG_METRICS: tuple[str, ...] = ("auroc", "fnr", "fpr", "ece")
#: Metrics that follow prevalence: reported with each group's prevalence, flagged only on request.
PREVALENCE_DEPENDENT: tuple[str, ...] = ("ppv", "npv")
#: Other names accepted for a metric (Seyyed-Kalantari's underdiagnosis is the FNR here).
METRIC_ALIASES: dict[str, str] = {"underdiagnosis": "fnr", "tpr": "sensitivity", "tnr": "specificity",
                                  "calibration": "ece", "precision": "ppv"}
MSG_BAD_METRIC = "metric {metric!r} is not known; choose from {known} (aliases: {aliases})."


def resolve_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """Metric names with aliases resolved (``underdiagnosis`` → ``fnr``), duplicates dropped;
    :class:`ValueError` naming the unknown one otherwise."""
    out: list[str] = []
    for raw in names:
        name = METRIC_ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if name not in METRICS:
            raise ValueError(MSG_BAD_METRIC.format(metric=raw, known=", ".join(METRICS),
                                                   aliases=", ".join(METRIC_ALIASES)))
        if name not in out:
            out.append(name)
    return tuple(out)

STATUS_OK = "ok"
STATUS_NO_BOTH_CLASSES = "not estimable: the group has only one class (n_pos={n_pos}, n_neg={n_neg})"
STATUS_NO_POSITIVES = "not estimable: the group has no positive cases"
STATUS_NO_NEGATIVES = "not estimable: the group has no negative cases"
STATUS_NO_POSITIVE_DECISIONS = "not estimable: the model made no positive decision in the group"
STATUS_NO_NEGATIVE_DECISIONS = "not estimable: the model made no negative decision in the group"
STATUS_SMALL = "small group (n={n} < {min_n}): interpret with caution"
STATUS_ECE_FEW = ("calibration error not flagged: {n} images < {min_n} ({per_bin} per bin x {bins} bins); "
                  "ECE is biased upwards in small samples")
STATUS_NO_REFERENCE = "not estimable: the reference value is not estimable"
STATUS_RATIO_ZERO = "not estimable: the reference value is 0"


def _both_classes(y_true: np.ndarray) -> bool:
    y = np.asarray(y_true)
    return bool((y == 1).any() and (y == 0).any())


def auroc(y_true: Any, y_pred: Any, score: Any = None) -> float:
    """AUROC of ``score`` (NaN when one class only). ``y_pred`` is ignored (MetricFrame passes
    the decisions; the score comes through ``sample_params``)."""
    y = np.asarray(y_true)
    if not _both_classes(y):
        return float("nan")
    return float(roc_auc_score(y, np.asarray(score)))


def _rate(fn: Callable[..., float], need: int) -> Callable[..., float]:
    def metric(y_true: Any, y_pred: Any) -> float:
        y = np.asarray(y_true)
        if not (y == need).any():
            return float("nan")
        return float(fn(y, np.asarray(y_pred), pos_label=1))
    metric.__name__ = fn.__name__
    return metric


def ppv(y_true: Any, y_pred: Any) -> float:
    return float(precision_score(np.asarray(y_true), np.asarray(y_pred), zero_division=np.nan))


def npv(y_true: Any, y_pred: Any) -> float:
    """Precision of the negative decision."""
    return float(precision_score(np.asarray(y_true), np.asarray(y_pred), pos_label=0,
                                 zero_division=np.nan))


def make_ece(n_bins: int) -> Callable[..., float]:
    """ECE of ``score`` with ``n_bins`` uniform bins (NaN with one class only, as
    :func:`calibration`); ``y_pred`` is ignored, the score comes through ``sample_params``."""
    def ece(y_true: Any, y_pred: Any, score: Any = None) -> float:
        y = np.asarray(y_true)
        if not _both_classes(y):
            return float("nan")
        return expected_calibration_error(y, np.asarray(score, dtype=float), n_bins=n_bins)
    return ece


METRIC_FUNCTIONS: dict[str, Callable[..., float]] = {
    "auroc": auroc,
    "sensitivity": _rate(true_positive_rate, 1),
    "specificity": _rate(true_negative_rate, 0),
    "fpr": _rate(false_positive_rate, 0),
    "fnr": _rate(false_negative_rate, 1),
    "ppv": ppv,
    "npv": npv,
}


def metric_status(metric: str, *, n_pos: int, n_neg: int, n_pred_pos: int) -> str:
    """Why ``metric`` is or is not estimable for a group with these counts."""
    if metric in ("auroc", "ece") and (n_pos == 0 or n_neg == 0):
        return STATUS_NO_BOTH_CLASSES.format(n_pos=n_pos, n_neg=n_neg)
    if metric in ("sensitivity", "fnr") and n_pos == 0:
        return STATUS_NO_POSITIVES
    if metric in ("specificity", "fpr") and n_neg == 0:
        return STATUS_NO_NEGATIVES
    if metric == "ppv" and n_pred_pos == 0:
        return STATUS_NO_POSITIVE_DECISIONS
    if metric == "npv" and n_pred_pos == n_pos + n_neg:
        return STATUS_NO_NEGATIVE_DECISIONS
    return STATUS_OK


# --- Bootstrap -------------------------------------------------------------------------------

def stratified_bootstrap_weights(strata: np.ndarray, *, n_boot: int,
                                 random_state: int | np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` integer multiplicities: each replicate resamples every stratum (e.g.
    group × class) with replacement to its own size, so group sizes and class counts are kept."""
    rng = np.random.default_rng(random_state)
    strata = np.asarray(strata)
    weights = np.zeros((n_boot, len(strata)), dtype=np.float64)
    for s in pd.unique(strata):
        idx = np.flatnonzero(strata == s)
        weights[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return weights


def weighted_auroc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC for each row of ``weights`` (``(B, n)``), ties counted one half; equals
    ``roc_auc_score(y, score, sample_weight=w)`` row by row. NaN where a class has no weight."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=float)
    w = np.atleast_2d(weights)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if len(pos) == 0 or len(neg) == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(score[neg], kind="mergesort")
    sn = score[neg][order]
    cw = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w[:, neg][:, order], axis=1)], axis=1)
    lo = np.searchsorted(sn, score[pos], side="left")
    hi = np.searchsorted(sn, score[pos], side="right")
    wp = w[:, pos]
    num = (wp * (cw[:, lo] + 0.5 * (cw[:, hi] - cw[:, lo]))).sum(axis=1)
    den = wp.sum(axis=1) * cw[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_ece(y: np.ndarray, score: np.ndarray, weights: np.ndarray, *, n_bins: int = 10) -> np.ndarray:
    """:func:`expected_calibration_error` for each row of ``weights``: sum over bins of
    |weighted sum of scores − weighted sum of labels| / total weight. NaN where a class has
    no weight."""
    y = np.asarray(y, dtype=float)
    score = np.asarray(score, dtype=float)
    w = np.atleast_2d(weights)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], score, side="right")
    total = np.zeros(w.shape[0])
    for b in np.unique(idx):
        m = idx == b
        total += np.abs(w[:, m] @ score[m] - w[:, m] @ y[m])
    wsum = w.sum(axis=1)
    has_both = (w[:, y == 1].sum(axis=1) > 0) & (w[:, y == 0].sum(axis=1) > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(has_both & (wsum > 0), total / wsum, np.nan)


def weighted_metrics(y: np.ndarray, pred: np.ndarray, score: np.ndarray,
                     weights: np.ndarray, *, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for each row of ``weights`` (same definitions as
    :data:`METRIC_FUNCTIONS`, evaluated on the weighted sample)."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    w = np.atleast_2d(weights)
    tp = w[:, y & pred].sum(axis=1)
    fn = w[:, y & ~pred].sum(axis=1)
    fp = w[:, ~y & pred].sum(axis=1)
    tn = w[:, ~y & ~pred].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        tnr = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        out = {
            "auroc": weighted_auroc(y, score, w),
            "sensitivity": tpr,
            "specificity": tnr,
            "fpr": 1.0 - tnr,
            "fnr": 1.0 - tpr,
            "ppv": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "npv": np.where(tn + fn > 0, tn / (tn + fn), np.nan),
        }
    out["ece"] = weighted_ece(y, score, w, n_bins=n_bins)
    return out


# --- Cells ----------------------------------------------------------------------------------

def _cell(value: float, ci: tuple[float, float] | None, status: str) -> dict[str, Any]:
    if status != STATUS_OK or value is None or not np.isfinite(value):
        return {"value": None, "ci": None, "status": status if status != STATUS_OK else
                "not estimable"}
    ci_out = None
    if ci is not None and np.all(np.isfinite(ci)):
        ci_out = [float(ci[0]), float(ci[1])]
    return {"value": float(value), "ci": ci_out, "status": STATUS_OK}


def _ci(replicates: np.ndarray, level: float) -> tuple[float, float] | None:
    r = replicates[np.isfinite(replicates)]
    if len(r) < 2:
        return None
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return float(lo), float(hi)


def _excludes(ci: list[float] | None, value: float) -> bool:
    return ci is not None and (ci[0] > value or ci[1] < value)


# --- Main entry -----------------------------------------------------------------------------

#: A group's calibration error is flagged only with at least this many images per bin on
#: average: binned ECE is biased upwards by roughly sqrt(bins / n), so a small, well-calibrated
#: group shows a larger ECE than the whole sample by chance alone.
MIN_IMAGES_PER_ECE_BIN = 10


@dataclass(frozen=True)
class MetricSettings:
    """How subgroup metrics are computed."""

    n_boot: int = 200
    ci_level: float = 0.95
    random_state: int = 0
    min_group_size: int = 30
    calibration_bins: int = 10

    @property
    def min_ece_group_size(self) -> int:
        """Smallest group whose calibration error may be flagged."""
        return MIN_IMAGES_PER_ECE_BIN * self.calibration_bins


def group_metrics(
    y_true: Sequence[float] | np.ndarray, y_score: Sequence[float] | np.ndarray,
    y_pred: Sequence[bool] | np.ndarray, groups: Sequence[str] | pd.Series, *,
    settings: MetricSettings = MetricSettings(), attribute: str = "group",
) -> dict[str, Any]:
    """Metrics overall and per group, gaps to overall and to the best group, with stratified
    bootstrap CIs (strata = group × class), calibration and group sizes.

    Returns a JSON-ready dict::

        {"attribute", "n", "overall": {metric: cell}, "groups": [{"group", "n", "n_pos",
         "n_neg", "n_pred_pos", "small", "status", "metrics": {metric: cell},
         "gap_to_overall": {metric: {"difference": cell, "ratio": cell, "significant": bool,
         "worse": bool}}, "gap_to_best": {...}, "calibration": {...}}], "best_group": {...}}

    where a cell is ``{"value": float|None, "ci": [lo, hi]|None, "status": str}``.
    A gap is ``significant`` when its CI excludes 0 (difference); ``worse`` when it points
    in the harmful direction (lower AUROC/sensitivity/specificity/PPV, higher FPR/FNR).
    """
    y = np.asarray(y_true, dtype=float).astype(int)
    s = np.asarray(y_score, dtype=float)
    p = np.asarray(y_pred).astype(bool)
    g = pd.Series(np.asarray(groups, dtype=object), name=attribute).astype(str)
    if not (len(y) == len(s) == len(p) == len(g)):
        raise ValueError(f"{attribute}: y_true, y_score, y_pred and groups differ in length")
    if len(y) == 0:
        raise ValueError(f"{attribute}: no rows to evaluate")
    functions = {**METRIC_FUNCTIONS, "ece": make_ece(settings.calibration_bins)}
    mf = MetricFrame(metrics=functions, y_true=y, y_pred=p.astype(int),
                     sensitive_features=g, sample_params={"auroc": {"score": s}, "ece": {"score": s}})
    labels = [str(v) for v in mf.by_group.index]
    codes = pd.Categorical(g, categories=labels).codes
    reps_overall, reps_group = _bootstrap_replicates(y, p, s, codes, labels, settings)
    c_all = _counts(y, p, np.ones(len(y), dtype=bool))
    overall: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        st = metric_status(metric, n_pos=c_all["n_pos"], n_neg=c_all["n_neg"],
                           n_pred_pos=c_all["n_pred_pos"])
        ci = _ci(reps_overall[metric], settings.ci_level) if reps_overall else None
        overall[metric] = _cell(float(mf.overall[metric]), ci, st)
    groups_out = [_group_entry(k, label, y=y, p=p, s=s, mask=codes == k, mf=mf, reps=reps_group.get(label),
                               settings=settings) for k, label in enumerate(labels)]
    best = _best_groups(groups_out)
    _add_gaps(groups_out, overall=overall, best=best, reps_overall=reps_overall, reps_group=reps_group,
              settings=settings)
    return {"attribute": attribute, **c_all, "overall": overall,
            "calibration": calibration(y, s, n_bins=settings.calibration_bins),
            "groups": groups_out, "best_group": best}


def _bootstrap_replicates(y: np.ndarray, p: np.ndarray, s: np.ndarray, codes: np.ndarray, labels: list[str],
                          settings: MetricSettings) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Bootstrap replicates of every metric, overall and per group (empty without bootstrap).

    Strata = group x class; overall and per-group values are replicated on the same resample
    so that gaps have CIs."""
    reps_overall: dict[str, np.ndarray] = {}
    reps_group: dict[str, dict[str, np.ndarray]] = {}
    if settings.n_boot > 0:
        w = stratified_bootstrap_weights(codes * 2 + y, n_boot=settings.n_boot,
                                         random_state=settings.random_state)
        reps_overall = weighted_metrics(y, p, s, w, n_bins=settings.calibration_bins)
        for k, label in enumerate(labels):
            m = codes == k
            reps_group[label] = weighted_metrics(y[m], p[m], s[m], w[:, m], n_bins=settings.calibration_bins)
    return reps_overall, reps_group


def _counts(y: np.ndarray, p: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    n_pos = int((y[mask] == 1).sum())
    return {"n": int(mask.sum()), "n_pos": n_pos, "n_neg": int((y[mask] == 0).sum()),
            "n_pred_pos": int(p[mask].sum()),
            "prevalence": float(n_pos / mask.sum()) if mask.any() else None}


def _group_entry(k: int, label: str, *, y: np.ndarray, p: np.ndarray, s: np.ndarray, mask: np.ndarray,
                 mf: MetricFrame, reps: dict[str, np.ndarray] | None, settings: MetricSettings) -> dict[str, Any]:
    """One group's counts, metric cells, size flags and calibration (gaps are added later)."""
    c = _counts(y, p, mask)
    small = c["n"] < settings.min_group_size
    cells = {}
    for metric in METRICS:
        st = metric_status(metric, n_pos=c["n_pos"], n_neg=c["n_neg"], n_pred_pos=c["n_pred_pos"])
        ci = _ci(reps[metric], settings.ci_level) if reps else None
        cells[metric] = _cell(float(mf.by_group.loc[label, metric]) if label in mf.by_group.index
                              else float(mf.by_group.iloc[k][metric]), ci, st)
    ece_flaggable = c["n"] >= settings.min_ece_group_size
    return {
        "group": label, **c, "small": small, "ece_flaggable": ece_flaggable,
        **({} if ece_flaggable else {"ece_status": STATUS_ECE_FEW.format(
            n=c["n"], min_n=settings.min_ece_group_size, per_bin=MIN_IMAGES_PER_ECE_BIN,
            bins=settings.calibration_bins)}),
        "status": STATUS_SMALL.format(n=c["n"], min_n=settings.min_group_size) if small else STATUS_OK,
        "metrics": cells,
        "calibration": calibration(y[mask], s[mask], n_bins=settings.calibration_bins),
    }


def _best_groups(groups_out: list[dict[str, Any]]) -> dict[str, str | None]:
    """The best group per metric: among estimable, not-small groups (all estimable if none large)."""
    best: dict[str, str | None] = {}
    for metric in METRICS:
        cands = [gr for gr in groups_out if gr["metrics"][metric]["value"] is not None]
        large = [gr for gr in cands if not gr["small"]]
        pool = large or cands
        if not pool:
            best[metric] = None
            continue
        values = [gr["metrics"][metric]["value"] for gr in pool]
        pick = int(np.argmax(values) if HIGHER_IS_BETTER[metric] else np.argmin(values))
        best[metric] = pool[pick]["group"]
    return best


def _add_gaps(groups_out: list[dict[str, Any]], *, overall: dict[str, dict[str, Any]],
              best: dict[str, str | None], reps_overall: dict[str, np.ndarray],
              reps_group: dict[str, dict[str, np.ndarray]], settings: MetricSettings) -> None:
    """Each group's ``gap_to_overall`` and ``gap_to_best``, per metric."""
    for gr in groups_out:
        gr["gap_to_overall"] = {}
        gr["gap_to_best"] = {}
        for metric in METRICS:
            own = gr["metrics"][metric]
            own_reps = reps_group.get(gr["group"], {}).get(metric)
            gr["gap_to_overall"][metric] = _gap(metric, own, overall[metric], own_reps,
                                                reps_overall.get(metric), settings)
            b = best[metric]
            ref = next((x for x in groups_out if x["group"] == b), None)
            ref_cell = ref["metrics"][metric] if ref else {"value": None}
            ref_reps = reps_group.get(b, {}).get(metric) if b else None
            gr["gap_to_best"][metric] = _gap(metric, own, ref_cell, own_reps, ref_reps, settings)

def _gap(metric: str, own: Mapping[str, Any], ref: Mapping[str, Any], own_reps: np.ndarray | None,
         ref_reps: np.ndarray | None, settings: MetricSettings) -> dict[str, Any]:
    if own["value"] is None:
        st = own["status"]
        return {"difference": _cell(np.nan, None, st), "ratio": _cell(np.nan, None, st),
                "significant": False, "worse": False}
    if ref["value"] is None:
        return {"difference": _cell(np.nan, None, STATUS_NO_REFERENCE),
                "ratio": _cell(np.nan, None, STATUS_NO_REFERENCE), "significant": False, "worse": False}
    diff = own["value"] - ref["value"]
    d_ci = r_ci = None
    if own_reps is not None and ref_reps is not None:
        d_ci = _ci(own_reps - ref_reps, settings.ci_level)
        if metric == "ece" and d_ci is not None:
            # ECE is biased upwards, the more so the smaller the sample: a small group's ECE
            # exceeds the overall one by chance alone, and its resamples more so. The basic
            # (reverse-percentile) interval corrects that first-order bias; a percentile
            # interval would flag every small well-calibrated group.
            d_ci = (2 * diff - d_ci[1], 2 * diff - d_ci[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            r_ci = _ci(np.where(ref_reps != 0, own_reps / ref_reps, np.nan), settings.ci_level)
    d_cell = _cell(diff, d_ci, STATUS_OK)
    r_cell = (_cell(own["value"] / ref["value"], r_ci, STATUS_OK) if ref["value"] != 0
              else _cell(np.nan, None, STATUS_RATIO_ZERO))
    worse = diff < 0 if HIGHER_IS_BETTER[metric] else diff > 0
    return {"difference": d_cell, "ratio": r_cell, "significant": _excludes(d_cell["ci"], 0.0),
            "worse": bool(worse)}


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, *, n_bins: int = 10) -> float:
    """ECE with ``n_bins`` equal-width bins (the bins of ``calibration_curve(strategy="uniform")``):
    sum over non-empty bins of (bin size / n) · |mean predicted − observed fraction|."""
    y = np.asarray(y_true, dtype=float)
    pr = np.asarray(y_prob, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], pr, side="right")
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(y) * abs(pr[m].mean() - y[m].mean())
    return float(total)


def calibration(y_true: np.ndarray, y_prob: np.ndarray, *, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve (:func:`sklearn.calibration.calibration_curve`, uniform bins) and ECE;
    not estimable (status, no numbers) with one class only."""
    y = np.asarray(y_true, dtype=int)
    if len(y) == 0 or not _both_classes(y):
        return {"status": STATUS_NO_BOTH_CLASSES.format(n_pos=int((y == 1).sum()), n_neg=int((y == 0).sum())),
                "prob_true": [], "prob_pred": [], "ece": None}
    prob_true, prob_pred = calibration_curve(y, y_prob, n_bins=n_bins, strategy="uniform")
    return {"status": STATUS_OK, "prob_true": prob_true.tolist(), "prob_pred": prob_pred.tolist(),
            "ece": expected_calibration_error(y, y_prob, n_bins=n_bins)}


def flagged_gaps(result: Mapping[str, Any], *, metrics: Sequence[str] = DEFAULT_FLAG_METRICS,
                 reference: str = "gap_to_overall", min_abs_gap: float = 0.0) -> list[dict[str, Any]]:
    """Groups whose gap (``reference``) is in the harmful direction, at least ``min_abs_gap``
    in size, with a CI excluding zero; small groups are never flagged (their status says why).

    ``metrics`` defaults to the prevalence-independent :data:`DEFAULT_FLAG_METRICS`; name
    ``ppv``/``npv`` to flag those too (aliases such as ``underdiagnosis`` are accepted)."""
    out = []
    for gr in result["groups"]:
        if gr["small"]:
            continue
        for metric in resolve_metrics(metrics):
            if metric == "ece" and not gr.get("ece_flaggable", True):
                continue
            gap = gr[reference][metric]
            value = gap["difference"]["value"]
            if gap["significant"] and gap["worse"] and value is not None and abs(value) >= min_abs_gap:
                out.append({"attribute": result["attribute"], "group": gr["group"], "metric": metric,
                            "difference": value, "ci": gap["difference"]["ci"], "n": gr["n"],
                            "prevalence": gr.get("prevalence")})
    return out
