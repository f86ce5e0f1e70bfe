"""The contract between the drivers and the pipeline: what the listener and the batch call.

:class:`cxr_ai.pipeline.Pipeline` implements both protocols below. A site's own pipeline plugs
into the listener by implementing :class:`PipelineLike` and naming its factory in
``[workers] pipeline = "package.module:Name"``; :func:`check_pipeline` checks it once, when
the worker builds it, with a message that names what is missing.

One status vocabulary: :class:`InstanceStatus` is what the pipeline says of an instance, and
its three values are also the final instance states of the job store
(:class:`cxr_ai.store.jobs.InstanceState` uses the same strings); :func:`status_of` is the one
place a driver reads an outcome's status.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

    from cxr_ai.dicom.reader import Source
    from cxr_ai.imaging import Preprocessed
    from cxr_ai.results import ImageResult, ModelInfo

MSG_NOT_A_PIPELINE = (
    "{what} does not implement cxr_ai.contract.PipelineLike: it has no process_study(sources) "
    "method; give [workers] pipeline the factory of a class with process_study(sources) -> "
    "outcomes (see docs/architecture.md)"
)


class InstanceStatus(str, enum.Enum):
    """How one instance ended; also the job store's final instance states."""

    PROCESSED = "processed"
    NOT_APPLICABLE = "not_applicable"
    FAILED = "failed"


class OutcomeLike(Protocol):
    """What the drivers read of one instance's outcome (:class:`cxr_ai.pipeline.InstanceOutcome`)."""

    sop_instance_uid: str
    status: InstanceStatus | str
    reason: str
    result: ImageResult | None
    datasets: list[Dataset]
    fhir_bundle: dict[str, Any] | None


#: Called with the outcomes whose first result objects (SR, FHIR) are built, before the
#: heatmap objects are: the listener sends them at once.
ResultsCallback = Callable[[list[Any]], None]


@runtime_checkable
class PipelineLike(Protocol):
    """What the listener's workers call: one study's instances in, one outcome per instance out.

    A pipeline that can hand over its first results early also takes ``on_results``
    (a keyword argument, :data:`ResultsCallback`), as :class:`cxr_ai.pipeline.Pipeline` does.
    """

    def process_study(self, sources: Sequence[Source]) -> Sequence[OutcomeLike]: ...


class StagedPipeline(Protocol):
    """What the batch stages call: the pipeline's stages, so that decoding overlaps inference."""

    config: Mapping[str, Any]
    engine: Any  # cxr_ai.models.engine.InferenceEngine (or a site's engine of the same shape)
    explain: bool

    @property
    def model_info(self) -> ModelInfo: ...

    def prepare(self, source: Source) -> tuple[Any, Preprocessed | None]: ...

    def infer(self, prepared: Sequence[tuple[Any, Preprocessed | None]], *,
              explain: bool | None = None, source_maps: bool = True) -> None: ...

    def add_heatmaps(self, inferred: Sequence[tuple[Any, Preprocessed]]) -> None: ...

    def build_outputs(self, outcome: Any, *, parts: Collection[str] = ...) -> None: ...


#: Builds a pipeline from the loaded configuration: ``factory(config=...)``.
PipelineFactory = Callable[..., PipelineLike]


def status_of(outcome: OutcomeLike) -> InstanceStatus:
    """The outcome's status in the shared vocabulary; anything unknown counts as failed."""
    value = outcome.status.value if isinstance(outcome.status, enum.Enum) else str(outcome.status)
    try:
        return InstanceStatus(value)
    except ValueError:
        return InstanceStatus.FAILED


def check_pipeline(pipeline: object, *, what: str = "the pipeline") -> bool:
    """Check ``pipeline`` against :class:`PipelineLike`; return whether it takes ``on_results``.

    Raises ``TypeError`` (with :data:`MSG_NOT_A_PIPELINE`) when it has no callable
    ``process_study``.
    """
    if not isinstance(pipeline, PipelineLike) or not callable(pipeline.process_study):
        raise TypeError(MSG_NOT_A_PIPELINE.format(what=what))
    try:
        return "on_results" in inspect.signature(pipeline.process_study).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return False
