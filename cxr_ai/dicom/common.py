"""Helpers shared by the DICOM result writers (SR, heatmap SC, Parametric Map, Segmentation, FHIR).

The series numbers, LO limits and series descriptions every result object uses, the check that
a source dataset carries the UIDs each output references, and the deterministic UIDs
(:mod:`cxr_ai.dicom.uids`) of a report and of each finding's tracking group. It imports none of
the writers, so each writer imports it without a loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from cxr_ai import __version__
from cxr_ai.dicom.uids import identity_of
from cxr_ai.results import FindingResult, ModelInfo

#: Default series numbers (overridable per call and in the ``[outputs]`` config section).
SR_SERIES_NUMBER = 990
SC_SERIES_NUMBER = 991
PM_SERIES_NUMBER = 992

#: DICOM LO values (SeriesDescription, ContentDescription) hold at most 64 characters.
LO_MAX = 64
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

MSG_SOURCE_MISSING = (
    "source dataset lacks {keyword}: result objects must reference the source image by "
    "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and SOPClassUID; pass the dataset "
    "the model read"
)

_REQUIRED_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


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
