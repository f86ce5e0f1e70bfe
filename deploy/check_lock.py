"""Check that a Python environment holds exactly the versions of ``requirements.lock``.

::

    python deploy/check_lock.py [--lock requirements.lock] [--extra dev]

Run by ``make setup`` after installing, so that a site (and CI) runs the versions CI tested.
It fails, naming each package, when

- an installed package that the lock pins has another version;
- cxr-ai (with the extras given) needs a package, directly or through its dependencies, that
  the lock does not pin: ``pyproject.toml`` changed and ``make lock`` was not run.

torch is not in the lock (``make setup`` installs ``TORCH_SPEC``, or keeps the CUDA build a GPU
site installed first), so neither torch nor what only torch needs is checked here.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: Installed with the project but deliberately not locked (see the module docstring).
UNLOCKED = frozenset({"torch", "pip", "cxr-ai"})

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#\\]+)")


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a pip-compile output."""
    pins: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _installed() -> dict[str, metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}


def _requirements(dist: metadata.Distribution, extras: Iterable[str]) -> list[Requirement]:
    env = default_environment()
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None:
            out.append(req)
            continue
        wanted = [""] + list(extras)
        if any(req.marker.evaluate({**env, "extra": e}) for e in wanted):
            out.append(req)
    return out


def needed(root: str, extras: Sequence[str], installed: dict[str, metadata.Distribution]) -> set[str]:
    """Canonical names that ``root[extras]`` needs in this environment, not looking into torch."""
    names: set[str] = set()
    visited: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(canonicalize_name(root), tuple(extras))]
    while todo:
        item = todo.pop()
        if item in visited:
            continue
        visited.add(item)
        dist = installed.get(item[0])
        if dist is None:
            continue
        for req in _requirements(dist, item[1]):
            dep = canonicalize_name(req.name)
            if dep == "torch":
                continue
            names.add(dep)
            todo.append((dep, tuple(sorted(req.extras))))
    return names


def problems(lock: dict[str, str], *, root: str = "cxr-ai", extras: Sequence[str] = ("dev",),
             installed: dict[str, metadata.Distribution] | None = None) -> list[str]:
    """What differs between this environment and the lock, one readable line each."""
    installed = _installed() if installed is None else installed
    found = []
    for name, want in sorted(lock.items()):
        dist = installed.get(name)
        if dist is not None and dist.version != want:
            found.append(f"{name}: {dist.version} is installed, the lock pins {want}")
    for name in sorted(needed(root, extras, installed) - set(lock) - UNLOCKED):
        found.append(f"{name}: needed by {root} but not pinned in the lock (run `make lock`)")
    if canonicalize_name(root) not in installed:
        found.append(f"{root} is not installed in this environment")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="check_lock", description=__doc__.splitlines()[0])
    ap.add_argument("--lock", default="requirements.lock")
    ap.add_argument("--extra", action="append", default=None, help="extras of cxr-ai to include (default: dev)")
    args = ap.parse_args(argv)
    found = problems(read_lock(args.lock), extras=args.extra or ["dev"])
    for line in found:
        print(f"{args.lock}: {line}", file=sys.stderr)
    if found:
        print(f"{args.lock}: this environment does not hold the locked versions; "
              "`make setup` installs them, `make lock` refreshes the lock after pyproject.toml changed.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
