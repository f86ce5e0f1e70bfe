"""The AI result as FHIR: an Observation per finding, a DiagnosticReport, a Device.

FHIR version: **R4 (4.0.1)**, the version hospital FHIR servers speak (the FHIR APIs of the
large EHR vendors and of the cloud FHIR services are R4; R5 adoption is still marginal). The
objects are built and validated with ``fhir.resources.R4B``: ``fhir.resources`` 8 ships R5
(default) and R4B but no R4 package, and R4B (4.3.0) is wire-compatible with R4 for everything
written here. Observation and Bundle are normative in R4, so R4B could not change them; R4B's
changes are elsewhere (new medication-definition and evidence resources, the subscriptions
backport). We emit no R4B-only element, no ``meta.profile`` and no version claim. This is
checked, not assumed: the tests compare the element names of Observation, DiagnosticReport,
Device and Bundle (with their backbone elements and choice types) in fhir.resources' R4B
models against the R4 4.0.1 StructureDefinitions shipped with the test FHIR engine (Medplum's
``fhir/r4`` definitions) and find them identical, and they post the bundle to that R4 engine,
which validates each resource.

What is built (pure functions: inputs in, ``fhir.resources`` objects out, no I/O except the
explicit ``save_*`` helpers):

- **Device** for the model bundle: identifier ``urn:dicom:uid`` / ``urn:oid:<device UID>``
  (the SR's observer device UID), ``deviceName`` (model name, and name + version), ``version``,
  ``manufacturer``, and a note "NOT FOR CLINICAL USE" for demo bundles.
- **Observation** per finding: status ``preliminary``; category ``imaging``; code = the
  finding's SNOMED CT concept (:mod:`cxr_ai.dicom.codes`); ``valueCodeableConcept`` SNOMED CT
  Present 52101004 / Absent 272519000 (the SR's qualitative evaluation); components with the
  probability (DCM 122157, ``valueQuantity`` UCUM ``1``) and the operating threshold (DCM
  122411); ``interpretation`` v3 POS / NEG; ``bodySite`` heart; ``method`` DCM 123110
  "Artificial Intelligence" (the TID 4019 algorithm family the SR uses) with the model in the
  text; ``device`` -> the Device; ``derivedFrom`` -> the ImagingStudy *by identifier*
  (``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``, as FHIR's ImagingStudy.identifier
  convention); ``subject`` -> the Patient by identifier (see below); ``effectiveDateTime``
  from the study; ``issued`` when the result was made; ``identifier`` = the SR measurement
  group's Tracking UID, so the Observation and the SR group name each other.
- **DiagnosticReport** grouping them: status ``preliminary``, category v2-0074 ``RAD``, code
  LOINC 36554-4 "XR Chest Single view" (the models read one frontal image), ``imagingStudy``
  by identifier, ``result`` -> the Observations, a plain-text ``conclusion`` and the positive
  findings as ``conclusionCode``; identifier = the SR's SOP Instance UID (same report, two
  encodings).
- A **transaction Bundle**: ``fullUrl`` ``urn:uuid:`` (UUIDs derived from those UIDs, so a
  re-sent result has the same ones). A resend **replaces** (``[fhir] resend = "replace"``,
  the default): the Observations and the DiagnosticReport go as a *conditional update*
  (``PUT Observation?identifier=<system>|<value>``, FHIR R4 3.1.0.4.3): the server updates
  the one resource with that identifier, or creates it when there is none, so a corrected
  or re-run result overwrites the earlier one in place (same id, new version). The Device
  goes as a conditional create (``ifNoneExist``), shared by every result of the same bundle
  version. ``resend = "keep"`` sends everything as conditional create: the first result
  stays and a resend changes nothing. Identifiers derive from the source instance and the
  model (:mod:`cxr_ai.dicom.sr`), so an update only ever touches the same image's result.
- **NDJSON** (:func:`to_ndjson`) for sites without a FHIR server: one resource per line (FHIR
  Bulk Data format), ids = the bundle's UUIDs, ``urn:uuid:`` references rewritten to
  ``Type/id``.

Patient identifier system (``subject.identifier.system``), first rule that applies:

1. the site's explicit map IssuerOfPatientID -> system (config ``[fhir]
   patient_identifier_systems``);
2. the Issuer of Patient ID Qualifiers Sequence: Universal Entity ID of type ISO ->
   ``urn:oid:<id>``, URI -> itself, UUID -> ``urn:uuid:<id>``;
3. an IssuerOfPatientID that is itself an OID -> ``urn:oid:<oid>``, or a URI (``urn:``,
   ``http(s)://``) -> itself;
4. otherwise ``default_patient_identifier_system``, and a non-empty issuer is kept as
   ``assigner.display``.

A patient identifier without a system cannot be matched by the receiving system, so the
listener refuses to start with a FHIR destination when ``default_patient_identifier_system``
is not set (:func:`require_patient_system`, :data:`MSG_NO_PATIENT_SYSTEM`).

``Identifier.type`` is always v2-0203 ``MR``. An image without PatientID gets no ``subject``.

Effective time: StudyDate + StudyTime in, first that applies, (1) the file's
TimezoneOffsetFromUTC, (2) the ``[fhir] default_timezone`` (IANA name), (3) the host's
local time zone, with its daylight-saving rule for that date (FHIR requires a time zone
whenever a time is given). :func:`effective_datetime_source` says which one applied.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.resource import Resource
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from cxr_ai.dicom import codes
from cxr_ai.dicom.reader import Radiograph, read_radiograph
from cxr_ai.dicom.common import report_uid, tracking_uid
from cxr_ai.errors import ConfigError
from cxr_ai.results import FindingResult, ModelInfo, format_probability

logger = logging.getLogger(__name__)

FHIR_VERSION = "4.0.1"
#: Identifier system for DICOM UIDs (FHIR R4 ImagingStudy.identifier convention).
DICOM_UID_SYSTEM = "urn:dicom:uid"

MSG_NO_FINDINGS = (
    "no findings to report for instance {sop}: FHIR output needs at least one FindingResult; "
    "a rejected image gets no result objects"
)
MSG_BAD_TIMEZONE = (
    "[fhir] default_timezone {value!r} is not an IANA time zone name (e.g. 'Europe/Berlin'); "
    "fix it or set it to \"\""
)
MSG_BAD_SYSTEM_MAP = (
    "[fhir] patient_identifier_systems must be a list of tables with keys 'issuer' and "
    "'system', e.g. [{{ issuer = \"HOSP_A\", system = \"urn:oid:1.2.3\" }}]; got {value!r}"
)
MSG_NO_PATIENT_SYSTEM = (
    "FHIR delivery is on (routing destination {destination!r}) but no patient identifier system is "
    "configured: set [fhir] default_patient_identifier_system to your patient-ID namespace (e.g. "
    "\"urn:oid:<your MRN assigning authority OID>\"), and list other issuers in [fhir] "
    "patient_identifier_systems; without a system the receiving server cannot match the patient."
)
MSG_BAD_RESEND = "[fhir] resend {value!r} is not known; choose \"replace\" (conditional update) or \"keep\"."
RESEND_MODES: tuple[str, ...] = ("replace", "keep")
MSG_NOT_RESOURCES = "to_ndjson takes a Bundle or FHIR resources, got {kind}"

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URI = re.compile(r"^(urn:|https?://)", re.IGNORECASE)


@dataclass(frozen=True)
class FhirOptions:
    """Site settings for FHIR output (the ``[fhir]`` config section)."""

    patient_identifier_systems: Mapping[str, str] = field(default_factory=dict)
    default_patient_identifier_system: str = ""
    default_timezone: str = ""
    conditional_create: bool = True
    #: What a resend of the same result does: "replace" (conditional update) or "keep".
    resend: str = "replace"

    def __post_init__(self) -> None:
        if self.resend not in RESEND_MODES:
            raise ConfigError(MSG_BAD_RESEND.format(value=self.resend))
        if self.default_timezone:
            try:
                ZoneInfo(self.default_timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(MSG_BAD_TIMEZONE.format(value=self.default_timezone)) from None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FhirOptions:
        """Options from a loaded configuration (its ``[fhir]`` section)."""
        section = config["fhir"]
        raw = section.get("patient_identifier_systems", [])
        systems: dict[str, str] = {}
        if not isinstance(raw, list):
            raise ConfigError(MSG_BAD_SYSTEM_MAP.format(value=raw))
        for item in raw:
            if not (isinstance(item, Mapping) and set(item) == {"issuer", "system"}):
                raise ConfigError(MSG_BAD_SYSTEM_MAP.format(value=item))
            systems[str(item["issuer"]).strip()] = str(item["system"]).strip()
        return cls(
            patient_identifier_systems=systems,
            default_patient_identifier_system=str(section.get("default_patient_identifier_system", "")),
            default_timezone=str(section.get("default_timezone", "")),
            conditional_create=bool(section.get("conditional_create", True)),
            resend=str(section.get("resend", "replace")),
        )


def require_patient_system(options: FhirOptions, *, destination: str) -> None:
    """Refuse FHIR delivery without a default patient identifier system.

    Raises
    ------
    ConfigError
        :data:`MSG_NO_PATIENT_SYSTEM`, naming the key to set.
    """
    if not options.default_patient_identifier_system.strip():
        raise ConfigError(MSG_NO_PATIENT_SYSTEM.format(destination=destination))


# --- small builders --------------------------------------------------------------------------


def coding(code: Code) -> dict[str, str]:
    """A FHIR Coding for a coded concept from :mod:`cxr_ai.dicom.codes`."""
    return {"system": codes.fhir_system(code), "code": code.value, "display": code.meaning}


def concept(code: Code, text: str | None = None) -> dict[str, Any]:
    """A FHIR CodeableConcept with one coding (and optional text)."""
    out: dict[str, Any] = {"coding": [coding(code)]}
    if text:
        out["text"] = text
    return out


def uid_identifier(uid: str) -> dict[str, str]:
    """A DICOM UID as a FHIR Identifier (``urn:dicom:uid`` / ``urn:oid:<uid>``)."""
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _quantity(value: float) -> dict[str, Any]:
    """A unitless Quantity (UCUM "1")."""
    return {
        "value": round(float(value), 6),
        "unit": codes.UNITLESS.value,
        "system": codes.fhir_system(codes.UNITLESS),
        "code": codes.UNITLESS.value,
    }


def _uuid_for(uid: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, uid))


def _as_radiograph(source: Radiograph | Dataset) -> Radiograph:
    return source if isinstance(source, Radiograph) else read_radiograph(source)


def patient_system(rg: Radiograph, options: FhirOptions) -> tuple[str | None, str | None]:
    """``(system, assigner_display)`` for the patient identifier (rules in the module doc)."""
    issuer = rg.issuer_of_patient_id.strip()
    if issuer and issuer in options.patient_identifier_systems:
        return options.patient_identifier_systems[issuer], None
    qualifiers = rg.dataset.get("IssuerOfPatientIDQualifiersSequence", None)
    if qualifiers:
        entity = str(qualifiers[0].get("UniversalEntityID", "") or "").strip()
        kind = str(qualifiers[0].get("UniversalEntityIDType", "") or "").strip().upper()
        if entity and kind == "ISO" and _OID.match(entity):
            return f"urn:oid:{entity}", None
        if entity and kind == "URI" and _URI.match(entity):
            return entity, None
        if entity and kind == "UUID":
            return f"urn:uuid:{entity.lower()}", None
    if issuer and _OID.match(issuer):
        return f"urn:oid:{issuer}", None
    if issuer and _URI.match(issuer):
        return issuer, None
    return options.default_patient_identifier_system or None, issuer or None


def subject_reference(rg: Radiograph, options: FhirOptions) -> dict[str, Any] | None:
    """The Patient as a logical reference by identifier, or None without a PatientID."""
    if not rg.patient_id:
        return None
    system, assigner = patient_system(rg, options)
    identifier: dict[str, Any] = {"type": concept(codes.IDENTIFIER_TYPE_MR), "value": rg.patient_id}
    if system:
        identifier["system"] = system
    if assigner:
        identifier["assigner"] = {"display": assigner}
    return {"type": "Patient", "identifier": identifier}


def effective_datetime_source(rg: Radiograph, options: FhirOptions) -> str:
    """Where the time zone of :func:`effective_datetime` comes from: ``"dicom"``
    (TimezoneOffsetFromUTC), ``"config"`` ([fhir] default_timezone), ``"host"`` (the local
    zone) or ``"date-only"`` (no study time)."""
    if rg.study_date is None or _parse_tm(rg.study_time) is None:
        return "date-only"
    if _parse_offset(str(rg.dataset.get("TimezoneOffsetFromUTC", "") or "")) is not None:
        return "dicom"
    return "config" if options.default_timezone else "host"


def effective_datetime(rg: Radiograph, options: FhirOptions) -> str | None:
    """The study's date and time as a FHIR dateTime (see the module doc for time zones)."""
    if rg.study_date is None:
        return None
    time = _parse_tm(rg.study_time)
    if time is None:
        return rg.study_date.isoformat()
    tz = _parse_offset(str(rg.dataset.get("TimezoneOffsetFromUTC", "") or ""))
    moment = dt.datetime.combine(rg.study_date, time)
    if tz is not None:
        return moment.replace(tzinfo=tz).isoformat()
    if options.default_timezone:
        return moment.replace(tzinfo=ZoneInfo(options.default_timezone)).isoformat()
    return moment.astimezone().isoformat()  # naive = local: the host zone's offset on that date


def _parse_tm(value: str) -> dt.time | None:
    match = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$", value.strip())
    if not match:
        return None
    hour, minute, second = (int(g) if g else 0 for g in match.groups()[:3])
    micro = int(match.group(4)[1:].ljust(6, "0")) if match.group(4) else 0
    try:
        return dt.time(hour, minute, second, micro)
    except ValueError:
        return None


def _parse_offset(value: str) -> dt.timezone | None:
    match = re.match(r"^([+-])(\d{2})(\d{2})$", value.strip())
    if not match:
        return None
    sign = 1 if match.group(1) == "+" else -1
    hours, minutes = int(match.group(2)), int(match.group(3))
    if hours > 14 or minutes > 59:
        return None
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def _not_for_clinical_use(model: ModelInfo) -> str:
    return f"NOT FOR CLINICAL USE: {model.label} is a demonstration model."


# --- resources -------------------------------------------------------------------------------


def build_device(model: ModelInfo) -> Device:
    """The Device resource describing the model bundle."""
    notes = []
    if model.not_for_clinical_use:
        notes.append({"text": _not_for_clinical_use(model)})
    if model.intended_use:
        notes.append({"text": f"Intended use: {model.intended_use}"})
    data: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [uid_identifier(model.device_uid)],
        "status": "active",
        "manufacturer": model.manufacturer,
        "deviceName": [
            {"name": model.name, "type": "model-name"},
            {"name": model.label, "type": "user-friendly-name"},
        ],
        "type": {"text": "AI image analysis software (chest radiograph)"},
        "version": [{"value": model.version}],
    }
    if notes:
        data["note"] = notes
    return Device.model_validate(data)


def build_observation(
    source: Radiograph | Dataset,
    model: ModelInfo,
    finding: FindingResult,
    *,
    device_reference: str,
    options: FhirOptions | None = None,
    issued: dt.datetime | None = None,
) -> Observation:
    """The Observation of one finding (see the module doc for every element)."""
    rg = _as_radiograph(source)
    options = options or FhirOptions()
    issued = issued or dt.datetime.now(dt.timezone.utc)
    finding_concept = codes.finding_code(finding.key)
    value = codes.PRESENT if finding.positive else codes.ABSENT
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [uid_identifier(tracking_uid(rg.dataset, model.device_uid, finding.key))],
        "status": "preliminary",
        "category": [concept(codes.OBSERVATION_CATEGORY_IMAGING)],
        "code": concept(finding_concept, finding.display),
        "issued": issued.isoformat(),
        "valueCodeableConcept": concept(value),
        "interpretation": [
            concept(codes.INTERPRETATION_POSITIVE if finding.positive else codes.INTERPRETATION_NEGATIVE)
        ],
        "bodySite": concept(codes.HEART),
        "method": concept(codes.ARTIFICIAL_INTELLIGENCE, f"AI model {model.label}"),
        "device": {"reference": device_reference, "display": model.label},
        "derivedFrom": [{"type": "ImagingStudy", "identifier": uid_identifier(rg.study_instance_uid)}],
        "component": [
            {"code": concept(codes.PROBABILITY), "valueQuantity": _quantity(finding.probability)},
            {"code": concept(codes.THRESHOLD_VALUE), "valueQuantity": _quantity(finding.threshold)},
        ],
    }
    subject = subject_reference(rg, options)
    if subject is not None:
        data["subject"] = subject
    effective = effective_datetime(rg, options)
    if effective is not None:
        data["effectiveDateTime"] = effective
    if model.not_for_clinical_use:
        data["note"] = [{"text": _not_for_clinical_use(model)}]
    return Observation.model_validate(data)


def build_diagnostic_report(
    source: Radiograph | Dataset,
    model: ModelInfo,
    findings: Sequence[FindingResult],
    *,
    observation_references: Sequence[str],
    options: FhirOptions | None = None,
    issued: dt.datetime | None = None,
) -> DiagnosticReport:
    """The DiagnosticReport grouping the findings' Observations."""
    rg = _as_radiograph(source)
    options = options or FhirOptions()
    issued = issued or dt.datetime.now(dt.timezone.utc)
    summary = "; ".join(
        f"{f.display}: {'present' if f.positive else 'absent'} "
        f"(probability {format_probability(f.probability)}, threshold {f.threshold:.2f})"
        for f in findings
    )
    prefix = "AI result, NOT FOR CLINICAL USE" if model.not_for_clinical_use else "AI result"
    data: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [uid_identifier(report_uid(rg.dataset, model.device_uid))],
        "status": "preliminary",
        "category": [concept(codes.DIAGNOSTIC_SERVICE_RADIOLOGY)],
        "code": concept(codes.XR_CHEST_SINGLE_VIEW, "AI analysis of chest radiograph"),
        "issued": issued.isoformat(),
        "result": [{"reference": ref} for ref in observation_references],
        "imagingStudy": [{"type": "ImagingStudy", "identifier": uid_identifier(rg.study_instance_uid)}],
        "conclusion": f"{prefix} ({model.label}): {summary}.",
    }
    positives = [concept(codes.finding_code(f.key), f.display) for f in findings if f.positive]
    if positives:
        data["conclusionCode"] = positives
    subject = subject_reference(rg, options)
    if subject is not None:
        data["subject"] = subject
    effective = effective_datetime(rg, options)
    if effective is not None:
        data["effectiveDateTime"] = effective
    return DiagnosticReport.model_validate(data)


def _entry(
    resource: Resource, full_url: str, identifier: Mapping[str, str], options: FhirOptions,
    *, replace: bool = False,
) -> dict[str, Any]:
    """A transaction entry: conditional update (``replace``, see the module doc), conditional
    create, or a plain POST when ``conditional_create`` is off."""
    kind = resource.get_resource_type()
    search = f"identifier={quote(identifier['system'], safe=':/')}|{quote(identifier['value'], safe=':/')}"
    if replace and options.resend == "replace":
        return {"fullUrl": full_url, "resource": resource, "request": {"method": "PUT", "url": f"{kind}?{search}"}}
    request: dict[str, Any] = {"method": "POST", "url": kind}
    if options.conditional_create:
        request["ifNoneExist"] = search
    return {"fullUrl": full_url, "resource": resource, "request": request}


def build_bundle(
    source: Radiograph | Dataset,
    model: ModelInfo,
    findings: Sequence[FindingResult],
    *,
    options: FhirOptions | None = None,
    issued: dt.datetime | None = None,
) -> Bundle:
    """The transaction Bundle: Device, one Observation per finding, the DiagnosticReport.

    Raises
    ------
    ValueError
        If there are no findings (a rejected image gets no FHIR output).
    """
    rg = _as_radiograph(source)
    if not findings:
        raise ValueError(MSG_NO_FINDINGS.format(sop=rg.sop_instance_uid))
    options = options or FhirOptions()
    issued = issued or dt.datetime.now(dt.timezone.utc)

    device = build_device(model)
    device_url = f"urn:uuid:{_uuid_for(model.device_uid)}"
    entries = [_entry(device, device_url, uid_identifier(model.device_uid), options)]
    observation_urls = []
    for finding in findings:
        obs = build_observation(
            rg, model, finding, device_reference=device_url, options=options, issued=issued
        )
        uid = tracking_uid(rg.dataset, model.device_uid, finding.key)
        url = f"urn:uuid:{_uuid_for(uid)}"
        observation_urls.append(url)
        entries.append(_entry(obs, url, uid_identifier(uid), options, replace=True))
    report = build_diagnostic_report(
        rg, model, findings, observation_references=observation_urls, options=options, issued=issued
    )
    rep_uid = report_uid(rg.dataset, model.device_uid)
    entries.append(_entry(report, f"urn:uuid:{_uuid_for(rep_uid)}", uid_identifier(rep_uid), options,
                          replace=True))
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


# --- serialisation ---------------------------------------------------------------------------


def _rewrite_references(node: Any, mapping: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite_references(v, mapping) for k, v in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in mapping:
            out["reference"] = mapping[ref]
        return out
    if isinstance(node, list):
        return [_rewrite_references(v, mapping) for v in node]
    return node


def ndjson_resources(resources: Bundle | Iterable[Resource]) -> list[dict[str, Any]]:
    """Plain JSON resources for NDJSON: a Bundle's entries get ids and relative references."""
    if isinstance(resources, Bundle):
        items = []
        mapping: dict[str, str] = {}
        for entry in resources.entry or []:
            data = entry.resource.model_dump(mode="json")
            full_url = entry.fullUrl or ""
            if full_url.startswith("urn:uuid:"):
                data["id"] = full_url[len("urn:uuid:"):]
                mapping[full_url] = f"{data['resourceType']}/{data['id']}"
            items.append(data)
        return [_rewrite_references(item, mapping) for item in items]
    out = []
    for resource in resources:
        if not isinstance(resource, Resource):
            raise TypeError(MSG_NOT_RESOURCES.format(kind=type(resource).__name__))
        out.append(resource.model_dump(mode="json"))
    return out


def to_ndjson(resources: Bundle | Iterable[Resource]) -> str:
    """Newline-delimited JSON, one resource per line (FHIR Bulk Data format).

    Given a transaction Bundle (from :func:`build_bundle`), each entry's resource gets the id
    of its ``urn:uuid:`` fullUrl and references between them become ``Type/id``.
    """
    lines = [
        json.dumps(item, ensure_ascii=False, separators=(",", ":")) for item in ndjson_resources(resources)
    ]
    return "".join(line + "\n" for line in lines)


def save_ndjson(resources: Bundle | Iterable[Resource], path: str | os.PathLike) -> Path:
    """Write :func:`to_ndjson` to ``path`` (UTF-8); returns the path."""
    out = Path(path)
    out.write_text(to_ndjson(resources), encoding="utf-8")
    return out


def save_bundle(bundle: Bundle, path: str | os.PathLike) -> Path:
    """Write the Bundle as FHIR JSON to ``path``; returns the path."""
    out = Path(path)
    out.write_text(bundle.model_dump_json(), encoding="utf-8")
    return out
