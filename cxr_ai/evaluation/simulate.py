"""Deterministic simulated classifier scores from phantom truth (tests, demos, benchmarks).

Not a model: a stand-in whose behaviour is known, so that fairness tooling can be checked
against a gap that was put there on purpose. The score of a finding is
``sigmoid(separation * (z - 0.5) + noise)`` where ``z`` is the truth (or, for
``cardiomegaly``, a smooth function of the true cardiothoracic ratio), and images of the
phantoms' shifted subgroup (``shifted == 1``) get ``shifted_noise`` instead of ``noise``:
their scores are noisier, as a model reading degraded images would be.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PREDICTION_COLUMNS: tuple[str, ...] = (
    "sop_uid", "study_uid", "patient_key", "model_name", "model_version", "gate_accepted",
    "gate_reason", "p_cardiomegaly", "thr_cardiomegaly", "pred_cardiomegaly", "p_low_ef",
    "thr_low_ef", "pred_low_ef",
)


def simulate_predictions(labels: pd.DataFrame, *, random_state: int, separation: float = 4.0,
                         noise: float = 1.0, shifted_noise: float = 3.0,
                         threshold: float = 0.5) -> pd.DataFrame:
    """A predictions table (``cxr-ai batch`` columns) for a phantom ``labels.csv`` frame.

    Rows that are not frontal chests are gate-rejected (no probabilities), as the gate would.
    """
    rng = np.random.default_rng(random_state)
    n = len(labels)
    shifted = labels.get("shifted", pd.Series(0, index=labels.index)).to_numpy(int) == 1
    sd = np.where(shifted, shifted_noise, noise)
    out = pd.DataFrame({
        "sop_uid": labels["sop_uid"].astype(str), "study_uid": labels["study_uid"].astype(str),
        "patient_key": "", "model_name": "simulated", "model_version": "0",
        "gate_accepted": labels.get("frontal_chest", pd.Series(1, index=labels.index)).astype(int) == 1,
    })
    out["gate_reason"] = np.where(out["gate_accepted"], "accepted", "not_frontal_chest")
    for finding in ("cardiomegaly", "low_ef"):
        z = labels[finding].to_numpy(float)
        if finding == "cardiomegaly" and "ctr" in labels:
            z = 1.0 / (1.0 + np.exp(-(labels["ctr"].to_numpy(float) - 0.5) / 0.02))
        logit = separation * (z - 0.5) + rng.normal(0.0, 1.0, n) * sd
        p = 1.0 / (1.0 + np.exp(-logit))
        p = np.where(out["gate_accepted"], p, np.nan)
        out[f"p_{finding}"] = p
        out[f"thr_{finding}"] = np.where(out["gate_accepted"], threshold, np.nan)
        out[f"pred_{finding}"] = np.where(out["gate_accepted"], p >= threshold, False)
    return out[list(PREDICTION_COLUMNS)]
