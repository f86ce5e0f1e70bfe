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
``MeasurementReport``). The shared helpers (series numbers, descriptions, UIDs) live in
:mod:`cxr_ai.dicom.common`; all result objects of one image are built in :mod:`cxr_ai.outputs`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from cxr_ai.dicom import codes
from cxr_ai.dicom.common import (
    SR_SERIES_NUMBER,
    check_source,
    report_uid,
    sanitize_lo,
    series_description,
    software_versions,
    tracking_uid,
)
from cxr_ai.dicom.uids import identity_of
from cxr_ai.results import FindingResult, ModelInfo

logger = logging.getLogger(__name__)

MSG_NO_FINDINGS = (
    "no findings to report for instance {sop}: an SR needs at least one FindingResult. "
    "A rejected image gets no result objects (use outputs_for, which returns None for it)."
)
MSG_NOT_3D_SR = (
    "{what}: SOP Class {sop_class} is not Comprehensive 3D SR Storage "
    "(1.2.840.10008.5.1.4.1.1.88.34); read_sr_findings reads the SRs cxr-ai writes"
)
MSG_NOT_TID1500 = (
    "{what}: the SR content is not a TID 1500 Measurement Report; read_sr_findings reads the "
    "SRs cxr-ai writes"
)
_THRESHOLD_PARAMETER = "threshold="

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


