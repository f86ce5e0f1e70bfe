"""Result objects passed from the models to the writers, the job store and the logs.

These are plain data: no sockets, files or torch tensors, so every driver (listener, batch,
evaluation) and every writer (SR, heatmaps, FHIR, tables) shares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - plain data: the gate's decision type is only named here
    from cxr_ai.dicom.gate import GateDecision


@dataclass(frozen=True)
class ModelInfo:
    """What the outputs must say about the model that produced them."""

    name: str
    version: str
    #: Stable UID for this bundle name + version (SR observer device, FHIR Device identifier).
    device_uid: str
    manufacturer: str = "cxr-ai"
    not_for_clinical_use: bool = True
    intended_use: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


#: Probabilities beyond these bounds are shown as "> 0.99" / "< 0.01", never as 1.00 / 0.00.
PROBABILITY_DISPLAY_BOUNDS: tuple[float, float] = (0.01, 0.99)


def format_probability(p: float) -> str:
    """A model probability for people to read: two decimals, but never certainty.

    ``0.9989`` is ``"> 0.99"`` (two decimals would print ``"1.00"``), ``0.0004`` is
    ``"< 0.01"``; a model probability is an estimate, and a burned-in "1.00" reads as a fact.
    Every image, page and report that prints a probability uses this function.
    """
    lo, hi = PROBABILITY_DISPLAY_BOUNDS
    value = float(p)
    if value > hi:
        return f"> {hi:.2f}"
    if value < lo:
        return f"< {lo:.2f}"
    return f"{value:.2f}"


#: The result parts of one image: the findings (SR, FHIR) need only the model's probabilities;
#: the heatmap objects (SC, Parametric Map) need the Grad-CAM maps too.
RESULT_PARTS: tuple[str, ...] = ("sr", "fhir")
HEATMAP_PARTS: tuple[str, ...] = ("heatmap_sc", "parametric_map", "segmentation")
OUTPUT_PARTS: tuple[str, ...] = RESULT_PARTS + HEATMAP_PARTS


@dataclass(frozen=True)
class FindingResult:
    """One finding's output for one image."""

    key: str  # "cardiomegaly" | "low_ef" (see cxr_ai.dicom.codes.FINDING_CODES)
    display: str  # human-readable name, e.g. "Cardiomegaly"
    probability: float
    threshold: float
    #: Grad-CAM map in the *source image geometry* (rows x columns), values in [0, 1]; None
    #: when explainability was not requested.
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "display": self.display,
            "probability": float(self.probability),
            "threshold": float(self.threshold),
            "positive": self.positive,
        }


@dataclass
class ImageResult:
    """Everything the pipeline produced for one instance.

    ``findings`` is empty when the gate rejected the image; ``decision`` says why.
    """

    sop_instance_uid: str
    study_instance_uid: str
    decision: GateDecision
    model: ModelInfo | None = None
    findings: list[FindingResult] = field(default_factory=list)
    embedding: np.ndarray | None = field(default=None, repr=False)

    @property
    def applicable(self) -> bool:
        return self.decision.accepted

    def finding(self, key: str) -> FindingResult:
        for f in self.findings:
            if f.key == key:
                return f
        raise KeyError(f"no finding {key!r} in result for {self.sop_instance_uid}")
