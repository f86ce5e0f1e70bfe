"""End-to-end training on tiny phantom sets: train -> bundle, resume, DDP (2 CPU processes,
gloo), embedding heads -> new bundle. Kept tiny: 32-px images, a ~10 k-parameter DenseNet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_ai.models.bundle import load_bundle
from cxr_ai.models.engine import InferenceEngine
from training import data as D
from training.config import load_train_config
from training.embeddings import EmbeddingHead, export_head_bundle, fit_torch_head, predict_torch_head, train_heads
from training.train import train

REPO = Path(__file__).resolve().parents[1]

TINY_TOML = """
[experiment]
name = "tiny-test"
version = "0.0.1"
seed = 7
findings = ["cardiomegaly", "low_ef"]

[phantoms]
train_studies = 0

[data]
source = "dicom"
root = "{root}"
cache_dir = "{cache}"

[pipeline]
size = 32

[model]
architecture = "densenet_small"
[model.kwargs]
init_features = 8
growth_rate = 4
block_config = [2, 2]

[split]
val_fraction = 0.3
test_fraction = 0.25

[train]
epochs = {epochs}
min_epochs = 1
batch_size = 16
lr = 0.003
patience = 5
augment = true
num_threads = 1
"""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    root = tmp_path_factory.mktemp("tiny_phantoms")
    generate_studies(root, PhantomConfig(n_studies=70, seed=5, size=64, prevalence_low_ef=0.35, prevalence_cardiomegaly=0.4))
    return root


def _config(tmp: Path, phantoms: Path, *, epochs: int) -> Path:
    p = tmp / f"tiny_{epochs}.toml"
    p.write_text(TINY_TOML.format(root=phantoms, cache=tmp / "cache", epochs=epochs))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantoms: Path) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("run")
    cfg = load_train_config(_config(tmp, phantoms, epochs=2))
    threads = torch.get_num_threads()
    try:
        summary = train(cfg, tmp / "out")
    finally:
        torch.set_num_threads(threads)
    return tmp / "out", summary


@pytest.mark.slow
def test_training_exports_a_loadable_bundle(trained) -> None:
    out, summary = trained
    assert Path(summary["bundle"]) == out / "bundle"
    b = load_bundle(out / "bundle")
    assert b.name == "tiny-test" and b.pipeline.size == 32
    c = b.cxr
    td = c["training_data"]
    assert td["patients_shared_between_splits"] == 0
    assert {"train", "val", "test"} <= set(td)
    assert td["train"]["images"] + td["val"]["images"] + td["test"]["images"] > 40
    assert "demographics" in td["train"] and "sex" in td["train"]["demographics"]
    for f in b.findings:
        assert 0.0 <= f.threshold <= 1.0 and f.threshold_method.startswith("youden")
        assert c["test_metrics"][f.key]["n"] == td["test"]["images"]
    log = json.loads((out / "bundle" / "docs" / "training_log.json").read_text())
    assert [e["epoch"] for e in log] == [0, 1]
    assert json.loads((out / "metrics.json").read_text())["thresholds"].keys() == {"cardiomegaly", "low_ef"}
    # the exported weights are the best epoch's, and the recorded test metric is reproducible
    preds = pd.read_csv(out / "test_predictions.csv")
    manifest = D.load_dicom_folder(c["training"]["config"]["data"]["root"]).set_index("image_id").loc[preds["image_id"].astype(str)]
    cache = D.ImageCache(out.parent / "cache", b.pipeline)
    images = cache.load_all(manifest.reset_index())
    p = InferenceEngine(b, device="cpu", num_threads=1).predict(images).probabilities
    np.testing.assert_allclose(p[:, 0], preds["p_cardiomegaly"].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained, tmp_path: Path, phantoms: Path) -> None:
    out, _ = trained
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    before = json.loads((run / "train_log.json").read_text())
    cfg = load_train_config(_config(tmp_path, phantoms, epochs=3))
    threads = torch.get_num_threads()
    try:
        train(cfg, run)
    finally:
        torch.set_num_threads(threads)
    after = json.loads((run / "train_log.json").read_text())
    assert [e["epoch"] for e in after] == [0, 1, 2]  # one more epoch, not three new ones
    assert after[:2] == before
    assert load_bundle(run / "bundle").cxr["training"]["epochs_run"] == 3


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_gloo(tmp_path: Path, phantoms: Path) -> None:
    cfg = _config(tmp_path, phantoms, epochs=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training.train", "--config", str(cfg), "--out", str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = load_bundle(tmp_path / "ddp" / "bundle")
    log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    assert [e["world_size"] for e in log] == [2, 2]
    assert b.name == "tiny-test"
    assert "DDP: rank 1/2" in proc.stderr and "with gloo" in proc.stderr


@pytest.mark.slow
def test_embedding_heads_learn_in_seconds() -> None:
    rng = np.random.default_rng(0)
    n, d = 3000, 64
    X = rng.standard_normal((n, d)).astype(np.float32) * 3 + 5  # unstandardised on purpose
    w = rng.standard_normal((d, 2))
    logits = (X - 5) @ w / 3
    Y = (logits + rng.standard_normal((n, 2)) > 0.8).astype(float)
    Y[::7, 1] = np.nan  # missing labels are masked
    results = train_heads(X[:2400], Y[:2400], X[2400:], Y[2400:], findings=["cardiomegaly", "low_ef"], random_state=0, epochs=8)
    by = {r.name: r for r in results}
    assert set(by) == {"torch_logistic", "torch_mlp", "sk_logistic", "random_forest", "hist_gb"}
    assert by["torch_logistic"].val_auroc["cardiomegaly"] > 0.9
    assert by["sk_logistic"].val_auroc["low_ef"] > 0.9
    assert all(r.val_auroc["cardiomegaly"] > 0.75 for r in results)
    assert all(r.fit_seconds >= 0 for r in results)


def test_standardisation_is_folded_into_the_head() -> None:
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((500, 8)) * [1, 10, 100, 0.1, 1, 1, 1, 1] + 50).astype(np.float32)
    Y = (X[:, [1]] > 50).astype(float)
    head, _ = fit_torch_head(X, Y, epochs=3, random_state=0)
    mean, std = X.mean(0), X.std(0) + 1e-6
    ref = EmbeddingHead(8, 1)
    ref.load_state_dict(head.state_dict())
    with torch.no_grad():  # un-fold: the folded head on raw X == the trained head on standardised X
        first = ref.head[1]
        first.bias.add_(first.weight @ torch.as_tensor(mean))
        first.weight.mul_(torch.as_tensor(std))
        z = torch.sigmoid(ref(torch.from_numpy((X - mean) / std))).numpy()
    np.testing.assert_allclose(predict_torch_head(head, X), z, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [0, 16])
def test_head_trained_on_bundle_embeddings_exports_to_a_bundle(trained, tmp_path: Path, hidden: int) -> None:
    out, _ = trained
    base = load_bundle(out / "bundle")
    engine = InferenceEngine(base, device="cpu", num_threads=1)
    manifest = D.load_dicom_folder(base.cxr["training"]["config"]["data"]["root"])
    images = D.ImageCache(out.parent / "cache", base.pipeline).load_all(manifest)
    pred = engine.predict(images)
    Y = manifest[["cardiomegaly", "low_ef"]].to_numpy(float)
    head, _ = fit_torch_head(pred.embeddings, Y, hidden=hidden, epochs=5, random_state=0)
    path = export_head_bundle(
        base, head, thresholds={"cardiomegaly": 0.4, "low_ef": 0.3}, threshold_methods={"cardiomegaly": "t", "low_ef": "t"},
        validation_metrics={}, out_dir=tmp_path / "new", version="0.0.2",
    )
    new = load_bundle(path)
    assert new.version == "0.0.2" and new.network.hidden == hidden
    assert new.cxr["base_bundle"]["version"] == "0.0.1"
    assert new.finding("cardiomegaly").threshold == 0.4
    got = InferenceEngine(new, device="cpu", num_threads=1).predict(images)
    np.testing.assert_allclose(got.embeddings, pred.embeddings, atol=1e-5)  # same backbone
    np.testing.assert_allclose(got.probabilities, predict_torch_head(head, pred.embeddings), atol=1e-5)


@pytest.mark.slow
def test_embeddings_cli_extract_then_heads(trained, tmp_path: Path) -> None:
    from training.embeddings import main

    out, _ = trained
    cfg = _config(tmp_path, Path(load_bundle(out / "bundle").cxr["training"]["config"]["data"]["root"]), epochs=1)
    threads = torch.get_num_threads()
    try:
        assert main(["extract", "--bundle", str(out / "bundle"), "--config", str(cfg), "--out", str(tmp_path / "emb.npz")]) == 0
        assert main([
            "heads", "--embeddings", str(tmp_path / "emb.npz"), "--labels", str(tmp_path / "emb.labels.csv"),
            "--heads", "torch_logistic", "sk_logistic", "--out", str(tmp_path / "heads.json"),
            "--base-bundle", str(out / "bundle"), "--export", str(tmp_path / "retrained"), "--version", "0.0.3",
        ]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "heads.json").read_text())
    assert [h["name"] for h in report["heads"]] == ["torch_logistic", "sk_logistic"]
    assert report["n_train"] > 0 and report["n_val"] > 0
    assert load_bundle(tmp_path / "retrained").version == "0.0.3"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "training" / "configs").glob("*.toml")))
def test_shipped_configs_parse(name: str) -> None:
    cfg = load_train_config(REPO / "training" / "configs" / name)
    assert cfg["experiment"]["findings"] and cfg["experiment"]["not_for_clinical_use"] is True


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    from cxr_ai.errors import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match="unknown training setting 'train.epoch'"):
        load_train_config(bad)
    bad.write_text('[data]\nsource = "chexpert"\n')
    with pytest.raises(ConfigError, match="needs an explicit uncertainty policy"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.toml")
