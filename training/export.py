"""Export a trained model to a cxr-ai bundle.

``python -m training.export --run RUN_DIR --out BUNDLE_DIR`` re-exports the best model of a
finished training run (its ``checkpoint.pt`` and ``metrics.json``), e.g. under another name or
version. :func:`training.train.train` calls :func:`export_bundle` itself at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cxr_ai.dicom.codes import finding_code
from cxr_ai.imaging import PixelPipelineSpec
from cxr_ai.models.bundle import FindingSpec, save_bundle
from cxr_ai.models.networks import CxrNet, NetworkConfig, build_network

logger = logging.getLogger(__name__)

DISPLAY = {"cardiomegaly": "Cardiomegaly", "low_ef": "Low ejection fraction (LVEF <= 40%)"}
REFERENCES = [
    "Rajpurkar P. et al. CheXNet: Radiologist-Level Pneumonia Detection on Chest X-Rays with Deep Learning. arXiv:1711.05225 (2017) [cardiomegaly AUROC 0.9248 on ChestX-ray14].",
    "Bhave S. et al. Deep learning to detect left ventricular structural abnormalities in chest X-rays (CheXchoNet). Eur Heart J 45 (2024) [composite AUROC 0.80].",
]


def export_bundle(
    *,
    model: CxrNet,
    cfg: dict[str, Any],
    spec: PixelPipelineSpec,
    thresholds: dict[str, float],
    threshold_methods: dict[str, str],
    validation_metrics: dict[str, Any],
    test_metrics: dict[str, Any],
    training_data: dict[str, Any],
    history: list[dict[str, Any]],
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    test_predictions: str | Path | None = None,
) -> Path:
    """Write the bundle for a trained model (overwrites ``out_dir``)."""
    e = cfg["experiment"]
    findings = [
        FindingSpec(key=f, display=DISPLAY.get(f, finding_code(f).meaning), threshold=float(thresholds[f]), threshold_method=threshold_methods[f])
        for f in e["findings"]
    ]
    version = str(e["version"])
    description = e["description"] or (
        f"{model.config.architecture} ({model.config.head} head) predicting "
        + ", ".join(f.display for f in findings)
        + f" from frontal chest radiographs at {spec.size}x{spec.size}."
    )
    path = save_bundle(
        out_dir,
        model=model,
        name=str(e["name"]),
        version=version,
        findings=findings,
        pipeline=spec,
        description=description,
        intended_use=str(e["intended_use"]),
        not_for_clinical_use=bool(e["not_for_clinical_use"]),
        training_data=training_data,
        validation_metrics=validation_metrics,
        test_metrics=test_metrics,
        changelog={version: f"trained by training.train (best epoch {max((h['epoch'] for h in history if h.get('best')), default=-1)})"},
        data_source=str(e["data_source"] or cfg["data"]["source"]),
        references=list(e["references"]) or REFERENCES,
        extra={"training": {"config": _jsonable(cfg), "epochs_run": len(history)}, **(extra or {})},
        docs={"training_log.json": history, "metrics.json": {"validation": validation_metrics, "test": test_metrics}, "training_config.json": _jsonable(cfg)},
        overwrite=True,
    )
    if test_predictions is not None:
        preds = pd.read_csv(test_predictions, dtype={"image_id": str})
        keep = ["image_id"] + [c for c in preds.columns if c.startswith("p_")]
        preds[keep].to_csv(path / "docs" / "test_predictions.csv", index=False, float_format="%.7g")
    return path


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.export", description="Export a finished training run to a bundle.")
    ap.add_argument("--run", required=True, help="training output directory (checkpoint.pt, metrics.json)")
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--name", default=None)
    ap.add_argument("--version", default=None)
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run = Path(args.run)
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    cfg = json.loads(ck["config"])
    if args.name:
        cfg["experiment"]["name"] = args.name
    if args.version:
        cfg["experiment"]["version"] = args.version
    net = build_network(NetworkConfig.from_dict(json.loads(ck["network"])))
    net.load_state_dict(ck["best_state"])
    path = export_bundle(
        model=net.eval(),
        cfg=cfg,
        spec=PixelPipelineSpec(size=int(cfg["pipeline"]["size"])),
        thresholds=metrics["thresholds"],
        threshold_methods=metrics["threshold_methods"],
        validation_metrics=metrics["validation"],
        test_metrics=metrics["test"],
        training_data=metrics["training_data"],
        history=json.loads(ck["history"]),
        out_dir=args.out,
    )
    logger.info("exported %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
