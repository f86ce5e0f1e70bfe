"""Live monitoring: prediction log (pseudonymous), ground-truth feed, rolling subgroup
performance with gap and drift alerts."""

from cxr_ai.monitoring.log import PredictionLog, patient_key, resolve_pseudonym_key
from cxr_ai.monitoring.performance import MonitorSettings, PerformanceMonitor
from cxr_ai.monitoring.truth import (
    TruthStore,
    match_truth,
    truth_from_csv,
    truth_from_fhir,
)

__all__ = [
    "MonitorSettings",
    "PerformanceMonitor",
    "PredictionLog",
    "TruthStore",
    "match_truth",
    "patient_key",
    "resolve_pseudonym_key",
    "truth_from_csv",
    "truth_from_fhir",
]
