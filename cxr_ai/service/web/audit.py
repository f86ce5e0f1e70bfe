"""The audit log the pages write (:class:`cxr_ai.audit.AuditLog`: one record shape for the
pages, the operator commands and retraction)."""

from __future__ import annotations

from cxr_ai.audit import AuditLog

__all__ = ["AuditLog"]
