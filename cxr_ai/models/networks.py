"""Networks: one MONAI backbone, several heads, one forward pass.

``CxrNet(x)`` returns ``{"logits": (B, F), "embedding": (B, D)}`` (plus ``"attention"``,
``(B, F, h, w)``, with the attention head): every finding's logit and the image embedding
come from the same backbone pass, and the embedding is what cheap heads train on
(``training/embeddings.py``).

Backbones (all MONAI, single channel, built without downloaded weights):

``densenet121``
    :class:`monai.networks.nets.DenseNet121` (default; CheXNet's architecture).
``densenet_small``
    :class:`monai.networks.nets.DenseNet` with ``init_features=16, growth_rate=8,
    block_config=(2, 4, 6, 4)`` unless ``kwargs`` say otherwise (~60 k parameters; the demo).
``resnet18`` / ``resnet34`` / ``resnet50``
    :func:`monai.networks.nets.resnet18` etc.
``efficientnet-b0`` … ``efficientnet-b7``
    :class:`monai.networks.nets.EfficientNetBN` with ``pretrained=False``.
``vit``
    :class:`monai.networks.nets.ViT` (patch tokens reshaped to a feature map).

Heads: ``avg`` (global average pooling, a linear or small-MLP classifier) or ``attention``
(one spatial attention map per finding, softmax-normalised, pooling the feature map before
that finding's linear classifier: the map learns to ignore regions irrelevant to the finding).

Every backbone ends in a module named ``feature_map`` (an identity): Grad-CAM targets it,
whatever the architecture (:data:`GRADCAM_LAYER`), and the forward returns it
(``"feature_map"``, ``(B, C, h, w)``) so that explanations need no second pass.

Explanations from the forward (:meth:`CxrNet.explanation_maps`)
--------------------------------------------------------------
With the ``avg`` head the embedding is the feature map's spatial mean,
``embedding = fmap.mean((2, 3))``, so ``d logit / d fmap[c, i, j] = (1/hw) d logit / d
embedding[c]`` at every position ``(i, j)``. Grad-CAM's channel weights (the spatial mean of
that gradient) are therefore ``alpha = (1/hw) d logit / d embedding``, and Grad-CAM at
``feature_map`` is exactly ``relu(sum_c alpha_c fmap_c)``: the forward's own feature map and
a backward through the head alone (for a linear head, its weight row). This holds for every
backbone here (DenseNet, ResNet, EfficientNet, ViT), since all of them are pooled this way.

The ``attention`` head pools with a softmax over positions, so its gradient depends on the
position and Grad-CAM has no such closed form. Its logit decomposes exactly instead:
``logit_f = sum_n att[f, n] (w_f . fmap[:, n]) + b_f`` (:meth:`CxrNet.contributions`); the
map shown is that contribution map, ``relu`` applied (evidence for the finding).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Name of the layer Grad-CAM reads, relative to :class:`LogitsOnly` wrapping a CxrNet.
GRADCAM_LAYER = "net.feature_map"

ARCHITECTURES = (
    "densenet121",
    "densenet_small",
    "resnet18",
    "resnet34",
    "resnet50",
    *(f"efficientnet-b{i}" for i in range(8)),
    "vit",
)
HEADS = ("avg", "attention")

DENSENET_SMALL_DEFAULTS: dict[str, Any] = {"init_features": 16, "growth_rate": 8, "block_config": [2, 4, 6, 4]}

MSG_UNKNOWN_ARCH = (
    "unknown network architecture {arch!r}; this cxr-ai knows {known}. Use one of them, or "
    "upgrade cxr-ai if the model was made by a newer version."
)
MSG_UNKNOWN_HEAD = "unknown network head {head!r}; use one of {known}."
MSG_BAD_KWARGS = "network {arch!r} cannot be built with kwargs {kwargs}: {detail}"
MSG_IMAGENET_MISSING = "ImageNet weights file {path} does not exist; pass the path of a saved state_dict."
MSG_IMAGENET_MISMATCH = (
    "ImageNet weights {path} fit only {loaded} of {total} backbone tensors of {arch!r} "
    "(e.g. missing {missing}); supply weights saved from the MONAI {arch} network."
)


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a network without code changes (stored in bundles)."""

    architecture: str = "densenet121"
    num_outputs: int = 2
    input_size: int = 224
    head: str = "avg"
    #: Hidden units of the classifier (0 = linear). Only with the ``avg`` head.
    hidden: int = 0
    dropout: float = 0.0
    #: Extra keyword arguments for the MONAI constructor (e.g. ``growth_rate``).
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(MSG_UNKNOWN_ARCH.format(arch=self.architecture, known=", ".join(ARCHITECTURES)))
        if self.head not in HEADS:
            raise ValueError(MSG_UNKNOWN_HEAD.format(head=self.head, known=", ".join(HEADS)))
        if self.num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {self.num_outputs}")
        if self.hidden and self.head != "avg":
            raise ValueError("a hidden classifier layer is only supported with head='avg'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NetworkConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"network parameters {sorted(unknown)} are not understood by this cxr-ai")
        return cls(**data)


# --- backbones: each returns a (B, C, h, w) feature map -------------------------------------


class _DenseNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.channels = int(net.class_layers.out.in_features)
        del net.class_layers
        self.net = net
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.net.features(x))


class _ResNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.channels = int(net.fc.in_features)
        net.fc = None
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.channels = int(net._fc.in_features)
        del net._fc
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(n._conv_stem_padding(x))))
        x = n._blocks(x)
        return n._swish(n._bn1(n._conv_head(n._conv_head_padding(x))))


class _ViTFeatures(nn.Module):
    def __init__(self, net: nn.Module, *, grid: tuple[int, int], channels: int) -> None:
        super().__init__()
        self.net = net
        self.grid = grid
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net(x)[0]  # (B, N[+1], hidden)
        n = self.grid[0] * self.grid[1]
        tokens = tokens[:, -n:]  # drop a class token when present
        return tokens.transpose(1, 2).reshape(x.shape[0], self.channels, *self.grid)


def _build_backbone(config: NetworkConfig, *, in_channels: int = 1) -> nn.Module:
    from monai.networks import nets

    arch, kw = config.architecture, dict(config.kwargs)
    try:
        if arch == "densenet121":
            return _DenseNetFeatures(nets.DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1, **kw))
        if arch == "densenet_small":
            kw = {**DENSENET_SMALL_DEFAULTS, **kw}
            kw["block_config"] = tuple(kw["block_config"])
            return _DenseNetFeatures(nets.DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=1, **kw))
        if arch.startswith("resnet"):
            factory = getattr(nets, arch)
            return _ResNetFeatures(factory(spatial_dims=2, n_input_channels=in_channels, num_classes=1, **kw))
        if arch.startswith("efficientnet-"):
            net = nets.EfficientNetBN(arch, pretrained=False, spatial_dims=2, in_channels=in_channels, num_classes=1, **kw)
            return _EfficientNetFeatures(net)
        if arch == "vit":
            kw.setdefault("patch_size", 16)
            patch = int(kw["patch_size"]) if not isinstance(kw["patch_size"], (list, tuple)) else int(kw["patch_size"][0])
            if config.input_size % patch:
                raise ValueError(f"input size {config.input_size} is not a multiple of the patch size {patch}")
            kw["patch_size"] = (patch, patch)
            kw.setdefault("hidden_size", 768)
            net = nets.ViT(
                in_channels=in_channels,
                img_size=(config.input_size, config.input_size),
                spatial_dims=2,
                classification=False,
                **kw,
            )
            g = config.input_size // patch
            return _ViTFeatures(net, grid=(g, g), channels=int(kw["hidden_size"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(MSG_BAD_KWARGS.format(arch=arch, kwargs=config.kwargs, detail=exc)) from exc
    raise ValueError(MSG_UNKNOWN_ARCH.format(arch=arch, known=", ".join(ARCHITECTURES)))


# --- heads ------------------------------------------------------------------------------------


class _AttentionHead(nn.Module):
    """One spatial softmax attention map per finding; each finding pools its own features."""

    def __init__(self, channels: int, num_outputs: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.Conv2d(channels, num_outputs, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.empty(num_outputs, channels))
        self.bias = nn.Parameter(torch.zeros(num_outputs))
        nn.init.normal_(self.weight, std=channels**-0.5)

    def contributions(self, fmap: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Per-position contributions ``att[f, n] * (w_f . fmap[:, n])``, ``(B, F, h, w)``.

        In eval mode (dropout off) they sum over positions to ``logit - bias``.
        """
        b, c, h, w = fmap.shape
        projected = torch.einsum("fc,bcn->bfn", self.weight.to(fmap.dtype), fmap.flatten(2))  # (B, F, hw)
        return (attention.flatten(2).to(fmap.dtype) * projected).reshape(b, -1, h, w)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = fmap.shape
        att = torch.softmax(self.attention(fmap).flatten(2), dim=-1)  # (B, F, hw)
        pooled = torch.einsum("bfn,bcn->bfc", att, fmap.flatten(2))  # (B, F, C)
        logits = (self.dropout(pooled) * self.weight).sum(-1) + self.bias
        return logits, att.reshape(b, -1, h, w)


def build_head(config: NetworkConfig, *, channels: int) -> nn.Module:
    """The classifier head of ``config`` for a backbone of ``channels`` feature channels."""
    if config.head == "attention":
        return _AttentionHead(channels, config.num_outputs, config.dropout)
    if config.hidden:
        return nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(channels, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_outputs),
        )
    return nn.Sequential(nn.Dropout(config.dropout), nn.Linear(channels, config.num_outputs))


class CxrNet(nn.Module):
    """Backbone + heads. ``forward(x) -> {"logits", "embedding"[, "attention"]}``."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _build_backbone(config)
        self.feature_map = nn.Identity()
        d = self.backbone.channels
        self.embedding_dim = d
        self.head: nn.Module = build_head(config, channels=d)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.feature_map(self.backbone(x))
        embedding = fmap.mean(dim=(2, 3))
        if isinstance(self.head, _AttentionHead):
            logits, att = self.head(fmap)
            return {"logits": logits, "embedding": embedding, "attention": att, "feature_map": fmap}
        return {"logits": self.head(embedding), "embedding": embedding, "feature_map": fmap}

    # --- explanations from the forward's outputs (see the module docstring) --------------------

    def head_gradient(self, embedding: torch.Tensor) -> torch.Tensor:
        """``d logit_f / d embedding``, ``(B, F, D)`` float32, for the ``avg`` head.

        A linear head's gradient is its weight row (dropout is the identity in eval mode);
        a head with a hidden layer gets a backward through the head alone, whatever the
        caller's grad or inference mode.
        """
        if isinstance(self.head, _AttentionHead):
            raise ValueError("the attention head has no position-independent gradient; use contributions()")
        layers = list(self.head)
        linear = [m for m in layers if isinstance(m, nn.Linear)]
        if not self.training and len(linear) == 1 and all(isinstance(m, (nn.Linear, nn.Dropout)) for m in layers):
            weight = linear[0].weight.detach().float()
            return weight.unsqueeze(0).expand(embedding.shape[0], -1, -1)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(embedding.device.type, enabled=False):
            dtype = linear[0].weight.dtype
            e = embedding.detach().clone().to(dtype).requires_grad_(True)
            logits = self.head(e)
            n_out = logits.shape[1]
            rows = [torch.autograd.grad(logits[:, k].sum(), e, retain_graph=k < n_out - 1)[0] for k in range(n_out)]
        return torch.stack(rows, dim=1).float()

    def contributions(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attention head: per-position contributions to each logit, ``(B, F, h, w)`` float32.

        ``contributions(out).sum((2, 3)) + head.bias == out["logits"]`` (eval mode).
        """
        if not isinstance(self.head, _AttentionHead):
            raise ValueError("contributions are defined for the attention head; use explanation_maps()")
        return self.head.contributions(out["feature_map"].float(), out["attention"].float())

    def explanation_maps(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """One map per finding at the feature map's resolution, ``(B, F, h, w)`` float32, >= 0.

        From this network's forward output ``out`` alone (no second pass): Grad-CAM at
        ``feature_map`` in closed form for the ``avg`` head, equal to MONAI's
        :class:`~monai.visualize.GradCAM` before upsampling; the positive part of the
        contribution map for the ``attention`` head.
        """
        fmap = out["feature_map"].float()
        if isinstance(self.head, _AttentionHead):
            return torch.relu(self.contributions(out))
        h, w = fmap.shape[-2:]
        alpha = self.head_gradient(out["embedding"]) / float(h * w)  # (B, F, C)
        return torch.relu(torch.einsum("bfc,bchw->bfhw", alpha, fmap))


class LogitsOnly(nn.Module):
    """Wraps a :class:`CxrNet` so that it returns the logits tensor (for MONAI's CAM classes)."""

    def __init__(self, net: CxrNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["logits"]


def build_network(config: NetworkConfig, *, imagenet_weights: str | os.PathLike | None = None) -> CxrNet:
    """Build a network from its config; optionally initialise the backbone from user weights.

    Parameters
    ----------
    config
        Architecture, head and sizes.
    imagenet_weights
        Path of a ``state_dict`` saved from the matching MONAI network (3-channel ImageNet
        weights are accepted: the first convolution's RGB kernels are summed into one
        channel). Nothing is ever downloaded.
    """
    net = CxrNet(config)
    if imagenet_weights is not None:
        load_backbone_weights(net, imagenet_weights)
    return net


def load_backbone_weights(net: CxrNet, path: str | os.PathLike) -> dict[str, int]:
    """Load a MONAI network's ``state_dict`` (e.g. ImageNet-trained) into ``net``'s backbone.

    Keys are those of the bare MONAI network (``features.conv0.weight`` for DenseNet); its
    classifier is ignored. A first convolution with 3 input channels is reduced to 1 channel
    by summing (equivalent to feeding a grey image to all three channels).

    Returns counts ``{"loaded": n, "total": m}``; raises ``ValueError`` when fewer than 90 %
    of the backbone tensors fit.
    """
    if not os.path.isfile(path):
        raise ValueError(MSG_IMAGENET_MISSING.format(path=path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = net.backbone.net.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key not in target:
            continue
        want = target[key]
        if value.shape == want.shape:
            adapted[key] = value
        elif value.ndim == 4 and want.ndim == 4 and value.shape[1] == 3 and want.shape[1] == 1 and value.shape[0] == want.shape[0]:
            adapted[key] = value.sum(dim=1, keepdim=True)
    total = len(target)
    if len(adapted) < 0.9 * total:
        missing = sorted(set(target) - set(adapted))[:3]
        raise ValueError(
            MSG_IMAGENET_MISMATCH.format(path=path, loaded=len(adapted), total=total, arch=net.config.architecture, missing=missing)
        )
    net.backbone.net.load_state_dict(adapted, strict=False)
    logger.info("initialised %s backbone from %s (%d/%d tensors)", net.config.architecture, path, len(adapted), total)
    return {"loaded": len(adapted), "total": total}
