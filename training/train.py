"""Train a cxr-ai model (MONAI networks and transforms) and export it as a bundle.

Single process::

    python -m training.train --config training/configs/demo.toml --out runs/demo

Several processes / GPUs / nodes (DDP; gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node 2 -m training.train --config CONFIG --out DIR

What happens: the data source is read into a manifest (:mod:`training.data`); patients are
split into train/val/test (:mod:`training.splits`; or a separate held-out folder is the test
set); phantoms are mixed into the training split when ``synthetic_fraction`` > 0; every image
goes through the cxr-ai pixel pipeline once and is cached; the network is trained with a
masked, class-weighted BCE (or ratio rebalancing), chest-safe augmentation, mixed precision on
CUDA, early stopping on the mean validation AUROC, and a checkpoint after every epoch (a rerun
with the same ``--out`` resumes). Thresholds are chosen on validation, the held-out test set is
scored, and the best model is exported with its training log and metrics.

Outputs in ``--out``: ``checkpoint.pt``, ``train_log.json``, ``metrics.json``, ``bundle/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from monai.data import get_track_meta, set_track_meta

from cxr_ai.imaging import PixelPipelineSpec
from cxr_ai.models.engine import available_cores, resolve_device
from cxr_ai.models.networks import CxrNet, NetworkConfig, build_network
from training import data as D
from training.augment import chest_augmentation
from training.config import load_train_config
from training.metrics import all_metrics, auroc, choose_threshold
from training.splits import assert_no_patient_leakage, patient_split

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG_FILE = "train_log.json"
METRICS_FILE = "metrics.json"


# --- data --------------------------------------------------------------------------------


def load_source(cfg: dict[str, Any], root: str, *, source_name: str | None = None, synthetic: bool = False) -> pd.DataFrame:
    """Read one data source named by ``cfg["data"]`` from ``root`` into a manifest."""
    d = cfg["data"]
    src = d["source"] if source_name is None else source_name
    if src == "dicom":
        return D.load_dicom_folder(root, labels_csv=d["labels_csv"], source="phantom" if synthetic else "dicom", synthetic=synthetic)
    if src == "nih":
        return D.load_nih_chestxray14(root, csv=d["csv"] or "Data_Entry_2017.csv")
    if src == "chexpert":
        return D.load_chexpert(root, csv=d["csv"] or "train.csv", uncertainty=d["uncertainty"])
    if src == "mimic":
        return D.load_mimic_cxr(
            root,
            uncertainty=d["uncertainty"],
            patients_csv=d["patients_csv"] or None,
            admissions_csv=d["admissions_csv"] or None,
            low_ef_csv=d["low_ef_csv"] or None,
        )
    if src == "manifest":
        p = Path(root) / d["csv"] if d["csv"] else Path(root)
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
        return D._finish(df)
    raise ValueError(f"unknown data source {src!r}")


def mix_synthetic(train_df: pd.DataFrame, synthetic_df: pd.DataFrame, *, fraction: float, random_state: int) -> pd.DataFrame:
    """Add synthetic rows so that they make up ``fraction`` of the returned training set.

    Rows are drawn without replacement; when there are too few, all are used and the achieved
    fraction is logged. Synthetic images only ever enter the training split.
    """
    if fraction <= 0 or len(synthetic_df) == 0:
        return train_df
    want = int(round(fraction / (1.0 - fraction) * len(train_df)))
    rng = np.random.default_rng(random_state)
    n = min(want, len(synthetic_df))
    if n < want:
        logger.warning("synthetic_fraction %.2f wants %d synthetic images, only %d available", fraction, want, n)
    pick = synthetic_df.iloc[np.sort(rng.choice(len(synthetic_df), size=n, replace=False))].copy()
    pick["synthetic"] = True
    pick["patient_id"] = "synthetic-" + pick["patient_id"].astype(str)
    return pd.concat([train_df, pick], ignore_index=True)


def prepare_data(cfg: dict[str, Any]) -> pd.DataFrame:
    """Manifest with a ``split`` column (train/val/test), synthetic rows mixed into train."""
    d, s, seed = cfg["data"], cfg["split"], int(cfg["experiment"]["seed"])
    if not d["root"]:
        raise ValueError("[data] root is empty: point it at the training data")
    pool = load_source(cfg, d["root"])
    stratify = [c for c in s["stratify"] if c in pool.columns and pool[c].notna().any()]
    if d["test_root"]:
        test = load_source(cfg, d["test_root"])
        shared = set(pool["patient_id"]) & set(test["patient_id"])
        if shared:
            raise ValueError(f"{len(shared)} patients are in both [data] root and test_root (e.g. {sorted(shared)[:2]}); the held-out set must not share patients")
        split = patient_split(pool, val_fraction=float(s["val_fraction"]), test_fraction=0.0, stratify=stratify, random_state=seed)
        pool = pool.assign(split=split.to_numpy())
        df = pd.concat([pool, test.assign(split="test")], ignore_index=True)
    else:
        split = patient_split(pool, val_fraction=float(s["val_fraction"]), test_fraction=float(s["test_fraction"]), stratify=stratify, random_state=seed)
        df = pool.assign(split=split.to_numpy())
    if float(d["synthetic_fraction"]) > 0:
        syn = load_source(cfg, d["synthetic_root"], source_name="dicom", synthetic=True)
        train = mix_synthetic(df[df["split"] == "train"], syn.assign(split="train"), fraction=float(d["synthetic_fraction"]), random_state=seed + 7)
        df = pd.concat([train, df[df["split"] != "train"]], ignore_index=True)
    assert_no_patient_leakage(df)
    return df


# --- distributed -------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_pref)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device_pref)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    logger.info("DDP: rank %d/%d (local %d) on %s with %s", rank, world, local, dev, backend)
    return DistInfo(rank=rank, world=world, local_rank=local), dev


def _broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- training ----------------------------------------------------------------------------


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """BCE over labelled entries only, averaged per finding, then over findings."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)
    per_finding = (loss * mask).sum(0) / mask.sum(0).clamp_min(1.0)
    present = (mask.sum(0) > 0).float()
    return (per_finding * present).sum() / present.sum().clamp_min(1.0)


def epoch_indices(labels: np.ndarray, mask: np.ndarray, *, epoch: int, seed: int, balance: str, ratio: float, info: DistInfo) -> list[int]:
    """This rank's sample order for one epoch (same number of samples on every rank)."""
    rng = np.random.default_rng(seed * 1000 + epoch)
    n = len(labels)
    if balance == "ratio":
        pos = (labels[:, 0] > 0.5) & (mask[:, 0] > 0)
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            p = np.where(pos, 1.0 / ((ratio + 1.0) * n_pos), ratio / ((ratio + 1.0) * n_neg))
            order = rng.choice(n, size=n, replace=True, p=p / p.sum())
        else:
            order = rng.permutation(n)
    else:
        order = rng.permutation(n)
    if info.enabled:
        per = math.ceil(n / info.world)
        order = np.resize(order, per * info.world)  # wrap so that every rank gets `per`
        order = order[info.rank :: info.world]
    return order.tolist()


def run_epoch(
    model: torch.nn.Module,
    loader: Any,
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    pos_weight: torch.Tensor | None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[list[float], int]:
    """One pass over ``loader``: returns the batch losses and the number of images seen."""
    model.train()
    losses, seen = [], 0
    for x, y, mask in loader:
        x, y, mask = x.to(device, non_blocking=True), y.to(device), mask.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = model(x)["logits"]
        loss = masked_bce(logits.float(), y, mask, pos_weight)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        seen += x.shape[0]
    return losses, seen


def predict_arrays(model: CxrNet, images: np.ndarray, *, device: torch.device, batch_size: int = 64, amp_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings of preprocessed images (eval mode, no augmentation)."""
    model.eval()
    probs, embs = [], []
    ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
            out = model(x)
            probs.append(out["logits"].float().sigmoid().cpu())
            embs.append(out["embedding"].float().cpu())
    if not probs:
        return np.zeros((0, model.config.num_outputs), np.float32), np.zeros((0, model.embedding_dim), np.float32)
    return torch.cat(probs).numpy(), torch.cat(embs).numpy()


def _labels(df: pd.DataFrame, findings: Sequence[str]) -> np.ndarray:
    return df[list(findings)].to_numpy(dtype=float)


def train(
    cfg: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    export_dir: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a training described by ``cfg`` (:func:`training.config.load_train_config`).

    Returns a summary dict (rank 0; other ranks return ``{}``): best epoch, validation and
    test metrics, thresholds, the bundle path.
    """
    out = Path(out_dir)
    t_cfg, e_cfg = cfg["train"], cfg["experiment"]
    info, device = init_distributed(t_cfg["device"])
    tracking, threads = get_track_meta(), torch.get_num_threads()
    set_track_meta(False)  # MONAI transforms return plain tensors: no MetaTensor overhead
    try:
        return _train(cfg, out, info, device, export_dir, extra)
    finally:
        set_track_meta(tracking)
        torch.set_num_threads(threads)
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: dict[str, Any], out: Path, info: DistInfo, device: torch.device, export_dir: str | os.PathLike | None, extra: dict[str, Any] | None
) -> dict[str, Any]:
    t_cfg, e_cfg, m_cfg = cfg["train"], cfg["experiment"], cfg["model"]
    seed = int(e_cfg["seed"])
    findings = list(e_cfg["findings"])
    if device.type == "cpu":
        n_threads = int(t_cfg["num_threads"]) or max(1, available_cores() // info.world)
        torch.set_num_threads(n_threads)
    out.mkdir(parents=True, exist_ok=True)
    spec = PixelPipelineSpec(size=int(cfg["pipeline"]["size"]))
    cache = D.ImageCache(cfg["data"]["cache_dir"] or out / "cache", spec)

    df = prepare_data(cfg)
    train_df = df[df["split"] == "train"].reset_index(drop=True)
    val_df = df[df["split"] == "val"].reset_index(drop=True)
    test_df = df[df["split"] == "test"].reset_index(drop=True)
    if len(val_df) == 0:
        raise ValueError("the validation split is empty; raise [split] val_fraction or add data")

    t0 = time.perf_counter()
    # rank 0 fills the cache first so that the other ranks only read it
    if info.main:
        train_images = cache.load_all(train_df) if cfg["data"]["preload"] else None
        val_images = cache.load_all(val_df)
    if info.enabled:
        dist.barrier()
    if not info.main:
        train_images = cache.load_all(train_df) if cfg["data"]["preload"] else None
        val_images = cache.load_all(val_df)
    logger.info("data ready: %d train / %d val / %d test images (%.1f s)", len(train_df), len(val_df), len(test_df), time.perf_counter() - t0)

    transform = chest_augmentation(size=spec.size, seed=seed, strength=float(t_cfg["augment_strength"])) if t_cfg["augment"] else None
    dataset = D.ManifestDataset(train_df, findings=findings, images=train_images, cache=cache, transform=transform)

    net_cfg = NetworkConfig(
        architecture=m_cfg["architecture"],
        num_outputs=len(findings),
        input_size=spec.size,
        head=m_cfg["head"],
        hidden=int(m_cfg["hidden"]),
        dropout=float(m_cfg["dropout"]),
        kwargs=dict(m_cfg["kwargs"]),
    )
    torch.manual_seed(seed)
    model = build_network(net_cfg, imagenet_weights=m_cfg["imagenet_weights"] or None).to(device)
    use_cuda = device.type == "cuda"
    if use_cuda and t_cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = None
    if use_cuda and t_cfg["amp"]:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ddp_model: torch.nn.Module = model
    if info.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

    epochs = int(t_cfg["epochs"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(t_cfg["lr"]), weight_decay=float(t_cfg["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs)) if t_cfg["scheduler"] == "cosine" else None

    pos_weight = None
    if t_cfg["balance"] == "pos_weight":
        pos = (dataset.labels * dataset.mask).sum(0)
        neg = ((1 - dataset.labels) * dataset.mask).sum(0)
        pos_weight = torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32, device=device)

    ckpt_path = out / CHECKPOINT
    start_epoch, best, best_epoch, bad_epochs, history, best_state = 0, -1.0, -1, 0, [], None
    if t_cfg["resume"] and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None and ck.get("scheduler"):
            scheduler.load_state_dict(ck["scheduler"])
        start_epoch, best, best_epoch, bad_epochs = int(ck["epoch"]) + 1, float(ck["best"]), int(ck["best_epoch"]), int(ck["bad_epochs"])
        history = json.loads(ck["history"])
        best_state = ck["best_state"]
        logger.info("resumed from %s at epoch %d (best mean AUROC %.4f at epoch %d)", ckpt_path, start_epoch, best, best_epoch)

    y_val = _labels(val_df, findings)
    stop = False
    for epoch in range(start_epoch, epochs):
        if stop:
            break
        t_ep = time.perf_counter()
        if transform is not None:
            transform.set_random_state(seed=seed * 1000 + epoch * 10 + info.rank)
        order = epoch_indices(dataset.labels, dataset.mask, epoch=epoch, seed=seed, balance=t_cfg["balance"], ratio=float(t_cfg["ratio"]), info=info)
        loader = torch.utils.data.DataLoader(dataset, batch_size=int(t_cfg["batch_size"]), sampler=order, num_workers=int(t_cfg["num_workers"]), drop_last=False)
        losses, seen = run_epoch(
            ddp_model, loader, optimizer=optimizer, scaler=scaler, device=device, pos_weight=pos_weight,
            amp_dtype=amp_dtype, channels_last=use_cuda and bool(t_cfg["channels_last"]),
        )
        if scheduler is not None:
            scheduler.step()
        train_seconds = time.perf_counter() - t_ep

        entry: dict[str, Any] | None = None
        if info.main:
            p_val, _ = predict_arrays(model, val_images, device=device, amp_dtype=amp_dtype)
            aurocs = {f: auroc(y_val[:, k], p_val[:, k]) for k, f in enumerate(findings)}
            valid = [v for v in aurocs.values() if not math.isnan(v)]
            mean_auc = float(np.mean(valid)) if valid else float("nan")
            improved = not math.isnan(mean_auc) and mean_auc > best + 1e-6
            if improved:
                best, best_epoch, bad_epochs = mean_auc, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            entry = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "val_auroc": aurocs,
                "val_mean_auroc": mean_auc,
                "lr": optimizer.param_groups[0]["lr"],
                "train_seconds": round(train_seconds, 3),
                "train_images_per_s": round(seen * info.world / train_seconds, 2) if train_seconds > 0 else None,
                "seconds": round(time.perf_counter() - t_ep, 3),
                "best": improved,
                "world_size": info.world,
            }
            history.append(entry)
            logger.info("epoch %d: loss %.4f, val AUROC %s, %.1f s", epoch, entry["train_loss"], {k: round(v, 4) for k, v in aurocs.items()}, entry["seconds"])
            stop = epoch + 1 >= int(t_cfg["min_epochs"]) and bad_epochs >= int(t_cfg["patience"])
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "epoch": epoch,
                    "best": best,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "history": json.dumps(history),
                    "best_state": best_state,
                    "config": json.dumps(cfg),
                    "network": json.dumps(net_cfg.to_dict()),
                },
                ckpt_path,
            )
            (out / LOG_FILE).write_text(json.dumps(history, indent=2), encoding="utf-8")
            if stop:
                logger.info("early stopping at epoch %d: no validation AUROC gain for %d epochs", epoch, bad_epochs)
        stop = bool(_broadcast(stop, info))

    if not info.main:
        return {}
    if best_state is None:
        raise RuntimeError("training produced no model with a finite validation AUROC; check the labels of the validation split")
    model.load_state_dict(best_state)
    summary = finish_and_export(
        cfg, model=model, net_cfg=net_cfg, spec=spec, df=df, cache=cache, val_images=val_images, history=history,
        best_epoch=best_epoch, device=device, out=out, export_dir=export_dir, extra=extra,
    )
    return summary


def finish_and_export(
    cfg: dict[str, Any],
    *,
    model: CxrNet,
    net_cfg: NetworkConfig,
    spec: PixelPipelineSpec,
    df: pd.DataFrame,
    cache: D.ImageCache,
    val_images: np.ndarray,
    history: list[dict[str, Any]],
    best_epoch: int,
    device: torch.device,
    out: Path,
    export_dir: str | os.PathLike | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Thresholds on validation, test metrics, metrics.json and the bundle."""
    from training.export import export_bundle

    findings = list(cfg["experiment"]["findings"])
    seed = int(cfg["experiment"]["seed"])
    val_df = df[df["split"] == "val"].reset_index(drop=True)
    test_df = df[df["split"] == "test"].reset_index(drop=True)
    p_val, _ = predict_arrays(model, val_images, device=device)
    y_val = _labels(val_df, findings)
    thresholds, methods = {}, {}
    for k, f in enumerate(findings):
        thr, how = choose_threshold(y_val[:, k], p_val[:, k], method=cfg["thresholds"]["method"], target_sensitivity=float(cfg["thresholds"]["target_sensitivity"]))
        thresholds[f], methods[f] = thr, how
    val_metrics = all_metrics(y_val, p_val, findings, thresholds=thresholds, random_state=seed)
    test_metrics: dict[str, Any] = {}
    if len(test_df):
        test_images = cache.load_all(test_df)
        p_test, _ = predict_arrays(model, test_images, device=device)
        test_metrics = all_metrics(_labels(test_df, findings), p_test, findings, thresholds=thresholds, random_state=seed)
        pd.DataFrame({"image_id": test_df["image_id"], "patient_id": test_df["patient_id"], **{f"p_{f}": p_test[:, k] for k, f in enumerate(findings)}}).to_csv(out / "test_predictions.csv", index=False)
    training_data = {
        split: D.summarise(df[df["split"] == split], findings=findings) for split in ("train", "val", "test") if (df["split"] == split).any()
    }
    training_data["patients_shared_between_splits"] = 0
    training_data["split_method"] = (
        "held-out folder (test_root) + patient-level StratifiedGroupKFold for validation"
        if cfg["data"]["test_root"]
        else "patient-level StratifiedGroupKFold (sklearn) for validation and test"
    )
    if "uncertainty" in cfg["data"] and cfg["data"]["uncertainty"]:
        training_data["uncertainty_policy"] = cfg["data"]["uncertainty"]
    metrics = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "thresholds": thresholds,
        "threshold_methods": methods,
        "validation": val_metrics,
        "test": test_metrics,
        "training_data": training_data,
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    bundle_dir = Path(export_dir) if export_dir else out / "bundle"
    path = export_bundle(
        model=model,
        cfg=cfg,
        spec=spec,
        thresholds=thresholds,
        threshold_methods=methods,
        validation_metrics=val_metrics,
        test_metrics=test_metrics,
        training_data=training_data,
        history=history,
        out_dir=bundle_dir,
        extra=extra,
        test_predictions=out / "test_predictions.csv" if len(test_df) and cfg["experiment"]["ship_test_predictions"] else None,
    )
    metrics["bundle"] = str(path)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="training TOML (see training/configs/)")
    ap.add_argument("--out", required=True, help="run directory (checkpoint, logs, metrics, bundle)")
    ap.add_argument("--bundle-out", default=None, help="where to write the bundle (default OUT/bundle)")
    ap.add_argument("--epochs", type=int, default=None, help="override [train] epochs")
    ap.add_argument("--no-resume", action="store_true", help="start afresh even if OUT has a checkpoint")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"train": {}}
    if args.epochs is not None:
        overrides["train"]["epochs"] = args.epochs
    if args.no_resume:
        overrides["train"]["resume"] = False
    cfg = load_train_config(args.config, overrides=overrides)
    summary = train(cfg, args.out, export_dir=args.bundle_out)
    if summary:
        brief = {f: round(m["auroc"], 4) for f, m in summary["test"].items()} if summary["test"] else {}
        logging.getLogger(__name__).info("done: bundle %s, test AUROC %s", summary["bundle"], brief)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
