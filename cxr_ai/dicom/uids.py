"""Result identity: every UID cxr-ai gives a result object, derived in one place.

A result UID is deterministic (the same model on the same source instance gives the same UID,
so a re-sent result *replaces* the earlier object at a PACS or FHIR server instead of
duplicating it) and must never collide across patients or studies (a sender that reuses a
SOP Instance UID for another patient must not make the second patient's result replace the
first's). So each UID is derived from:

- the **source instance**: its SOP Instance UID;
- its **study**: Study Instance UID;
- its **patient**: Patient ID and Issuer of Patient ID;
- the **model**: the bundle's device UID, itself derived from the bundle name and version
  (:func:`cxr_ai.models.bundle.device_uid`);
- the **kind** of object (SR, SC, PM, series, frame of reference, tracking identifier) and,
  where several exist, the finding.

The UID is ``2.25.<name-based UUID as integer>`` (PS3.5 B.2; RFC 9562 version 5 over the
parts joined with a separator that cannot occur in them). pydicom's
``generate_uid(prefix, entropy_srcs=...)`` is not used: it joins its sources without a
separator (``["ab", "c"]`` and ``["a", "bc"]`` give the same UID), and needs an organisation
root, while ``2.25`` needs none.

Results sent before this derivation existed (the parts were source instance and model only)
keep their UIDs at the PACS; a re-send after the upgrade makes new objects beside them.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from pydicom.dataset import Dataset

#: Namespace of the name-based (version 5) UUIDs behind :func:`output_uid`.
#: Fixed forever: changing it changes every output UID.
_UID_NAMESPACE = uuid.UUID("56ece789-553c-4592-ad45-54d5046d9651")
#: Unit separator: never part of a UID, Patient ID (LO) or issuer (LO).
_SEP = "\x1f"
#: Version of the derivation; part of every name so a future change cannot reuse a UID.
_SCHEME = "result-identity-2"

#: A DICOM UID (PS3.5 §9.1): numeric components separated by dots, no leading zeros, at least
#: two components, at most 64 characters. Stricter than pydicom's ``UID.is_valid``, which
#: accepts a one-component UID and trailing padding: this one is also safe as a file name.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (PS3.5 §9.1)."""
    return isinstance(value, str) and len(value) <= 64 and UID_RE.match(value) is not None



def output_uid(*parts: str) -> str:
    """A deterministic UID from the given parts: ``2.25.<UUID as integer>`` (PS3.5 B.2).

    The UUID is name-based (RFC 9562 version 5) over the parts joined unambiguously, so the
    same inputs give the same UID and any change gives another.
    """
    name = _SEP.join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class ResultIdentity:
    """What a result object belongs to: source instance, study, patient and model."""

    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    device_uid: str

    @classmethod
    def of(cls, *, source_ds: Dataset, device_uid: str) -> ResultIdentity:
        """The identity of results made by the model ``device_uid`` from ``source_ds``."""
        return cls(
            sop_instance_uid=str(source_ds.get("SOPInstanceUID", "") or ""),
            study_instance_uid=str(source_ds.get("StudyInstanceUID", "") or ""),
            patient_id=str(source_ds.get("PatientID", "") or ""),
            issuer_of_patient_id=str(source_ds.get("IssuerOfPatientID", "") or ""),
            device_uid=device_uid,
        )

    def _patient_study(self) -> tuple[str, ...]:
        return (_SCHEME, self.study_instance_uid, self.patient_id, self.issuer_of_patient_id, self.device_uid)

    def _instance(self) -> tuple[str, ...]:
        return (*self._patient_study(), self.sop_instance_uid)

    # -- SOP instances -------------------------------------------------------------------
    def sr_uid(self) -> str:
        """SOP Instance UID of the SR; also the FHIR DiagnosticReport identifier."""
        return output_uid("sr", *self._instance())

    def tracking_uid(self, finding_key: str) -> str:
        """Tracking UID of a finding's TID 1501 group; also the FHIR Observation identifier."""
        return output_uid("tracking", *self._instance(), finding_key)

    def sc_uid(self, finding_key: str) -> str:
        """SOP Instance UID of a finding's heatmap Secondary Capture."""
        return output_uid("sc", *self._instance(), finding_key)

    def pm_uid(self, finding_key: str) -> str:
        """SOP Instance UID of a finding's Parametric Map."""
        return output_uid("pm", *self._instance(), finding_key)

    def seg_uid(self, finding_key: str) -> str:
        """SOP Instance UID of a finding's (opt-in) Segmentation."""
        return output_uid("seg", *self._instance(), finding_key)

    def frame_of_reference_uid(self) -> str:
        """Frame of Reference of the Parametric Maps of this source image (shared by its maps).

        Model-independent: every map drawn on the same image plane shares it.
        """
        return output_uid("frame-of-reference", _SCHEME, self.study_instance_uid, self.patient_id,
                          self.issuer_of_patient_id, self.sop_instance_uid)

    # -- series (one per study, patient, model and kind) ---------------------------------
    def series_uid(self, kind: str) -> str:
        """Series Instance UID of the ``kind`` objects (``"sr"``, ``"sc"``, ``"pm"``, ``"seg"``) of this study."""
        return output_uid(f"{kind}-series", *self._patient_study())


def identity_of(source_ds: Dataset, device_uid: str) -> ResultIdentity:
    """Shorthand for :meth:`ResultIdentity.of`."""
    return ResultIdentity.of(source_ds=source_ds, device_uid=device_uid)


def patient_study_fingerprint(*, study_instance_uid: str, patient_id: str, issuer_of_patient_id: str) -> str:
    """A short, non-reversible fingerprint of (study, patient) for comparing instances.

    Used by the job store and the batch processor to tell a SOP Instance UID re-sent for the
    same study and patient from one reused for another; it is not a pseudonym (no key) and is
    never logged.
    """
    return uuid.uuid5(_UID_NAMESPACE, _SEP.join(("fingerprint", study_instance_uid, patient_id,
                                                 issuer_of_patient_id))).hex[:16]


def rejection_note_uids(*, study_instance_uid: str, rejected_sop_instance_uids: list[str] | tuple[str, ...]) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the IOCM rejection note withdrawing
    ``rejected_sop_instance_uids`` of a study: the same set gives the same note (a repeated
    retraction replaces it), another set another note; the series is one per study."""
    series = output_uid("kos-series", _SCHEME, study_instance_uid)
    sop = output_uid("kos", _SCHEME, study_instance_uid, *sorted(rejected_sop_instance_uids))
    return series, sop
