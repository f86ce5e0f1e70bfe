"""Embedding heads: update a model cheaply, without retraining the backbone.

1. **Extract** embeddings with a bundle's backbone (``extract``), or bring your own (e.g. CXR
   Foundation's 1,376-d vectors) as ``.npy``/``.npz``/parquet with an id column.
2. **Train heads** on them (``heads``): a logistic head and a small MLP in PyTorch (seconds on
   a CPU for 100,000 vectors), with scikit-learn baselines beside them — logistic regression,
   random forest, histogram gradient boosting — all scored on the same patient-level
   validation split.
3. **Export**: a torch head trained on a bundle's own embeddings drops into that bundle's
   network (``CxrNet`` with the ``avg`` head is backbone -> embedding -> linear/MLP), so the
   result is a new bundle with the same backbone, new head weights and new thresholds.

CLI::

    python -m training.embeddings extract --bundle B --config CONFIG --out emb.npz
    python -m training.embeddings heads --embeddings emb.npz --labels emb.labels.csv \
        --out heads.json [--base-bundle B --export NEW_BUNDLE --export-head torch_mlp]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from training import data as D
from training.metrics import auroc, choose_threshold, all_metrics

logger = logging.getLogger(__name__)

TORCH_HEADS = ("torch_logistic", "torch_mlp")
SKLEARN_HEADS = ("sk_logistic", "random_forest", "hist_gb")
ALL_HEADS = TORCH_HEADS + SKLEARN_HEADS


# --- torch heads ---------------------------------------------------------------------------


class EmbeddingHead(nn.Module):
    """Same layout as :class:`cxr_ai.models.networks.CxrNet`'s ``avg`` head (so it exports)."""

    def __init__(self, dim: int, num_outputs: int, *, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = hidden
        # index 0 mirrors CxrNet's input dropout (Identity here: masking 1,376 inputs per row
        # costs more than the whole matmul on a CPU); dropout acts on the hidden layer only
        if hidden:
            self.head = nn.Sequential(nn.Identity(), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_outputs))
        else:
            self.head = nn.Sequential(nn.Identity(), nn.Linear(dim, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    @torch.no_grad()
    def fold_standardisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Make the head take raw embeddings: ``W' = W / std``, ``b' = b - W' @ mean``."""
        first = self.head[1]
        m = torch.as_tensor(mean, dtype=first.weight.dtype)
        s = torch.as_tensor(std, dtype=first.weight.dtype)
        first.weight.div_(s)
        first.bias.sub_(first.weight @ m)


def fit_torch_head(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    X_val: np.ndarray | None = None,
    Y_val: np.ndarray | None = None,
    hidden: int = 0,
    dropout: float = 0.1,
    epochs: int = 8,
    batch_size: int | None = None,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    patience: int = 3,
    random_state: int,
) -> tuple[EmbeddingHead, list[dict[str, float]]]:
    """Train a logistic (``hidden=0``) or MLP head with masked, class-weighted BCE.

    Inputs are standardised with training statistics, which are then folded into the first
    layer: the returned head takes raw embeddings. Early stopping on the mean validation
    AUROC when a validation set is given. NaN labels are masked. ``batch_size`` defaults to
    ``n / 50`` clipped to 32..1024.
    """
    from training.train import masked_bce

    gen = torch.Generator().manual_seed(random_state)
    torch.manual_seed(random_state)
    mean = X.mean(0)
    std = X.std(0) + 1e-6
    Xt = torch.from_numpy(((X - mean) / std).astype(np.float32))
    Ymask = ~np.isnan(Y)
    Yt = torch.from_numpy(np.nan_to_num(Y, nan=0.0).astype(np.float32))
    Mt = torch.from_numpy(Ymask.astype(np.float32))
    pos = (Yt * Mt).sum(0)
    neg = ((1 - Yt) * Mt).sum(0)
    pos_weight = torch.where(pos > 0, neg / pos.clamp_min(1), torch.ones_like(pos))
    head = EmbeddingHead(X.shape[1], Y.shape[1], hidden=hidden, dropout=dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    Xv = torch.from_numpy(((X_val - mean) / std).astype(np.float32)) if X_val is not None else None
    history: list[dict[str, float]] = []
    best, best_state, bad = -1.0, None, 0
    n = len(Xt)
    if batch_size is None:  # at least ~50 steps an epoch on small sets, 1024-sized batches on big ones
        batch_size = int(min(1024, max(32, n // 50)))
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        Xe, Ye, Me = Xt[perm], Yt[perm], Mt[perm]  # one gather an epoch, then contiguous slices
        total = 0.0
        for i in range(0, n, batch_size):
            opt.zero_grad(set_to_none=True)
            loss = masked_bce(head(Xe[i : i + batch_size]), Ye[i : i + batch_size], Me[i : i + batch_size], pos_weight)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(Xe[i : i + batch_size])
        entry = {"epoch": epoch, "train_loss": total / n}
        if Xv is not None and Y_val is not None:
            head.eval()
            with torch.inference_mode():
                pv = torch.sigmoid(head(Xv)).numpy()
            aucs = [auroc(Y_val[:, k], pv[:, k]) for k in range(Y.shape[1])]
            valid = [a for a in aucs if not np.isnan(a)]
            score = float(np.mean(valid)) if valid else float("nan")
            entry["val_mean_auroc"] = score
            if score > best + 1e-5:
                best, best_state, bad = score, copy.deepcopy(head.state_dict()), 0
            else:
                bad += 1
        history.append(entry)
        if Xv is not None and bad >= patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    head.fold_standardisation(mean, std)
    return head, history


def predict_torch_head(head: EmbeddingHead, X: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
    head.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(X), batch_size):
            out.append(torch.sigmoid(head(torch.from_numpy(np.ascontiguousarray(X[i : i + batch_size], dtype=np.float32)))).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.head[-1].out_features), np.float32)


# --- scikit-learn baselines ----------------------------------------------------------------


def _sklearn_model(name: str, random_state: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "sk_logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=200, class_weight="balanced", random_state=random_state))
    if name == "random_forest":
        return RandomForestClassifier(
            n_estimators=100, max_depth=12, min_samples_leaf=5, max_features="sqrt", max_samples=0.3,
            class_weight="balanced_subsample", n_jobs=-1, random_state=random_state,
        )
    if name == "hist_gb":
        return HistGradientBoostingClassifier(
            max_iter=100, learning_rate=0.1, max_leaf_nodes=31, early_stopping=True, validation_fraction=0.1,
            n_iter_no_change=10, random_state=random_state,  # no class weights: weighted binning is
            # ~100x slower on wide data, and AUROC does not need them
        )
    raise ValueError(f"unknown head {name!r}; known: {ALL_HEADS}")


@dataclass
class HeadResult:
    name: str
    fit_seconds: float
    val_auroc: dict[str, float]
    model: Any = field(repr=False, default=None)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fit_seconds": round(self.fit_seconds, 3), "val_auroc": self.val_auroc, "epochs": len(self.history) or None}


def train_heads(
    X: np.ndarray,
    Y: np.ndarray,
    X_val: np.ndarray,
    Y_val: np.ndarray,
    *,
    findings: Sequence[str],
    heads: Sequence[str] = ALL_HEADS,
    mlp_hidden: int = 128,
    epochs: int = 8,
    random_state: int,
) -> list[HeadResult]:
    """Fit each head on (X, Y) and score it on (X_val, Y_val); NaN labels are skipped."""
    results = []
    for name in heads:
        t0 = time.perf_counter()
        if name in TORCH_HEADS:
            head, hist = fit_torch_head(
                X, Y, X_val=X_val, Y_val=Y_val, hidden=mlp_hidden if name == "torch_mlp" else 0, epochs=epochs, random_state=random_state
            )
            secs = time.perf_counter() - t0
            pv = predict_torch_head(head, X_val)
            results.append(HeadResult(name, secs, {f: auroc(Y_val[:, k], pv[:, k]) for k, f in enumerate(findings)}, head, hist))
        elif name in SKLEARN_HEADS:
            models, aucs = {}, {}
            for k, f in enumerate(findings):
                keep = ~np.isnan(Y[:, k])
                if len(np.unique(Y[keep, k])) < 2:
                    aucs[f] = float("nan")
                    continue
                m = _sklearn_model(name, random_state)
                m.fit(X[keep], Y[keep, k].astype(int))
                models[f] = m
                aucs[f] = auroc(Y_val[:, k], m.predict_proba(X_val)[:, 1])
            results.append(HeadResult(name, time.perf_counter() - t0, aucs, models))
        else:
            raise ValueError(f"unknown head {name!r}; known: {ALL_HEADS}")
        logger.info("head %s: %.2f s, val AUROC %s", name, results[-1].fit_seconds, {k: round(v, 4) for k, v in results[-1].val_auroc.items()})
    return results


# --- extraction and export -----------------------------------------------------------------


def extract_embeddings(engine: Any, manifest: pd.DataFrame, *, cache: D.ImageCache, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and probabilities of every manifest image via the engine (same pipeline)."""
    embs, probs = [], []
    for i in range(0, len(manifest), chunk):
        imgs = cache.load_all(manifest.iloc[i : i + chunk])
        pred = engine.predict(imgs)
        embs.append(pred.embeddings)
        probs.append(pred.probabilities)
    if not embs:
        return np.zeros((0, engine.model.embedding_dim), np.float32), np.zeros((0, len(engine.finding_keys)), np.float32)
    return np.concatenate(embs), np.concatenate(probs)


def export_head_bundle(
    base_bundle: Any,
    head: EmbeddingHead,
    *,
    thresholds: dict[str, float],
    threshold_methods: dict[str, str],
    validation_metrics: dict[str, Any],
    out_dir: str | Path,
    version: str,
    name: str | None = None,
    training_data: dict[str, Any] | None = None,
    note: str = "",
) -> Path:
    """A new bundle: the base bundle's backbone with ``head`` as its classifier."""
    from cxr_ai.models.bundle import FindingSpec, save_bundle
    from cxr_ai.models.networks import NetworkConfig, build_network

    base_cfg = base_bundle.network
    if base_cfg.head != "avg":
        raise ValueError(f"only bundles with the 'avg' head take an embedding head (base has {base_cfg.head!r})")
    cfg = NetworkConfig.from_dict({**base_cfg.to_dict(), "hidden": head.hidden, "num_outputs": head.head[-1].out_features})
    net = build_network(cfg)
    state = {k: v for k, v in base_bundle.model.state_dict().items() if not k.startswith("head.")}
    state.update({k: v for k, v in head.state_dict().items()})
    net.load_state_dict(state, strict=True)
    c = base_bundle.cxr
    findings = [FindingSpec(key=f.key, display=f.display, threshold=float(thresholds[f.key]), threshold_method=threshold_methods[f.key]) for f in base_bundle.findings]
    meta = base_bundle.metadata
    return save_bundle(
        out_dir,
        model=net.eval(),
        name=name or base_bundle.name,
        version=version,
        findings=findings,
        pipeline=base_bundle.pipeline,
        description=meta.get("description", "") + f" Head retrained on embeddings ({'MLP' if head.hidden else 'logistic'}). {note}".rstrip(),
        intended_use=c.get("intended_use", ""),
        not_for_clinical_use=base_bundle.not_for_clinical_use,
        training_data=training_data or c.get("training_data", {}),
        validation_metrics=validation_metrics,
        test_metrics={},
        changelog={**meta.get("changelog", {}), version: f"head retrained on embeddings from {base_bundle.name} {base_bundle.version}"},
        data_source=meta.get("data_source", ""),
        references=meta.get("references", []),
        extra={"base_bundle": {"name": base_bundle.name, "version": base_bundle.version, "weights_sha256": c["weights"]["sha256"]}},
        overwrite=True,
    )


def _split_for_heads(labels: pd.DataFrame, findings: Sequence[str], random_state: int) -> pd.Series:
    from training.splits import patient_split

    if "split" in labels.columns:
        return labels["split"].replace({"test": "val"}) if not (labels["split"] == "val").any() else labels["split"]
    strat = [f for f in findings if labels[f].notna().any()]
    return patient_split(labels, val_fraction=0.2, test_fraction=0.0, stratify=strat, random_state=random_state)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.embeddings", description="Extract embeddings and train heads on them.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="embeddings of a data set with a bundle's backbone")
    ex.add_argument("--bundle", default=None, help="bundle directory (default: the shipped demo)")
    ex.add_argument("--config", required=True, help="training TOML whose [data] section names the images")
    ex.add_argument("--root", default=None, help="override [data] root")
    ex.add_argument("--out", required=True, help=".npz or .parquet; a <name>.labels.csv manifest is written beside it")
    ex.add_argument("--cache-dir", default=None)
    hd = sub.add_parser("heads", help="train heads on embeddings")
    hd.add_argument("--embeddings", required=True)
    hd.add_argument("--labels", required=True, help="CSV with the id column, finding columns and patient_id (and optionally split)")
    hd.add_argument("--id-column", default="image_id")
    hd.add_argument("--findings", nargs="+", default=["cardiomegaly", "low_ef"])
    hd.add_argument("--heads", nargs="+", default=list(ALL_HEADS), choices=ALL_HEADS)
    hd.add_argument("--seed", type=int, default=0)
    hd.add_argument("--out", required=True, help="results JSON")
    hd.add_argument("--base-bundle", default=None, help="bundle the embeddings came from (to export a new bundle)")
    hd.add_argument("--export", default=None, help="directory for the new bundle")
    hd.add_argument("--export-head", default="torch_logistic", choices=TORCH_HEADS)
    hd.add_argument("--version", default=None, help="version of the exported bundle")
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from cxr_ai.models.bundle import load_bundle
    from cxr_ai.models.engine import InferenceEngine, default_bundle_path

    if args.cmd == "extract":
        from training.config import load_train_config
        from training.train import load_source

        cfg = load_train_config(args.config, overrides={"data": {"root": args.root}} if args.root else None)
        bundle = load_bundle(args.bundle or default_bundle_path())
        engine = InferenceEngine(bundle, device="auto")
        manifest = load_source(cfg, cfg["data"]["root"])
        cache = D.ImageCache(args.cache_dir or Path(args.out).parent / "cache", bundle.pipeline)
        X, P = extract_embeddings(engine, manifest, cache=cache)
        out = D.save_embeddings(args.out, manifest["image_id"], X)
        manifest.assign(**{f"p_{f}": P[:, k] for k, f in enumerate(bundle.finding_keys)}).to_csv(out.with_suffix(".labels.csv"), index=False)
        logger.info("wrote %d x %d embeddings to %s", *X.shape, out)
        return 0

    ids, X = D.load_embeddings(args.embeddings, id_column=args.id_column)
    labels = pd.read_csv(args.labels, dtype={args.id_column: str, "patient_id": str})
    labels = labels.set_index(args.id_column).loc[ids].reset_index()
    split = _split_for_heads(labels, args.findings, args.seed)
    tr, va = (split == "train").to_numpy(), (split == "val").to_numpy()
    Y = labels[args.findings].to_numpy(dtype=float)
    results = train_heads(X[tr], Y[tr], X[va], Y[va], findings=args.findings, heads=args.heads, random_state=args.seed)
    report: dict[str, Any] = {"n_train": int(tr.sum()), "n_val": int(va.sum()), "dim": int(X.shape[1]), "heads": [r.to_dict() for r in results]}
    if args.export:
        if not args.base_bundle:
            ap.error("--export needs --base-bundle (the bundle whose backbone made the embeddings)")
        chosen = next(r for r in results if r.name == args.export_head)
        pv = predict_torch_head(chosen.model, X[va])
        thr, how = {}, {}
        for k, f in enumerate(args.findings):
            thr[f], how[f] = choose_threshold(Y[va, k], pv[:, k], method="youden")
        base = load_bundle(args.base_bundle)
        version = args.version or base.version + "+head"
        path = export_head_bundle(
            base, chosen.model, thresholds=thr, threshold_methods=how,
            validation_metrics=all_metrics(Y[va], pv, args.findings, thresholds=thr, random_state=args.seed),
            out_dir=args.export, version=version,
        )
        report["exported_bundle"] = str(path)
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
