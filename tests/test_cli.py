"""The ``cxr-ai`` command, called in-process through ``main(argv)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_ai.cli import main


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "jobs", "demo", "phantoms", "check", "batch", "worklist", "evaluate"):
        assert command in out


def test_check_prints_one_decision_per_file(rg1_paths: dict[str, Path], rg3_paths: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(rg1_paths["RG1_J2KR"]), str(rg3_paths["RG3_UNCR"])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["accepted"], r["reason"]) for r in lines] == [(True, "accepted"), (False, "body_part")]
