"""The AI result as a DICOM Structured Report: TID 1500 in a Comprehensive 3D SR.

What the IHE AI Results (AIR) profile asks for, built with highdicom:

- **Document**: Comprehensive 3D SR Storage (PS3.3 A.35.13), content TID 1500 "Measurement
  Report" (PS3.16), title DCM 126000 "Imaging Measurement Report", procedure reported SNOMED CT
  399208008 "Plain X-ray of chest".
- **Observer context** (TID 1002/1004): a *device* observer, the model bundle: its stable
  device UID (:attr:`cxr_ai.results.ModelInfo.device_uid`), name, manufacturer and model name.
- **One TID 1501 image-level group per finding**: tracking identifier (UID + text), algorithm
  identification (TID 4019: bundle name, version, manufacturer, family DCM 123110 "Artificial
  Intelligence", the operating threshold as an algorithm parameter), finding type (the
  finding's concept), finding site (heart), the source image, a qualitative evaluation
  (finding concept -> Present/Absent at the threshold) and the probability as a measurement
  (DCM 122157, UCUM "1").
- **Header**: patient and study copied from the source (highdicom copies them from the
  evidence), a new series whose description says what it is and, for demo bundles, "NOT FOR
  CLINICAL USE"; Completion Flag COMPLETE and Verification Flag UNVERIFIED (no person has
  checked it), Preliminary Flag PRELIMINARY.

UIDs are deterministic (:mod:`cxr_ai.dicom.uids`): the same model on the same instance of the
same study and patient gives the same SOP Instance UID and tracking UIDs, so a re-sent result
replaces the earlier object in a PACS instead of duplicating it, and FHIR resources can carry
the same identifiers; a SOP Instance UID reused for another study or patient gives other UIDs.
The series UID is per study, patient, model and object kind, so a study's AI SRs share one
series.

:func:`read_sr_findings` reads such a document back with highdicom (``srread`` /
``MeasurementReport``). :func:`outputs_for` builds every result object for one
:class:`cxr_ai.results.ImageResult` and returns ``None`` for an image the applicability gate
rejected: the reason stays in the result record (``ImageResult.decision``), which the listener
and batch report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from cxr_ai import __version__
from cxr_ai.dicom import codes
from cxr_ai.dicom.uids import identity_of, output_uid  # noqa: F401 - output_uid re-exported
from cxr_ai.errors import ConfigError
from cxr_ai.results import OUTPUT_PARTS, FindingResult, ImageResult, ModelInfo

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time to keep import cheap
    from fhir.resources.R4B.bundle import Bundle

logger = logging.getLogger(__name__)

#: Default series numbers (overridable per call and in the ``[outputs]`` config section).
SR_SERIES_NUMBER = 990
SC_SERIES_NUMBER = 991
PM_SERIES_NUMBER = 992

#: DICOM LO values (SeriesDescription, ContentDescription) hold at most 64 characters.
LO_MAX = 64
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

MSG_NO_FINDINGS = (
    "no findings to report for instance {sop}: an SR needs at least one FindingResult. "
    "A rejected image gets no result objects (use outputs_for, which returns None for it)."
)
MSG_SOURCE_MISSING = (
    "source dataset lacks {keyword}: result objects must reference the source image by "
    "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and SOPClassUID; pass the dataset "
    "the model read"
)
MSG_NOT_3D_SR = (
    "{what}: SOP Class {sop_class} is not Comprehensive 3D SR Storage "
    "(1.2.840.10008.5.1.4.1.1.88.34); read_sr_findings reads the SRs cxr-ai writes"
)
MSG_NOT_TID1500 = (
    "{what}: the SR content is not a TID 1500 Measurement Report; read_sr_findings reads the "
    "SRs cxr-ai writes"
)
MSG_NO_MODEL = (
    "result for instance {sop} has findings but no ModelInfo; the pipeline must set "
    "ImageResult.model so the outputs can name the algorithm"
)

_REQUIRED_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_THRESHOLD_PARAMETER = "threshold="


# --- helpers shared by the DICOM writers ----------------------------------------------------


def check_source(source_ds: Dataset) -> None:
    """Raise ``ValueError`` if ``source_ds`` lacks the UIDs every output references."""
    for keyword in _REQUIRED_SOURCE:
        if not str(source_ds.get(keyword, "") or "").strip():
            raise ValueError(MSG_SOURCE_MISSING.format(keyword=keyword))


def tracking_uid(source_ds: Dataset, device_uid: str, finding_key: str) -> str:
    """Tracking UID of a finding's TID 1501 group; also the FHIR Observation identifier."""
    return identity_of(source_ds, device_uid).tracking_uid(finding_key)


def report_uid(source_ds: Dataset, device_uid: str) -> str:
    """Default SOP Instance UID of the SR; also the FHIR DiagnosticReport identifier."""
    return identity_of(source_ds, device_uid).sr_uid()


def series_description(kind: str, model: ModelInfo, findings: Sequence[FindingResult]) -> str:
    """``"cxr-ai <kind> (<findings>) - NOT FOR CLINICAL USE"``, shortened to fit 64 chars.

    The not-for-clinical-use suffix is never cut: the finding list is dropped first, then the
    kind is truncated.
    """
    suffix = f" - {NOT_FOR_CLINICAL_USE}" if model.not_for_clinical_use else ""
    names = sanitize_lo(", ".join(f.display for f in findings))
    candidates = ([f"cxr-ai {kind} ({names})"] if names else []) + [f"cxr-ai {kind}"]
    for text in candidates:
        if len(text) + len(suffix) <= LO_MAX:
            return text + suffix
    return sanitize_lo(f"cxr-ai {kind}")[: LO_MAX - len(suffix)] + suffix


def sanitize_lo(text: str) -> str:
    """Plain ASCII without backslashes (safe in any Specific Character Set), <= 64 chars."""
    ascii_text = text.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    return ascii_text[:LO_MAX]


def software_versions(model: ModelInfo) -> list[str]:
    """SoftwareVersions (LO, multi-valued): this package and the model bundle."""
    return [sanitize_lo(f"cxr-ai {__version__}"), sanitize_lo(model.label)]


# --- the SR ----------------------------------------------------------------------------------


def _algorithm(model: ModelInfo, finding: FindingResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=model.manufacturer,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        parameters=[f"{_THRESHOLD_PARAMETER}{finding.threshold:.6g}"],
    )


def _group(
    source_ds: Dataset, model: ModelInfo, finding: FindingResult
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = codes.finding_code(finding.key)
    algorithm = _algorithm(model, finding)
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(source_ds, model.device_uid, finding.key),
        identifier=sanitize_lo(f"{finding.display} ({model.label})"),
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.HEART)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=concept, value=codes.PRESENT if finding.positive else codes.ABSENT
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=codes.PROBABILITY,
                value=float(finding.probability),
                unit=codes.UNITLESS,
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source_ds)],
    )


def build_sr(
    source_ds: Dataset,
    model: ModelInfo,
    findings: Sequence[FindingResult],
    *,
    series_instance_uid: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR for one source image.

    Parameters
    ----------
    source_ds
        The image the model read (pixels are not needed; metadata suffices).
    model
        The bundle that produced the findings (observer device, algorithm identification).
    findings
        One TID 1501 group each, in order.
    series_instance_uid, sop_instance_uid
        Override the deterministic UIDs (see :mod:`cxr_ai.dicom.uids`).
    series_number, instance_number
        Numbers of the new series and instance.
    institution_name
        Institution creating the SR (optional, Type 3).

    Raises
    ------
    ValueError
        If there are no findings, or the source lacks the UIDs the SR must reference.
    """
    check_source(source_ds)
    if not findings:
        raise ValueError(MSG_NO_FINDINGS.format(sop=source_ds.SOPInstanceUID))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid,
        name=sanitize_lo(model.label),
        manufacturer_name=sanitize_lo(model.manufacturer),
        model_name=sanitize_lo(model.name),
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.OBSERVER_TYPE_DEVICE, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.PLAIN_XRAY_CHEST,
        imaging_measurements=[_group(source_ds, model, f) for f in findings],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source_ds],
        content=report,
        series_instance_uid=series_instance_uid
        or identity_of(source_ds, model.device_uid).series_uid("sr"),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or report_uid(source_ds, model.device_uid),
        instance_number=instance_number,
        manufacturer=sanitize_lo(model.manufacturer),
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=series_description("AI results", model, findings),
        manufacturer_model_name=sanitize_lo(model.name),
        software_versions=software_versions(model),
    )
    from cxr_ai.dicom import headers

    headers.finish(sr, source_ds, model, description=f"AI findings by {model.label}")
    logger.debug(
        "built SR %s with %d finding group(s) for instance %s",
        sr.SOPInstanceUID, len(findings), source_ds.SOPInstanceUID,
    )
    return sr


def read_sr_findings(source: str | os.PathLike | BinaryIO | Dataset) -> list[dict[str, Any]]:
    """Read the findings of a cxr-ai SR back with highdicom.

    Returns one dictionary per TID 1501 group: ``finding`` (code value), ``finding_scheme``,
    ``finding_meaning``, ``key`` (cxr-ai finding key or ``None``), ``present`` (bool, from the
    qualitative evaluation), ``probability``, ``threshold`` (from the algorithm parameters),
    ``algorithm_name``/``algorithm_version``, ``tracking_uid``, ``source_sop_instance_uid``,
    ``source_sop_class_uid`` and the observer ``device_uid``.

    Raises
    ------
    ValueError
        If the document is not a Comprehensive 3D SR with TID 1500 content.
    """
    if isinstance(source, Dataset):
        what = str(getattr(source, "filename", None) or "<dataset>")
        if str(source.get("SOPClassUID", "")) != Comprehensive3DSRStorage:
            raise ValueError(MSG_NOT_3D_SR.format(what=what, sop_class=source.get("SOPClassUID")))
        document = hd.sr.Comprehensive3DSR.from_dataset(source, copy=True)
    else:
        what = str(source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<file>"))
        document = hd.sr.srread(source)
        if not isinstance(document, hd.sr.Comprehensive3DSR):
            raise ValueError(MSG_NOT_3D_SR.format(what=what, sop_class=document.SOPClassUID))
    content = document.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(MSG_NOT_TID1500.format(what=what))

    device_uid = None
    for observer in content.get_observer_contexts(observer_type=codes.OBSERVER_TYPE_DEVICE):
        attributes = observer.observer_identifying_attributes
        device_uid = str(attributes.uid)
    by_code = {(c.value, c.scheme_designator): k for k, c in codes.FINDING_CODES.items()}

    rows: list[dict[str, Any]] = []
    for group in content.get_image_measurement_groups():
        finding = group.finding_type
        # Filter by name: highdicom also returns the Algorithm Family CODE item here.
        evaluations = group.get_qualitative_evaluations(name=finding) if finding else []
        probability = group.get_measurements(name=codes.PROBABILITY)
        sources = group.source_images
        rows.append(
            {
                "finding": finding.value if finding is not None else None,
                "finding_scheme": finding.scheme_designator if finding is not None else None,
                "finding_meaning": finding.meaning if finding is not None else None,
                "key": by_code.get((finding.value, finding.scheme_designator)) if finding else None,
                "present": (evaluations[0].value == codes.PRESENT) if evaluations else None,
                "probability": float(probability[0].value) if probability else None,
                "threshold": _threshold(group),
                "algorithm_name": _text_item(group, "111001"),
                "algorithm_version": _text_item(group, "111003"),
                "tracking_uid": str(group.tracking_uid) if group.tracking_uid else None,
                "source_sop_instance_uid": (
                    str(sources[0].referenced_sop_instance_uid) if sources else None
                ),
                "source_sop_class_uid": str(sources[0].referenced_sop_class_uid) if sources else None,
                "device_uid": device_uid,
            }
        )
    return rows


def _text_items(group: hd.sr.MeasurementsAndQualitativeEvaluations, code_value: str) -> list[str]:
    items = hd.sr.utils.find_content_items(
        group[0],
        name=hd.sr.CodedConcept(code_value, "DCM", "-"),
        value_type=hd.sr.ValueTypeValues.TEXT,
        recursive=True,
    )
    return [str(item.TextValue) for item in items]


def _text_item(group: hd.sr.MeasurementsAndQualitativeEvaluations, code_value: str) -> str | None:
    values = _text_items(group, code_value)
    return values[0] if values else None


def _threshold(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> float | None:
    for text in _text_items(group, "111002"):  # DCM 111002 Algorithm Parameters
        if text.startswith(_THRESHOLD_PARAMETER):
            try:
                return float(text[len(_THRESHOLD_PARAMETER):])
            except ValueError:
                return None
    return None


# --- all outputs of one image ----------------------------------------------------------------

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
            path = out / "fhir-bundle.json"
            path.write_text(self.fhir_bundle.model_dump_json(), encoding="utf-8")
            paths.append(path)
        return paths


def outputs_for(
    result: ImageResult,
    source_ds: Dataset,
    *,
    display_image: np.ndarray | None = None,
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
        :func:`cxr_ai.imaging.display_array` of the source (computed from the source pixels
        when omitted and an SC is due).
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
    from cxr_ai.dicom import heatmap

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
