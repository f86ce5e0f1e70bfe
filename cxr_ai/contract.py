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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from cxr_ai.dicom.reader import Source
    from cxr_ai.imaging import Preprocessed
    from cxr_ai.models.bundle import Bundle
    from cxr_ai.models.engine import ModelOutput
    from cxr_ai.outputs import ImageOutputs
    from cxr_ai.pipeline import InstanceOutcome
    from cxr_ai.results import ImageResult, ModelInfo

MSG_NOT_A_PIPELINE = (
    "{what} does not implement cxr_ai.contract.PipelineLike: it has no process_study(sources, *, "
    "on_results=None) method; give [workers] pipeline the factory of a class with "
    "process_study(sources, *, on_results=None) -> outcomes (see docs/architecture.md)"
)


class InstanceStatus(str, enum.Enum):
    """How one instance ended; also the job store's final instance states."""

    PROCESSED = "processed"
    NOT_APPLICABLE = "not_applicable"
    FAILED = "failed"


class OutcomeLike(Protocol):
    """What the drivers read of one instance's outcome (:class:`cxr_ai.pipeline.InstanceOutcome`).

    ``outputs`` holds the instance's result objects typed by kind (empty when there are none);
    the drivers name and route them with :mod:`cxr_ai.outputs`. The drivers only read these
    (read-only members, so a plain attribute of a narrower type satisfies them).
    """

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def status(self) -> InstanceStatus | str: ...

    @property
    def reason(self) -> str: ...

    @property
    def result(self) -> ImageResult | None: ...

    @property
    def outputs(self) -> ImageOutputs: ...


#: ``on_results``: called (at most once per :meth:`PipelineLike.process_study` call) with the
#: outcomes whose first result objects (SR, FHIR bundle) are built, before the heatmap objects
#: are: the listener writes and sends them at once. Whatever ``outputs`` gain afterwards is
#: written with the rest of the study.
ResultsCallback = Callable[[Sequence[OutcomeLike]], None]


@runtime_checkable
class PipelineLike(Protocol):
    """What the listener's workers call: one study's instances in, one outcome per instance out.

    ``on_results`` is part of the contract: the workers always pass it. A pipeline that builds
    everything at once may ignore it (every object then goes out with the study) or call it
    once with its final outcomes; :class:`cxr_ai.pipeline.Pipeline` calls it once the SRs and
    FHIR bundles are built, before the heatmaps are computed.
    """

    def process_study(self, sources: Sequence[Source], *,
                      on_results: ResultsCallback | None = None) -> Sequence[OutcomeLike]: ...


class EngineLike(Protocol):
    """What the pipeline and the batch read of the inference engine
    (:class:`cxr_ai.models.engine.InferenceEngine`, or a site's engine of the same shape)."""

    bundle: Bundle
    model_info: ModelInfo
    finding_keys: list[str]
    batch_size: int

    def predict_preprocessed(self, items: Sequence[Preprocessed], *, explain: bool = True,
                             source_maps: bool = True) -> list[ModelOutput]: ...

    def heatmaps_preprocessed(self, items: Sequence[Preprocessed]) -> list[list[np.ndarray]]: ...


class StagedPipeline(Protocol):
    """What the batch stages call: the pipeline's stages, so that decoding overlaps inference."""

    engine: EngineLike
    explain: bool

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def model_info(self) -> ModelInfo: ...

    def prepare(self, source: Source) -> tuple[InstanceOutcome, Preprocessed | None]: ...

    def infer(self, prepared: Sequence[tuple[InstanceOutcome, Preprocessed | None]], *,
              explain: bool | None = None, source_maps: bool = True) -> None: ...

    def add_heatmaps(self, inferred: Sequence[tuple[InstanceOutcome, Preprocessed]]) -> None: ...

    def build_outputs(self, outcome: InstanceOutcome, *, parts: Collection[str] = ...) -> None: ...


#: Builds a pipeline from the loaded configuration: ``factory(config=...)``.
PipelineFactory = Callable[..., PipelineLike]


def status_of(outcome: OutcomeLike) -> InstanceStatus:
    """The outcome's status in the shared vocabulary; anything unknown counts as failed."""
    value = outcome.status.value if isinstance(outcome.status, enum.Enum) else str(outcome.status)
    try:
        return InstanceStatus(value)
    except ValueError:
        return InstanceStatus.FAILED


def check_pipeline(pipeline: object, *, what: str = "the pipeline") -> PipelineLike:
    """Check ``pipeline`` against :class:`PipelineLike` and return it, typed.

    Raises ``TypeError`` (with :data:`MSG_NOT_A_PIPELINE`) when it has no callable
    ``process_study``. That it takes ``on_results`` is what the protocol declares (a type
    checker verifies it); it is not read from the signature at run time.
    """
    if not isinstance(pipeline, PipelineLike) or not callable(pipeline.process_study):
        raise TypeError(MSG_NOT_A_PIPELINE.format(what=what))
    return pipeline
