"""Evaluate a bundle on a labelled data set through the inference engine (the serving path).

::

    python -m training.evaluate --bundle BUNDLE --config CONFIG [--root DIR] [--out metrics.json]

The images go through the bundle's own pixel pipeline and :class:`InferenceEngine`, exactly
as in service; the metrics are those recorded in bundles (AUROC with bootstrap CI, AP, and
sensitivity/specificity at the bundle's thresholds).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_ai.models.bundle import Bundle, load_bundle
from cxr_ai.models.engine import InferenceEngine
from training import data as D
from training.metrics import all_metrics

logger = logging.getLogger(__name__)


def evaluate_bundle(
    bundle: Bundle,
    manifest: pd.DataFrame,
    *,
    cache: D.ImageCache | None = None,
    engine: InferenceEngine | None = None,
    random_state: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics per finding and the probabilities (N, F), in manifest order."""
    engine = engine or InferenceEngine(bundle, device="auto")
    keys = bundle.finding_keys
    missing = [k for k in keys if k not in manifest.columns]
    if missing:
        raise ValueError(f"the data set has no labels for {missing}; the bundle predicts {keys}")
    probs = []
    for i in range(0, len(manifest), 256):
        chunk = manifest.iloc[i : i + 256]
        if cache is not None:
            imgs = cache.load_all(chunk)
        else:
            imgs = np.stack([D.load_image(p, k, bundle.pipeline) for p, k in zip(chunk["path"], chunk["kind"])]) if len(chunk) else np.zeros((0, 1, bundle.pipeline.size, bundle.pipeline.size), np.float32)
        probs.append(engine.predict(imgs).probabilities)
    P = np.concatenate(probs) if probs else np.zeros((0, len(keys)), np.float32)
    Y = manifest[keys].to_numpy(dtype=float)
    thresholds = {f.key: f.threshold for f in bundle.findings}
    return all_metrics(Y, P, keys, thresholds=thresholds, random_state=random_state), P


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description="Evaluate a bundle on a labelled data set.")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--config", required=True, help="training TOML whose [data] section names the data set")
    ap.add_argument("--root", default=None, help="override [data] root")
    ap.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.config import load_train_config
    from training.train import load_source

    cfg = load_train_config(args.config, overrides={"data": {"root": args.root}} if args.root else None)
    bundle = load_bundle(args.bundle)
    manifest = load_source(cfg, cfg["data"]["root"])
    metrics, _ = evaluate_bundle(bundle, manifest)
    text = json.dumps({"bundle": f"{bundle.name} {bundle.version}", "n": len(manifest), "metrics": metrics}, indent=2)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    logger.info("AUROC: %s", {k: round(v["auroc"], 4) for k, v in metrics.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
