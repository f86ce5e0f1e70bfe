"""Every case of the bad-input corpus ends in its expected state, with a reason, no crash."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from badinput import build_corpus
from cxr_ai.pipeline import InstanceStatus, Pipeline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, data_store_dir: Path):
    return build_corpus(tmp_path_factory.mktemp("bad"), data_store_dir)


def test_corpus_is_large_and_varied(corpus) -> None:
    assert len(corpus) >= 50
    assert len({c.name for c in corpus}) == len(corpus)
    kinds = Counter(c.status for c in corpus)
    assert kinds["processed"] >= 10 and kinds["failed"] >= 15 and kinds["not_applicable"] >= 15


@pytest.mark.slow
def test_pipeline_outcomes(corpus, tmp_path: Path) -> None:
    pipeline = Pipeline(explain=False)
    report = []
    mismatches = []
    for case in corpus:
        (outcome,) = pipeline.process_study([case.path])
        report.append({"case": case.name, "status": outcome.status.value, "reason": outcome.reason,
                       "message": outcome.message})
        if (outcome.status.value, outcome.reason) != (case.status, case.reason):
            mismatches.append((case.name, (case.status, case.reason), (outcome.status.value, outcome.reason),
                               outcome.message))
        assert outcome.message
        if outcome.status is not InstanceStatus.PROCESSED:
            assert outcome.datasets == [] and case.path.name in outcome.message or outcome.source == "<dataset>"
    assert not mismatches, "\n".join(map(str, mismatches))
    # Written for the hardening report (benchmarks/results/bad_inputs.json via the listener run).
    (tmp_path / "bad_inputs.json").write_text(json.dumps(report, indent=1))
