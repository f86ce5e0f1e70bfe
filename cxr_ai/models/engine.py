"""Inference engine: a bundle loaded once, batched prediction, Grad-CAM per finding.

Device policy
-------------
``device="auto"`` picks CUDA when ``torch.cuda.is_available()``, else the CPU.

- **CUDA**: mixed precision (``torch.autocast``, bfloat16 where the GPU supports it, else
  float16), channels-last memory format for the weights and every input batch.
- **CPU**: float32; ``torch.set_num_threads`` is set deliberately (``num_threads``; 0 = the
  cores this process may run on, ``os.sched_getaffinity``), because PyTorch's default may count
  cores the process cannot use or that other services need. Set it lower to leave cores to
  the DICOM listener. Note that the thread count is process-wide in PyTorch.

Prediction runs under ``torch.inference_mode``.

Explanations
------------
``gradcam`` (default) comes from the inference forward itself: the forward keeps the final
feature map and :meth:`cxr_ai.models.networks.CxrNet.explanation_maps` turns it into one map
per finding, Grad-CAM in closed form for pooled heads (equal to MONAI's
:class:`monai.visualize.GradCAM` at ``feature_map``, which the tests check on every
architecture) and the exact contribution map for the attention head. No second forward, no
copy of the network: the maps cost a small fraction of the forward. Each map is upsampled to
the model input (bilinear, as MONAI's CAM does), scaled to [0, 1] per image and finding, and
mapped back to the source geometry with :meth:`cxr_ai.imaging.Letterbox.to_source` (all
findings of an image in one resampling).

``smoothgrad`` (:class:`monai.visualize.SmoothGrad`, opt-in) and ``monai-gradcam`` (MONAI's
``GradCAM`` hooked onto ``feature_map``, one forward and backward per finding: the reference
the closed form is tested against) need gradients through the whole network, so they run on
a private float32 copy of it and cost several forwards per image.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_ai.dicom.reader import Radiograph
from cxr_ai.imaging import Preprocessed, preprocess
from cxr_ai.models.bundle import Bundle, load_bundle
from cxr_ai.models.networks import GRADCAM_LAYER, LogitsOnly
from cxr_ai.results import FindingResult, ModelInfo

logger = logging.getLogger(__name__)

#: Directory name of the shipped demo bundle under ``cxr_ai/bundles``.
DEMO_BUNDLE_NAME = "demo-cxr-phantom"
EXPLAIN_METHODS = ("gradcam", "smoothgrad", "monai-gradcam")

MSG_BAD_INPUT = (
    "engine input has shape {shape} and dtype {dtype}; expected float32 images shaped "
    "(B, 1, {size}, {size}) from the bundle's pixel pipeline (cxr_ai.imaging.preprocess)."
)
MSG_NO_CUDA = "device {device!r} was requested but CUDA is not available on this machine; use device='auto' or 'cpu'."
MSG_BAD_METHOD = "explain method {method!r} is not supported; use one of {known}."
MSG_NO_DEMO = (
    "the shipped demo model bundle is missing from {path}; reinstall cxr-ai, or regenerate it "
    "with `python -m training.demo`, or set [models] bundle to a bundle directory."
)


def default_bundle_path() -> Path:
    """Directory of the demo bundle shipped inside the package (``cxr_ai/bundles/...``)."""
    return Path(str(resources.files("cxr_ai").joinpath("bundles", DEMO_BUNDLE_NAME)))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from cxr_ai.errors import ConfigError

        raise ConfigError(MSG_NO_CUDA.format(device=str(device)))
    return dev


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Prediction:
    """Batched model outputs: probabilities (B, F) and embeddings (B, D), float32.

    ``saliency`` (with ``explain``): one map per finding in the model-input geometry,
    (B, F, S, S) float32 in [0, 1], from the same forward.
    """

    probabilities: np.ndarray
    embeddings: np.ndarray
    finding_keys: list[str]
    saliency: np.ndarray | None = field(default=None, repr=False)


@dataclass
class ModelOutput:
    """One image's model outputs, ready for :class:`cxr_ai.results.ImageResult`."""

    findings: list[FindingResult]
    embedding: np.ndarray = field(repr=False)
    model: ModelInfo
    notes: list[str] = field(default_factory=list)
    #: One map per finding in the model-input geometry, (F, S, S) float32 in [0, 1], when
    #: explanations were asked for (``source_maps=False`` leaves the findings' heatmaps to
    #: :func:`source_heatmaps`).
    saliency: np.ndarray | None = field(default=None, repr=False)


def source_heatmaps(saliency: np.ndarray, letterbox: Any) -> list[np.ndarray]:
    """Model-geometry maps (F, S, S) -> one float32 map in [0, 1] per finding, in the source
    geometry (:meth:`cxr_ai.imaging.Letterbox.to_source`, every finding in one resampling)."""
    maps = letterbox.to_source(np.asarray(saliency, dtype=np.float32))
    maps = maps.reshape(-1, *maps.shape[-2:])
    np.clip(maps, 0.0, 1.0, out=maps)
    return [maps[k] for k in range(maps.shape[0])]


def saliency_maps(net: torch.nn.Module, out: dict[str, torch.Tensor], *, size: int) -> torch.Tensor:
    """A forward's maps (:meth:`~cxr_ai.models.networks.CxrNet.explanation_maps`, (B, F, h, w))
    as heatmaps (B, F, size, size) in [0, 1], float32, on the forward's device.

    Upsampled as MONAI's CAM upsamples (bilinear, ``align_corners=False``), then scaled to
    [0, 1] per image and finding (:func:`_normalise01`), outside autocast: for pooled heads
    this is MONAI's ``GradCAM(..., postprocessing=_normalise01)`` of each finding.
    """
    raw = out["feature_map"]
    with torch.autocast(raw.device.type, enabled=False):
        raw = net.explanation_maps(out)
        b, f = raw.shape[:2]
        up = torch.nn.functional.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
        return _normalise01(up.reshape(b * f, 1, size, size)).reshape(b, f, size, size)


def _normalise01(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling to [0, 1] (0 everywhere for a flat map).

    MONAI's default CAM post-processing maps (min, max) to (1, 0) — inverted — so a heatmap
    meant for people needs this instead.
    """
    flat = x.detach().float().flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return out.reshape(x.shape)


class InferenceEngine:
    """Loads a bundle's network once and runs it in batches.

    Parameters
    ----------
    bundle
        A loaded bundle (:func:`cxr_ai.models.bundle.load_bundle`).
    device
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    num_threads
        CPU intra-op threads (0 = the cores this process may use). Ignored on CUDA.
    batch_size
        Images per forward pass.
    amp
        Mixed precision on CUDA (bfloat16 where supported, else float16). Never on CPU.
    channels_last
        Channels-last memory format on CUDA.
    explain_method
        ``"gradcam"`` (default) or ``"smoothgrad"``.
    smoothgrad_samples, smoothgrad_noise
        SmoothGrad's number of noisy copies and noise level (fraction of the input range).
    seed
        Seed for SmoothGrad's noise, so explanations are reproducible.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str | torch.device = "auto",
        num_threads: int = 0,
        batch_size: int = 8,
        amp: bool = True,
        channels_last: bool = True,
        explain_method: str = "gradcam",
        smoothgrad_samples: int = 8,
        smoothgrad_noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        if explain_method not in EXPLAIN_METHODS:
            raise ValueError(MSG_BAD_METHOD.format(method=explain_method, known=EXPLAIN_METHODS))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.explain_method = explain_method
        self.smoothgrad_samples = int(smoothgrad_samples)
        self.smoothgrad_noise = float(smoothgrad_noise)
        self.seed = int(seed)
        self.size = bundle.pipeline.size
        self.model_info = bundle.model_info()
        self.finding_keys = bundle.finding_keys
        if self.device.type == "cuda":
            self.channels_last = bool(channels_last)
            self.amp_dtype: torch.dtype | None = None
            if amp:
                self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.num_threads = torch.get_num_threads()
        else:
            self.channels_last = False
            self.amp_dtype = None
            self.num_threads = int(num_threads) if num_threads and num_threads > 0 else available_cores()
            if torch.get_num_threads() != self.num_threads:
                torch.set_num_threads(self.num_threads)
        self.model = bundle.model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._cam_model: torch.nn.Module | None = None
        self._gradcam: Any = None
        # MONAI's CAM keeps activations/gradients on the wrapper: one explanation at a time
        self._explain_lock = threading.Lock()
        logger.info(
            "inference engine: %s on %s (amp=%s, channels_last=%s, threads=%d, batch=%d)",
            self.model_info.label,
            self.device,
            self.amp_dtype,
            self.channels_last,
            self.num_threads,
            self.batch_size,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, *, bundle: Bundle | None = None) -> "InferenceEngine":
        """Build from the ``[models]`` section of the cxr-ai config (or the whole config)."""
        section = _models_section(config)
        if bundle is None:
            path = section.get("bundle") or default_bundle_path()
            bundle = load_bundle(path)
        return cls(
            bundle,
            device=section.get("device", "auto"),
            num_threads=int(section.get("num_threads", 0)),
            batch_size=int(section.get("batch_size", 8)),
            amp=bool(section.get("amp", True)),
            channels_last=bool(section.get("channels_last", True)),
            explain_method=str(section.get("explain_method", "gradcam")),
            smoothgrad_samples=int(section.get("smoothgrad_samples", 8)),
            smoothgrad_noise=float(section.get("smoothgrad_noise", 0.1)),
        )

    # --- tensors ------------------------------------------------------------------------------

    def _check(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (1, self.size, self.size) or arr.dtype != np.float32:
            raise ValueError(MSG_BAD_INPUT.format(shape=np.shape(images), dtype=np.asarray(images).dtype, size=self.size))
        return arr

    def _to_device(self, chunk: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(chunk))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def predict(self, images: np.ndarray, *, explain: bool = False) -> Prediction:
        """Probabilities and embeddings for ``images`` shaped (B, 1, S, S), float32.

        With ``explain``, also the closed-form Grad-CAM (or attention contribution) map of each
        finding from the same forward (:attr:`Prediction.saliency`).
        """
        arr = self._check(images)
        probs, embs, maps = [], [], []
        with torch.inference_mode():
            for start in range(0, arr.shape[0], self.batch_size):
                with self._autocast():
                    out = self.model(self._to_device(arr[start : start + self.batch_size]))
                probs.append(out["logits"].float().sigmoid().cpu())
                embs.append(out["embedding"].float().cpu())
                if explain:
                    maps.append(self._saliency(out).cpu())
        n_f = len(self.finding_keys)
        if not probs:
            empty = np.zeros((0, n_f, self.size, self.size), np.float32) if explain else None
            return Prediction(np.zeros((0, n_f), np.float32), np.zeros((0, self.model.embedding_dim), np.float32),
                              list(self.finding_keys), saliency=empty)
        return Prediction(
            probabilities=torch.cat(probs).numpy(),
            embeddings=torch.cat(embs).numpy(),
            finding_keys=list(self.finding_keys),
            saliency=torch.cat(maps).numpy() if explain else None,
        )

    def _saliency(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return saliency_maps(self.model, out, size=self.size)

    # --- explanations -------------------------------------------------------------------------

    def _explainer_model(self) -> torch.nn.Module:
        if self._cam_model is None:
            net = copy.deepcopy(self.bundle.model).float().to(self.device).eval()
            for p in net.parameters():
                p.requires_grad_(False)
            self._cam_model = LogitsOnly(net).eval()
        return self._cam_model

    def explain(self, images: np.ndarray, *, method: str | None = None) -> np.ndarray:
        """Heatmaps (B, F, S, S) in [0, 1] in model-input geometry, one per finding.

        ``gradcam`` runs one forward (:meth:`predict` with ``explain``); a caller that also
        wants the probabilities should call that instead. ``smoothgrad`` and
        ``monai-gradcam`` are thread-safe but serialised (MONAI's hooks hold per-call
        state); :meth:`predict` runs concurrently from several threads.
        """
        method = method or self.explain_method
        if method not in EXPLAIN_METHODS:
            raise ValueError(MSG_BAD_METHOD.format(method=method, known=EXPLAIN_METHODS))
        if method == "gradcam":
            saliency = self.predict(images, explain=True).saliency
            assert saliency is not None
            return saliency
        from monai.visualize import GradCAM, SmoothGrad

        arr = self._check(images)
        wrapped = self._explainer_model()
        n_f = len(self.finding_keys)
        out = np.zeros((arr.shape[0], n_f, self.size, self.size), dtype=np.float32)
        # gradients are needed even when the caller runs under torch.inference_mode()
        with self._explain_lock, torch.inference_mode(False), torch.enable_grad():
            if method == "monai-gradcam":
                if self._gradcam is None:
                    self._gradcam = GradCAM(nn_module=wrapped, target_layers=GRADCAM_LAYER, postprocessing=_normalise01)
                for start in range(0, arr.shape[0], self.batch_size):
                    x = torch.from_numpy(np.ascontiguousarray(arr[start : start + self.batch_size])).to(self.device)
                    x.requires_grad_(True)  # gradients must flow although the weights are frozen
                    for k in range(n_f):
                        cam = self._gradcam(x, class_idx=k)
                        out[start : start + x.shape[0], k] = cam[:, 0].detach().cpu().numpy()
            else:
                sg = SmoothGrad(wrapped, stdev_spread=self.smoothgrad_noise, n_samples=self.smoothgrad_samples, magnitude=True, verbose=False)
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed)
                    for i in range(arr.shape[0]):
                        x = torch.from_numpy(arr[i : i + 1].copy()).to(self.device)
                        for k in range(n_f):
                            sal = sg(x, index=k)
                            out[i, k] = _normalise01(sal)[0, 0].cpu().numpy()
        return out

    # --- radiographs --------------------------------------------------------------------------

    def heatmaps_preprocessed(self, items: Sequence[Preprocessed]) -> list[list[np.ndarray]]:
        """Heatmaps in source geometry (float32 in [0, 1]): one list per item, one map per finding.

        For images whose forward has not kept its maps; :meth:`predict_preprocessed` with
        ``explain`` gets them from the forward it runs anyway.
        """
        if not items:
            return []
        batch = np.stack([p.image for p in items]).astype(np.float32, copy=False)
        maps = self.explain(batch)
        return [source_heatmaps(maps[i], pre.letterbox) for i, pre in enumerate(items)]

    def predict_preprocessed(self, items: Sequence[Preprocessed], *, explain: bool = True,
                             source_maps: bool = True) -> list[ModelOutput]:
        """Model outputs for images already run through the bundle's pixel pipeline.

        With ``explain``, each output carries its maps in model geometry
        (:attr:`ModelOutput.saliency`, from the same forward for ``gradcam``) and, with
        ``source_maps``, each finding its heatmap in source geometry (:func:`source_heatmaps`;
        without, the caller maps them where the source image is, e.g. a worker process).
        """
        if not items:
            return []
        batch = np.stack([p.image for p in items]).astype(np.float32, copy=False)
        forward_maps = explain and self.explain_method == "gradcam"
        pred = self.predict(batch, explain=forward_maps)
        saliency = pred.saliency if forward_maps else (self.explain(batch) if explain else None)
        outputs = []
        for i, pre in enumerate(items):
            maps = source_heatmaps(saliency[i], pre.letterbox) if saliency is not None and source_maps else None
            findings = [
                FindingResult(
                    key=spec.key,
                    display=spec.display,
                    probability=float(pred.probabilities[i, k]),
                    threshold=float(spec.threshold),
                    heatmap=maps[k] if maps is not None else None,
                )
                for k, spec in enumerate(self.bundle.findings)
            ]
            outputs.append(ModelOutput(findings=findings, embedding=pred.embeddings[i], model=self.model_info,
                                       notes=list(pre.notes),
                                       saliency=saliency[i] if saliency is not None else None))
        return outputs

    def predict_radiographs(self, radiographs: Sequence[Radiograph], *, explain: bool = True) -> list[ModelOutput]:
        """Pixel pipeline (the bundle's spec) + model + heatmaps in source geometry.

        The caller has already applied the applicability gate. Decoding errors
        (:class:`cxr_ai.errors.ReadError`) propagate.
        """
        pre = [preprocess(rg, self.bundle.pipeline) for rg in radiographs]
        return self.predict_preprocessed(pre, explain=explain)


def _models_section(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if config is None:  # the embedded defaults; the edge (CLI, service) loads files and env
        from cxr_ai.config import default_config

        config = default_config()
    if "models" in config and isinstance(config["models"], Mapping):
        return config["models"]
    return config


def load_default_engine(config: Mapping[str, Any] | None = None) -> InferenceEngine:
    """The engine the service and the batch processor use: ``[models]`` config, or the demo."""
    section = _models_section(config)
    path = section.get("bundle") or default_bundle_path()
    if not section.get("bundle") and not Path(path).is_dir():
        from cxr_ai.errors import BundleError

        raise BundleError(MSG_NO_DEMO.format(path=path))
    return InferenceEngine.from_config(section, bundle=load_bundle(path))
