"""The result objects of one image: SR, heatmap SCs, Parametric Maps, Segmentations, FHIR bundle.

:func:`outputs_for` builds every result object for one :class:`cxr_ai.results.ImageResult`
with the writers in :mod:`cxr_ai.dicom` and :mod:`cxr_ai.fhir`, and returns ``None`` for an
image the applicability gate rejected: the reason stays in the result record
(``ImageResult.decision``), which the listener and batch report. :class:`ImageOutputs` holds
them, typed by kind, and :func:`kind_of` names the kind of a DICOM result object, so the drivers
(the listener's workers, the batch stages) name files and route objects without looking at
SOP Class UIDs themselves.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from cxr_ai import fhir
from cxr_ai.dicom import heatmap
from cxr_ai.dicom.sr import build_sr
from cxr_ai.errors import ConfigError
from cxr_ai.results import OUTPUT_PARTS, ImageResult

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time to keep import cheap
    from fhir.resources.R4B.bundle import Bundle

logger = logging.getLogger(__name__)


class OutputKind(enum.Enum):
    """The kind of one DICOM result object."""

    SR = "sr"
    SC = "sc"
    PM = "pm"
    SEG = "seg"
    OTHER = "obj"


_KIND_BY_SOP_CLASS: tuple[tuple[str, OutputKind], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", OutputKind.SR),   # Structured Report Storage classes
    ("1.2.840.10008.5.1.4.1.1.30", OutputKind.PM),    # Parametric Map Storage
    ("1.2.840.10008.5.1.4.1.1.66.4", OutputKind.SEG),  # Segmentation Storage
    ("1.2.840.10008.5.1.4.1.1.7", OutputKind.SC),     # Secondary Capture Image Storage classes
)


def kind_of(ds: Dataset) -> OutputKind:
    """The kind of a DICOM result object, from its SOP Class UID."""
    sop_class = str(getattr(ds, "SOPClassUID", "") or "")
    for prefix, kind in _KIND_BY_SOP_CLASS:
        if sop_class.startswith(prefix):
            return kind
    return OutputKind.OTHER


# --- names on disk: the listener's result folder and the batch output tree -------------------


def listener_prefix(ds: Dataset) -> str:
    """File name prefix of a result object in the listener's result folder.

    ``SR``, ``SC``, ``PM``; any other object by its modality (``SEG`` for a Segmentation),
    ``OBJ`` when it has none.
    """
    kind = kind_of(ds)
    if kind in (OutputKind.SR, OutputKind.SC, OutputKind.PM):
        return kind.value.upper()
    return "".join(c for c in str(ds.get("Modality", "") or "OBJ") if c.isalnum())[:8] or "OBJ"


def batch_kind_name(ds: Dataset) -> str:
    """Kind part of a result object's file name in the batch output tree
    (``<sop>_<kind><n>.dcm``): ``sr``, ``sc``, ``pm``, else ``obj``."""
    kind = kind_of(ds)
    return kind.value if kind in (OutputKind.SR, OutputKind.SC, OutputKind.PM) else OutputKind.OTHER.value


#: File name of an image's FHIR bundle in :meth:`ImageOutputs.save`.
FHIR_BUNDLE_FILE = "fhir-bundle.json"


MSG_NO_MODEL = (
    "result for instance {sop} has findings but no ModelInfo; the pipeline must set "
    "ImageResult.model so the outputs can name the algorithm"
)
MSG_UNKNOWN_PARTS = "unknown output part(s) {parts}; choose from {known}"
#: ``[outputs] heatmaps_for``: heatmap objects for the positive findings only, or for all.
HEATMAPS_FOR: tuple[str, ...] = ("positive", "all")
MSG_HEATMAPS_FOR = "[outputs] heatmaps_for = {value!r} is not known; choose \"positive\" (default) or \"all\"."


@dataclass
class ImageOutputs:
    """The result objects for one accepted image (see :func:`outputs_for`)."""

    sr: hd.sr.Comprehensive3DSR | None
    heatmap_scs: list[hd.sc.SCImage] = field(default_factory=list)
    parametric_maps: list[hd.pm.ParametricMap] = field(default_factory=list)
    segmentations: list[hd.seg.Segmentation] = field(default_factory=list)
    fhir_bundle: Bundle | None = None

    def dicom(self) -> list[Dataset]:
        """Every DICOM object, SR first."""
        objects: list[Dataset] = [self.sr] if self.sr is not None else []
        return objects + list(self.heatmap_scs) + list(self.parametric_maps) + list(self.segmentations)

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write each DICOM object as ``<SOPInstanceUID>.dcm`` (and ``fhir-bundle.json``)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in self.dicom():
            path = out / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        if self.fhir_bundle is not None:
            path = out / FHIR_BUNDLE_FILE
            path.write_text(self.fhir_bundle.model_dump_json(), encoding="utf-8")
            paths.append(path)
        return paths


def outputs_for(
    result: ImageResult,
    source_ds: Dataset,
    *,
    display_image: np.ndarray | heatmap.ScDisplay | None = None,
    config: dict[str, Any] | None = None,
    instance_number: int = 1,
    include: Collection[str] = OUTPUT_PARTS,
) -> ImageOutputs | None:
    """Build the SR, heatmap SCs, Parametric Maps and FHIR bundle for one image result.

    Returns ``None`` when the applicability gate rejected the image (``result.decision``
    holds the machine-readable reason and the message; the listener and batch report it from
    there) or when there are no findings. Objects switched off in the ``[outputs]`` config
    section are omitted; heatmap objects are built only for findings that carry a heatmap.

    Parameters
    ----------
    result
        The pipeline's result for ``source_ds``.
    source_ds
        The dataset the model read.
    display_image
        :func:`cxr_ai.imaging.display_array` of the source, or its
        :func:`cxr_ai.dicom.heatmap.sc_display` (computed from the source pixels when omitted
        and an SC is due).
    config
        A loaded configuration (:func:`cxr_ai.config.load_config`); defaults when omitted.
    instance_number
        Instance Number of the SR; heatmap SCs and Parametric Maps count up from it, one per
        finding with a heatmap.
    include
        Which parts to build (a subset of :data:`cxr_ai.results.OUTPUT_PARTS`): the listener builds the
        ``RESULT_PARTS`` (SR, FHIR) first and sends them while the heatmaps are computed,
        then the ``HEATMAP_PARTS``. Each part is also subject to the ``[outputs]`` switches.
    """
    from cxr_ai.config import default_config

    if not result.applicable:
        logger.debug(
            "no result objects for instance %s: rejected (%s)",
            result.sop_instance_uid, result.decision.reason.value,
        )
        return None
    if not result.findings:
        logger.debug("no result objects for instance %s: no findings", result.sop_instance_uid)
        return None
    if result.model is None:
        raise ValueError(MSG_NO_MODEL.format(sop=result.sop_instance_uid))
    cfg = config if config is not None else default_config()
    out_cfg = cfg["outputs"]
    model, findings = result.model, result.findings

    unknown = set(include) - set(OUTPUT_PARTS)
    if unknown:
        raise ValueError(MSG_UNKNOWN_PARTS.format(parts=sorted(unknown), known=OUTPUT_PARTS))
    outputs = ImageOutputs(sr=None)
    if out_cfg["sr"] and "sr" in include:
        outputs.sr = build_sr(
            source_ds, model, findings,
            series_number=int(out_cfg["sr_series_number"]), instance_number=instance_number,
        )
    heatmaps_for = str(out_cfg.get("heatmaps_for", "positive"))
    if heatmaps_for not in HEATMAPS_FOR:
        raise ConfigError(MSG_HEATMAPS_FOR.format(value=heatmaps_for))
    # Localisation for the findings the model called present (the SR still reports every
    # finding, Absent with its probability); "all" adds maps of the negative findings too.
    with_maps = [f for f in findings if f.heatmap is not None and (heatmaps_for == "all" or f.positive)]
    if with_maps and out_cfg["heatmap_sc"] and "heatmap_sc" in include:
        if display_image is None:
            from cxr_ai.imaging import display_array

            display_image, _ = display_array(source_ds, source_ds.pixel_array)
        if not isinstance(display_image, heatmap.ScDisplay) and np.shape(display_image) == (
                int(source_ds.Rows), int(source_ds.Columns)):  # resized once for every finding
            display_image = heatmap.sc_display(display_image, max_side=int(out_cfg["sc_max_side"]))
        outputs.heatmap_scs = [
            heatmap.build_heatmap_sc(
                source_ds, f, model,
                display_image=display_image,
                max_side=int(out_cfg["sc_max_side"]),
                colormap=str(out_cfg["sc_colormap"]),
                max_alpha=float(out_cfg["sc_max_alpha"]),
                min_heat=float(out_cfg["sc_min_heat"]),
                series_number=int(out_cfg["sc_series_number"]),
                instance_number=instance_number + i,
            )
            for i, f in enumerate(with_maps)
        ]
    if with_maps and out_cfg["parametric_map"] and "parametric_map" in include:
        outputs.parametric_maps = heatmap.build_parametric_maps(
            source_ds, with_maps, model,
            series_number=int(out_cfg["pm_series_number"]),
            first_instance_number=instance_number,
            transfer_syntax_uid=str(out_cfg["pm_transfer_syntax"]),
        )
    if with_maps and out_cfg.get("segmentation", False) and "segmentation" in include:
        from cxr_ai.dicom.segmentation import SEG_SERIES_NUMBER, build_segmentation

        outputs.segmentations = [
            build_segmentation(source_ds, f, model,
                               series_number=int(out_cfg.get("seg_series_number", SEG_SERIES_NUMBER)),
                               instance_number=instance_number + i)
            for i, f in enumerate(with_maps)
        ]
    if "fhir" in include:
        outputs.fhir_bundle = fhir.build_bundle(
            source_ds, model, findings, options=fhir.FhirOptions.from_config(cfg)
        )
    return outputs
