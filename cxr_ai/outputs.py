"""The result objects of one image: SR, heatmap SCs, Parametric Maps, Segmentations, FHIR bundle.

:func:`outputs_for` builds every result object for one :class:`cxr_ai.results.ImageResult`
with the writers in :mod:`cxr_ai.dicom` and :mod:`cxr_ai.fhir`, and returns ``None`` for an
image the applicability gate rejected: the reason stays in the result record
(``ImageResult.decision``), which the listener and batch report. :class:`ImageOutputs` holds
them, typed by kind, from the pipeline to the drivers (``InstanceOutcome.outputs``), and this
module owns how each kind is named on disk, so that the drivers (the listener's workers, the
batch stages, the second opinion) never look at SOP Class UIDs themselves:

=====================  ===============================  ==========================  ==========================
kind                   listener result folder           batch output tree           second-opinion download
=====================  ===============================  ==========================  ==========================
SR                     ``SR-<sop>.dcm``                 ``<src>_sr<n>.dcm``         ``<stem>-SR-<n>.dcm``
heatmap SC             ``SC-<sop>.dcm``                 ``<src>_sc<n>.dcm``         ``<stem>-SC-<n>.dcm``
Parametric Map         ``PM-<sop>.dcm``                 ``<src>_pm<n>.dcm``         ``<stem>-PM-<n>.dcm``
Segmentation           ``SEG-<sop>.dcm``                ``<src>_obj<n>.dcm``        ``<stem>-SEG-<n>.dcm``
FHIR bundle            ``fhir-<src>.json``              ``<src>_fhir.json``         ``<stem>-fhir-bundle.json``
=====================  ===============================  ==========================  ==========================

(``<sop>``: the object's SOP Instance UID, ``<src>``: the source instance's key, ``<n>``: the
object's number within its kind, from 1.) :meth:`ImageOutputs.save` writes
``<SOPInstanceUID>.dcm`` and :data:`FHIR_BUNDLE_FILE`.

Routing: the objects are sent in the order of :meth:`ImageOutputs.objects` (SR first); the
SR and the FHIR bundle (:data:`cxr_ai.results.RESULT_PARTS`) are built, written and queued
first, the heatmap objects after. In the listener's result folder, every ``.dcm`` file goes
to the DICOM and STOW-RS destinations and every ``fhir-*.json`` file to the FHIR destinations
(:mod:`cxr_ai.service.routing`).
"""

from __future__ import annotations

import enum
import logging
import os
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from cxr_ai.errors import ConfigError
from cxr_ai.results import OUTPUT_PARTS, FindingResult, ImageResult, ModelInfo

if TYPE_CHECKING:  # pragma: no cover
    import highdicom as hd
    from fhir.resources.R4B.bundle import Bundle

    from cxr_ai.dicom.heatmap import ScDisplay

# The writers (highdicom, fhir.resources, matplotlib) are imported by outputs_for, when objects
# are built: the names and ImageOutputs here are read by every driver and command line.

logger = logging.getLogger(__name__)


class OutputKind(enum.Enum):
    """The kind of one DICOM result object (see :class:`ImageOutputs`)."""

    SR = "sr"
    SC = "sc"
    PM = "pm"
    SEG = "seg"

    @property
    def sop_class_uid(self) -> str:
        """The SOP Class this kind is written as."""
        return _SOP_CLASS[self]


_SOP_CLASS: dict[OutputKind, str] = {
    OutputKind.SR: Comprehensive3DSRStorage,
    OutputKind.SC: SecondaryCaptureImageStorage,
    OutputKind.PM: ParametricMapStorage,
    OutputKind.SEG: SegmentationStorage,
}


def stored_kind(ds: Dataset) -> OutputKind | None:
    """The kind of a result object read back from disk (its SOP Class, exactly); ``None`` for
    anything cxr-ai does not write as a result object (a source image, a rejection note)."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    return next((kind for kind, uid in _SOP_CLASS.items() if uid == sop_class), None)


# --- names on disk: the listener's result folder, the batch output tree, downloads ----------

#: File name of an image's FHIR bundle in :meth:`ImageOutputs.save`.
FHIR_BUNDLE_FILE = "fhir-bundle.json"
#: Name pattern of the FHIR bundles in a listener result folder.
LISTENER_FHIR_GLOB = "fhir-*.json"
_BATCH_KIND = {OutputKind.SR: "sr", OutputKind.SC: "sc", OutputKind.PM: "pm", OutputKind.SEG: "obj"}


def listener_name(kind: OutputKind, object_key: str) -> str:
    """A result object's file name in the listener's result folder: ``SR-<key>.dcm``,
    ``SC-``, ``PM-``, ``SEG-`` (``object_key``: the spool's key of its SOP Instance UID)."""
    return f"{kind.name}-{object_key}.dcm"


def listener_glob(kind: OutputKind) -> str:
    """The name pattern of ``kind``'s objects in a listener result folder (``PM-*.dcm``)."""
    return listener_name(kind, "*")


def listener_kind(name: str) -> OutputKind | None:
    """The kind of a file in a listener result folder, from its name (``None``: not a DICOM
    result object, e.g. a FHIR bundle, ``summary.json`` or a rejection note)."""
    prefix, dash, _ = name.partition("-")
    if not dash or not name.endswith(".dcm"):
        return None
    return next((kind for kind in OutputKind if kind.name == prefix), None)


def listener_fhir_name(instance_key: str) -> str:
    """The FHIR bundle's file name in the listener's result folder (``instance_key``: the
    spool's key of the source instance)."""
    return f"fhir-{instance_key}.json"


def batch_name(source_key: str, kind: OutputKind, n: int) -> str:
    """A result object's file name in the batch output tree: ``<source>_<kind><n>.dcm``
    (``sr``, ``sc``, ``pm``; a Segmentation is ``obj``), ``n`` counting from 1 per kind."""
    return f"{source_key}_{_BATCH_KIND[kind]}{n}.dcm"


def batch_fhir_name(source_key: str) -> str:
    """The FHIR bundle's file name in the batch output tree."""
    return f"{source_key}_fhir.json"


def download_name(stem: str, kind: OutputKind, n: int) -> str:
    """A result object's download name (second opinion): ``<stem>-SR-1.dcm``, ``<stem>-PM-2.dcm``."""
    return f"{stem}-{kind.name}-{n}.dcm"


def download_fhir_name(stem: str) -> str:
    """The FHIR bundle's download name (second opinion)."""
    return f"{stem}-{FHIR_BUNDLE_FILE}"


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
    """The result objects of one image, typed by kind (see :func:`outputs_for`).

    Empty for an image without results (rejected, failed, no findings). The pipeline builds
    them in two steps (the SR and FHIR bundle, then the heatmap objects) and joins them with
    :meth:`merged`.
    """

    sr: hd.sr.Comprehensive3DSR | None = None
    heatmap_scs: list[hd.sc.SCImage] = field(default_factory=list)
    parametric_maps: list[hd.pm.ParametricMap] = field(default_factory=list)
    segmentations: list[hd.seg.Segmentation] = field(default_factory=list)
    fhir_bundle: Bundle | None = None
    _fhir_json: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def objects(self) -> list[tuple[OutputKind, Dataset]]:
        """Every DICOM object with its kind, in the order they are written and sent: SR first,
        then the heatmap SCs, the Parametric Maps and the Segmentations."""
        objects: list[tuple[OutputKind, Dataset]] = [(OutputKind.SR, self.sr)] if self.sr is not None else []
        objects += [(OutputKind.SC, ds) for ds in self.heatmap_scs]
        objects += [(OutputKind.PM, ds) for ds in self.parametric_maps]
        objects += [(OutputKind.SEG, ds) for ds in self.segmentations]
        return objects

    def numbered(self) -> list[tuple[OutputKind, int, Dataset]]:
        """:meth:`objects` with each object's number within its kind (from 1), for file names."""
        counts: Counter[OutputKind] = Counter()
        out = []
        for kind, ds in self.objects():
            counts[kind] += 1
            out.append((kind, counts[kind], ds))
        return out

    def dicom(self) -> list[Dataset]:
        """Every DICOM object, SR first."""
        return [ds for _, ds in self.objects()]

    def fhir_json(self) -> dict[str, Any] | None:
        """The FHIR bundle as JSON data (``None`` when none was built), made once."""
        if self.fhir_bundle is None:
            return None
        if self._fhir_json is None:
            self._fhir_json = self.fhir_bundle.model_dump(mode="json", exclude_none=True)
        return self._fhir_json

    @property
    def empty(self) -> bool:
        """No DICOM object and no FHIR bundle."""
        return self.fhir_bundle is None and not self.objects()

    def merged(self, later: ImageOutputs) -> ImageOutputs:
        """These objects followed by ``later``'s (a new value; neither is changed): an SR or
        FHIR bundle in ``later`` replaces this one's, the lists are joined. Building the result
        parts and then the heatmap parts and merging gives what one build gives."""
        joined = ImageOutputs(
            sr=later.sr if later.sr is not None else self.sr,
            heatmap_scs=self.heatmap_scs + later.heatmap_scs,
            parametric_maps=self.parametric_maps + later.parametric_maps,
            segmentations=self.segmentations + later.segmentations,
            fhir_bundle=later.fhir_bundle if later.fhir_bundle is not None else self.fhir_bundle,
        )
        joined._fhir_json = later._fhir_json if later.fhir_bundle is not None else self._fhir_json
        return joined

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


def _heatmap_scs(source_ds: Dataset, with_maps: list[FindingResult], model: ModelInfo,
                 display_image: np.ndarray | ScDisplay | None, out_cfg: Mapping[str, Any], *,
                 instance_number: int) -> list[hd.sc.SCImage]:
    """One heatmap SC per finding in ``with_maps``, over one background made once per image."""
    from cxr_ai.dicom import heatmap

    if display_image is None:
        from cxr_ai.imaging import display_array

        display_image, _ = display_array(source_ds, source_ds.pixel_array)
    if not isinstance(display_image, heatmap.ScDisplay) and np.shape(display_image) == (
            int(source_ds.Rows), int(source_ds.Columns)):  # resized once for every finding
        display_image = heatmap.sc_display(display_image, max_side=int(out_cfg["sc_max_side"]))
    return [
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


def _findings_with_maps(findings: list[FindingResult], out_cfg: Mapping[str, Any]) -> list[FindingResult]:
    """The findings that get heatmap objects: those the model called present (the SR still
    reports every finding, Absent with its probability); ``heatmaps_for = "all"`` adds the
    negative ones."""
    heatmaps_for = str(out_cfg.get("heatmaps_for", "positive"))
    if heatmaps_for not in HEATMAPS_FOR:
        raise ConfigError(MSG_HEATMAPS_FOR.format(value=heatmaps_for))
    return [f for f in findings if f.heatmap is not None and (heatmaps_for == "all" or f.positive)]


def _segmentations(source_ds: Dataset, with_maps: list[FindingResult], model: ModelInfo,
                   out_cfg: Mapping[str, Any], *, instance_number: int) -> list[hd.seg.Segmentation]:
    from cxr_ai.dicom.segmentation import SEG_SERIES_NUMBER, build_segmentation

    return [
        build_segmentation(source_ds, f, model,
                           series_number=int(out_cfg.get("seg_series_number", SEG_SERIES_NUMBER)),
                           instance_number=instance_number + i)
        for i, f in enumerate(with_maps)
    ]


def outputs_for(
    result: ImageResult,
    source_ds: Dataset,
    *,
    display_image: np.ndarray | ScDisplay | None = None,
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
    from cxr_ai import fhir
    from cxr_ai.config import default_config
    from cxr_ai.dicom import parametric_map
    from cxr_ai.dicom.sr import build_sr

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
    outputs = ImageOutputs()
    if out_cfg["sr"] and "sr" in include:
        outputs.sr = build_sr(
            source_ds, model, findings,
            series_number=int(out_cfg["sr_series_number"]), instance_number=instance_number,
        )
    with_maps = _findings_with_maps(findings, out_cfg)
    if with_maps and out_cfg["heatmap_sc"] and "heatmap_sc" in include:
        outputs.heatmap_scs = _heatmap_scs(source_ds, with_maps, result.model, display_image, out_cfg,
                                           instance_number=instance_number)
    if with_maps and out_cfg["parametric_map"] and "parametric_map" in include:
        outputs.parametric_maps = parametric_map.build_parametric_maps(
            source_ds, with_maps, model,
            series_number=int(out_cfg["pm_series_number"]),
            first_instance_number=instance_number,
            transfer_syntax_uid=str(out_cfg["pm_transfer_syntax"]),
        )
    if with_maps and out_cfg.get("segmentation", False) and "segmentation" in include:
        outputs.segmentations = _segmentations(source_ds, with_maps, model, out_cfg, instance_number=instance_number)
    if "fhir" in include:
        outputs.fhir_bundle = fhir.build_bundle(
            source_ds, model, findings, options=fhir.FhirOptions.from_config(cfg)
        )
    return outputs
