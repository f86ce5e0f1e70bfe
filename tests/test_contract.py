"""The pipeline contract (cxr_ai.contract): one status vocabulary, a clear refusal of a non-pipeline."""

from __future__ import annotations

import pytest

from cxr_ai.contract import InstanceStatus, PipelineLike, check_pipeline, status_of
from cxr_ai.errors import ConfigError
from cxr_ai.pipeline import Pipeline
from cxr_ai.service import import_factory
from cxr_ai.store.jobs import InstanceState


def test_pipeline_statuses_are_job_store_states() -> None:
    assert {s.value for s in InstanceStatus} <= {s.value for s in InstanceState}


class _Outcome:
    def __init__(self, status: object) -> None:
        self.status = status


@pytest.mark.parametrize(("status", "expected"), [
    (InstanceStatus.PROCESSED, InstanceStatus.PROCESSED),
    ("not_applicable", InstanceStatus.NOT_APPLICABLE),
    ("exploded", InstanceStatus.FAILED),
])
def test_status_of_reads_enum_or_string(status: object, expected: InstanceStatus) -> None:
    assert status_of(_Outcome(status)) is expected


def test_the_real_pipeline_class_implements_the_contract() -> None:
    assert callable(Pipeline.process_study)
    assert issubclass(Pipeline, PipelineLike)


class _Pipeline:
    def process_study(self, sources, *, on_results=None):  # noqa: ANN001, ANN201
        return []


class _NotAPipeline:
    def run(self, sources):  # noqa: ANN001, ANN201
        return []


def test_check_pipeline_returns_the_pipeline_typed() -> None:
    pipeline = _Pipeline()
    assert check_pipeline(pipeline) is pipeline


def test_a_class_without_process_study_is_refused_at_start_with_the_setting_named() -> None:
    with pytest.raises(TypeError, match="PipelineLike"):
        check_pipeline(_NotAPipeline(), what="mine")
    with pytest.raises(ConfigError, match=r"\[workers\] pipeline = 'test_contract:_NotAPipeline'.*process_study"):
        import_factory("test_contract:_NotAPipeline")
