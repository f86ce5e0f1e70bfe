"""Fuzzing the read + gate + pixel path with hypothesis (bounded: examples and deadline).

Seeds are the real NEMA radiographs (RG1 chest, RG3 tibia) with their headers intact and
their pixels reduced to 256 x 256 (so one example decodes in milliseconds), in native and
RLE/JPEG 2000 encodings. Mutations: bit flips, truncations, inserted/deleted bytes, and
random values for the header attributes the reader trusts (Rows, Columns, BitsStored,
BitsAllocated, HighBit, PixelRepresentation, SamplesPerPixel, PhotometricInterpretation,
NumberOfFrames, window, rescale, transfer syntax). The contract: ``read_radiograph`` /
``check_applicability`` / ``preprocess`` either succeed, return a rejected
:class:`GateDecision`, or raise :class:`cxr_ai.errors.ReadError` - never anything else.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from cxr_ai.dicom.gate import GateReason, check_applicability
from cxr_ai.errors import ReadError
from cxr_ai.imaging import PixelPipelineSpec, preprocess

SPEC = PixelPipelineSpec(size=64)
FUZZ = settings(max_examples=60, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_SEEDS: dict[str, bytes] = {}
findings: list[str] = []


def _small(path: Path, *, syntax: str) -> bytes:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array[::7, ::7][:256, :256].astype(np.uint16)
    ds.Rows, ds.Columns = arr.shape
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def seeds(data_store_dir: Path) -> dict[str, bytes]:
    if not _SEEDS:
        for name in ("RG1_UNCR", "RG3_UNCR"):
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless):
                _SEEDS[f"{name}-{syntax.keyword}"] = _small(data_store_dir / f"{name}.dcm", syntax=syntax)
        _SEEDS["RG1_J2KI"] = (data_store_dir / "RG1_J2KI.dcm").read_bytes()  # real JPEG 2000 stream
    return _SEEDS


def exercise(payload: bytes | pydicom.Dataset) -> str:
    """The path under test. Returns the outcome; raises only if the contract is broken."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decision, rg = check_applicability(payload)
            if rg is None:
                assert not decision.accepted and isinstance(decision.reason, GateReason)
                return f"rejected:{decision.reason.value}"
            if not decision.accepted:
                return f"rejected:{decision.reason.value}"
            pre = preprocess(rg, SPEC)
            assert pre.image.shape == (1, 64, 64) and pre.image.dtype == np.float32
            return "accepted"
        except ReadError as exc:
            assert exc.reason and str(exc)
            return f"read_error:{exc.reason}"


seed_names = st.sampled_from(["RG1_UNCR-ExplicitVRLittleEndian", "RG1_UNCR-ImplicitVRLittleEndian",
                              "RG1_UNCR-RLELossless", "RG3_UNCR-ExplicitVRLittleEndian", "RG3_UNCR-RLELossless"])


@pytest.mark.slow
@FUZZ
@given(name=seed_names, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                       min_size=1, max_size=24))
def test_bit_flips(name: str, flips) -> None:
    data = bytearray(_SEEDS[name])
    header = min(len(data), 4096)  # most flips in the header, where the parser lives
    for i, (pos, bit) in enumerate(flips):
        span = header if i % 3 else len(data)
        data[int(pos * span)] ^= 1 << bit
    exercise(bytes(data))


@pytest.mark.slow
@FUZZ
@given(name=seed_names | st.just("RG1_J2KI"), cut=st.floats(0, 1), insert=st.binary(max_size=64),
       where=st.floats(0, 1), delete=st.integers(0, 64))
def test_truncations_insertions_deletions(name: str, cut: float, insert: bytes, where: float, delete: int) -> None:
    data = _SEEDS[name]
    exercise(data[: int(len(data) * cut)])
    pos = int(len(data) * where)
    exercise(data[:pos] + insert + data[pos + delete:])


_INT_ATTRS = ("Rows", "Columns", "BitsStored", "BitsAllocated", "HighBit", "PixelRepresentation",
              "SamplesPerPixel", "NumberOfFrames", "PlanarConfiguration")
_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
             "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
             "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
             "1.2.840.10008.1.2.4.100", "1.2.3.4", ""]


@pytest.mark.slow
@FUZZ
@given(name=seed_names,
       ints=st.dictionaries(st.sampled_from(_INT_ATTRS), st.one_of(st.integers(0, 70000), st.integers(-5, 5)),
                            max_size=4),
       photometric=st.none() | st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR",
                                                "", "monochrome2", "MONOCHROME3"]),
       window=st.none() | st.tuples(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                    st.floats(allow_nan=True, allow_infinity=True, width=32)),
       rescale=st.none() | st.tuples(st.floats(-1e6, 1e6, width=32), st.floats(-1e6, 1e6, width=32)),
       syntax=st.none() | st.sampled_from(_SYNTAXES),
       drop=st.lists(st.sampled_from(["Modality", "BodyPartExamined", "ViewPosition", "PixelData",
                                      "WindowCenter", "PhotometricInterpretation", "StudyInstanceUID"]),
                     max_size=2))
def test_header_values(name: str, ints, photometric, window, rescale, syntax, drop) -> None:
    ds = pydicom.dcmread(io.BytesIO(_SEEDS[name]))
    for k, v in ints.items():
        setattr(ds, k, v % 65536 if k not in ("NumberOfFrames",) else v)
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (f"{v:.6g}"[:16] for v in window)
    if rescale is not None:
        ds.RescaleIntercept, ds.RescaleSlope = (f"{v:.6g}"[:16] for v in rescale)
    for k in drop:
        if k in ds:
            delattr(ds, k)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    exercise(ds)
    # the same damage after a round trip through bytes (what a peer would send)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buf, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - pydicom cannot even write it: nothing to send
        return
    exercise(buf.getvalue())


def test_seeds_are_read_as_expected() -> None:
    """The fuzzer's seeds are what they claim to be (else the fuzzing tests nothing)."""
    assert exercise(_SEEDS["RG1_UNCR-ExplicitVRLittleEndian"]) == "accepted"
    assert exercise(_SEEDS["RG1_UNCR-RLELossless"]) == "accepted"
    assert exercise(_SEEDS["RG3_UNCR-ExplicitVRLittleEndian"]) == "rejected:body_part"
    assert exercise(_SEEDS["RG1_J2KI"]) == "accepted"
    assert exercise(b"") == "rejected:not_dicom"
