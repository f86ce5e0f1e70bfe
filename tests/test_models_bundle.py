"""Model bundles: round trip, MONAI metadata, and every way a bundle can be broken."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_ai.dicom.codes import CARDIOMEGALY, LV_SYSTOLIC_DYSFUNCTION
from cxr_ai.errors import BundleError
from cxr_ai.imaging import PixelPipelineSpec
from cxr_ai.models import bundle as B
from cxr_ai.models.bundle import FindingSpec, device_uid, load_bundle, read_metadata, save_bundle, sha256_file
from cxr_ai.models.networks import NetworkConfig, build_network

SIZE = 64


def _net(**kw):
    torch.manual_seed(0)
    cfg = dict(architecture="densenet_small", input_size=SIZE, kwargs={"block_config": [2, 2]})
    cfg.update(kw)
    return build_network(NetworkConfig(**cfg))


def _save(path: Path, net=None, **kw) -> Path:
    args = dict(
        model=net or _net(),
        name="unit-test-model",
        version="1.2.3",
        findings=[
            FindingSpec("cardiomegaly", "Cardiomegaly", 0.42, "youden (test)"),
            FindingSpec("low_ef", "Low EF", 0.31, "sensitivity>=0.90 (test)"),
        ],
        pipeline=PixelPipelineSpec(size=SIZE),
        description="unit test bundle",
        intended_use="tests only",
        training_data={"train": {"images": 10}},
        validation_metrics={"cardiomegaly": {"auroc": 0.9, "n": 10}},
    )
    args.update(kw)
    return save_bundle(path, **args)


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return _save(tmp_path / "b")


def _edit_meta(path: Path, fn) -> None:
    meta_path = path / B.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    fn(meta)
    meta_path.write_text(json.dumps(meta))


def test_round_trip(bundle_dir: Path) -> None:
    net = _net()
    b = load_bundle(bundle_dir)
    assert b.name == "unit-test-model" and b.version == "1.2.3"
    assert [f.key for f in b.findings] == ["cardiomegaly", "low_ef"]
    assert b.finding("cardiomegaly").threshold == pytest.approx(0.42)
    assert b.finding("low_ef").threshold_method == "sensitivity>=0.90 (test)"
    assert b.finding("cardiomegaly").code == CARDIOMEGALY
    assert b.finding("low_ef").code == LV_SYSTOLIC_DYSFUNCTION
    assert b.pipeline == PixelPipelineSpec(size=SIZE)
    assert b.network == net.config
    assert not b.model.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    info = b.model_info()
    assert info.not_for_clinical_use is True
    assert info.intended_use == "tests only"
    sha = b.cxr["weights"]["sha256"]
    assert info.device_uid == device_uid("unit-test-model", "1.2.3", weights_sha256=sha)
    assert device_uid("unit-test-model", "1.2.4", weights_sha256=sha) != info.device_uid
    # retrained (other weights), same name and version: another device
    assert device_uid("unit-test-model", "1.2.3", weights_sha256="0" * 64) != info.device_uid
    assert (bundle_dir / "docs" / "README.md").read_text().startswith("# unit-test-model 1.2.3")
    assert "NOT FOR CLINICAL USE" in (bundle_dir / "docs" / "README.md").read_text()
    assert (bundle_dir / "LICENSE").is_file()


def test_metadata_is_monai_bundle_metadata(bundle_dir: Path) -> None:
    meta = read_metadata(bundle_dir)
    for key in B.MONAI_REQUIRED:
        assert key in meta, key
    inp = meta["network_data_format"]["inputs"]["image"]
    assert inp["num_channels"] == 1 and inp["spatial_shape"] == [SIZE, SIZE]
    assert inp["dtype"] == "float32" and inp["value_range"] == [0, 1] and inp["is_patch_data"] is False
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "cardiomegaly", "1": "low_ef"}
    assert meta["monai_version"] and meta["pytorch_version"] and meta["numpy_version"]
    c = meta["cxr_ai"]
    assert c["format_version"] == B.FORMAT_VERSION
    assert c["findings"][0]["code"] == {"value": "8186001", "scheme": "SCT", "meaning": "Cardiomegaly"}
    assert c["weights"]["sha256"] == sha256_file(bundle_dir / B.WEIGHTS_FILE)
    assert c["not_for_clinical_use"] is True
    assert meta["eval_metrics"] == {"val_cardiomegaly_auroc": 0.9}


def test_metadata_validates_against_monai_schema_rules(bundle_dir: Path) -> None:
    """The field types MONAI's meta_schema_20240725 asks for (jsonschema, offline copy of its rules)."""
    import jsonschema
    tensor = {
        "type": "object",
        "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
        "properties": {
            "num_channels": {"type": "integer"},
            "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
            "value_range": {"type": "array", "items": {"type": "number"}},
            "is_patch_data": {"type": "boolean"},
            "channel_def": {"type": "object"},
        },
    }
    schema = {
        "type": "object",
        "required": list(B.MONAI_REQUIRED),
        "properties": {
            **{k: {"type": "string"} for k in ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors", "copyright", "data_source", "data_type", "image_classes", "label_classes", "pred_classes", "intended_use")},
            "changelog": {"type": "object"},
            "required_packages_version": {"type": "object"},
            "eval_metrics": {"type": "object"},
            "references": {"type": "array", "items": {"type": "string"}},
            "network_data_format": {
                "type": "object",
                "required": ["inputs", "outputs"],
                "properties": {
                    "inputs": {"type": "object", "additionalProperties": tensor},
                    "outputs": {"type": "object", "additionalProperties": tensor},
                },
            },
        },
    }
    jsonschema.validate(read_metadata(bundle_dir), schema)


def test_refuses_to_overwrite(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="already exists"):
        _save(bundle_dir)


# --- broken bundles ---------------------------------------------------------------------------


def _expect(path: Path, template: str, **fmt) -> BundleError:
    """load_bundle raises BundleError whose text is ``template`` (its fixed parts) + values."""
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    text = str(info.value)
    fixed = max(re.split(r"\{[^}]*\}", template), key=len)
    assert fixed in text, (fixed, text)
    assert str(path) in text
    for v in fmt.values():
        assert str(v) in text, (v, text)
    return info.value


def test_missing_directory(tmp_path: Path) -> None:
    err = _expect(tmp_path / "nope", B.MSG_MISSING_DIR)
    assert "does not exist" in str(err)


def test_file_instead_of_directory(bundle_dir: Path) -> None:
    _expect(bundle_dir / B.WEIGHTS_FILE, B.MSG_NOT_DIR)


def test_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    err = _expect(tmp_path / "empty", B.MSG_NOT_BUNDLE)
    assert "configs/metadata.json is missing" in str(err)


def test_metadata_not_json(bundle_dir: Path) -> None:
    (bundle_dir / B.METADATA_FILE).write_text("{not json")
    _expect(bundle_dir, B.MSG_BAD_JSON)


def test_monai_fields_missing(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m.pop("monai_version"))
    _expect(bundle_dir, B.MSG_NOT_MONAI, missing="monai_version")


def test_monai_bundle_without_cxr_section(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m.pop("cxr_ai"))
    _expect(bundle_dir, B.MSG_NOT_CXR)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(bundle_dir: Path, version) -> None:
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"].__setitem__("format_version", version))
    err = _expect(bundle_dir, B.MSG_FORMAT_VERSION)
    assert f"reads format version {B.FORMAT_VERSION}" in str(err)


def test_missing_weights(bundle_dir: Path) -> None:
    (bundle_dir / B.WEIGHTS_FILE).unlink()
    _expect(bundle_dir, B.MSG_MISSING_WEIGHTS, file=B.WEIGHTS_FILE)


def test_checksum_mismatch(bundle_dir: Path) -> None:
    w = bundle_dir / B.WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    err = _expect(bundle_dir, B.MSG_CHECKSUM)
    assert "corrupted or was replaced" in str(err)


def test_unsupported_pixel_pipeline(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["pixel_pipeline"].__setitem__("version", 99))
    err = _expect(bundle_dir, B.MSG_PIPELINE)
    assert "pixel pipeline version 99" in str(err)


def test_unknown_pixel_pipeline_parameter(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["pixel_pipeline"].__setitem__("clahe", True))
    _expect(bundle_dir, B.MSG_PIPELINE, detail="clahe")


@pytest.mark.parametrize(
    "key, value, detail",
    [
        ("num_channels", 3, "num_channels is 3"),
        ("spatial_shape", [224, 224], "spatial_shape is [224, 224]"),
        ("dtype", "uint8", "dtype is 'uint8'"),
        ("value_range", [0, 255], "value_range is [0, 255]"),
        ("is_patch_data", True, "is_patch_data is true"),
    ],
)
def test_input_spec_the_pipeline_cannot_honour(bundle_dir: Path, key, value, detail) -> None:
    _edit_meta(bundle_dir, lambda m: m["network_data_format"]["inputs"]["image"].__setitem__(key, value))
    _expect(bundle_dir, B.MSG_INPUT_SPEC, detail=detail)


def test_unknown_architecture(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["network"].__setitem__("architecture", "convnext_tiny"))
    _expect(bundle_dir, B.MSG_ARCH, arch="convnext_tiny")


def test_unknown_finding(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["findings"][1].__setitem__("key", "pneumothorax"))
    _expect(bundle_dir, B.MSG_FINDING, key="pneumothorax")


def test_finding_code_mismatch(bundle_dir: Path) -> None:
    # pydicom's codes.SCT.Cardiomegaly is 287272002, a different concept (DESIGN.md)
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["findings"][0]["code"].__setitem__("value", "287272002"))
    err = _expect(bundle_dir, B.MSG_FINDING, key="cardiomegaly")
    assert "287272002" in str(err) and "8186001" in str(err)


def test_threshold_out_of_range(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["findings"][0].__setitem__("threshold", 1.5))
    _expect(bundle_dir, B.MSG_FINDING, detail="outside [0, 1]")


def _replace_weights(bundle_dir: Path, obj) -> None:
    w = bundle_dir / B.WEIGHTS_FILE
    torch.save(obj, w)
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["weights"].__setitem__("sha256", sha256_file(w)))


def test_state_dict_mismatch(bundle_dir: Path) -> None:
    other = _net(kwargs={"block_config": [2, 3]})  # a different network, consistent checksum
    _replace_weights(bundle_dir, other.state_dict())
    err = _expect(bundle_dir, B.MSG_STATE_DICT)
    assert "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err)


def test_weights_not_a_state_dict(bundle_dir: Path) -> None:
    _replace_weights(bundle_dir, [torch.zeros(3)])
    _expect(bundle_dir, B.MSG_WEIGHTS_UNREADABLE, detail="found list")


def test_weights_not_loadable_safely(bundle_dir: Path) -> None:
    """A pickle of arbitrary objects is refused by weights_only loading."""
    _replace_weights(bundle_dir, {"model": np.float64})  # a class: not allowed by weights_only
    _expect(bundle_dir, B.MSG_WEIGHTS_UNREADABLE)


def test_network_config_with_unknown_parameter(bundle_dir: Path) -> None:
    _edit_meta(bundle_dir, lambda m: m["cxr_ai"]["network"].__setitem__("depth", 7))
    _expect(bundle_dir, B.MSG_NETWORK, detail="depth")


def test_copy_of_bundle_loads(bundle_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    shutil.copytree(bundle_dir, dst)
    assert load_bundle(dst).version == "1.2.3"
