"""Live monitoring: prediction log (pseudonymous), ground-truth feed, rolling subgroup
performance with gap and drift alerts.

The names below load on first use: logging one prediction (:mod:`cxr_ai.monitoring.log`) must
not import the evaluation stack (matplotlib, fairlearn, scipy) that the performance monitor uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cxr_ai.monitoring.log import PredictionLog, patient_key, resolve_pseudonym_key
    from cxr_ai.monitoring.performance import MonitorSettings, PerformanceMonitor
    from cxr_ai.monitoring.truth import TruthStore, match_truth, truth_from_csv, truth_from_fhir

_WHERE = {
    "PredictionLog": "log",
    "patient_key": "log",
    "resolve_pseudonym_key": "log",
    "MonitorSettings": "performance",
    "PerformanceMonitor": "performance",
    "TruthStore": "truth",
    "match_truth": "truth",
    "truth_from_csv": "truth",
    "truth_from_fhir": "truth",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"cxr_ai.monitoring.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
