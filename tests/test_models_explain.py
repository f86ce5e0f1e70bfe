"""Explanations from the inference forward, against MONAI's GradCAM as the reference.

For every pooled-head architecture the closed form (the forward's feature map weighted by
``(1/hw) d logit / d embedding``) must equal MONAI's :class:`monai.visualize.GradCAM` at
``feature_map``: before upsampling (``compute_map``) and after upsampling and scaling to
[0, 1] (``postprocessing=_normalise01``), with a linear head (its weight row) and with a
hidden layer (a backward through the head alone). The attention head's contribution map
must add up to its logit.

Tolerances: the closed form and MONAI sum the same float32 products in different orders,
so raw maps agree to 1e-5 of their largest value and normalised maps to 1e-4 (both far
below the 1/255 a heatmap SC can show and the 1e-4 a Parametric Map stores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxr_ai.imaging import PixelPipelineSpec, preprocess
from cxr_ai.models.bundle import FindingSpec, load_bundle, save_bundle
from cxr_ai.models.engine import InferenceEngine, _normalise01, saliency_maps
from cxr_ai.models.networks import (
    ARCHITECTURES,
    GRADCAM_LAYER,
    LogitsOnly,
    NetworkConfig,
    build_head,
    build_network,
)

SIZE = 64
RAW_RTOL = 1e-5  # of the map's largest value
NORM_ATOL = 1e-4
VIT_KWARGS = {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 4}
#: Built and run in seconds; the larger EfficientNets take a minute each on 2 cores.
FAST = {"densenet121", "densenet_small", "resnet18", "resnet34", "resnet50", "efficientnet-b0", "vit"}


def _config(arch: str, **kw) -> NetworkConfig:
    return NetworkConfig(architecture=arch, input_size=SIZE, kwargs=VIT_KWARGS if arch == "vit" else {}, **kw)


def _like_trained(net: nn.Module, seed: int) -> nn.Module:
    """Randomised normalisation statistics and affine parameters, as after training.

    A freshly initialised EfficientNet multiplies its features by near-zero batch-norm
    scales, so every map would be ~1e-15 and the comparison would say nothing.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net.eval()


def _monai(net: nn.Module, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's Grad-CAM of finding ``k``: the raw map, and the map as ``GradCAM.__call__``
    returns it (upsampled, then ``postprocessing``), from one forward and backward."""
    from monai.visualize import GradCAM

    # eval(): MONAI restores the wrapper's training flag, which would put ``net`` in train mode
    cam = GradCAM(nn_module=LogitsOnly(net).eval(), target_layers=GRADCAM_LAYER, postprocessing=_normalise01)
    inp = x.clone().requires_grad_(True)  # gradients must reach feature_map
    raw = cam.compute_map(inp, class_idx=k)
    return raw[:, 0].detach(), cam._upsample_and_post_process(raw, inp)[:, 0].detach()


def _check_pooled(net: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        out = net(x)
        closed = net.explanation_maps(out)
        heat = saliency_maps(net, out, size=SIZE)
    n_f = out["logits"].shape[1]
    assert closed.shape == (x.shape[0], n_f, *out["feature_map"].shape[-2:])
    peaks = []
    for k in range(n_f):
        raw, ref = _monai(net, x, k)
        peaks.append(float(raw.max()))
        torch.testing.assert_close(closed[:, k], raw, rtol=0, atol=RAW_RTOL * max(peaks[-1], 1e-30))
        torch.testing.assert_close(heat[:, k], ref, rtol=0, atol=NORM_ATOL)
    # finding 1 is the negative of finding 0 (_opposite_findings): relu(s) and relu(-s) cannot
    # both vanish, so at least one comparison is of a map with structure
    assert max(peaks) > 0


def _opposite_findings(net: nn.Module) -> nn.Module:
    """Make logit 1 = -logit 0 (up to the bias), so that the two maps are relu(s) and relu(-s)."""
    last = [m for m in net.head if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight[1].copy_(-last.weight[0])
    return net


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=() if a in FAST else pytest.mark.slow) for a in ARCHITECTURES]
)
def test_closed_form_gradcam_equals_monai(arch: str) -> None:
    """Linear head and a head with a hidden layer, on the same backbone."""
    torch.manual_seed(11)
    net = _like_trained(build_network(_config(arch)), seed=12)
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(13))
    _check_pooled(_opposite_findings(net), x)
    torch.manual_seed(14)
    net.head = build_head(_config(arch, hidden=16), channels=net.embedding_dim).eval()
    with torch.no_grad():  # a ReLU layer that passes most inputs, so the gradient is not the zero vector
        net.head[1].bias.fill_(0.5)
    _check_pooled(_opposite_findings(net), x)


def test_head_gradient_linear_is_the_weight_row_and_hidden_matches_autograd() -> None:
    torch.manual_seed(0)
    net = build_network(_config("densenet_small")).eval()
    emb = torch.rand(3, net.embedding_dim)
    with torch.inference_mode():  # as in the engine's forward
        grad = net.head_gradient(emb)
    assert torch.equal(grad[1], net.head[1].weight.detach())
    net.head = build_head(_config("densenet_small", hidden=8), channels=net.embedding_dim).eval()
    with torch.inference_mode():
        grad = net.head_gradient(emb)
    jac = torch.autograd.functional.jacobian(lambda e: net.head(e).sum(0), emb)  # (F, B, D)
    torch.testing.assert_close(grad, jac.permute(1, 0, 2))


@pytest.mark.parametrize("arch", ["densenet_small", "resnet18", "vit"])
def test_attention_contributions_sum_to_the_logit(arch: str) -> None:
    torch.manual_seed(5)
    net = _like_trained(build_network(_config(arch, head="attention")), seed=6)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.3, -0.7]))
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        out = net(x)
        contrib = net.contributions(out)
        maps = net.explanation_maps(out)
    assert contrib.shape == out["attention"].shape
    total = contrib.sum((2, 3)) + net.head.bias
    torch.testing.assert_close(total, out["logits"], rtol=1e-5, atol=1e-5)
    assert (contrib < 0).any() and (contrib > 0).any()  # evidence both ways; the map shows the positive part
    torch.testing.assert_close(maps, contrib.clamp_min(0))
    with pytest.raises(ValueError, match="no position-independent gradient"):
        net.head_gradient(out["embedding"])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The same bundle (a DenseNet with a hidden layer) with the forward's maps and with MONAI's."""
    torch.manual_seed(21)
    net = _like_trained(build_network(_config("densenet_small", hidden=16)), seed=22)
    with torch.no_grad():
        net.head[1].bias.fill_(0.5)
    path = save_bundle(
        tmp_path_factory.mktemp("explain") / "b", model=net, name="explain-test", version="0.0.1",
        findings=[FindingSpec("cardiomegaly", "Cardiomegaly", 0.5), FindingSpec("low_ef", "Low EF", 0.3)],
        pipeline=PixelPipelineSpec(size=SIZE), description="explain test", intended_use="tests",
    )
    bundle = load_bundle(path)
    return (InferenceEngine(bundle, device="cpu", batch_size=2),
            InferenceEngine(bundle, device="cpu", batch_size=2, explain_method="monai-gradcam"))


def test_engine_forward_maps_equal_monai_and_leave_probabilities_alone(engines) -> None:
    fast, reference = engines
    images = np.random.default_rng(3).random((3, 1, SIZE, SIZE), dtype=np.float32)  # batches 2 + 1
    plain = fast.predict(images)
    explained = fast.predict(images, explain=True)
    assert plain.saliency is None
    np.testing.assert_array_equal(explained.probabilities, plain.probabilities)
    np.testing.assert_array_equal(explained.embeddings, plain.embeddings)
    assert explained.saliency is not None and explained.saliency.shape == (3, 2, SIZE, SIZE)
    np.testing.assert_allclose(explained.saliency, reference.explain(images), rtol=0, atol=NORM_ATOL)
    np.testing.assert_array_equal(fast.explain(images), explained.saliency)


def test_radiograph_heatmaps_in_source_geometry_equal_monai(engines, rg1_paths) -> None:
    """A real CR chest (1955 x 1841): the heatmaps the SC and Parametric Map are built from,
    new path against MONAI's, pixel for pixel within the tolerance."""
    from cxr_ai.dicom.reader import read_radiograph

    fast, reference = engines
    pre = [preprocess(read_radiograph(rg1_paths["RG1_UNCR"]), fast.bundle.pipeline)]
    (got,) = fast.predict_preprocessed(pre, explain=True)
    (want,) = reference.predict_preprocessed(pre, explain=True)
    (deferred,) = fast.predict_preprocessed(pre, explain=True, source_maps=False)
    assert [f.probability for f in got.findings] == [f.probability for f in want.findings]
    assert all(f.heatmap is None for f in deferred.findings) and deferred.saliency is not None
    for g, w in zip(got.findings, want.findings):
        assert g.heatmap is not None and w.heatmap is not None
        assert g.heatmap.shape == w.heatmap.shape == (1955, 1841) and g.heatmap.dtype == np.float32
        np.testing.assert_allclose(g.heatmap, w.heatmap, rtol=0, atol=NORM_ATOL)
    # one resampling for all findings gives what one per finding gives
    one_by_one = [np.clip(pre[0].letterbox.to_source(deferred.saliency[k]), 0, 1) for k in range(2)]
    for g, m in zip(got.findings, one_by_one):
        np.testing.assert_array_equal(g.heatmap, m)
