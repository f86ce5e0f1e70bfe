"""Regenerate the shipped demo bundle: phantoms -> training -> ``cxr_ai/bundles/``.

::

    python -m training.demo [--config training/configs/demo.toml] [--work runs/demo] [--out DIR]

1. Writes the training pool and the held-out set with :func:`cxr_ai.phantoms.generate_studies`
   from the seeds in the config's ``[phantoms]`` section. The two seeds give disjoint patients
   (checked), so the held-out set is a patient-level split.
2. Trains the small network (:mod:`training.train`), choosing thresholds on a patient-level
   validation share of the pool.
3. Exports the bundle with a ``reproduce`` record: the held-out phantom config and its
   metrics, so ``tests/test_training_demo.py`` can regenerate the held-out phantoms and check
   that the shipped bundle reproduces them; ``docs/held_out_thumbnails.npz`` holds small
   thumbnails of the held-out images so that the check can compare pixels with a tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom

from cxr_ai.models.engine import default_bundle_path
from cxr_ai.phantoms import PhantomConfig, generate_studies
from training.config import load_train_config
from training.train import train

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"


def phantom_configs(cfg: dict[str, Any]) -> tuple[PhantomConfig, PhantomConfig]:
    ph = cfg["phantoms"]
    if int(ph["train_studies"]) < 1 or int(ph["test_studies"]) < 1:
        raise ValueError("[phantoms] train_studies and test_studies must be >= 1 for the demo recipe")
    train_cfg = PhantomConfig(n_studies=int(ph["train_studies"]), seed=int(ph["train_seed"]), size=int(ph["size"]))
    test_cfg = PhantomConfig(n_studies=int(ph["test_studies"]), seed=int(ph["test_seed"]), size=int(ph["size"]))
    return train_cfg, test_cfg


def phantom_config_to_dict(pc: PhantomConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(pc)))


def phantom_config_from_dict(d: dict[str, Any]) -> PhantomConfig:
    d = dict(d)
    for key in ("size_range", "modalities", "bits_stored"):
        if key in d and d[key] is not None:
            d[key] = tuple(d[key])
    return PhantomConfig(**d)


def phantom_fingerprint(folder: str | Path) -> str:
    """sha256 of what the model sees and is scored on: for each frontal chest in
    ``labels.csv`` order, its file name, labels and stored pixel bytes (UIDs excluded).

    Recorded in the demo bundle; a different value means :mod:`cxr_ai.phantoms` now draws
    other images for the same seed, and the bundle must be regenerated to be reproducible.
    """
    folder = Path(folder)
    labels = pd.read_csv(folder / "labels.csv")
    h = hashlib.sha256()
    for row in labels[labels["frontal_chest"] == 1].itertuples():
        h.update(f"{row.file}|{row.cardiomegaly}|{row.low_ef}|".encode())
        h.update(pydicom.dcmread(folder / row.file).PixelData)
    return h.hexdigest()


#: Held-out image thumbnails shipped in the bundle's docs (see :func:`phantom_thumbnails`).
THUMBNAILS_FILE = "held_out_thumbnails.npz"
#: Thumbnails are ``THUMBNAIL_GRID x THUMBNAIL_GRID`` block means of the stored pixel values.
THUMBNAIL_GRID = 16


def phantom_thumbnails(folder: str | Path, *, grid: int = THUMBNAIL_GRID) -> dict[str, np.ndarray]:
    """What the model is scored on, small enough to ship: for each frontal chest in
    ``labels.csv`` order, its file name, labels and the ``grid x grid`` block means of its
    stored pixel values (in stored units; the image is cropped to a multiple of ``grid``).

    Unlike :func:`phantom_fingerprint`, thumbnails compare with a tolerance: a pixel that moved
    by one stored unit moves its block mean by at most one unit, while a change of what the
    generator draws moves block means by far more.
    """
    folder = Path(folder)
    labels = pd.read_csv(folder / "labels.csv")
    frontal = labels[labels["frontal_chest"] == 1]
    thumbs = []
    for row in frontal.itertuples():
        px = pydicom.dcmread(folder / row.file).pixel_array.astype(np.float64)
        r, c = (px.shape[0] // grid) * grid, (px.shape[1] // grid) * grid
        thumbs.append(px[:r, :c].reshape(grid, r // grid, grid, c // grid).mean(axis=(1, 3)))
    return {
        "files": frontal["file"].to_numpy(str),
        "cardiomegaly": frontal["cardiomegaly"].to_numpy(np.int8),
        "low_ef": frontal["low_ef"].to_numpy(np.int8),
        "thumbnails": np.asarray(thumbs, np.float32).reshape(len(thumbs), grid, grid),
    }


def _generate(folder: Path, pc: PhantomConfig) -> None:
    import cxr_ai.phantoms
    import cxr_ai.portable_math

    marker = folder / "phantom_config.json"
    source = b"".join(Path(m.__file__).read_bytes() for m in (cxr_ai.phantoms, cxr_ai.portable_math))
    want = {"config": phantom_config_to_dict(pc), "generator_sha256": hashlib.sha256(source).hexdigest()}
    if marker.exists() and (folder / "labels.csv").exists() and json.loads(marker.read_text()) == want:
        logger.info("phantoms in %s are up to date", folder)
        return
    t0 = time.perf_counter()
    generate_studies(folder, pc)
    marker.write_text(json.dumps(want, indent=2), encoding="utf-8")
    logger.info("generated %d phantom studies in %s (%.0f s)", pc.n_studies, folder, time.perf_counter() - t0)


def run_demo(*, config: str | Path = DEFAULT_CONFIG, work: str | Path, out: str | Path | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Generate phantoms, train, export. Returns the training summary."""
    work = Path(work)
    overrides: dict[str, Any] = {"data": {"root": str(work / "train"), "test_root": str(work / "test"), "cache_dir": str(work / "cache")}}
    if epochs is not None:
        overrides["train"] = {"epochs": epochs}
    cfg = load_train_config(config, overrides=overrides)
    train_pc, test_pc = phantom_configs(cfg)
    _generate(work / "train", train_pc)
    _generate(work / "test", test_pc)
    extra = {
        "reproduce": {
            "recipe": "python -m training.demo --config training/configs/demo.toml",
            "held_out": {
                "generator": "cxr_ai.phantoms.generate_studies",
                "phantom_config": phantom_config_to_dict(test_pc),
                "fingerprint": phantom_fingerprint(work / "test"),
            },
            "training_pool": {"generator": "cxr_ai.phantoms.generate_studies", "phantom_config": phantom_config_to_dict(train_pc)},
        }
    }
    bundle_dir = Path(out) if out else default_bundle_path()
    summary = train(cfg, work / "run", export_dir=bundle_dir, extra=extra)
    np.savez_compressed(bundle_dir / "docs" / THUMBNAILS_FILE, **phantom_thumbnails(work / "test"))
    return summary


def rerecord_held_out(*, work: str | Path, bundle_dir: str | Path | None = None, note: str) -> dict[str, Any]:
    """Re-record a bundle's held-out evaluation after :mod:`cxr_ai.phantoms` changed only how it
    rounds (not what it draws): regenerate the held-out phantoms from the recorded config,
    evaluate the unchanged weights on them, and rewrite the held-out record (fingerprint,
    thumbnails, per-image predictions, test metrics, model card). ``note`` says why; it is kept
    in the record. Returns the new test metrics.
    """
    import torch

    from cxr_ai.models.bundle import METADATA_FILE, _model_card, load_bundle
    from cxr_ai.models.engine import InferenceEngine
    from training import data as D
    from training.evaluate import evaluate_bundle

    root = Path(bundle_dir) if bundle_dir else default_bundle_path()
    meta_path = root / METADATA_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cxr = meta["cxr_ai"]
    held_out = cxr["reproduce"]["held_out"]
    folder = Path(work) / "test"
    _generate(folder, phantom_config_from_dict(held_out["phantom_config"]))
    bundle = load_bundle(root)
    manifest = D.load_dicom_folder(folder)
    threads = torch.get_num_threads()
    try:
        seed = int(cxr["training"]["config"]["experiment"]["seed"])
        metrics, probs = evaluate_bundle(bundle, manifest, engine=InferenceEngine(bundle, device="cpu"), random_state=seed)
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads(json.dumps(metrics))
    held_out["fingerprint"] = phantom_fingerprint(folder)
    held_out.setdefault("rerecorded", []).append(note)
    cxr["test_metrics"] = metrics
    for key, m in metrics.items():
        if isinstance(m, dict) and "auroc" in m:
            meta.setdefault("eval_metrics", {})[f"test_{key}_auroc"] = m["auroc"]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    docs = root / "docs"
    metrics_path = docs / "metrics.json"
    recorded = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    recorded["test"] = metrics
    metrics_path.write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")
    preds = pd.DataFrame({"image_id": manifest["image_id"].astype(str),
                          **{f"p_{k}": probs[:, i] for i, k in enumerate(bundle.finding_keys)}})
    preds.to_csv(docs / "test_predictions.csv", index=False, float_format="%.7g")
    np.savez_compressed(docs / THUMBNAILS_FILE, **phantom_thumbnails(folder))
    (docs / "README.md").write_text(_model_card(meta), encoding="utf-8")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.demo", description="Regenerate the demo bundle from phantoms.")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--work", default="out/demo", help="phantoms, cache and run directory")
    ap.add_argument("--out", default=None, help="bundle directory (default: the shipped cxr_ai/bundles/demo-cxr-phantom)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--rerecord-held-out", metavar="NOTE", default=None,
                    help="do not train: re-record the bundle's held-out evaluation with the current "
                         "phantom generator (after a change of rounding only), keeping NOTE as the reason")
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rerecord_held_out:
        test = rerecord_held_out(work=args.work, bundle_dir=args.out, note=args.rerecord_held_out)
        logger.info("held-out record rewritten: AUROC %s", {k: round(m["auroc"], 4) for k, m in test.items() if isinstance(m, dict)})
        return 0
    t0 = time.perf_counter()
    summary = run_demo(config=args.config, work=args.work, out=args.out, epochs=args.epochs)
    test = {f: round(m["auroc"], 4) for f, m in summary["test"].items()}
    logger.info("demo bundle %s: held-out AUROC %s (%.0f s)", summary["bundle"], test, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
