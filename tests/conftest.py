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


# --- DICOM validators (dicom3tools dciodvfy, dcmtk dsrdump) used by the result-object tests ---


class DciodvfyReport:
    """dciodvfy's verdict on one file: its error and warning lines."""

    def __init__(self, path: Path, output: str) -> None:
        self.path = path
        self.output = output
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        self.errors = [line for line in lines if line.startswith("Error")]
        self.warnings = [line for line in lines if line.startswith("Warning")]

    def __repr__(self) -> str:
        return f"DciodvfyReport({self.path.name}: {len(self.errors)} errors, {len(self.warnings)} warnings)"


@pytest.fixture(scope="session")
def dciodvfy():
    """Run dicom3tools ``dciodvfy`` on a file; returns a :class:`DciodvfyReport`."""
    import logging
    import shutil
    import subprocess

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed; run the set-up (make setup)")
    log = logging.getLogger("tests.dciodvfy")

    def run(path: Path) -> DciodvfyReport:
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
        report = DciodvfyReport(Path(path), proc.stdout + proc.stderr)
        log.info("%r", report)
        for line in report.warnings:
            log.info("dciodvfy %s: %s", Path(path).name, line)
        return report

    return run
