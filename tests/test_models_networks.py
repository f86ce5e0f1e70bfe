"""Networks: every architecture, both heads, one pass -> logits + embedding; user weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxr_ai.models import networks as N
from cxr_ai.models.networks import NetworkConfig, build_network, load_backbone_weights

_SLOW = pytest.mark.slow
CASES = [
    pytest.param("densenet_small", {}, 64, "avg", id="densenet_small-avg"),
    pytest.param("densenet_small", {}, 64, "attention", id="densenet_small-attention"),
    pytest.param("vit", {"hidden_size": 96, "mlp_dim": 192, "num_layers": 2, "num_heads": 3, "patch_size": 16}, 64, "attention", id="vit-attention"),
    pytest.param("resnet18", {}, 64, "avg", id="resnet18-avg"),
    pytest.param("densenet121", {}, 64, "avg", id="densenet121-avg", marks=_SLOW),
    pytest.param("densenet121", {}, 64, "attention", id="densenet121-attention", marks=_SLOW),
    pytest.param("resnet34", {}, 64, "attention", id="resnet34-attention", marks=_SLOW),
    pytest.param("resnet50", {}, 64, "avg", id="resnet50-avg", marks=_SLOW),
    pytest.param("efficientnet-b0", {}, 64, "avg", id="efficientnet-b0-avg", marks=_SLOW),
    pytest.param("efficientnet-b0", {}, 64, "attention", id="efficientnet-b0-attention", marks=_SLOW),
    pytest.param("vit", {"hidden_size": 96, "mlp_dim": 192, "num_layers": 2, "num_heads": 3, "patch_size": 16}, 64, "avg", id="vit-avg"),
]


@pytest.mark.parametrize("arch, kwargs, size, head", CASES)
def test_one_pass_gives_logits_and_embedding(arch: str, kwargs: dict, size: int, head: str) -> None:
    torch.manual_seed(0)
    net = build_network(NetworkConfig(architecture=arch, input_size=size, head=head, kwargs=kwargs)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, size, size))
    assert out["logits"].shape == (2, 2)
    assert out["embedding"].shape == (2, net.embedding_dim)
    assert torch.isfinite(out["logits"]).all()
    if head == "attention":
        att = out["attention"]
        assert att.shape[:2] == (2, 2)
        assert torch.allclose(att.flatten(2).sum(-1), torch.ones(2, 2), atol=1e-5)
    # the Grad-CAM layer exists in every architecture
    names = dict(N.LogitsOnly(net).named_modules())
    assert N.GRADCAM_LAYER in names


def test_mlp_classifier() -> None:
    net = build_network(NetworkConfig(architecture="densenet_small", input_size=64, hidden=16))
    assert net(torch.rand(1, 1, 64, 64))["logits"].shape == (1, 2)


def test_config_round_trip() -> None:
    cfg = NetworkConfig(architecture="resnet18", num_outputs=3, input_size=96, head="attention", dropout=0.2, kwargs={"widen_factor": 0.5})
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"architecture": "convnext"}, "unknown network architecture 'convnext'"),
        ({"head": "transformer"}, "unknown network head 'transformer'"),
        ({"head": "attention", "hidden": 8}, "only supported with head='avg'"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ],
)
def test_config_errors(kw: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        NetworkConfig(**kw)
    assert fragment in str(info.value)


def test_bad_kwargs_say_which_network() -> None:
    with pytest.raises(ValueError, match="network 'densenet_small' cannot be built with kwargs"):
        build_network(NetworkConfig(architecture="densenet_small", kwargs={"no_such_option": 1}))


def test_user_supplied_three_channel_weights_are_summed_into_one(tmp_path: Path) -> None:
    """ImageNet weights are RGB: the first conv's kernels are summed (grey image in 3 channels)."""
    from monai.networks.nets import DenseNet

    torch.manual_seed(1)
    rgb = DenseNet(spatial_dims=2, in_channels=3, out_channels=1000, **{**N.DENSENET_SMALL_DEFAULTS, "block_config": (2, 4, 6, 4)})
    path = tmp_path / "imagenet.pt"
    torch.save(rgb.state_dict(), path)
    net = build_network(NetworkConfig(architecture="densenet_small", input_size=64), imagenet_weights=path)
    mine = net.backbone.net.state_dict()
    theirs = rgb.state_dict()
    assert torch.allclose(mine["features.conv0.weight"], theirs["features.conv0.weight"].sum(1, keepdim=True))
    assert torch.equal(mine["features.denseblock4.denselayer4.layers.conv2.weight"], theirs["features.denseblock4.denselayer4.layers.conv2.weight"])
    # a grey image gives the same features through both
    x = torch.rand(1, 1, 64, 64)
    net.eval(), rgb.eval()
    with torch.no_grad():
        a = net.backbone(x)
        b = torch.relu(rgb.features(x.repeat(1, 3, 1, 1)))
    assert torch.allclose(a, b, atol=1e-4)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    from monai.networks.nets import resnet18

    path = tmp_path / "resnet.pt"
    torch.save(resnet18(spatial_dims=2, n_input_channels=3, num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="fit only 0 of"):
        build_network(NetworkConfig(architecture="densenet_small", input_size=64), imagenet_weights=path)
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone_weights(build_network(NetworkConfig(architecture="densenet_small", input_size=64)), tmp_path / "missing.pt")
