"""Rolling-window subgroup performance from the prediction log + ground truth, with alerts.

The metrics are those of the offline evaluator (:func:`cxr_ai.evaluation.evaluate.evaluate_joined`,
the same code, not a copy). Each :meth:`PerformanceMonitor.update` appends one JSON line to
the performance log and refreshes :meth:`PerformanceMonitor.metric_values`, a flat dict the
service's ``/metrics`` endpoint can render (Prometheus-style names and labels).

Alerts (logged at WARNING, listed in the performance record, exposed as metrics):

- ``gap``: a group's gap to overall is in the harmful direction, at least ``gap_bound`` in
  size, with its bootstrap CI excluding 0 (small groups never alert);
- ``drift``: a group's score distribution in the current window differs from the reference
  window before it (two-sample KS test, :func:`scipy.stats.ks_2samp`, p < ``drift_alpha``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from scipy.stats import ks_2samp

from cxr_ai.evaluation.evaluate import (
    EvaluationSettings,
    attribute_column,
    evaluate_joined,
)
from cxr_ai.evaluation.metrics import DEFAULT_FLAG_METRICS, METRICS, MetricSettings, resolve_metrics
from cxr_ai.evaluation.report import strip_frames
from cxr_ai.monitoring.log import PredictionLog, monitoring_dir
from cxr_ai.monitoring.truth import FEEDBACK_SOURCE, TruthStore, match_truth

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorSettings:
    """The ``[monitoring]`` knobs of the rolling evaluation."""

    findings: tuple[str, ...] = ("cardiomegaly", "low_ef")
    attributes: tuple[str, ...] = ("sex", "age_band", "race")
    intersections: tuple[tuple[str, ...], ...] = (("race", "sex"),)
    window_days: float = 30.0
    truth_window_days: float = 30.0
    gap_bound: float = 0.05
    #: Prevalence-independent by default (see :data:`~cxr_ai.evaluation.metrics.DEFAULT_FLAG_METRICS`).
    gap_metrics: tuple[str, ...] = DEFAULT_FLAG_METRICS
    drift_alpha: float = 0.01
    metrics: MetricSettings = field(default_factory=MetricSettings)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MonitorSettings:
        m = config.get("monitoring", {})
        return cls(
            findings=tuple(m.get("findings", cls.findings)),
            attributes=tuple(m.get("attributes", cls.attributes)),
            intersections=tuple(tuple(x) for x in m.get("intersections", cls.intersections)),
            window_days=float(m.get("window_days", 30.0)),
            truth_window_days=float(m.get("truth_window_days", 30.0)),
            gap_bound=float(m.get("gap_bound", 0.05)),
            gap_metrics=resolve_metrics(m.get("gap_metrics", cls.gap_metrics)),
            drift_alpha=float(m.get("drift_alpha", 0.01)),
            metrics=MetricSettings(n_boot=int(m.get("n_boot", 200)), ci_level=float(m.get("ci_level", 0.95)),
                                   random_state=int(m.get("random_state", 0)),
                                   min_group_size=int(m.get("min_group_size", 30))),
        )


def _label(name: str, labels: Mapping[str, str]) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return f"{name}{{{inner}}}"


class PerformanceMonitor:
    """Joins the prediction log with the truth store over a rolling window and evaluates it."""

    def __init__(self, prediction_log: PredictionLog, truth_store: TruthStore, *,
                 performance_log: str | os.PathLike, settings: MonitorSettings = MonitorSettings()) -> None:
        self.prediction_log = prediction_log
        self.truth_store = truth_store
        self.performance_log = Path(performance_log)
        self.performance_log.parent.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PerformanceMonitor:
        m = config.get("monitoring", {})
        d = monitoring_dir(config)
        return cls(PredictionLog.from_config(config), TruthStore(d / m.get("truth_log", "truth.jsonl")),
                   performance_log=d / m.get("performance_log", "performance.jsonl"),
                   settings=MonitorSettings.from_config(config))

    def read_logs(self) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
        """(the prediction log as a frame, every truth record): one read of each file, for
        every window and truth kind computed from them (:meth:`window_frame` ``logs=``)."""
        return self.prediction_log.to_frame(findings=self.settings.findings), self.truth_store.records()

    def window_frame(self, *, now: dt.datetime | None = None, truth: str = "independent",
                     logs: tuple[pd.DataFrame, list[dict[str, Any]]] | None = None,
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
        """(current window joined with truth, reference window, truth match report).

        ``truth`` is ``"independent"`` (echocardiography, reports, CSV: every record not made
        from feedback on the pages) or ``"feedback"`` (radiologists' verdicts given with the
        model's answer shown, :data:`~cxr_ai.monitoring.truth.FEEDBACK_SOURCE`). ``logs`` is
        what :meth:`read_logs` returned (read now when omitted).
        """
        now = pd.Timestamp(now or dt.datetime.now(dt.timezone.utc))
        if now.tzinfo is None:
            now = now.tz_localize("UTC")
        preds, truth_records = logs if logs is not None else self.read_logs()
        if preds.empty:
            return preds, preds, {}
        w = pd.Timedelta(days=self.settings.window_days)
        current = preds[(preds["logged_at"] > now - w) & (preds["logged_at"] <= now)]
        # the offline evaluator's canonical order (by SOP Instance UID): same rows, same CIs
        current = current.sort_values("sop_uid", kind="stable")
        reference = preds[(preds["logged_at"] > now - 2 * w) & (preds["logged_at"] <= now - w)]
        records = [r for r in truth_records if (r.get("source") == FEEDBACK_SOURCE) == (truth == "feedback")]
        joined, report = match_truth(current.reset_index(drop=True), records,
                                     findings=self.settings.findings,
                                     window_days=self.settings.truth_window_days)
        return joined, reference.reset_index(drop=True), report

    def update(self, *, now: dt.datetime | None = None) -> dict[str, Any]:
        """Evaluate the current window, check alerts, append to the performance log."""
        s = self.settings
        logs = self.read_logs()
        joined, reference, match = self.window_frame(now=now, logs=logs)
        computed_at = (now or dt.datetime.now(dt.timezone.utc)).isoformat()
        record: dict[str, Any] = {"computed_at": computed_at, "window_days": s.window_days,
                                  "n_predictions": len(joined), "truth_match": match, "alerts": []}
        accepted = joined[joined["gate_accepted"].astype(bool)] if len(joined) else joined
        findings = tuple(f for f in s.findings if len(accepted) and accepted[f].notna().any())
        if findings:
            result = evaluate_joined(accepted.reset_index(drop=True), name="live window",
                                     settings=EvaluationSettings(findings=findings, attributes=s.attributes,
                                                                 intersections=s.intersections, metrics=s.metrics,
                                                                 gap_bound=s.gap_bound,
                                                                 flag_metrics=s.gap_metrics))
            record["result"] = strip_frames(result)
            for f, res in result["findings"].items():
                for r in res.get("attributes", {}).values():
                    for flag in r.get("flagged", ()):  # evaluate_joined flagged them with flag_metrics=gap_metrics
                        record["alerts"].append({"kind": "gap", "finding": f, **flag})
        record["alerts"] += self._drift(accepted, reference)
        record["truth"] = "independent (radiologist feedback given with the AI shown is reported apart)"
        record["feedback"] = self._feedback_figures(now=now, logs=logs)
        for alert in record["alerts"]:
            logger.warning("monitoring alert: %s", json.dumps(alert))
        with self._lock, open(self.performance_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(strip_frames(record), separators=(",", ":"), allow_nan=False) + "\n")
        self._values = self._flatten(record)
        return record

    def _feedback_figures(self, *, now: dt.datetime | None,
                          logs: tuple[pd.DataFrame, list[dict[str, Any]]]) -> dict[str, Any]:
        """The same figures on feedback-based truth only (no alerts: the readers saw the model)."""
        s = self.settings
        joined, _, match = self.window_frame(now=now, truth="feedback", logs=logs)
        out: dict[str, Any] = {"truth": FEEDBACK_SOURCE + " (not independent of the model)", "truth_match": match}
        accepted = joined[joined["gate_accepted"].astype(bool)] if len(joined) else joined
        findings = tuple(f for f in s.findings if len(accepted) and f in accepted and accepted[f].notna().any())
        if findings:
            out["result"] = strip_frames(evaluate_joined(
                accepted.reset_index(drop=True), name="live window, radiologist feedback (AI shown)",
                settings=EvaluationSettings(findings=findings, attributes=s.attributes, intersections=s.intersections,
                                            metrics=s.metrics, gap_bound=s.gap_bound)))
        return out

    def _drift(self, current: pd.DataFrame, reference: pd.DataFrame) -> list[dict[str, Any]]:
        s = self.settings
        alerts: list[dict[str, Any]] = []
        if current.empty or reference.empty:
            return alerts
        ref = reference[reference["gate_accepted"].astype(bool)]
        for f in s.findings:
            for attr in s.attributes:
                if attr not in current or attr not in ref:
                    continue
                _, gc = attribute_column(current, attr)
                _, gr = attribute_column(ref, attr)
                for group in sorted(set(gc)):
                    a = current.loc[(gc == group).to_numpy(), f"p_{f}"].dropna()
                    b = ref.loc[(gr == group).to_numpy(), f"p_{f}"].dropna()
                    if min(len(a), len(b)) < s.metrics.min_group_size:
                        continue
                    res = ks_2samp(a, b)
                    if res.pvalue < s.drift_alpha:
                        alerts.append({"kind": "drift", "finding": f, "attribute": attr, "group": group,
                                       "ks_statistic": float(res.statistic), "p_value": float(res.pvalue),
                                       "n_current": len(a), "n_reference": len(b)})
        return alerts

    @staticmethod
    def _flatten(record: Mapping[str, Any]) -> dict[str, float]:
        values: dict[str, float] = {"cxr_ai_monitoring_window_predictions": float(record["n_predictions"])}
        for f, res in record.get("result", {}).get("findings", {}).items():
            for attr, r in res.get("attributes", {}).items():
                for gr in [{"group": "overall", "metrics": r["overall"], "n": r["n"]}, *r["groups"]]:
                    base = {"finding": f, "attribute": attr, "group": gr["group"]}
                    values[_label("cxr_ai_subgroup_n", base)] = float(gr["n"])
                    for m in METRICS:
                        v = gr["metrics"][m]["value"]
                        if v is not None:
                            values[_label("cxr_ai_subgroup_metric", {**base, "metric": m})] = float(v)
                        gap = gr.get("gap_to_overall", {}).get(m)
                        if gap and gap["difference"]["value"] is not None:
                            values[_label("cxr_ai_subgroup_gap", {**base, "metric": m})] = float(gap["difference"]["value"])
        for f, res in record.get("feedback", {}).get("result", {}).get("findings", {}).items():
            for attr, r in res.get("attributes", {}).items():
                for gr in [{"group": "overall", "metrics": r["overall"], "n": r["n"]}, *r["groups"]]:
                    base = {"finding": f, "attribute": attr, "group": gr["group"], "truth": "feedback_ai_shown"}
                    values[_label("cxr_ai_feedback_subgroup_n", base)] = float(gr["n"])
                    for m in METRICS:
                        v = gr["metrics"][m]["value"]
                        if v is not None:
                            values[_label("cxr_ai_feedback_subgroup_metric", {**base, "metric": m})] = float(v)
        for alert in record.get("alerts", []):
            labels = {k: str(alert[k]) for k in ("kind", "finding", "attribute", "group", "metric") if k in alert}
            values[_label("cxr_ai_fairness_alert", labels)] = 1.0
        values["cxr_ai_fairness_alerts"] = float(len(record.get("alerts", [])))
        return values

    def metric_values(self) -> dict[str, float]:
        """Metric name with labels → value, from the last :meth:`update`."""
        return dict(self._values)
