"""The core: DICOM instance in -> applicability decision -> model outputs -> result objects.

No sockets, no spool, no globals: the listener (:mod:`cxr_ai.service`) and the batch
processor (:mod:`cxr_ai.batch`) are two drivers of this one class. Every instance ends in one
of three states, with a reason:

- ``processed``: the gate accepted it, the models ran, the SR / heatmap SC / Parametric Map /
  FHIR objects were built;
- ``not_applicable``: the gate rejected it (wrong modality, body part, view, ...);
- ``failed``: it could not be read or decoded, or a result object could not be built.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from cxr_ai.contract import EngineLike, InstanceStatus, ResultsCallback
from cxr_ai.dicom.gate import GateDecision, GateReason, GateRules, check_applicability
from cxr_ai.dicom.reader import Radiograph, Source, sanitized_for_outputs
from cxr_ai.errors import ReadError
from cxr_ai.imaging import PixelPipelineSpec, Preprocessed, display_array, letterbox
from cxr_ai.outputs import ImageOutputs, outputs_for
from cxr_ai.results import HEATMAP_PARTS, OUTPUT_PARTS, RESULT_PARTS, ImageResult, ModelInfo

if TYPE_CHECKING:  # pragma: no cover
    from cxr_ai.dicom.heatmap import ScDisplay

logger = logging.getLogger(__name__)

#: Gate reasons that mean the data itself is broken (as opposed to "not a chest film").
BROKEN_INPUT_REASONS = frozenset(
    {GateReason.NOT_DICOM, GateReason.TRUNCATED, GateReason.MISSING_UID, GateReason.INVALID_UID,
     GateReason.DECODE_FAILED, GateReason.BLANK_IMAGE}
)


MSG_BLANK = (
    "{source}: the image is blank after windowing (every pixel has the same value); check the "
    "pixel data and the Rescale/VOI attributes at the sender."
)


@dataclass
class InstanceOutcome:
    """What happened to one instance, and what to send where (:attr:`outputs`, typed by kind)."""

    source: str
    sop_instance_uid: str
    study_instance_uid: str
    status: InstanceStatus
    reason: str  # gate reason or failure kind; "" when processed
    message: str
    result: ImageResult | None = None
    radiograph: Radiograph | None = field(default=None, repr=False)
    outputs: ImageOutputs = field(default_factory=ImageOutputs, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    #: The model's maps of this image in model-input geometry, (F, S, S) float32 in [0, 1],
    #: kept by :meth:`Pipeline.infer` with ``source_maps=False`` until :meth:`Pipeline.add_heatmaps`.
    saliency: np.ndarray | None = field(default=None, repr=False)
    #: The source as displayed at the heatmap capture's size (:class:`cxr_ai.dicom.heatmap.ScDisplay`),
    #: made by :meth:`Pipeline.prepare` when heatmaps are due, from the display image it computes
    #: for the model anyway; :meth:`Pipeline.build_outputs` blends the heatmaps over it.
    sc_display: ScDisplay | None = field(default=None, repr=False)

    @property
    def processed(self) -> bool:
        return self.status is InstanceStatus.PROCESSED

    @property
    def datasets(self) -> list[Dataset]:
        """Every DICOM result object, SR first (read-only; :attr:`outputs` has them by kind)."""
        return self.outputs.dicom()

    @property
    def fhir_bundle(self) -> dict[str, Any] | None:
        """The FHIR bundle as JSON data, ``None`` when none was built (read-only)."""
        return self.outputs.fhir_json()


class Pipeline:
    """Gate, pixel pipeline, models and writers, with the model loaded once.

    Parameters
    ----------
    config
        A loaded configuration (:func:`cxr_ai.config.load_config`); embedded defaults if None.
    engine
        An :class:`cxr_ai.models.engine.InferenceEngine` (:class:`cxr_ai.contract.EngineLike`); by default the ``[models]`` bundle
        (the bundled demo model unless configured), loaded once here.
    explain
        Compute Grad-CAM heatmaps (needed for the heatmap SC and the Parametric Map).
    """

    def __init__(self, *, config: Mapping[str, Any] | None = None, engine: EngineLike | None = None,
                 explain: bool = True) -> None:
        from cxr_ai.config import default_config

        # Settings come in as arguments: without them, the embedded defaults (no file, no
        # environment; cxr_ai.config.load_config at the edge reads those).
        self.config = dict(config) if config is not None else default_config()
        self.rules = GateRules.from_config(self.config)
        if engine is None:
            from cxr_ai.models.engine import load_default_engine

            engine = load_default_engine(self.config)
        self.engine: EngineLike = engine
        self.explain = explain

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info

    def process_instance(self, source: Source) -> InstanceOutcome:
        """Process one instance (a path, bytes or Dataset)."""
        return self.process_study([source])[0]

    def process_study(self, sources: Sequence[Source], *,
                      on_results: ResultsCallback | None = None) -> list[InstanceOutcome]:
        """Process the instances of a study; accepted images go through the model as one batch.

        With ``on_results``, the findings go out first: the model runs without heatmaps, the
        SR and FHIR objects are built, and ``on_results`` gets the outcomes (their
        ``outputs`` hold the SRs and FHIR bundles) so that the caller can send them; then the
        maps the same forward kept are mapped to the source geometry and the heatmap SC /
        Parametric Map objects are merged into the same outcomes' ``outputs``. The objects are identical either way;
        only their order in time differs.
        """
        prepared = [self.prepare(source) for source in sources]
        if on_results is None or not self.explain:
            self.infer(prepared)
            for outcome, pre in prepared:
                if pre is not None and outcome.result is not None and outcome.result.findings:
                    self.build_outputs(outcome)
            if on_results is not None:
                on_results([outcome for outcome, _ in prepared])
            return [outcome for outcome, _ in prepared]
        self.infer(prepared, source_maps=False)
        inferred = [(o, pre) for o, pre in prepared
                    if pre is not None and o.result is not None and o.result.findings]
        for outcome, _ in inferred:
            self.build_outputs(outcome, parts=RESULT_PARTS)
        on_results([outcome for outcome, _ in prepared])
        self.add_heatmaps([(o, pre) for o, pre in inferred if o.status is InstanceStatus.PROCESSED])
        for outcome, _ in inferred:
            if outcome.status is InstanceStatus.PROCESSED:
                self.build_outputs(outcome, parts=HEATMAP_PARTS)
        return [outcome for outcome, _ in prepared]

    # --- stages (public so that drivers can overlap decoding with inference) ------------------

    def prepare(self, source: Source) -> tuple[InstanceOutcome, Preprocessed | None]:
        """Stage 1: read, gate, decode and preprocess. Thread-safe; no model involved.

        Returns the outcome so far and the model input (None when the instance is not
        applicable or failed; the outcome then says why).
        """
        t0 = time.perf_counter()
        label = str(source) if isinstance(source, (str, os.PathLike)) else "<dataset>"
        decision, rg = check_applicability(source, self.rules)
        outcome = InstanceOutcome(
            source=label,
            sop_instance_uid=rg.sop_instance_uid if rg else "",
            study_instance_uid=rg.study_instance_uid if rg else "",
            status=InstanceStatus.NOT_APPLICABLE,
            reason=decision.reason.value,
            message=decision.message,
            radiograph=rg,
            result=ImageResult(rg.sop_instance_uid, rg.study_instance_uid, decision) if rg else None,
        )
        if not decision.accepted:
            if decision.reason in BROKEN_INPUT_REASONS:
                outcome.status = InstanceStatus.FAILED
            return outcome, None
        assert rg is not None
        try:
            spec = self.engine.bundle.pipeline
            display, used = display_array(rg.dataset, rg.pixels(), spec)
            pre = letterbox(display, spec, used_file_window=used)
            if not np.ptp(pre.image) > 0:
                raise ReadError("blank_image", MSG_BLANK.format(source=label))
            outcome.sc_display = self._sc_display(display, spec)
        except ReadError as exc:
            failed = GateDecision(False, GateReason(exc.reason), str(exc), decision.warnings)
            outcome.status, outcome.reason, outcome.message = InstanceStatus.FAILED, exc.reason, str(exc)
            outcome.result = ImageResult(rg.sop_instance_uid, rg.study_instance_uid, failed)
            return outcome, None
        outcome.timings["read_preprocess_s"] = time.perf_counter() - t0
        return outcome, pre

    def _sc_display(self, display: np.ndarray, spec: PixelPipelineSpec) -> ScDisplay | None:
        """The heatmap captures' background from stage 1's display image, when heatmap SCs are
        due and the model's pixel pipeline displays as the captures do (the default display
        steps); else None, and :meth:`build_outputs` computes it."""
        out_cfg = self.config["outputs"]
        if not (self.explain and out_cfg["heatmap_sc"]):
            return None
        if spec.display_steps != PixelPipelineSpec().display_steps:
            return None
        from cxr_ai.dicom.heatmap import sc_display  # highdicom and matplotlib load only for heatmaps

        return sc_display(display, max_side=int(out_cfg["sc_max_side"]))

    def infer(self, prepared: Sequence[tuple[InstanceOutcome, Preprocessed | None]], *,
              explain: bool | None = None, source_maps: bool = True) -> None:
        """Stage 2: one model call for every prepared instance that has a model input.

        ``explain`` (default: the pipeline's) keeps the forward's Grad-CAM maps
        (:attr:`InstanceOutcome.saliency`); with ``source_maps`` the findings get their
        heatmaps in the source geometry at once, else :meth:`add_heatmaps` maps them later
        (after the SR has gone out, or in the process that holds the source image).
        """
        accepted = [(outcome, pre) for outcome, pre in prepared if pre is not None]
        if not accepted:
            return
        explain = self.explain if explain is None else explain
        t0 = time.perf_counter()
        model_outputs = self.engine.predict_preprocessed([pre for _, pre in accepted], explain=explain,
                                                         source_maps=source_maps)
        per_image = (time.perf_counter() - t0) / len(accepted)
        for (outcome, _pre), out in zip(accepted, model_outputs):
            assert outcome.result is not None and outcome.radiograph is not None
            outcome.timings["model_s"] = per_image
            outcome.saliency = None if source_maps else out.saliency
            outcome.result = ImageResult(
                sop_instance_uid=outcome.sop_instance_uid,
                study_instance_uid=outcome.study_instance_uid,
                decision=outcome.result.decision,
                model=out.model,
                findings=out.findings,
                embedding=out.embedding,
            )

    def add_heatmaps(self, inferred: Sequence[tuple[InstanceOutcome, Preprocessed]]) -> None:
        """Stage 2b: each finding's heatmap in the source geometry, for instances inferred
        without them: from the maps their forward kept (:attr:`InstanceOutcome.saliency`),
        else (an outcome inferred with ``explain=False``) from one more model call."""
        from cxr_ai.models.engine import source_heatmaps

        todo = [(o, pre) for o, pre in inferred if o.result is not None and o.result.findings]
        if not todo:
            return
        t0 = time.perf_counter()
        missing = [(o, pre) for o, pre in todo if o.saliency is None]
        computed = iter(self.engine.heatmaps_preprocessed([pre for _, pre in missing]) if missing else [])
        maps = [source_heatmaps(o.saliency, pre.letterbox) if o.saliency is not None else next(computed)
                for o, pre in todo]
        per_image = (time.perf_counter() - t0) / len(todo)
        for (outcome, _), per_finding in zip(todo, maps):
            assert outcome.result is not None
            outcome.timings["heatmaps_s"] = per_image
            outcome.saliency = None
            outcome.result.findings = [replace(f, heatmap=m) for f, m in zip(outcome.result.findings, per_finding)]

    def build_outputs(self, outcome: InstanceOutcome, *, parts: Collection[str] = OUTPUT_PARTS) -> None:
        """Stage 3: the SR, heatmap SC, Parametric Map and FHIR objects of an inferred instance.

        ``parts`` selects a subset (see :data:`cxr_ai.results.OUTPUT_PARTS`); the objects are
        merged into ``outcome.outputs`` (:meth:`ImageOutputs.merged`), so that calling it with
        the result parts and then the heatmap parts gives what one call gives.
        """
        t0 = time.perf_counter()
        rg = outcome.radiograph
        assert outcome.result is not None and rg is not None
        source, notes = sanitized_for_outputs(rg.dataset)
        captures_due = "heatmap_sc" in parts and bool(self.config["outputs"]["heatmap_sc"]) and any(
            f.heatmap is not None for f in outcome.result.findings)
        if notes:
            logger.info("source attributes blanked for the result objects: %s", "; ".join(notes))
        try:
            display = outcome.sc_display
            if display is None and captures_due:
                display, _ = display_array(rg.dataset, rg.pixels())  # already decoded: no re-decode
            objects = outputs_for(outcome.result, source, display_image=display, config=self.config,
                                  include=parts)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # highdicom validates what it builds and raises these on inconsistent input.
            outcome.status = InstanceStatus.FAILED
            outcome.reason = "output_failed"
            outcome.message = (f"{outcome.source}: the model ran but the result objects could not be "
                               f"built ({type(exc).__name__}: {exc}); report this with the instance.")
            logger.warning("result objects failed: %s", type(exc).__name__)
            return
        outcome.timings["outputs_s"] = outcome.timings.get("outputs_s", 0.0) + time.perf_counter() - t0
        if captures_due:
            outcome.sc_display = None  # the captures are made
        outcome.status, outcome.reason = InstanceStatus.PROCESSED, ""
        outcome.message = f"{outcome.source}: processed"
        if objects is not None:
            outcome.outputs = outcome.outputs.merged(objects)
