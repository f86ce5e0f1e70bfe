"""Inference engine: batching, device policy, Grad-CAM/SmoothGrad in source geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.errors import ConfigError
from cxr_ai.imaging import PixelPipelineSpec, preprocess
from cxr_ai.models.bundle import FindingSpec, load_bundle, save_bundle
from cxr_ai.models.engine import InferenceEngine, _normalise01, default_bundle_path, load_default_engine
from cxr_ai.models.networks import GRADCAM_LAYER, LogitsOnly, NetworkConfig, build_network

SIZE = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(3)
    net = build_network(NetworkConfig(architecture="densenet_small", input_size=SIZE, kwargs={"block_config": [2, 3, 4]}))
    path = save_bundle(
        tmp_path_factory.mktemp("engine") / "b",
        model=net,
        name="engine-test",
        version="0.0.1",
        findings=[FindingSpec("cardiomegaly", "Cardiomegaly", 0.5), FindingSpec("low_ef", "Low EF", 0.3)],
        pipeline=PixelPipelineSpec(size=SIZE),
        description="engine test",
        intended_use="tests",
    )
    return load_bundle(path)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((7, 1, SIZE, SIZE), dtype=np.float32)


def test_batch_equals_one_by_one(bundle, images) -> None:
    engine = InferenceEngine(bundle, device="cpu", batch_size=3)  # 7 images: batches 3+3+1
    batch = engine.predict(images)
    assert batch.probabilities.shape == (7, 2) and batch.probabilities.dtype == np.float32
    assert batch.embeddings.shape == (7, bundle.model.embedding_dim)
    assert batch.finding_keys == ["cardiomegaly", "low_ef"]
    singles = [engine.predict(images[i : i + 1]) for i in range(len(images))]
    np.testing.assert_allclose(np.concatenate([s.probabilities for s in singles]), batch.probabilities, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([s.embeddings for s in singles]), batch.embeddings, rtol=1e-4, atol=1e-5)
    # and the probabilities really are the network's
    with torch.no_grad():
        ref = torch.sigmoid(bundle.model(torch.from_numpy(images))["logits"]).numpy()
    np.testing.assert_allclose(batch.probabilities, ref, atol=1e-5)


def test_cpu_threads_are_set_deliberately(bundle) -> None:
    before = torch.get_num_threads()
    try:
        engine = InferenceEngine(bundle, device="cpu", num_threads=1)
        assert engine.num_threads == 1 and torch.get_num_threads() == 1
        assert engine.amp_dtype is None and engine.channels_last is False
    finally:
        torch.set_num_threads(before)


def test_bad_input_says_what_is_expected(bundle) -> None:
    engine = InferenceEngine(bundle, device="cpu")
    with pytest.raises(ValueError, match=rf"expected float32 images shaped \(B, 1, {SIZE}, {SIZE}\)"):
        engine.predict(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="dtype float64"):
        engine.predict(np.zeros((2, 1, SIZE, SIZE)))
    assert engine.predict(np.zeros((0, 1, SIZE, SIZE), np.float32)).probabilities.shape == (0, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(bundle) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        InferenceEngine(bundle, device="cuda")
    assert InferenceEngine(bundle, device="auto").device.type == "cpu"


def test_gradcam_matches_monai_and_is_not_inverted(bundle, images) -> None:
    """Our heatmap is MONAI's Grad-CAM map, scaled so that the most important pixel is 1."""
    from monai.visualize import GradCAM

    engine = InferenceEngine(bundle, device="cpu")
    maps = engine.explain(images[:2])
    assert maps.shape == (2, 2, SIZE, SIZE)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    # eval(): MONAI restores the wrapper's training flag, which would put the bundle in train mode
    raw = GradCAM(nn_module=LogitsOnly(bundle.model).eval(), target_layers=GRADCAM_LAYER, postprocessing=lambda t: t)(
        torch.from_numpy(images[:2]).requires_grad_(True), class_idx=1
    )
    raw = raw[:, 0].detach().numpy()
    for i in range(2):
        assert np.unravel_index(maps[i, 1].argmax(), maps[i, 1].shape) == np.unravel_index(raw[i].argmax(), raw[i].shape)
        expected = (raw[i] - raw[i].min()) / (raw[i].max() - raw[i].min())
        np.testing.assert_allclose(maps[i, 1], expected, atol=1e-4)


def test_explain_works_inside_a_callers_inference_mode(bundle, images) -> None:
    engine = InferenceEngine(bundle, device="cpu")
    outside = engine.explain(images[:1])
    with torch.inference_mode():
        inside = engine.explain(images[:1])
    np.testing.assert_allclose(inside, outside, atol=1e-6)


def test_normalise_flat_map_is_zero() -> None:
    out = _normalise01(torch.ones(2, 1, 4, 4))
    assert torch.count_nonzero(out) == 0


@pytest.mark.slow
def test_radiograph_heatmaps_in_source_geometry(bundle, rg1_paths) -> None:
    """A real CR chest (1955 x 1841): heatmaps come back at the source size, in [0, 1]."""
    rg = read_radiograph(rg1_paths["RG1_UNCR"])
    engine = InferenceEngine(bundle, device="cpu")
    (out,) = engine.predict_radiographs([rg], explain=True)
    assert out.model.name == "engine-test"
    assert [f.key for f in out.findings] == ["cardiomegaly", "low_ef"]
    pre = preprocess(rg, bundle.pipeline)
    expected = engine.predict(pre.image[None]).probabilities[0]
    for k, f in enumerate(out.findings):
        assert f.probability == pytest.approx(float(expected[k]), abs=1e-6)
        assert f.threshold == bundle.findings[k].threshold
        assert f.heatmap is not None and f.heatmap.shape == (rg.rows, rg.columns) == (1955, 1841)
        assert f.heatmap.dtype == np.float32
        assert 0.0 <= f.heatmap.min() and f.heatmap.max() <= 1.0
        assert f.heatmap.max() > 0.5 and f.heatmap.std() > 0.01  # not flat
    (plain,) = engine.predict_radiographs([rg], explain=False)
    assert all(f.heatmap is None for f in plain.findings)
    assert out.embedding.shape == (bundle.model.embedding_dim,)


@pytest.mark.slow
def test_smoothgrad_option_is_reproducible(bundle, images) -> None:
    engine = InferenceEngine(bundle, device="cpu", explain_method="smoothgrad", smoothgrad_samples=3, seed=5)
    a = engine.explain(images[:1])
    b = engine.explain(images[:1])
    assert a.shape == (1, 2, SIZE, SIZE)
    # the same seeded noise samples: equal up to the order of multi-threaded float sums in
    # the backward pass (seen to differ by 3e-4 relative on 2 threads); other noise moves the
    # maps by tenths
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
    other = InferenceEngine(bundle, device="cpu", explain_method="smoothgrad", smoothgrad_samples=3, seed=6)
    diff = float(np.abs(other.explain(images[:1]) - a).max())
    assert diff > 1e-2, diff
    assert 0.0 <= a.min() and a.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="explain method 'lime' is not supported"):
        engine.explain(images[:1], method="lime")


def test_from_config_section(bundle) -> None:
    before = torch.get_num_threads()
    try:
        engine = InferenceEngine.from_config({"models": {"device": "cpu", "num_threads": 1, "batch_size": 5, "explain_method": "gradcam"}}, bundle=bundle)
        assert engine.batch_size == 5 and engine.num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_default_engine_loads_the_shipped_demo_bundle() -> None:
    path = default_bundle_path()
    assert path.is_dir(), f"the demo bundle should ship in {path}"
    before = torch.get_num_threads()
    try:
        engine = load_default_engine({"models": {"bundle": "", "device": "cpu", "num_threads": 1}})
    finally:
        torch.set_num_threads(before)
    info = engine.model_info
    assert info.not_for_clinical_use is True
    assert engine.bundle.path == path


def test_default_engine_with_configured_bundle(bundle, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        engine = load_default_engine({"models": {"bundle": str(bundle.path), "device": "cpu", "num_threads": 1}})
        assert engine.model_info.name == "engine-test"
    finally:
        torch.set_num_threads(before)
