"""What ``cxr-ai jobs`` and ``/status`` show of the job store: states, reason codes, reused
SOP Instance UIDs, Study Instance UIDs shared by several patients. Job ids only: no patient data (the ``jobs`` command adds the Study Instance
UID for the operator)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

from cxr_ai.store.jobs import JobStore, StudyRecord, StudyState


def study_listing(study: StudyRecord, *, reused: int = 0, shared: bool = False) -> dict[str, Any]:
    """One study as the ``jobs`` listing and ``/status`` show it (no patient data); ``shared``:
    its Study Instance UID was received for another patient too."""
    row: dict[str, Any] = {
        "job_id": study.job_id, "state": study.state.value, "reason_code": study.reason_code,
        "reason": study.reason,
        "updated": dt.datetime.fromtimestamp(study.updated_at, dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if reused:
        row["sop_uid_reused_instances"] = reused
    if shared:
        row["study_uid_shared"] = True
    if study.retracted_at is not None:
        row["retracted"] = dt.datetime.fromtimestamp(study.retracted_at, dt.timezone.utc).isoformat(timespec="seconds")
    return row


#: How many failed / not-applicable studies ``/status`` lists (newest first).
STATUS_RECENT = 20


def reused_uid_counts(store: JobStore) -> dict[str, int]:
    """Study key -> how many of its instances carry a SOP Instance UID reused elsewhere."""
    return dict(Counter(inst.study_key for inst in store.reused_uid_instances()))


def recent_problems(store: JobStore, *, limit: int = STATUS_RECENT) -> dict[str, Any]:
    """The ``/status`` lists: recent failed and not-applicable studies with reason codes, the
    jobs holding instances whose SOP Instance UID was reused, and the jobs whose Study
    Instance UID was received for several patients (no patient data)."""
    reused = reused_uid_counts(store)
    shared = shared_study_jobs(store)
    recent = store.studies(state=(StudyState.FAILED, StudyState.NOT_APPLICABLE), newest_first=True, limit=limit)
    jobs = {s.study_key: s.job_id for s in store.studies()} if reused else {}
    return {"recent_problems": [study_listing(s, reused=reused.get(s.study_key, 0), shared=s.job_id in shared)
                                for s in recent],
            "sop_uid_reused": [{"job_id": jobs.get(k, ""), "instances": n} for k, n in sorted(reused.items())],
            "study_uid_shared": [{"job_id": j} for j in sorted(shared)]}


def shared_study_jobs(store: JobStore) -> set[str]:
    """Job ids of the studies whose Study Instance UID another patient's study has too."""
    return {s.job_id for s in store.shared_study_uid_studies()}
