"""Patient-level splits, rebalancing, synthetic mixing, augmentation, loss and thresholds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from training.augment import chest_augmentation
from training.metrics import binary_metrics, choose_threshold, finding_metrics
from training.splits import assert_no_patient_leakage, patient_split
from training.train import DistInfo, epoch_indices, masked_bce, mix_synthetic


def _manifest(n_patients: int = 300, *, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-4 images each; labels per patient, prevalence ~0.3 / ~0.15."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        card = float(rng.random() < 0.3)
        ef = float(rng.random() < 0.15) if rng.random() > 0.1 else np.nan
        for k in range(int(rng.integers(1, 5))):
            rows.append({"image_id": f"{p}-{k}", "patient_id": f"P{p:04d}", "cardiomegaly": card, "low_ef": ef, "synthetic": False})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits() -> None:
    df = _manifest()
    split = patient_split(df, val_fraction=0.15, test_fraction=0.15, stratify=["cardiomegaly", "low_ef"], random_state=1)
    assert set(split) == {"train", "val", "test"}
    per_patient = df.assign(split=split).groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    # roughly the asked-for fractions of patients, and stratified prevalence
    frac = df.assign(split=split).groupby("split")["patient_id"].nunique() / df["patient_id"].nunique()
    assert 0.08 < frac["test"] < 0.22 and 0.08 < frac["val"] < 0.22
    prev = df.assign(split=split).groupby("split")["cardiomegaly"].mean()
    assert abs(prev["test"] - df["cardiomegaly"].mean()) < 0.08
    assert abs(prev["val"] - df["cardiomegaly"].mean()) < 0.08


def test_split_is_reproducible_and_seeded() -> None:
    df = _manifest()
    a = patient_split(df, random_state=3)
    b = patient_split(df, random_state=3)
    c = patient_split(df, random_state=4)
    assert a.equals(b) and not a.equals(c)


def test_zero_test_fraction_leaves_test_empty() -> None:
    split = patient_split(_manifest(), val_fraction=0.2, test_fraction=0.0, random_state=0)
    assert set(split) == {"train", "val"}


def test_leakage_is_detected() -> None:
    df = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(ValueError, match=r"patients \['a'\] appear in more than one split"):
        assert_no_patient_leakage(df)


def test_ratio_rebalancing_gives_about_three_to_one() -> None:
    labels = np.zeros((2000, 1), np.float32)
    labels[:100] = 1.0  # 5 % positives
    mask = np.ones_like(labels)
    order = epoch_indices(labels, mask, epoch=0, seed=0, balance="ratio", ratio=3.0, info=DistInfo())
    pos_share = labels[order, 0].mean()
    assert len(order) == 2000
    assert 0.22 < pos_share < 0.28  # 1 / (3 + 1)
    plain = epoch_indices(labels, mask, epoch=0, seed=0, balance="pos_weight", ratio=3.0, info=DistInfo())
    assert sorted(plain) == list(range(2000))


def test_ddp_shards_are_equal_and_cover_the_epoch() -> None:
    labels = np.zeros((11, 1), np.float32)
    mask = np.ones_like(labels)
    shards = [epoch_indices(labels, mask, epoch=2, seed=0, balance="none", ratio=3.0, info=DistInfo(rank=r, world=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 6  # equal steps on every rank (else DDP hangs)
    assert set(shards[0]) | set(shards[1]) == set(range(11))


def test_synthetic_fraction() -> None:
    real = _manifest(100)
    syn = _manifest(200, seed=9).assign(synthetic=True)
    mixed = mix_synthetic(real, syn, fraction=0.3, random_state=0)
    assert mixed["synthetic"].mean() == pytest.approx(0.3, abs=0.005)
    assert mixed.loc[mixed["synthetic"], "patient_id"].str.startswith("synthetic-").all()
    assert mix_synthetic(real, syn, fraction=0.0, random_state=0) is real
    few = mix_synthetic(real, syn.iloc[:10], fraction=0.5, random_state=0)
    assert few["synthetic"].sum() == 10


def test_masked_bce_ignores_unknown_labels() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = masked_bce(logits, y, mask, None)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (bce(logits[:, 0], y[:, 0]) + bce(logits[0, 1], y[0, 1])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # changing a masked label changes nothing
    y2 = y.clone()
    y2[1, 1] = 0.0
    assert masked_bce(logits, y2, mask, None).item() == pytest.approx(loss.item())


def test_augmentation_never_flips_left_right() -> None:
    """The heart is on the left: after augmentation the bright side stays the bright side."""
    img = torch.zeros(1, 64, 64)
    img[:, 16:48, 36:56] = 1.0  # a "heart" on image right (patient's left)
    aug = chest_augmentation(size=64, seed=0, strength=1.0)
    for _ in range(60):
        out = torch.as_tensor(aug(img.clone()))
        assert out.shape == (1, 64, 64)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert out[..., 32:].sum() > 3 * out[..., :32].sum()


def test_augmentation_is_seeded() -> None:
    img = torch.rand(1, 32, 32)
    a = torch.as_tensor(chest_augmentation(size=32, seed=5)(img.clone()))
    b = torch.as_tensor(chest_augmentation(size=32, seed=5)(img.clone()))
    assert torch.equal(a, b)


def test_thresholds() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, np.nan])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9, 0.5])
    thr, how = choose_threshold(y, p, method="youden")
    assert thr == pytest.approx(0.7) and how.startswith("youden")
    m = binary_metrics(y, p, thr)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 1.0
    thr, how = choose_threshold(y, p, method="sensitivity", target_sensitivity=1.0)
    assert thr == pytest.approx(0.4) and "sensitivity>=1.00" in how
    assert binary_metrics(y, p, thr)["sensitivity"] == 1.0
    thr, how = choose_threshold(np.zeros(4), np.linspace(0, 1, 4))
    assert thr == 0.5 and "one class" in how
    with pytest.raises(ValueError, match="threshold method 'f1'"):
        choose_threshold(y, p, method="f1")


def test_finding_metrics_with_ci() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(float)
    p = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    m = finding_metrics(y, p, threshold=0.5, random_state=0)
    lo, hi = m["auroc_ci95"]
    assert lo < m["auroc"] < hi and m["n"] == 400
    assert m == finding_metrics(y, p, threshold=0.5, random_state=0)  # seeded bootstrap
