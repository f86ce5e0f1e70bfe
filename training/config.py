"""Training configuration: TOML files in ``training/configs/`` over these defaults.

Unknown keys are errors (a typo must not silently train with a default). Relative paths in
``[data]`` are resolved against the config file's folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cxr_ai.config import merge_settings, read_toml
from cxr_ai.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "experiment": {
        "name": "cxr-model",
        "version": "0.1.0",
        "seed": 0,
        "findings": ["cardiomegaly", "low_ef"],
        "description": "",
        "intended_use": "Research use: triage support for frontal chest radiographs.",
        "not_for_clinical_use": True,
        "data_source": "",
        "references": [],
        # copy held-out predictions (image_id + probabilities, no patient ids) into the
        # bundle's docs/ so that re-evaluation can be checked image by image (synthetic data)
        "ship_test_predictions": False,
    },
    "data": {
        # dicom | nih | chexpert | mimic | manifest (a CSV/parquet in the manifest format)
        "source": "dicom",
        "root": "",
        "labels_csv": "labels.csv",
        "csv": "",  # nih: Data_Entry_2017.csv, chexpert: train.csv, manifest: the file
        "uncertainty": "",  # chexpert / mimic: u_ones | u_zeros | ignore (required there)
        "patients_csv": "",
        "admissions_csv": "",
        "low_ef_csv": "",
        # a held-out test set in the same format (else a patient-level share of root)
        "test_root": "",
        # synthetic (phantom) images mixed into the training split only
        "synthetic_root": "",
        "synthetic_fraction": 0.0,
        "cache_dir": "",  # default: <out>/cache
        "preload": True,  # hold the preprocessed training images in memory
    },
    "pipeline": {"size": 224},
    "model": {
        "architecture": "densenet121",
        "head": "avg",
        "hidden": 0,
        "dropout": 0.0,
        "imagenet_weights": "",
        "kwargs": {},
    },
    "split": {"val_fraction": 0.15, "test_fraction": 0.15, "stratify": ["cardiomegaly", "low_ef"]},
    "train": {
        "epochs": 30,
        "min_epochs": 1,
        "batch_size": 32,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "scheduler": "cosine",  # cosine | none
        # pos_weight: BCE weighted by negatives/positives per finding;
        # ratio: sample so that negatives:positives of the first finding is `ratio`:1;
        # none: plain BCE
        "balance": "pos_weight",
        "ratio": 3.0,
        "patience": 6,  # early stopping on the mean validation AUROC
        "augment": True,
        "augment_strength": 1.0,
        "amp": True,  # CUDA only
        "channels_last": True,  # CUDA only
        "device": "auto",
        "num_threads": 0,
        "num_workers": 0,
        "resume": True,
        "log_every": 0,
    },
    "thresholds": {"method": "youden", "target_sensitivity": 0.9},
    # Only for recipes that generate their data (training.demo): cxr_ai.phantoms settings.
    "phantoms": {"train_studies": 0, "test_studies": 0, "train_seed": 0, "test_seed": 1, "size": 256},
}


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> None:
    # network kwargs are free-form (they go to the MONAI constructor as they are)
    merge_settings(base, update, where=where, noun="training setting", open_tables=frozenset({"kwargs"}))


def load_train_config(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, overlaid by the TOML file, then by ``overrides`` (same nesting)."""
    cfg = copy.deepcopy(DEFAULTS)
    base_dir = Path.cwd()
    if path is not None:
        user = read_toml(path, what="training config", hint="see training/configs/ for examples")
        _merge(cfg, user, str(path))
        base_dir = Path(path).resolve().parent
    if overrides:
        _merge(cfg, overrides, "overrides")
    for key in ("root", "test_root", "synthetic_root", "patients_csv", "admissions_csv", "low_ef_csv", "cache_dir"):
        v = cfg["data"][key]
        if v and not Path(v).is_absolute():
            cfg["data"][key] = str((base_dir / v).resolve())
    w = cfg["model"]["imagenet_weights"]
    if w and not Path(w).is_absolute():
        cfg["model"]["imagenet_weights"] = str((base_dir / w).resolve())
    validate(cfg)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    d, t = cfg["data"], cfg["train"]
    if d["source"] not in ("dicom", "nih", "chexpert", "mimic", "manifest"):
        raise ConfigError(f"[data] source {d['source']!r} is not one of dicom, nih, chexpert, mimic, manifest")
    if d["source"] in ("chexpert", "mimic") and d["uncertainty"] not in ("u_ones", "u_zeros", "ignore"):
        raise ConfigError(f"[data] source {d['source']} needs an explicit uncertainty policy (u_ones, u_zeros or ignore), got {d['uncertainty']!r}")
    if not 0.0 <= float(d["synthetic_fraction"]) < 1.0:
        raise ConfigError(f"[data] synthetic_fraction must be in [0, 1), got {d['synthetic_fraction']}")
    if float(d["synthetic_fraction"]) > 0 and not d["synthetic_root"]:
        raise ConfigError("[data] synthetic_fraction > 0 needs synthetic_root (a phantom folder)")
    if t["balance"] not in ("pos_weight", "ratio", "none"):
        raise ConfigError(f"[train] balance {t['balance']!r} is not one of pos_weight, ratio, none")
    if cfg["thresholds"]["method"] not in ("youden", "sensitivity"):
        raise ConfigError(f"[thresholds] method {cfg['thresholds']['method']!r} is not one of youden, sensitivity")
    if not cfg["experiment"]["findings"]:
        raise ConfigError("[experiment] findings must name at least one finding")
