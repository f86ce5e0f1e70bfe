"""Second opinion on one upload: real radiographs (RG1 chest PA, RG3 tibia, a CT) as DICOM and
as PNG/JPEG made from them, through the shipped demo model; and every kind of bad input."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_ai.config import load_config
from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.dicom.sr import read_sr_findings
from cxr_ai.imaging import display_array
from cxr_ai.pipeline import Pipeline
from cxr_ai.second_opinion import (
    NOT_VERIFIED,
    SecondOpinionError,
    SecondOpinionSettings,
    second_opinion,
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    cfg = load_config(env={})
    root = tmp_path_factory.mktemp("so")
    cfg["store"]["root"] = str(root / "var")
    cfg["monitoring"]["dir"] = str(root / "mon")
    cfg["worklist"]["path"] = str(root / "worklist.sqlite3")
    return Pipeline(config=cfg)


@pytest.fixture(scope="module")
def rg1_display(rg1_paths) -> np.ndarray:
    rg = read_radiograph(rg1_paths["RG1_UNCR"], decode=True)
    return display_array(rg.dataset, rg.pixels())[0]  # [0, 1], bone bright (MONOCHROME1 inverted)


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_dicom_chest_gets_findings_overlay_and_downloads(pipeline, rg1_paths, tmp_path) -> None:
    for name in ("RG1_UNCR", "RG1_J2KR"):  # uncompressed and JPEG 2000 lossless
        data = rg1_paths[name].read_bytes()
        ans = second_opinion(data, f"/some/dir/{name}.dcm", pipeline=pipeline)
        assert ans.accepted and ans.status == 200 and ans.applicability_verified and ans.kind == "dicom"
        assert ans.filename == f"{name}.dcm"
        assert [f["key"] for f in ans.findings] == ["cardiomegaly", "low_ef"]
        for f in ans.findings:
            assert 0.0 <= f["probability"] <= 1.0 and f["positive"] == (f["probability"] >= f["threshold"])
        assert ans.model["name"] and ans.model["version"] and ans.model["not_for_clinical_use"] is True
        png = Image.open(io.BytesIO(ans.overlays["cardiomegaly"]))
        assert png.format == "PNG" and png.mode == "RGB" and max(png.size) == 1024
        kinds = sorted(k.split("-")[-2] for k in ans.downloads if k.endswith(".dcm"))
        assert kinds == ["PM", "PM", "SC", "SC", "SR"]
        sr_name = next(k for k in ans.downloads if "-SR-" in k)
        sr = pydicom.dcmread(io.BytesIO(ans.downloads[sr_name]))
        got = {f["key"]: f["probability"] for f in read_sr_findings(sr)}
        assert got == pytest.approx({f["key"]: f["probability"] for f in ans.findings}, abs=1e-6)
        bundle = json.loads(ans.downloads[f"{name}-fhir-bundle.json"])
        assert bundle["resourceType"] == "Bundle" and bundle["entry"]
        assert json.loads(json.dumps(ans.to_dict()))["findings"] == ans.findings
    # the same pipeline as the listener: the same probabilities as process_instance
    direct = pipeline.process_instance(rg1_paths["RG1_UNCR"])
    assert [f.probability for f in direct.result.findings] == pytest.approx(
        [f["probability"] for f in second_opinion(rg1_paths["RG1_UNCR"].read_bytes(), "a.dcm",
                                                  pipeline=pipeline).findings], abs=1e-6)
    # nothing written: no prediction log, worklist, job store or outbox
    mon = Path(pipeline.config["monitoring"]["dir"])
    assert not (mon / "predictions.jsonl").exists()
    assert not Path(pipeline.config["worklist"]["path"]).exists()
    assert not (Path(pipeline.config["store"]["root"]) / "jobs.sqlite3").exists()


def test_rejected_dicom_gets_the_gate_reason_in_words(pipeline, rg3_paths) -> None:
    tibia = second_opinion(rg3_paths["RG3_UNCR"].read_bytes(), "leg.dcm", pipeline=pipeline)
    assert not tibia.accepted and tibia.status == 422 and tibia.reason == "body_part" and not tibia.findings
    assert "not the chest" in tibia.message and tibia.message.startswith("leg.dcm:")
    ct = second_opinion(Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes(), "ct.dcm",
                        pipeline=pipeline)
    assert not ct.accepted and ct.reason == "modality" and "modality CT" in ct.message and not ct.downloads
    # a raw data set (no preamble, no file meta, as on the wire) under any name is still DICOM
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    del ds.file_meta
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    raw = second_opinion(fp.getvalue(), "upload.bin", pipeline=pipeline)
    assert raw.kind == "dicom" and not raw.accepted and raw.reason == "modality"
    # and a PNG under a DICOM name is still read as the PNG it is
    rg = read_radiograph(rg3_paths["RG3_UNCR"], decode=True)
    png = second_opinion(_png(np.rint(display_array(rg.dataset, rg.pixels())[0] * 255).astype(np.uint8)),
                         "named.dcm", pipeline=pipeline)
    assert png.kind == "png" and png.accepted and not png.applicability_verified


def test_png_and_jpeg_from_a_radiograph(pipeline, rg1_paths, rg1_display) -> None:
    ref = second_opinion(rg1_paths["RG1_UNCR"].read_bytes(), "rg1.dcm", pipeline=pipeline)
    ref_p = np.array([f["probability"] for f in ref.findings])
    u8 = np.rint(rg1_display * 255).astype(np.uint8)
    u16 = np.rint(rg1_display * 65535).astype(np.uint16)
    rgb = np.repeat(u8[..., None], 3, axis=-1)
    rgb[::7, ::5, 0] = np.clip(rgb[::7, ::5, 0].astype(int) + 1, 0, 255).astype(np.uint8)  # within tolerance
    for data, name, bits in ((_png(u8), "rg1.png", "8-bit"), (_png(u16), "rg1-16.png", "16-bit"),
                             (_jpeg(u8), "rg1.jpg", "8-bit"), (_png(rgb), "rg1-rgb.png", "8-bit")):
        ans = second_opinion(data, name, pipeline=pipeline)
        assert ans.accepted and ans.status == 200 and not ans.applicability_verified
        assert NOT_VERIFIED in ans.warnings and NOT_VERIFIED in ans.message
        assert any(bits in a for a in ans.assumptions), ans.assumptions
        assert any(a.startswith("photometric: MONOCHROME2 assumed") for a in ans.assumptions)
        assert any(a.startswith("pixel spacing: unknown") for a in ans.assumptions)
        assert set(ans.overlays) == {"cardiomegaly", "low_ef"} and not ans.downloads
        p = np.array([f["probability"] for f in ans.findings])
        # the exported image is the DICOM's own display rendering: the reading stays close
        assert np.abs(p - ref_p).max() < 0.1, (name, p, ref_p)
    assert any(a.startswith("colour: RGB with equal channels") for a in
               second_opinion(_png(rgb), "x.png", pipeline=pipeline).assumptions)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (8-bit grayscale)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case", ["empty", "too_large", "not_image", "truncated_png", "truncated_dicom",
                                  "huge_png", "huge_dicom", "apng", "multiframe_dicom", "colour", "gif"])
def test_bad_input_gets_a_clear_message_and_status(case, pipeline, rg1_paths, rg1_display, tmp_path) -> None:
    u8 = np.rint(rg1_display[::4, ::4] * 255).astype(np.uint8)
    settings = SecondOpinionSettings()
    expect: tuple[int, str, str]
    if case == "empty":
        data, name, expect = b"", "x.png", (400, "empty", "the file is empty")
    elif case == "too_large":
        data, name = _png(u8), "big.png"
        settings = SecondOpinionSettings(max_bytes=len(data) - 1)
        expect = (413, "too_large", "the limit is")
    elif case == "not_image":
        data, name, expect = b"Dear doctor, please find attached...\n" * 20, "letter.txt", (
            415, "not_image", "not a DICOM, PNG or JPEG image")
    elif case == "truncated_png":
        full = _png(u8)
        data, name, expect = full[: len(full) // 2], "cut.png", (400, "truncated", "truncated or corrupt")
    elif case == "truncated_dicom":
        full = rg1_paths["RG1_J2KR"].read_bytes()  # encapsulated: the cut ends inside an element
        data, name, expect = full[: len(full) // 2], "cut.dcm", (400, "truncated", "truncated")
    elif case == "huge_png":
        data, name, expect = _png_claiming(60000, 60000), "huge.png", (413, "image_size", "60000")
    elif case == "huge_dicom":
        ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
        ds.Rows = ds.Columns = 60000
        buf = io.BytesIO()
        ds.save_as(buf)
        ans = second_opinion(buf.getvalue(), "huge.dcm", pipeline=pipeline)
        assert not ans.accepted and ans.status == 422 and ans.reason == "image_size" and "60000x60000" in ans.message
        return
    elif case == "apng":
        frames = [Image.fromarray(u8), Image.fromarray(255 - u8)]
        buf = io.BytesIO()
        frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
        data, name, expect = buf.getvalue(), "cine.png", (422, "multi_frame", "2 frames")
    elif case == "multiframe_dicom":
        ds = pydicom.dcmread(rg1_paths["RG1_UNCR"])
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
        buf = io.BytesIO()
        ds.save_as(buf)
        ans = second_opinion(buf.getvalue(), "two.dcm", pipeline=pipeline)
        assert not ans.accepted and ans.status == 422 and ans.reason == "multi_frame" and "2 frames" in ans.message
        return
    elif case == "colour":  # a synthetic colour photo: a warm gradient with a blue disc
        h, w = 400, 600
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([200 + 55 * x / w, 120 + 80 * y / h, 60 + 0 * x], axis=-1)
        img[(x - 300) ** 2 + (y - 200) ** 2 < 80 ** 2] = (30, 60, 220)
        data, name, expect = _jpeg(img.astype(np.uint8)), "cat.jpg", (422, "colour", "a colour image")
    else:  # gif
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format="GIF")
        data, name, expect = buf.getvalue(), "x.gif", (415, "format", "GIF images are not accepted")
    with pytest.raises(SecondOpinionError) as err:
        second_opinion(data, name, pipeline=pipeline, settings=settings)
    status, reason, words = expect
    assert (err.value.status, err.value.reason) == (status, reason), err.value.message
    assert words in err.value.message and err.value.message.startswith(name)
