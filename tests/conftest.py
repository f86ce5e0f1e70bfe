"""Shared fixtures: real radiographs from pydicom-data, temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RG1_NAMES = ("RG1_UNCR", "RG1_J2KR", "RG1_UNCI", "RG1_J2KI")
RG3_NAMES = ("RG3_UNCR", "RG3_J2KR", "RG3_UNCI", "RG3_J2KI")


@pytest.fixture(scope="session")
def data_store_dir() -> Path:
    """The folder of NEMA WG04 and other real DICOM files shipped by pydicom-data."""
    import data_store

    return Path(os.path.dirname(data_store.__file__)) / "data"


@pytest.fixture(scope="session")
def rg1_paths(data_store_dir: Path) -> dict[str, Path]:
    """The real CR chest PA (RG1) in its four encodings, by name."""
    return {name: data_store_dir / f"{name}.dcm" for name in RG1_NAMES}


@pytest.fixture(scope="session")
def rg3_paths(data_store_dir: Path) -> dict[str, Path]:
    """The real CR tibia (RG3) in its four encodings, by name."""
    return {name: data_store_dir / f"{name}.dcm" for name in RG3_NAMES}
