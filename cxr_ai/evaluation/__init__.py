"""Demographic-stratified evaluation: ground-truth loaders, subgroup metrics with bootstrap
CIs, embedding analysis, HTML/JSON report (``cxr-ai evaluate``)."""

import importlib
from typing import Any

_LAZY = {
    "EvaluationSettings": "cxr_ai.evaluation.evaluate",
    "evaluate_frames": "cxr_ai.evaluation.evaluate",
    "evaluate_joined": "cxr_ai.evaluation.evaluate",
    "join_predictions": "cxr_ai.evaluation.evaluate",
    "JoinReport": "cxr_ai.evaluation.labels",
    "load_labels": "cxr_ai.evaluation.labels",
    "MetricSettings": "cxr_ai.evaluation.metrics",
    "group_metrics": "cxr_ai.evaluation.metrics",
}


def __getattr__(name: str) -> Any:  # PEP 562: import pandas/fairlearn only when used
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cxr_ai.evaluation' has no attribute {name!r}")


__all__ = [
    "EvaluationSettings",
    "JoinReport",
    "MetricSettings",
    "evaluate_frames",
    "evaluate_joined",
    "group_metrics",
    "join_predictions",
    "load_labels",
]
