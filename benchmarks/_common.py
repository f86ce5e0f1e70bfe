"""Shared by the benchmark scripts: what machine a figure was measured on, and where it goes."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """Python, torch and accelerator of this run (figures are only comparable within a run)."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.cuda.is_available())
    except ImportError:
        pass
    return info


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Write a benchmark's result as indented JSON, creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
