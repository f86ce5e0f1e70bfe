"""requirements.lock: pins every dependency of pyproject.toml, no CUDA build, and the check that
``make setup`` runs finds what differs."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", REPO / "deploy" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_lock", module)
    spec.loader.exec_module(module)
    return module


def test_lock_pins_every_declared_dependency_except_torch() -> None:
    pins = _check_lock().read_lock(LOCK)
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {canonicalize_name(Requirement(r).name) for r in declared} - {"torch"}
    missing = sorted(names - set(pins))
    assert not missing, f"pyproject.toml names {missing}, which requirements.lock does not pin: run `make lock`"
    assert "torch" not in pins
    for name, version in pins.items():
        assert not name.startswith(("nvidia-", "cuda-")) and name != "triton", f"CUDA package {name}=={version} in the lock"


def test_lock_check_names_a_wrong_version_and_an_unpinned_dependency() -> None:
    check = _check_lock()
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    numpy_version = installed["numpy"].version
    lock = {"numpy": numpy_version, "pydicom": installed["pydicom"].version}
    assert not any(line.startswith(("numpy", "pydicom")) for line in check.problems(lock, root="highdicom", extras=(), installed=installed))
    lock["numpy"] = numpy_version + ".post999"
    found = check.problems(lock, root="highdicom", extras=(), installed=installed)
    assert f"numpy: {numpy_version} is installed, the lock pins {numpy_version}.post999" in found
    # highdicom needs pillow (among others), which this lock does not pin
    assert any(line.startswith("pillow: needed by highdicom but not pinned") for line in found)
