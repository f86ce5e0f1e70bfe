"""The shared pixel pipeline on real radiographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.imaging import PixelPipelineSpec, display_array, preprocess


@pytest.fixture(scope="module")
def rg1_outputs(rg1_paths: dict[str, Path]) -> dict[str, np.ndarray]:
    return {name: preprocess(read_radiograph(p)).image for name, p in rg1_paths.items()}


def test_shape_dtype_range(rg1_outputs: dict[str, np.ndarray]) -> None:
    for image in rg1_outputs.values():
        assert image.shape == (1, 224, 224) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0


def test_lossless_pairs_bit_identical(rg1_outputs: dict[str, np.ndarray]) -> None:
    assert np.array_equal(rg1_outputs["RG1_UNCR"], rg1_outputs["RG1_J2KR"])
    assert np.array_equal(rg1_outputs["RG1_UNCI"], rg1_outputs["RG1_J2KI"])
    # The lossy image is close to, but not the same as, the original.
    diff = np.abs(rg1_outputs["RG1_UNCR"] - rg1_outputs["RG1_UNCI"])
    assert 0 < diff.max() < 0.05


def _mono2_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same image stored as MONOCHROME2: pixels inverted, window mirrored to match."""
    copy = pydicom.dcmread(ds.filename)
    top = (1 << int(ds.BitsStored)) - 1
    copy.PixelData = (top - ds.pixel_array.astype(np.int32)).astype(ds.pixel_array.dtype).tobytes()
    copy.PhotometricInterpretation = "MONOCHROME2"
    # Linear VOI (PS3.3 C.11.2.1.2.1) maps x to ((x - (c - 0.5)) / (w - 1) + 0.5); the mirror
    # image x' = top - x gets the mirrored output with c' = top - c + 1.
    copy.WindowCenter = top - float(ds.WindowCenter) + 1
    return copy


def test_monochrome2_copy_matches_monochrome1(rg1_paths: dict[str, Path], rg1_outputs: dict[str, np.ndarray]) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
    out2 = preprocess(read_radiograph(_mono2_copy(ds))).image
    np.testing.assert_allclose(out2, rg1_outputs["RG1_UNCR"], atol=1e-5)


def test_monochrome1_is_inverted(rg1_paths: dict[str, Path]) -> None:
    """Bone bright, air dark: the spine column is brighter than the lung fields."""
    rg = read_radiograph(rg1_paths["RG1_UNCR"])
    img, used = display_array(rg.dataset, rg.pixels())
    assert used  # RG1 carries a window (WC 15000 / WW 30000)
    rows, cols = img.shape
    band = img[int(rows * 0.35) : int(rows * 0.55)]
    spine = band[:, int(cols * 0.47) : int(cols * 0.53)].mean()
    lungs = np.concatenate([band[:, int(cols * 0.2) : int(cols * 0.35)], band[:, int(cols * 0.65) : int(cols * 0.8)]], axis=1).mean()
    assert spine > lungs + 0.1, (spine, lungs)
    # Ignoring MONOCHROME1 would flip that ordering.
    raw = rg.pixels().astype(float)
    raw_band = raw[int(rows * 0.35) : int(rows * 0.55)]
    assert raw_band[:, int(cols * 0.47) : int(cols * 0.53)].mean() < raw_band[:, int(cols * 0.2) : int(cols * 0.35)].mean()


def test_fallback_window_without_voi(rg1_paths: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
    del ds.WindowCenter
    del ds.WindowWidth
    rg = read_radiograph(ds)
    pre = preprocess(rg)
    assert not pre.used_file_window
    # Still a usable image: full range used, and close to the windowed result.
    windowed = preprocess(read_radiograph(rg1_paths["RG1_UNCR"])).image
    assert pre.image.max() == pytest.approx(1.0) and pre.image.min() == pytest.approx(0.0)
    assert np.corrcoef(pre.image.ravel(), windowed.ravel())[0, 1] > 0.95


def test_letterbox_preserves_aspect_and_maps_back(rg1_paths: dict[str, Path]) -> None:
    spec = PixelPipelineSpec(size=128)
    pre = preprocess(read_radiograph(rg1_paths["RG1_UNCR"]), spec)
    box = pre.letterbox
    assert box.source_shape == (1955, 1841)
    assert box.resized_shape[0] == 128 and abs(box.resized_shape[1] - round(128 * 1841 / 1955)) <= 1
    # padding columns are zero, image columns are not
    assert pre.image[0, :, : box.offset[1]].max() == 0
    # a map that is 1 on the left half of the image maps back to the left half of the source
    m = np.zeros((128, 128), np.float32)
    m[:, : box.offset[1] + box.resized_shape[1] // 2] = 1
    back = box.to_source(m)
    assert back.shape == (1955, 1841)
    assert back[:, :800].mean() > 0.99 and back[:, 1000:].mean() < 0.01


def test_spec_round_trip_and_validation() -> None:
    spec = PixelPipelineSpec(size=160, norm_percentiles=(1.0, 99.0))
    assert PixelPipelineSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="version 99"):
        PixelPipelineSpec.from_dict({**spec.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="not understood"):
        PixelPipelineSpec.from_dict({**spec.to_dict(), "clahe": True})
    with pytest.raises(ValueError, match="resize mode"):
        PixelPipelineSpec(resize="crop")
