"""What the job store speaks in: the states of studies, instances and deliveries (stable
strings stored in the database), the reason codes, and the records its methods return and
take (:mod:`cxr_ai.store.jobs`)."""

from __future__ import annotations

import enum
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any


class StudyState(str, enum.Enum):
    """Where a study is in the service (stable strings stored in the database)."""

    RECEIVED = "received"
    PROCESSING = "processing"
    SENDING = "sending"
    RESULTS_SENT = "results_sent"
    DONE = "done"
    NOT_APPLICABLE = "not_applicable"
    FAILED = "failed"


class InstanceState(str, enum.Enum):
    RECEIVED = "received"
    PROCESSING = "processing"
    PROCESSED = "processed"
    NOT_APPLICABLE = "not_applicable"
    FAILED = "failed"


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class ReasonCode(str, enum.Enum):
    """Why a study is failed or not applicable (stable strings; logged and listed, never PHI).

    Not-applicable studies carry the applicability gate's reasons instead
    (:class:`cxr_ai.dicom.gate.GateReason` values, e.g. ``body_part``), joined by ``+``.
    """

    INSTANCES_FAILED = "instances_failed"
    DELIVERY_DEAD = "delivery_dead"
    PIPELINE_ERROR = "pipeline_error"
    RECORDING_FAILED = "recording_failed"
    UNKNOWN_STATE = "unknown_state"


@dataclass(frozen=True)
class InstanceRecord:
    sop_key: str
    sop_uid: str
    sop_class_uid: str
    study_key: str
    path: str
    size: int
    calling_ae: str
    received_at: float
    state: InstanceState
    reason: str
    result: dict[str, Any] | None
    #: Fingerprint of (study, patient) (:func:`cxr_ai.dicom.uids.patient_study_fingerprint`).
    patient_fp: str = ""
    #: Its SOP Instance UID was also received for another study or patient.
    uid_reused: bool = False

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> InstanceRecord:
        return cls(
            sop_key=row["sop_key"], sop_uid=row["sop_uid"], sop_class_uid=row["sop_class_uid"],
            study_key=row["study_key"], path=row["path"], size=row["size"],
            calling_ae=row["calling_ae"], received_at=row["received_at"],
            state=InstanceState(row["state"]), reason=row["reason"],
            result=json.loads(row["result_json"]) if row["result_json"] else None,
            patient_fp=row["patient_fp"], uid_reused=bool(row["uid_reused"]),
        )


@dataclass(frozen=True)
class StudyRecord:
    study_key: str
    study_uid: str
    job_id: str
    state: StudyState
    reason: str
    attempts: int
    created_at: float
    updated_at: float
    last_received_at: float
    ready_at: float | None
    processed_at: float | None
    results_sent_at: float | None
    files_removed: bool
    reason_code: str = ""
    retracted_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StudyRecord:
        return cls(
            study_key=row["study_key"], study_uid=row["study_uid"], job_id=row["job_id"],
            state=StudyState(row["state"]), reason=row["reason"], attempts=row["attempts"],
            created_at=row["created_at"], updated_at=row["updated_at"],
            last_received_at=row["last_received_at"], ready_at=row["ready_at"],
            processed_at=row["processed_at"], results_sent_at=row["results_sent_at"],
            files_removed=bool(row["files_removed"]),
            reason_code=row["reason_code"], retracted_at=row["retracted_at"],
        )


@dataclass(frozen=True)
class Delivery:
    """One outbox row: a batch of result files for one destination."""

    id: int
    study_key: str
    job_id: str
    destination: str
    items: list[str]
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str
    created_at: float
    sent_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Delivery:
        return cls(
            id=row["id"], study_key=row["study_key"], job_id=row["job_id"],
            destination=row["destination"], items=json.loads(row["items"]),
            state=DeliveryState(row["state"]), attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"], last_error=row["last_error"],
            created_at=row["created_at"], sent_at=row["sent_at"],
        )


@dataclass(frozen=True)
class ClaimedStudy:
    """A study a worker has taken: its record and the instances to process."""

    study: StudyRecord
    instances: list[InstanceRecord]


@dataclass
class InstanceResult:
    """What a worker reports for one instance after the pipeline ran."""

    sop_key: str
    state: InstanceState
    reason: str = ""
    result: dict[str, Any] | None = None


@dataclass
class NewDelivery:
    destination: str
    items: list[str] = field(default_factory=list)
