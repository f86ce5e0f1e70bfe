"""Heatmap Secondary Capture and Parametric Map from real radiographs and a phantom.

The SC must show the anatomy the right way up with bright bones, also from RG1, a real
MONOCHROME1 CR (where stored values are high for air): checked against the display pipeline,
against the raw stored values and against the anatomy (lungs darker than the abdomen below
them and the mediastinum between them), not just by shape. Both objects must pass dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import matplotlib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from cxr_ai.dicom import codes
from cxr_ai.dicom.heat import DIAGNOSTIC_WARNING, MSG_HEATMAP_SHAPE, MSG_NO_HEATMAP
from cxr_ai.dicom.heatmap import (
    MSG_COLORMAP,
    MSG_DISPLAY_SHAPE,
    MSG_SC_DISPLAY_SIDE,
    build_heatmap_sc,
    overlay_rgb,
    sc_display,
    sc_text_lines,
)
from cxr_ai.dicom.parametric_map import (
    NOMINAL_SPACING_MM,
    PM_SCALE,
    build_parametric_map,
    build_parametric_maps,
    map_geometry,
)
from cxr_ai.dicom.sr import build_sr
from cxr_ai.imaging import display_array
from cxr_ai.phantoms import make_phantom_dataset
from cxr_ai.results import FindingResult, ModelInfo

# RG1's Referring Physician's Name is the single word "ward"; highdicom warns when copying it.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\" is unlikely:UserWarning")

DEMO = ModelInfo(name="cxr-ai-demo", version="0.1.0", device_uid="2.25.271828182845904523536028747135266249")
NAMES = ["RG1_UNCR", "RG1_J2KR", "RG1_UNCI", "RG1_J2KI", "phantom_DX_M1"]


def _blob(rows: int, cols: int, *, centre=(0.62, 0.55), width=(0.15, 0.17)) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return np.exp(-(((yy - centre[0] * rows) / (width[0] * rows)) ** 2 + ((xx - centre[1] * cols) / (width[1] * cols)) ** 2))


@pytest.fixture(scope="module")
def images(rg1_paths: dict[str, Path]) -> dict[str, tuple[Dataset, np.ndarray, np.ndarray]]:
    """name -> (dataset with pixels, stored pixel values, display_array)."""
    out = {}
    for name, path in rg1_paths.items():
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        out[name] = (ds, pixels, display_array(ds, pixels)[0])
    ds = make_phantom_dataset(modality="DX", photometric="MONOCHROME1", size=512, random_state=11)
    pixels = ds.pixel_array
    out["phantom_DX_M1"] = (ds, pixels, display_array(ds, pixels)[0])
    return out


def _finding(ds: Dataset, *, heat: np.ndarray | None = None, probability: float = 0.83) -> FindingResult:
    rows, cols = int(ds.Rows), int(ds.Columns)
    return FindingResult("cardiomegaly", "Cardiomegaly", probability, 0.5,
                         heatmap=_blob(rows, cols) if heat is None else heat)


# --- validity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_sc_and_pm_pass_dciodvfy(name, images, tmp_path, dciodvfy):
    ds, _, display = images[name]
    finding = _finding(ds)
    sc = build_heatmap_sc(ds, finding, DEMO, display_image=display)
    pm = build_parametric_map(ds, finding, DEMO)
    for obj, label in ((sc, "SCImage"), (pm, "ParametricMap")):
        path = tmp_path / f"{label}.dcm"
        obj.save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.errors == [], report.output
        assert label in report.output


# --- the Secondary Capture --------------------------------------------------------------------


def _sc_gray(sc: Dataset, tmp_path: Path) -> np.ndarray:
    """The SC's image part (above the text band) as gray 0-1, read back from a file."""
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float32) / 255.0
    return rgb.mean(axis=-1)


def _downsample(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    pil = Image.fromarray(img.astype(np.float32)).resize((shape[1], shape[0]), Image.Resampling.BOX)
    return np.asarray(pil)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("name", ["RG1_UNCR", "RG1_J2KI", "phantom_DX_M1"])
def test_sc_shows_anatomy_right_way_up_with_bright_bones(name, images, tmp_path):
    ds, stored, display = images[name]
    assert ds.PhotometricInterpretation == "MONOCHROME1"  # air is stored bright: inversion needed
    rows, cols = display.shape
    # Heat only in a small corner, so the radiograph itself is what is compared.
    heat = np.zeros((rows, cols), np.float32)
    heat[: rows // 20, : cols // 20] = 1.0
    sc = build_heatmap_sc(ds, _finding(ds, heat=heat), DEMO, display_image=display, max_side=512)
    gray = _sc_gray(sc, tmp_path)
    scale = min(1.0, 512 / max(rows, cols))
    h, w = round(rows * scale), round(cols * scale)
    image = gray[:h]
    assert max(image.shape) <= 512 and image.shape == (h, w)
    mask = np.ones_like(image, bool)
    mask[: h // 10, : w // 10] = False  # leave out the heat corner

    expected = _downsample(display, (h, w))
    assert _corr(image[mask], expected[mask]) > 0.97
    # Not merely similar in shape: flipped or inverted versions of the radiograph do not match.
    assert _corr(image[mask], expected[::-1][mask]) < 0.6
    assert _corr(image[mask], (1.0 - expected)[mask]) < -0.97
    # Independent of the display pipeline: MONOCHROME1 stores air bright, so the SC must be
    # the negative of the raw stored values.
    raw = _downsample(stored.astype(np.float32), (h, w))
    assert _corr(image[mask], raw[mask]) < -0.8

    # Anatomy: lung fields (left and right of the mediastinum, upper-middle third) are dark;
    # the mediastinum/spine between them and the abdomen below the diaphragm are bright.
    band = slice(int(0.30 * h), int(0.50 * h))
    lungs = np.concatenate([image[band, int(0.15 * w): int(0.35 * w)].ravel(),
                            image[band, int(0.65 * w): int(0.85 * w)].ravel()]).mean()
    mediastinum = image[band, int(0.45 * w): int(0.55 * w)].mean()
    abdomen = image[int(0.88 * h): int(0.97 * h), int(0.30 * w): int(0.70 * w)].mean()
    assert mediastinum > lungs + 0.1
    assert abdomen > lungs + 0.1


def test_sc_overlay_colours_the_heat_and_leaves_cold_regions_gray(images, tmp_path):
    ds, _, display = images["RG1_UNCR"]
    sc = build_heatmap_sc(ds, _finding(ds), DEMO, display_image=display)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    rgb = pydicom.dcmread(path).pixel_array.astype(int)
    rows, cols = int(ds.Rows), int(ds.Columns)
    scale = min(1.0, 1024 / max(rows, cols))
    h, w = round(rows * scale), round(cols * scale)
    hot = rgb[round(0.62 * h), round(0.55 * w)]  # heat 1: inferno's pale yellow
    warm = rgb[round(0.62 * h), round(0.6715 * w)]  # heat ~0.6: inferno's orange
    cold = rgb[round(0.2 * h), round(0.1 * w)]
    assert hot[0] - hot[2] > 30 and warm[0] - warm[2] > 30  # coloured where the heat is
    assert cold[0] == cold[1] == cold[2]  # no overlay where heat < min_heat
    band = rgb[h:]
    assert band.shape[0] > 20 and band.max() > 200 and np.median(band) == 0  # text on black


def test_overlay_blend_formula():
    gray = np.full((2, 3), 0.5, np.float32)
    heat = np.array([[0.0, 0.2, 0.6], [1.0, 1.0, 0.1]], np.float32)
    rgb = overlay_rgb(gray, heat, colormap="inferno", max_alpha=0.6, min_heat=0.2).astype(float) / 255
    lut = matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3]
    for (r, c), h in np.ndenumerate(heat):
        alpha = 0.6 * max(0.0, (h - 0.2) / 0.8)
        expected = 0.5 * (1 - alpha) + lut[round(h * 255)] * alpha
        assert rgb[r, c] == pytest.approx(expected, abs=2 / 255)  # 8-bit quantisation
    with pytest.raises(ValueError):
        overlay_rgb(gray, heat, max_alpha=1.5)


def test_sc_header(images):
    ds, _, display = images["RG1_J2KI"]
    sc = build_heatmap_sc(ds, _finding(ds), DEMO, display_image=display)
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.BodyPartExamined == "CHEST"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == ds.SOPClassUID
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert str(sc[keyword].value) == str(ds[keyword].value), keyword
    assert sc.SeriesInstanceUID != ds.SeriesInstanceUID
    assert list(sc.PatientOrientation) == ["L", "F"]  # same orientation as the source
    assert sc.LossyImageCompression == "01"  # the J2KI source was lossy
    assert "NOT FOR CLINICAL USE" in sc.SeriesDescription
    assert DIAGNOSTIC_WARNING in sc.ImageComments
    assert "PixelSpacing" not in sc  # RG1's 0.000\0.000 is never copied
    assert sc_text_lines(_finding(ds), DEMO)[1] == DIAGNOSTIC_WARNING
    assert "p = 0.83" in sc_text_lines(_finding(ds), DEMO)[0]


def test_sc_of_a_source_without_orientation_says_unknown(images, tmp_path, dciodvfy):
    ds, _, display = images["phantom_DX_M1"]
    source = Dataset()
    source.update(ds)
    source.file_meta = ds.file_meta
    del source.PatientOrientation
    sc = build_heatmap_sc(source, _finding(source), DEMO, display_image=display)
    assert "PatientOrientation" in sc and not sc.PatientOrientation
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy(path).errors == []


def test_sc_errors_say_what_to_do(images):
    ds, _, display = images["phantom_DX_M1"]
    rows, cols = int(ds.Rows), int(ds.Columns)
    no_map = FindingResult("cardiomegaly", "Cardiomegaly", 0.8, 0.5, heatmap=None)
    with pytest.raises(ValueError) as info:
        build_heatmap_sc(ds, no_map, DEMO, display_image=display)
    assert str(info.value) == MSG_NO_HEATMAP.format(key="cardiomegaly", sop=ds.SOPInstanceUID)
    small = _finding(ds, heat=np.zeros((224, 224), np.float32))
    with pytest.raises(ValueError) as info:
        build_parametric_map(ds, small, DEMO)
    assert str(info.value) == MSG_HEATMAP_SHAPE.format(
        key="cardiomegaly", shape=(224, 224), sop=ds.SOPInstanceUID, rows=rows, cols=cols)
    with pytest.raises(ValueError) as info:
        build_heatmap_sc(ds, _finding(ds), DEMO, display_image=display[:-1])
    assert str(info.value) == MSG_DISPLAY_SHAPE.format(
        shape=(rows - 1, cols), sop=ds.SOPInstanceUID, rows=rows, cols=cols)
    with pytest.raises(ValueError) as info:
        build_heatmap_sc(ds, _finding(ds), DEMO, display_image=display, colormap="no-such-map")
    assert str(info.value) == MSG_COLORMAP.format(name="no-such-map")


# --- the Parametric Map -----------------------------------------------------------------------


def test_pm_keeps_the_source_geometry_and_values(images, tmp_path):
    ds, _, _ = images["RG1_UNCR"]
    rows, cols = int(ds.Rows), int(ds.Columns)
    heat = _blob(rows, cols)
    pm = build_parametric_map(ds, _finding(ds, heat=heat), DEMO)
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert (back.Rows, back.Columns, int(back.NumberOfFrames)) == (rows, cols, 1)
    frame = back.PerFrameFunctionalGroupsSequence[0]
    mapping = frame.RealWorldValueMappingSequence[0] if "RealWorldValueMappingSequence" in frame \
        else back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = back.pixel_array.astype(np.float64) * mapping.RealWorldValueSlope + mapping.RealWorldValueIntercept
    assert np.abs(values - heat).max() <= 0.5 / PM_SCALE + 1e-6
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == codes.SALIENCY.value
    # Pixel for pixel with the source, and the source's invalid 0.000\0.000 is not copied.
    derivation = frame.DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert derivation.SourceImageSequence[0].SpatialLocationsPreserved == "YES"
    spacing = [float(v) for v in back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == [NOMINAL_SPACING_MM, NOMINAL_SPACING_MM]
    assert "nominal" in derivation.DerivationDescription
    orientation = [float(v) for v in back.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    assert orientation == [1, 0, 0, 0, 0, -1]  # PatientOrientation L\F
    assert back.FrameOfReferenceUID == map_geometry(ds).frame_of_reference_uid
    assert back.ContentLabel == "CARDIOMEGALY_MAP" and back.ContentQualification == "RESEARCH"
    # highdicom reads it back as a Parametric Map.
    assert isinstance(hd.pm.ParametricMap.from_dataset(back), hd.pm.ParametricMap)


def test_writers_do_not_modify_the_source(images):
    ds, _, display = images["RG1_UNCI"]
    before = {elem.tag: (elem.VR, str(elem.value)) for elem in ds if elem.tag != 0x7FE00010}
    build_parametric_map(ds, _finding(ds), DEMO)
    build_heatmap_sc(ds, _finding(ds), DEMO, display_image=display)
    build_sr(ds, DEMO, [_finding(ds)])
    after = {elem.tag: (elem.VR, str(elem.value)) for elem in ds if elem.tag != 0x7FE00010}
    assert after == before
    assert [str(v) for v in ds.PixelSpacing] == ["0.000", "0.000"] or list(ds.PixelSpacing) == [0, 0]


def test_pm_copies_valid_spacing(images):
    ds, _, _ = images["phantom_DX_M1"]
    pm = build_parametric_map(ds, _finding(ds), DEMO)
    spacing = [float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert map_geometry(ds).spacing_source == "PixelSpacing"


def test_one_pm_per_finding_in_one_series(images):
    ds, _, _ = images["phantom_DX_M1"]
    rows, cols = int(ds.Rows), int(ds.Columns)
    findings = [_finding(ds), FindingResult("low_ef", "Low EF", 0.2, 0.35, heatmap=_blob(rows, cols, centre=(0.6, 0.6)))]
    maps = build_parametric_maps(ds, findings, DEMO)
    assert [m.ContentLabel for m in maps] == ["CARDIOMEGALY_MAP", "LOW_EF_MAP"]
    assert len({m.SeriesInstanceUID for m in maps}) == 1
    assert len({m.SOPInstanceUID for m in maps}) == 2
    assert [int(m.InstanceNumber) for m in maps] == [1, 2]


# --- rendering internals: the cheaper path gives the same pixels ---------------------------------


def test_sc_pixels_are_the_overlay_of_the_resized_images_for_each_finding(images):
    """The display is resized once per image and reused for every finding: each SC must still
    be exactly overlay_rgb of its own heat over that display, and a new display (another
    image, same size) must not get the previous one's pixels."""
    from cxr_ai.dicom.heatmap import _resize

    ds, _, display = images["phantom_DX_M1"]
    rows, cols = display.shape
    heats = [_blob(rows, cols), _blob(rows, cols, centre=(0.3, 0.3), width=(0.1, 0.1))]
    for display_now in (display, 1.0 - display):
        for heat in heats:
            sc = build_heatmap_sc(ds, _finding(ds, heat=heat), DEMO, display_image=display_now, max_side=256)
            small = (256, 256)
            want = overlay_rgb(_resize(display_now, small), _resize(heat, small))
            np.testing.assert_array_equal(sc.pixel_array[:256], want)


def test_sc_over_a_display_made_once_equals_the_sc_over_the_display_image(images):
    """The pipeline makes the capture's background once per image in stage 1 (sc_display); the
    SC must be pixel for pixel the one made from the full display image, and a background made
    for another size or another image is refused with a message saying what to do."""
    ds, _, display = images["RG1_UNCR"]
    rows, cols = display.shape
    heats = [_blob(rows, cols), _blob(rows, cols, centre=(0.3, 0.3), width=(0.1, 0.1))]
    small = sc_display(display, max_side=512)
    assert small.source_shape == (rows, cols) and max(small.gray.shape) == 512
    for heat in heats:
        finding = _finding(ds, heat=heat)
        want = build_heatmap_sc(ds, finding, DEMO, display_image=display, max_side=512)
        got = build_heatmap_sc(ds, finding, DEMO, display_image=small, max_side=512)
        np.testing.assert_array_equal(got.pixel_array, want.pixel_array)
    with pytest.raises(ValueError) as info:
        build_heatmap_sc(ds, _finding(ds), DEMO, display_image=small, max_side=1024)
    assert str(info.value) == MSG_SC_DISPLAY_SIDE.format(made=512, wanted=1024)
    other, _, other_display = images["phantom_DX_M1"]
    with pytest.raises(ValueError) as info:
        build_heatmap_sc(ds, _finding(ds), DEMO, display_image=sc_display(other_display, max_side=512), max_side=512)
    assert str(info.value) == MSG_DISPLAY_SHAPE.format(
        shape=other_display.shape, sop=ds.SOPInstanceUID, rows=rows, cols=cols)


def test_a_map_out_of_range_is_clipped_after_maps_in_range_were_written(images):
    """A map out of range is clipped, also after maps in range were written (the SC and the PM
    of a finding read the same map)."""
    ds, _, display = images["phantom_DX_M1"]
    heat = _blob(int(ds.Rows), int(ds.Columns))
    build_heatmap_sc(ds, _finding(ds, heat=heat), DEMO, display_image=display)
    build_parametric_map(ds, _finding(ds, heat=heat), DEMO)
    wild = heat * 3.0 - 1.0
    wild[:8, :8] = np.nan
    pm = build_parametric_map(ds, _finding(ds, heat=wild), DEMO)
    want = np.round(np.clip(np.nan_to_num(wild, nan=0.0), 0.0, 1.0) * PM_SCALE).astype(np.uint16)
    np.testing.assert_array_equal(pm.pixel_array, want)


@pytest.mark.parametrize(("shape", "size"), [((2048, 2048), (1024, 1024)), ((3000, 2400), (1000, 800)),
                                            ((1955, 1841), (1024, 964))])
def test_resize_is_the_box_average_whole_factor_or_not(shape, size):
    """A whole reduction factor takes Pillow's reduce(), any other its BOX resize: both are
    the area average (to float rounding)."""
    from cxr_ai.dicom.heatmap import _resize

    img = np.random.default_rng(5).random(shape, dtype=np.float32)
    want = np.asarray(Image.fromarray(img).resize((size[1], size[0]), resample=Image.Resampling.BOX))
    got = _resize(img, size)
    assert got.shape == size and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    fy, fx = shape[0] // size[0], shape[1] // size[1]
    if shape == (size[0] * fy, size[1] * fx):  # the mean of each block, computed independently
        blocks = img.reshape(size[0], fy, size[1], fx).mean(axis=(1, 3), dtype=np.float64)
        np.testing.assert_allclose(got, blocks, rtol=0, atol=1e-6)


def test_blend_lookup_equals_pillows_composite_pixel_for_pixel():
    """The blend is looked up in a table made once per look; it must be exactly Pillow's
    palette + opacity + composite run on the image itself."""
    from cxr_ai.dicom.heatmap import _overlay_luts, _to_u8, overlay_rgb

    rng = np.random.default_rng(7)
    display = rng.random((300, 211), dtype=np.float32)
    heat = rng.random((300, 211), dtype=np.float32)
    for colormap, max_alpha, min_heat in (("inferno", 0.6, 0.2), ("viridis", 1.0, 0.0), ("magma", 0.35, 0.5)):
        palette, opacity = _overlay_luts(colormap, max_alpha, min_heat)
        heat_u8 = Image.fromarray(_to_u8(heat))
        colour = heat_u8.copy()
        colour.putpalette(palette)
        gray = Image.fromarray(_to_u8(display)).convert("RGB")
        want = np.asarray(Image.composite(colour.convert("RGB"), gray, heat_u8.point(opacity)))
        got = overlay_rgb(display, heat, colormap=colormap, max_alpha=max_alpha, min_heat=min_heat)
        assert got.shape == (300, 211, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


def test_heat_clipping_matches_nan_to_num_then_clip():
    from cxr_ai.dicom.heat import clip01 as _clip01

    heat = np.array([[np.nan, -np.inf, np.inf, -0.5], [0.0, 0.25, 1.0, 1.5]], dtype=np.float32)
    np.testing.assert_array_equal(_clip01(heat), np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0))
    inside = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    assert _clip01(inside) is inside  # no copy for a map already in [0, 1]


def test_pm_stores_rounded_heat(images):
    ds, _, _ = images["phantom_DX_M1"]
    heat = _blob(int(ds.Rows), int(ds.Columns))
    pm = build_parametric_map(ds, _finding(ds, heat=heat), DEMO)
    np.testing.assert_array_equal(pm.pixel_array, np.round(heat * PM_SCALE).astype(np.uint16))
