"""Predictions ⋈ ground truth → per-finding, per-attribute subgroup results (JSON-ready).

:func:`evaluate_frames` is the entry for tables already in memory (``cxr-ai batch`` output,
predictions run on the fly, or the monitoring join); :func:`evaluate_joined` is the part the
live monitor reuses on its own joined window.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from cxr_ai.evaluation.labels import (
    UNKNOWN,
    JoinReport,
    explicit_join,
    fill_demographics,
)
from cxr_ai.evaluation.metrics import (
    DEFAULT_FLAG_METRICS,
    MetricSettings,
    flagged_gaps,
    group_metrics,
    resolve_metrics,
)

logger = logging.getLogger(__name__)

DEFAULT_FINDINGS: tuple[str, ...] = ("cardiomegaly", "low_ef")
DEFAULT_ATTRIBUTES: tuple[str, ...] = ("sex", "age_band", "race", "insurance")
DEFAULT_INTERSECTIONS: tuple[tuple[str, ...], ...] = (("race", "sex"),)
INTERSECTION_SEP = " × "

MSG_NO_PROBABILITY = (
    "predictions lack the column p_{finding} (and thr_{finding}/pred_{finding}); found "
    "{found}. Pass a predictions table written by `cxr-ai batch` or list only the findings it has."
)
MSG_NO_ROWS = "{name}: no gate-accepted prediction with ground truth for {finding}; nothing to evaluate."


@dataclass(frozen=True)
class EvaluationSettings:
    """What :func:`evaluate_frames` computes."""

    findings: tuple[str, ...] = DEFAULT_FINDINGS
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    intersections: tuple[tuple[str, ...], ...] = DEFAULT_INTERSECTIONS
    metrics: MetricSettings = field(default_factory=MetricSettings)
    #: A gap is flagged when harmful, at least this large (practical significance) and with a
    #: CI excluding 0 (statistical significance). Many groups x metrics are tested at once, so
    #: CIs alone flag tiny chance gaps; the bound keeps the flags to gaps that matter.
    gap_bound: float = 0.05
    #: Metrics on which harm is flagged: by default only those that do not depend on a
    #: group's prevalence (PPV/NPV do; they are reported with prevalence, flagged on request).
    flag_metrics: tuple[str, ...] = DEFAULT_FLAG_METRICS

    def __post_init__(self) -> None:
        object.__setattr__(self, "flag_metrics", resolve_metrics(self.flag_metrics))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attribute_column(frame: pd.DataFrame, attribute: str | Sequence[str]) -> tuple[str, pd.Series]:
    """The group labels for an attribute or an intersection of attributes (``race × sex``)."""
    if isinstance(attribute, str):
        return attribute, frame[attribute].fillna(UNKNOWN).astype(str)
    name = INTERSECTION_SEP.join(attribute)
    values = frame[list(attribute)].fillna(UNKNOWN).astype(str).agg(INTERSECTION_SEP.join, axis=1)
    return name, values


def decisions(frame: pd.DataFrame, finding: str) -> np.ndarray:
    """``pred_<finding>`` when present, else ``p_<finding> >= thr_<finding>``."""
    col = f"pred_{finding}"
    if col in frame and frame[col].notna().all():
        return frame[col].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0")
                              if isinstance(v, str) else bool(v)).to_numpy(bool)
    return (frame[f"p_{finding}"].to_numpy(float) >= frame[f"thr_{finding}"].to_numpy(float))


def evaluate_joined(frame: pd.DataFrame, *, settings: EvaluationSettings = EvaluationSettings(),
                    name: str = "test set") -> dict[str, Any]:
    """Evaluate a joined frame: truth columns named by finding, ``p_/thr_/pred_<finding>``,
    demographic columns. Rows whose truth for a finding is NaN are excluded for that finding
    only (counted as ``n_unlabelled``)."""
    out: dict[str, Any] = {"name": name, "findings": {}}
    for finding in settings.findings:
        if f"p_{finding}" not in frame:
            raise ValueError(MSG_NO_PROBABILITY.format(finding=finding, found=list(frame.columns)))
        if finding not in frame or frame[finding].isna().all():
            out["findings"][finding] = {"status": f"not estimable: no ground truth for {finding}"}
            continue
        labelled = frame[frame[finding].notna() & frame[f"p_{finding}"].notna()]
        if labelled.empty:
            out["findings"][finding] = {"status": MSG_NO_ROWS.format(name=name, finding=finding)}
            continue
        y = labelled[finding].to_numpy(float).astype(int)
        s = labelled[f"p_{finding}"].to_numpy(float)
        p = decisions(labelled, finding)
        thr = labelled[f"thr_{finding}"].dropna().unique().tolist() if f"thr_{finding}" in labelled else []
        res: dict[str, Any] = {
            "n": len(labelled), "n_unlabelled": int(len(frame) - len(labelled)),
            "thresholds": [float(t) for t in thr],
            "confusion_matrix": confusion_matrix(y, p.astype(int), labels=[0, 1]).tolist(),
            "classification_report": classification_report(
                y, p.astype(int), labels=[0, 1], target_names=[f"no {finding}", finding],
                output_dict=True, zero_division=0),
            "attributes": {},
        }
        attrs: list[str | tuple[str, ...]] = [a for a in settings.attributes if a in labelled]
        attrs += [tuple(i) for i in settings.intersections if all(a in labelled for a in i)]
        for attr in attrs:
            attr_name, groups = attribute_column(labelled, attr)
            r = group_metrics(y, s, p, groups, settings=settings.metrics, attribute=attr_name)
            for gr in r["groups"]:
                m = (groups == gr["group"]).to_numpy()
                gr["confusion_matrix"] = confusion_matrix(y[m], p[m].astype(int), labels=[0, 1]).tolist()
            r["flagged"] = flagged_gaps(r, metrics=settings.flag_metrics, min_abs_gap=settings.gap_bound)
            res["attributes"][attr_name] = r
        res["overall"] = next(iter(res["attributes"].values()))["overall"] if res["attributes"] else {}
        out["findings"][finding] = res
    return out


def join_predictions(predictions: pd.DataFrame, truth: pd.DataFrame, *, pred_key: str = "sop_uid",
                     truth_key: str = "id", name: str = "test set"
                     ) -> tuple[pd.DataFrame, JoinReport]:
    """Inner-join predictions and truth on explicit keys; the report counts and gives examples
    of unmatched rows on both sides. Demographics missing from the truth (``Unknown``) are
    filled from the predictions' DICOM-header columns (``sex``, ``age``, ``ethnic_group``)."""
    from cxr_ai.evaluation.labels import (
        MSG_NO_MATCH,
        age_band,
        normalise_race,
        normalise_sex,
    )

    if pred_key not in predictions:
        raise ValueError(f"predictions lack the join key column {pred_key!r}; found "
                         f"{list(predictions.columns)}; pass --pred-key")
    if truth_key not in truth:
        raise ValueError(f"ground truth lacks the join key column {truth_key!r}; found "
                         f"{list(truth.columns)}; pass --truth-key")
    pred = predictions.copy()
    pred[pred_key] = pred[pred_key].astype(str)
    demo_cols = [c for c in ("sex", "age", "ethnic_group") if c in pred]
    header_demo = None
    if demo_cols:
        header_demo = pd.DataFrame({"id": pred[pred_key]})
        if "sex" in pred:
            header_demo["sex"] = pred["sex"].map(normalise_sex)
        if "age" in pred:
            header_demo["age"] = pd.to_numeric(pred["age"], errors="coerce")
            header_demo["age_band"] = header_demo["age"].map(age_band)
        if "ethnic_group" in pred:
            header_demo["race"] = pred["ethnic_group"].map(normalise_race)
        pred = pred.drop(columns=demo_cols)
    t = truth.copy()
    t[truth_key] = t[truth_key].astype(str)
    if header_demo is not None and truth_key == "id":
        t = fill_demographics(t, header_demo)
    joined, report = explicit_join(pred, t, left_on=[pred_key], right_on=[truth_key], how="inner",
                                   name=f"{name}: predictions-truth", left_name="predictions",
                                   right_name="ground truth")
    if joined.empty:
        raise ValueError(MSG_NO_MATCH.format(
            pred_key=pred_key, truth_key=truth_key, pred_examples=pred[pred_key].head(3).tolist(),
            truth_examples=t[truth_key].head(3).tolist()))
    return joined, report


def _gate_mask(frame: pd.DataFrame) -> np.ndarray:
    if "gate_accepted" not in frame:
        return np.ones(len(frame), dtype=bool)
    return frame["gate_accepted"].map(
        lambda v: str(v).strip().lower() in ("true", "1", "1.0") if isinstance(v, str) else bool(v)
    ).to_numpy(bool)


def evaluate_frames(predictions_df: pd.DataFrame, truth_df: pd.DataFrame, *,
                    settings: EvaluationSettings = EvaluationSettings(), name: str = "test set",
                    pred_key: str = "sop_uid", truth_key: str = "id",
                    join_reports: Sequence[JoinReport] = ()) -> dict[str, Any]:
    """Join, keep gate-accepted rows (rejections are counted by reason), evaluate.

    Returns the test set's JSON-ready result (see :func:`evaluate_joined`) with ``joins``
    (every :class:`JoinReport`, loaders' included) and ``gate`` counts.
    """
    joined, report = join_predictions(predictions_df, truth_df, pred_key=pred_key,
                                      truth_key=truth_key, name=name)
    joined = joined.sort_values(pred_key, kind="stable").reset_index(drop=True)  # canonical order:
    # the bootstrap resamples by position, so the same rows in the same order give the same CIs
    accepted = _gate_mask(joined)
    gate = {"n_joined": len(joined), "n_accepted": int(accepted.sum()),
            "n_rejected": int((~accepted).sum())}
    if "gate_reason" in joined and (~accepted).any():
        gate["rejected_by_reason"] = {str(k): int(v) for k, v in
                                      joined.loc[~accepted, "gate_reason"].value_counts().items()}
    findings = tuple(f for f in settings.findings if f"p_{f}" in joined)
    missing = [f for f in settings.findings if f not in findings]
    s = replace(settings, findings=findings)
    result = evaluate_joined(joined[accepted].reset_index(drop=True), settings=s, name=name)
    for f in missing:
        result["findings"][f] = {"status": f"not estimable: the predictions have no p_{f}"}
    result["joins"] = [r.to_dict() for r in (*join_reports, report)]
    result["gate"] = gate
    result["frame"] = joined[accepted].reset_index(drop=True)  # for plots; dropped from JSON
    return result
