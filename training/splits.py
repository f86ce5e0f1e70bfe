"""Patient-level splits: no patient in two splits, stratified by label."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MSG_LEAK = "patients {examples} appear in more than one split ({n} in all): a patient-level split was broken"


def _strata(df: pd.DataFrame, stratify: Sequence[str]) -> np.ndarray:
    """One integer stratum per row from the label columns (unknown labels are a stratum)."""
    code = np.zeros(len(df), dtype=np.int64)
    for col in stratify:
        v = df[col].to_numpy(dtype=float)
        code = code * 3 + np.where(np.isnan(v), 2, v > 0.5).astype(np.int64)
    return code


def _one_fold(df: pd.DataFrame, idx: np.ndarray, fraction: float, stratify: Sequence[str], rng: int) -> np.ndarray:
    """Indices (into ``idx``) of a patient-grouped, stratified fold of about ``fraction``."""
    n_splits = max(2, int(round(1.0 / fraction)))
    groups = df["patient_id"].to_numpy()[idx]
    n_groups = len(np.unique(groups))
    n_splits = min(n_splits, n_groups)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=rng)
    _, held = next(sgkf.split(np.zeros(len(idx)), _strata(df.iloc[idx], stratify), groups))
    return held


def patient_split(
    df: pd.DataFrame,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    stratify: Sequence[str] = ("cardiomegaly",),
    random_state: int,
) -> pd.Series:
    """Assign each row to ``train``/``val``/``test`` with whole patients in one split.

    Uses :class:`sklearn.model_selection.StratifiedGroupKFold` (groups = ``patient_id``,
    strata = the joint label pattern of ``stratify``); the fractions are therefore
    approximate (1/round(1/f) of the patients). A fraction of 0 leaves that split empty.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum below 1")
    split = np.array(["train"] * len(df), dtype=object)
    remaining = np.arange(len(df))
    if test_fraction > 0:
        held = _one_fold(df, remaining, test_fraction, stratify, random_state)
        split[remaining[held]] = "test"
        remaining = np.delete(remaining, held)
    if val_fraction > 0:
        held = _one_fold(df, remaining, val_fraction / (1.0 - test_fraction), stratify, random_state + 1)
        split[remaining[held]] = "val"
    out = pd.Series(split, index=df.index, name="split")
    assert_no_patient_leakage(df.assign(split=out))
    logger.info("patient split: %s", out.value_counts().to_dict())
    return out


def assert_no_patient_leakage(df: pd.DataFrame, *, split_column: str = "split") -> None:
    """Raise ``ValueError`` if any patient has rows in more than one split."""
    per_patient = df.groupby("patient_id")[split_column].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise ValueError(MSG_LEAK.format(examples=list(leaked.index[:3]), n=len(leaked)))
