"""Durable state of the listener: the spool (files), the job store and its outbox (SQLite)."""

from cxr_ai.store.jobs import (
    ClaimedStudy,
    Delivery,
    DeliveryState,
    InstanceRecord,
    InstanceResult,
    InstanceState,
    JobStore,
    NewDelivery,
    StudyRecord,
    StudyState,
)
from cxr_ai.store.spool import Spool, safe_key

__all__ = [
    "ClaimedStudy", "Delivery", "DeliveryState", "InstanceRecord", "InstanceResult", "InstanceState",
    "JobStore", "NewDelivery", "Spool", "StudyRecord", "StudyState", "safe_key",
]
