"""Model bundles: weights plus the metadata that makes them self-describing.

Layout (the MONAI Bundle layout, so MONAI's own tools can read it, with cxr-ai's fields under
the ``"cxr_ai"`` key of the metadata)::

    <bundle>/
      configs/metadata.json   MONAI metadata (version, changelog, monai/pytorch/numpy versions,
                              task, description, authors, copyright, data source, classes,
                              network_data_format) + "cxr_ai": format_version, name, network,
                              findings (codes, thresholds and how they were chosen), pixel
                              pipeline, training data summary, metrics, intended use,
                              not_for_clinical_use, sha256 of the weights
      models/model.pt         the network's state_dict (loaded with weights_only=True)
      docs/README.md          model card
      docs/*.json             training log and metrics (optional)
      LICENSE

:func:`load_bundle` checks integrity (files present, checksum) and compatibility (format
version, pixel pipeline, architecture, findings, state dict) and raises
:class:`cxr_ai.errors.BundleError` with a message saying what is wrong, in which bundle, and
what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cxr_ai.dicom.codes import finding_code
from cxr_ai.errors import BundleError
from cxr_ai.imaging import PixelPipelineSpec
from cxr_ai.models.networks import ARCHITECTURES, CxrNet, NetworkConfig, build_network
from cxr_ai.results import ModelInfo

logger = logging.getLogger(__name__)

#: Version of the ``"cxr_ai"`` section layout. Bump when a reader of the old layout would
#: misread the new one.
FORMAT_VERSION = 1
METADATA_FILE = "configs/metadata.json"
WEIGHTS_FILE = "models/model.pt"
README_FILE = "docs/README.md"
LICENSE_FILE = "LICENSE"
#: Schema URL MONAI's ``verify_metadata`` downloads (fields required by it: MONAI_REQUIRED).
MONAI_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: Top-level fields MONAI's bundle metadata schema (meta_schema_20240725) requires.
MONAI_REQUIRED = (
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)

MSG_MISSING_DIR = "model bundle {path} does not exist; pass the directory of a cxr-ai model bundle (it holds configs/metadata.json and models/model.pt)."
MSG_NOT_DIR = "model bundle {path} is not a directory; pass the bundle directory, not one of its files."
MSG_NOT_BUNDLE = "{path} is not a model bundle: {missing} is missing. A bundle holds configs/metadata.json and models/model.pt; re-export it with training/export.py."
MSG_BAD_JSON = "model bundle {path}: configs/metadata.json is not valid JSON ({detail}); the file is damaged, re-copy or re-export the bundle."
MSG_NOT_MONAI = "model bundle {path}: configs/metadata.json lacks the MONAI fields {missing}; re-export the bundle with training/export.py."
MSG_NOT_CXR = "model bundle {path} is a MONAI bundle but not a cxr-ai one (no \"cxr_ai\" section in configs/metadata.json); export it with training/export.py."
MSG_FORMAT_VERSION = "model bundle {path} has format version {found}; this cxr-ai reads format version {supported}. Upgrade cxr-ai (newer bundle) or re-export the bundle (older bundle)."
MSG_MISSING_FIELD = "model bundle {path}: metadata field cxr_ai.{field} is missing or invalid ({detail}); re-export the bundle."
MSG_MISSING_WEIGHTS = "model bundle {path}: the weights file {file} is missing; re-copy the whole bundle directory."
MSG_CHECKSUM = "model bundle {path}: {file} is corrupted or was replaced (sha256 {found}, metadata says {expected}); re-copy the bundle or re-export it."
MSG_PIPELINE = "model bundle {path}: its pixel pipeline cannot be honoured by this cxr-ai: {detail}"
MSG_INPUT_SPEC = "model bundle {path}: network_data_format input {detail}; this cxr-ai feeds one-channel float32 [0, 1] images of size {size}x{size} (pixel pipeline). Re-export the bundle."
MSG_ARCH = "model bundle {path}: network architecture {arch!r} is unknown to this cxr-ai (known: {known}); upgrade cxr-ai."
MSG_NETWORK = "model bundle {path}: the network cannot be built from its config: {detail}"
MSG_FINDING = "model bundle {path}: finding {key!r} {detail}"
MSG_WEIGHTS_UNREADABLE = "model bundle {path}: {file} could not be read as a PyTorch state_dict ({detail}); re-export the bundle (weights must be a plain state_dict)."
MSG_STATE_DICT = "model bundle {path}: the weights do not fit the network described in its metadata ({detail}); the metadata and models/model.pt come from different models: re-export the bundle."


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_to_dict(code: Code) -> dict[str, str]:
    return {"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}


@dataclass(frozen=True)
class FindingSpec:
    """One output of a bundle: which finding, its code, and its operating point."""

    key: str
    display: str
    threshold: float
    threshold_method: str = "fixed 0.5"

    @property
    def code(self) -> Code:
        return finding_code(self.key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "display": self.display,
            "code": code_to_dict(self.code),
            "threshold": float(self.threshold),
            "threshold_method": self.threshold_method,
        }


@dataclass
class Bundle:
    """A loaded, verified bundle. ``model`` is the network in eval mode on the CPU."""

    path: Path
    metadata: dict[str, Any]
    network: NetworkConfig
    findings: list[FindingSpec]
    pipeline: PixelPipelineSpec
    model: CxrNet = field(repr=False)

    @property
    def cxr(self) -> dict[str, Any]:
        return self.metadata["cxr_ai"]

    @property
    def name(self) -> str:
        return str(self.cxr["name"])

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def not_for_clinical_use(self) -> bool:
        return bool(self.cxr.get("not_for_clinical_use", True))

    @property
    def finding_keys(self) -> list[str]:
        return [f.key for f in self.findings]

    def finding(self, key: str) -> FindingSpec:
        for f in self.findings:
            if f.key == key:
                return f
        raise KeyError(f"bundle {self.name} {self.version} has no finding {key!r} (has {self.finding_keys})")

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            device_uid=device_uid(self.name, self.version,
                                  weights_sha256=str(self.cxr.get("weights", {}).get("sha256", ""))),
            manufacturer=str(self.cxr.get("manufacturer", "cxr-ai")),
            not_for_clinical_use=self.not_for_clinical_use,
            intended_use=str(self.cxr.get("intended_use", "")),
        )


def device_uid(name: str, version: str, *, weights_sha256: str = "") -> str:
    """Stable DICOM UID of a trained model: name + version + the sha256 of its weights.

    It is the SR observer device UID, the Device UID of the Contributing Equipment of every
    result object and the FHIR Device identifier. The weights' checksum is part of it so that
    a retrained model is another device even if its version string was not bumped.
    """
    return generate_uid(entropy_srcs=["cxr-ai model", name, version, *([weights_sha256] if weights_sha256 else [])])


# --- saving -----------------------------------------------------------------------------------


def save_bundle(
    out_dir: str | os.PathLike,
    *,
    model: CxrNet,
    name: str,
    version: str,
    findings: list[FindingSpec],
    pipeline: PixelPipelineSpec,
    description: str,
    intended_use: str,
    not_for_clinical_use: bool = True,
    training_data: dict[str, Any] | None = None,
    validation_metrics: dict[str, Any] | None = None,
    test_metrics: dict[str, Any] | None = None,
    changelog: dict[str, str] | None = None,
    authors: str = "cxr-ai contributors",
    copyright: str = "Copyright (c) cxr-ai contributors",
    license_text: str | None = None,
    data_source: str = "",
    references: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    docs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory and return its path.

    ``docs`` maps file names under ``docs/`` to JSON-serialisable objects (training log,
    metrics). ``extra`` adds keys to the ``"cxr_ai"`` section (e.g. how to reproduce it).
    """
    out = _new_bundle_dir(Path(out_dir), model=model, findings=findings, pipeline=pipeline, overwrite=overwrite)
    weights = out / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    metrics_flat = _flat_aurocs(validation_metrics, test_metrics)
    import monai

    meta: dict[str, Any] = {
        "schema": MONAI_SCHEMA_URL,
        "version": version,
        "changelog": changelog or {version: "exported by cxr-ai"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"cxr-ai": _cxr_version()},
        "name": name,
        "task": "Multi-label classification of frontal chest radiographs: "
        + ", ".join(f.display for f in findings),
        "description": description,
        "authors": authors,
        "copyright": copyright,
        "data_source": data_source,
        "data_type": "dicom",
        "image_classes": "single-channel frontal chest radiograph, intensities in [0, 1] after the cxr-ai pixel pipeline",
        "label_classes": "; ".join(
            f"{f.key}: {f.display} (SCT/LN code {f.code.value} {f.code.scheme_designator})" for f in findings
        ),
        "pred_classes": "; ".join(f"channel {i}: logit of {f.display}" for i, f in enumerate(findings)),
        "eval_metrics": metrics_flat,
        "intended_use": intended_use,
        "references": references or [],
        "network_data_format": _network_data_format(findings, pipeline, embedding_dim=int(model.embedding_dim)),
        "cxr_ai": _cxr_ai_section(model=model, name=name, findings=findings, pipeline=pipeline,
                                  training_data=training_data, validation_metrics=validation_metrics,
                                  test_metrics=test_metrics, intended_use=intended_use,
                                  not_for_clinical_use=not_for_clinical_use, weights=weights, extra=extra),
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    for fname, obj in (docs or {}).items():
        (out / "docs" / fname).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    (out / README_FILE).write_text(_model_card(meta), encoding="utf-8")
    (out / LICENSE_FILE).write_text(license_text or _DEFAULT_LICENSE, encoding="utf-8")
    logger.info("exported bundle %s %s to %s", name, version, out)
    return out


def _new_bundle_dir(out: Path, *, model: CxrNet, findings: list[FindingSpec], pipeline: PixelPipelineSpec,
                    overwrite: bool) -> Path:
    """Check that the findings and the pixel pipeline fit the network, then make the empty
    bundle folders (replacing an existing bundle only with ``overwrite``)."""
    if out.exists():
        if not overwrite:
            raise BundleError(f"model bundle {out} already exists; pass overwrite=True or choose a new directory")
        shutil.rmtree(out)
    cfg = model.config
    if len(findings) != cfg.num_outputs:
        raise ValueError(f"{len(findings)} findings given for a network with {cfg.num_outputs} outputs")
    if cfg.input_size != pipeline.size:
        raise ValueError(f"network input size {cfg.input_size} differs from pixel pipeline size {pipeline.size}")
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    (out / "docs").mkdir()
    return out


def _flat_aurocs(validation_metrics: dict[str, Any] | None, test_metrics: dict[str, Any] | None) -> dict[str, float]:
    """MONAI's ``eval_metrics``: ``{split}_{finding}_auroc`` for every finding with an AUROC."""
    metrics_flat: dict[str, float] = {}
    for split, metrics in (("val", validation_metrics or {}), ("test", test_metrics or {})):
        for key, m in metrics.items():
            if isinstance(m, dict) and "auroc" in m:
                metrics_flat[f"{split}_{key}_auroc"] = float(m["auroc"])
    return metrics_flat


def _network_data_format(findings: list[FindingSpec], pipeline: PixelPipelineSpec, *,
                         embedding_dim: int) -> dict[str, Any]:
    """MONAI's ``network_data_format``: the image in, the logits and the embedding out."""
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "CR/DX",
                "num_channels": 1,
                "spatial_shape": [pipeline.size, pipeline.size],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "logits",
                "format": "multilabel",
                "num_channels": len(findings),
                "spatial_shape": [1],
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": {str(i): f.key for i, f in enumerate(findings)},
            },
            "embedding": {
                "type": "vector",
                "format": "embedding",
                "num_channels": embedding_dim,
                "spatial_shape": [1],
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
            },
        },
    }


def _cxr_ai_section(*, model: CxrNet, name: str, findings: list[FindingSpec], pipeline: PixelPipelineSpec,
                    training_data: dict[str, Any] | None, validation_metrics: dict[str, Any] | None,
                    test_metrics: dict[str, Any] | None, intended_use: str, not_for_clinical_use: bool,
                    weights: Path, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The ``"cxr_ai"`` section: what cxr-ai needs to load and run the bundle, and its provenance."""
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "manufacturer": "cxr-ai",
        "network": model.config.to_dict(),
        "findings": [f.to_dict() for f in findings],
        "pixel_pipeline": pipeline.to_dict(),
        "training_data": training_data or {},
        "validation_metrics": validation_metrics or {},
        "test_metrics": test_metrics or {},
        "intended_use": intended_use,
        "not_for_clinical_use": bool(not_for_clinical_use),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights)},
        "exported_with": {"python": platform.python_version(), "cxr_ai": _cxr_version()},
        **(extra or {}),
    }


def _cxr_version() -> str:
    from cxr_ai import __version__

    return __version__


_DEFAULT_LICENSE = """Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0)

The weights in models/model.pt are released under the same licence as cxr-ai. A model
marked "not for clinical use" in configs/metadata.json must not be used to make clinical
decisions.
"""


def _model_card(meta: dict[str, Any]) -> str:
    c = meta["cxr_ai"]
    lines = [
        f"# {c['name']} {meta['version']}",
        "",
        "**NOT FOR CLINICAL USE.**" if c["not_for_clinical_use"] else "",
        "",
        meta["description"],
        "",
        "## Intended use",
        "",
        c["intended_use"],
        "",
        "## Findings",
        "",
        "| key | finding | code | threshold | how chosen |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in c["findings"]:
        code = f["code"]
        lines.append(
            f"| {f['key']} | {f['display']} | {code['scheme']} {code['value']} {code['meaning']} | "
            f"{f['threshold']:.4f} | {f['threshold_method']} |"
        )
    net = c["network"]
    pp = c["pixel_pipeline"]
    lines += [
        "",
        "## Network and input",
        "",
        f"{net['architecture']} ({net['head']} head), input 1 x {pp['size']} x {pp['size']} float32 in [0, 1] "
        f"from the cxr-ai pixel pipeline v{pp['version']} (modality LUT, VOI window, MONOCHROME1 inversion, "
        f"percentile normalisation {pp['norm_percentiles']}, letterbox).",
        "",
        "## Metrics",
        "",
    ]
    for split, key in (("validation", "validation_metrics"), ("held-out test", "test_metrics")):
        for fk, m in c.get(key, {}).items():
            if isinstance(m, dict) and "auroc" in m:
                ci = m.get("auroc_ci95")
                ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
                lines.append(f"- {split} {fk}: AUROC {m['auroc']:.4f}{ci_text}, n={m.get('n', '?')}, prevalence {m.get('prevalence', float('nan')):.3f}")
    td = c.get("training_data") or {}
    if td:
        lines += ["", "## Training data", "", "```json", json.dumps(td, indent=2), "```"]
    lines += ["", f"Weights sha256: `{c['weights']['sha256']}`", ""]
    return "\n".join(lines)


# --- loading ----------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally check a bundle's metadata (no weights loaded)."""
    root = Path(path)
    if not root.exists():
        raise BundleError(MSG_MISSING_DIR.format(path=root))
    if not root.is_dir():
        raise BundleError(MSG_NOT_DIR.format(path=root))
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise BundleError(MSG_NOT_BUNDLE.format(path=root, missing=METADATA_FILE))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(MSG_BAD_JSON.format(path=root, detail=exc)) from exc
    if not isinstance(meta, dict):
        raise BundleError(MSG_BAD_JSON.format(path=root, detail="top level is not an object"))
    missing = [k for k in MONAI_REQUIRED if k not in meta]
    if missing:
        raise BundleError(MSG_NOT_MONAI.format(path=root, missing=missing))
    cxr = meta.get("cxr_ai")
    if not isinstance(cxr, dict):
        raise BundleError(MSG_NOT_CXR.format(path=root))
    found = cxr.get("format_version")
    if found != FORMAT_VERSION:
        raise BundleError(MSG_FORMAT_VERSION.format(path=root, found=found, supported=FORMAT_VERSION))
    for key in ("name", "network", "findings", "pixel_pipeline", "weights"):
        if key not in cxr:
            raise BundleError(MSG_MISSING_FIELD.format(path=root, field=key, detail="missing"))
    return meta


def load_bundle(path: str | os.PathLike, *, verify_checksum: bool = True) -> Bundle:
    """Load and verify a bundle; the model is returned in eval mode on the CPU.

    Raises
    ------
    BundleError
        Missing directory or file, not a bundle, wrong format version, checksum mismatch,
        input spec the pixel pipeline cannot honour, unknown architecture or finding, or
        weights that do not fit the network.
    """
    root = Path(path)
    meta = read_metadata(root)
    cxr = meta["cxr_ai"]

    try:
        pipeline = PixelPipelineSpec.from_dict(cxr["pixel_pipeline"])
    except (ValueError, TypeError) as exc:
        raise BundleError(MSG_PIPELINE.format(path=root, detail=exc)) from exc
    _check_input_spec(root, meta, pipeline)

    net_cfg = dict(cxr["network"]) if isinstance(cxr["network"], dict) else {}
    arch = net_cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise BundleError(MSG_ARCH.format(path=root, arch=arch, known=", ".join(ARCHITECTURES)))
    try:
        network = NetworkConfig.from_dict(net_cfg)
    except (ValueError, TypeError) as exc:
        raise BundleError(MSG_NETWORK.format(path=root, detail=exc)) from exc
    if network.input_size != pipeline.size:
        raise BundleError(
            MSG_INPUT_SPEC.format(path=root, detail=f"network input size {network.input_size} differs from pixel pipeline size", size=pipeline.size)
        )

    findings = _read_findings(root, cxr["findings"])
    if len(findings) != network.num_outputs:
        raise BundleError(
            MSG_MISSING_FIELD.format(path=root, field="findings", detail=f"{len(findings)} findings for {network.num_outputs} network outputs")
        )

    weights_meta = cxr["weights"] if isinstance(cxr["weights"], dict) else {}
    wfile = str(weights_meta.get("file", WEIGHTS_FILE))
    wpath = root / wfile
    if not wpath.is_file():
        raise BundleError(MSG_MISSING_WEIGHTS.format(path=root, file=wfile))
    expected = weights_meta.get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise BundleError(MSG_MISSING_FIELD.format(path=root, field="weights.sha256", detail="no sha256 recorded"))
    if verify_checksum:
        found = sha256_file(wpath)
        if found != expected:
            raise BundleError(MSG_CHECKSUM.format(path=root, file=wfile, found=found[:16] + "...", expected=expected[:16] + "..."))

    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise BundleError(MSG_WEIGHTS_UNREADABLE.format(path=root, file=wfile, detail=_short(exc))) from exc
    if not isinstance(state, dict):
        raise BundleError(MSG_WEIGHTS_UNREADABLE.format(path=root, file=wfile, detail=f"found {type(state).__name__}"))
    try:
        model = build_network(network)
    except ValueError as exc:
        raise BundleError(MSG_NETWORK.format(path=root, detail=exc)) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(MSG_STATE_DICT.format(path=root, detail=_short(exc, 300))) from exc
    model.eval()
    logger.info("loaded model bundle %s %s from %s", cxr["name"], meta["version"], root)
    return Bundle(path=root, metadata=meta, network=network, findings=findings, pipeline=pipeline, model=model)


def _check_input_spec(root: Path, meta: dict[str, Any], pipeline: PixelPipelineSpec) -> None:
    try:
        spec = meta["network_data_format"]["inputs"]["image"]
    except (KeyError, TypeError):
        raise BundleError(MSG_INPUT_SPEC.format(path=root, detail="'image' is not described", size=pipeline.size)) from None
    problems = []
    if spec.get("num_channels") != 1:
        problems.append(f"num_channels is {spec.get('num_channels')!r}, not 1")
    if list(spec.get("spatial_shape", [])) != [pipeline.size, pipeline.size]:
        problems.append(f"spatial_shape is {spec.get('spatial_shape')!r}, not [{pipeline.size}, {pipeline.size}]")
    if str(spec.get("dtype")) != "float32":
        problems.append(f"dtype is {spec.get('dtype')!r}, not 'float32'")
    if [float(v) for v in spec.get("value_range", [])] != [0.0, 1.0]:
        problems.append(f"value_range is {spec.get('value_range')!r}, not [0, 1]")
    if spec.get("is_patch_data", False):
        problems.append("is_patch_data is true (the pipeline feeds whole images)")
    if problems:
        raise BundleError(MSG_INPUT_SPEC.format(path=root, detail="; ".join(problems), size=pipeline.size))


def _read_findings(root: Path, raw: Any) -> list[FindingSpec]:
    if not isinstance(raw, list) or not raw:
        raise BundleError(MSG_MISSING_FIELD.format(path=root, field="findings", detail="empty or not a list"))
    out = []
    for item in raw:
        key = item.get("key") if isinstance(item, dict) else None
        try:
            code = finding_code(str(key))
        except KeyError as exc:
            raise BundleError(MSG_FINDING.format(path=root, key=key, detail=f"is unknown to this cxr-ai ({exc.args[0]})")) from None
        got = item.get("code") or {}
        if (got.get("value"), got.get("scheme")) != (code.value, code.scheme_designator):
            raise BundleError(
                MSG_FINDING.format(
                    path=root,
                    key=key,
                    detail=f"is coded {got.get('scheme')} {got.get('value')} in the bundle but "
                    f"{code.scheme_designator} {code.value} by this cxr-ai; re-export the bundle with this cxr-ai's codes",
                )
            )
        try:
            threshold = float(item["threshold"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(MSG_FINDING.format(path=root, key=key, detail="has no numeric threshold")) from None
        if not 0.0 <= threshold <= 1.0:
            raise BundleError(MSG_FINDING.format(path=root, key=key, detail=f"has threshold {threshold} outside [0, 1]"))
        out.append(
            FindingSpec(
                key=str(key),
                display=str(item.get("display") or code.meaning),
                threshold=threshold,
                threshold_method=str(item.get("threshold_method", "unknown")),
            )
        )
    return out


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
