"""The "never" rules of docs/architecture.md, and no import cycles inside cxr_ai.

Read with the standard library's ``ast``: every ``import`` counts, at module level and inside
functions alike; imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxr_ai"

#: part (module or package prefix) -> the parts it must never import.
NO_DRIVERS = ("cxr_ai.net", "cxr_ai.store", "cxr_ai.service", "cxr_ai.batch",
              "cxr_ai.cli", "cxr_ai.ops_cli", "cxr_ai.worklist_cli")
NEVER: dict[str, tuple[str, ...]] = {
    "cxr_ai.pipeline": NO_DRIVERS,
    "cxr_ai.outputs": NO_DRIVERS,
    "cxr_ai.contract": NO_DRIVERS + ("cxr_ai.pipeline", "cxr_ai.models", "cxr_ai.outputs"),
    "cxr_ai.results": NO_DRIVERS + ("cxr_ai.dicom.gate", "cxr_ai.models", "cxr_ai.pipeline"),
    "cxr_ai.models": NO_DRIVERS + ("cxr_ai.pipeline",),
    "cxr_ai.imaging": NO_DRIVERS + ("cxr_ai.models", "cxr_ai.pipeline"),
    "cxr_ai.dicom": NO_DRIVERS + ("cxr_ai.pipeline", "cxr_ai.outputs", "cxr_ai.fhir"),
    "cxr_ai.fhir": NO_DRIVERS + ("cxr_ai.pipeline", "cxr_ai.outputs"),
    "cxr_ai.net": ("cxr_ai.models", "cxr_ai.pipeline", "cxr_ai.outputs", "cxr_ai.service.web", "cxr_ai.batch",
                   "cxr_ai.service.wiring", "cxr_ai.service.workers", "cxr_ai.service.routing",
                   "cxr_ai.service.cli"),
    "cxr_ai.store": ("cxr_ai.net", "cxr_ai.service", "cxr_ai.batch", "cxr_ai.models",
                     "cxr_ai.pipeline"),
    "cxr_ai.batch": ("cxr_ai.service", "cxr_ai.cli"),
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The cxr_ai modules ``module`` imports (each name resolved to the deepest known module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [prefix] + [f"{prefix}.{a.name}" for a in node.names]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in resolve(node):
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imported(m, p, known) for m, p in known.items()}


def _within(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


def test_no_part_imports_what_it_must_never_import() -> None:
    graph = _graph()
    broken = sorted(
        f"{m} imports {t} (never: {part} -> {never})"
        for m, targets in graph.items()
        for part, nevers in NEVER.items() if _within(m, part)
        for t in targets
        for never in nevers if _within(t, never) and not _within(t, part)
    )
    assert not broken, "\n".join(broken)


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports_and_skips_type_checking(tmp_path: Path) -> None:
    """The rules above are only as good as the reader: a late import counts, a typing one not."""
    pkg = tmp_path / "cxr_ai"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cxr_ai import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cxr_ai import a\n")
    known = {"cxr_ai": pkg / "__init__.py", "cxr_ai.a": pkg / "a.py", "cxr_ai.b": pkg / "b.py"}
    assert _imported("cxr_ai.a", pkg / "a.py", known) == {"cxr_ai", "cxr_ai.b"}
    assert _imported("cxr_ai.b", pkg / "b.py", known) == set()


#: The edge: the modules that read the environment and the configuration file (through
#: cxr_ai.config.load_settings) and pass settings down as arguments. Any ``__main__`` too.
EDGE = frozenset({"cxr_ai.config", "cxr_ai.cli", "cxr_ai.ops_cli", "cxr_ai.worklist_cli", "cxr_ai.service.cli",
                  "cxr_ai.batch.cli", "cxr_ai.monitoring.cli", "cxr_ai.evaluation.cli", "cxr_ai.service.web.users_cli"})
#: What reads the environment (``os.<name>`` or ``from os import <name>``).
ENV_READERS = frozenset({"environ", "environb", "getenv", "getenvb"})
#: What loads the configuration file and the environment.
CONFIG_LOADERS = frozenset({"load_config", "load_settings", "read_toml"})


def _reads_outside(path: Path) -> list[str]:
    """Where a module reads the environment or loads the configuration: ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in ENV_READERS and (
                isinstance(node.value, ast.Name) and node.value.id == "os"):
            found.append(f"{node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"{node.lineno}: from os import {a.name}" for a in node.names if a.name in ENV_READERS]
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in CONFIG_LOADERS:
                found.append(f"{node.lineno}: {name}()")
    return found


def _edge(module: str) -> bool:
    return module in EDGE or module.endswith(".__main__")


def test_only_the_edge_reads_the_environment_or_loads_the_configuration() -> None:
    """Settings are resolved once, at the edge (cxr_ai.config.load_settings, called by the
    CLIs); below it they come in as arguments, never from os.environ or a file."""
    broken = sorted(f"{module}:{where}" for module, path in _modules().items() if not _edge(module)
                    for where in _reads_outside(path))
    assert not broken, "read outside the edge (pass it down from the CLI instead):\n" + "\n".join(broken)


def test_the_edge_checker_sees_every_way_of_reading(tmp_path: Path) -> None:
    code = ("import os\nfrom os import getenv as g\nfrom cxr_ai import config\n"
            "def f():\n    return os.environ.get('A'), os.getenv('B'), config.load_config(None)\n"
            "def h():\n    return load_settings('x.toml'), os.path.join('a', 'b'), os.environment_free\n")
    (tmp_path / "m.py").write_text(code)
    assert sorted(_reads_outside(tmp_path / "m.py")) == [
        "2: from os import getenv", "5: load_config()", "5: os.environ", "5: os.getenv", "7: load_settings()"]
    assert _edge("cxr_ai.service.cli") and _edge("cxr_ai.batch.__main__") and not _edge("cxr_ai.service.wiring")


@pytest.mark.parametrize("module", ["cxr_ai.monitoring.log"])
def test_logging_a_prediction_loads_no_evaluation_stack(module: str) -> None:
    """Logging one prediction must not pull in matplotlib, fairlearn or scipy."""
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('matplotlib', 'fairlearn', 'scipy') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"
