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
   that the shipped bundle reproduces them.
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


def _generate(folder: Path, pc: PhantomConfig) -> None:
    import cxr_ai.phantoms

    marker = folder / "phantom_config.json"
    source = Path(cxr_ai.phantoms.__file__).read_bytes()
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
    return train(cfg, work / "run", export_dir=Path(out) if out else default_bundle_path(), extra=extra)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.demo", description="Regenerate the demo bundle from phantoms.")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--work", default="out/demo", help="phantoms, cache and run directory")
    ap.add_argument("--out", default=None, help="bundle directory (default: the shipped cxr_ai/bundles/demo-cxr-phantom)")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    summary = run_demo(config=args.config, work=args.work, out=args.out, epochs=args.epochs)
    test = {f: round(m["auroc"], 4) for f, m in summary["test"].items()}
    logger.info("demo bundle %s: held-out AUROC %s (%.0f s)", summary["bundle"], test, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
