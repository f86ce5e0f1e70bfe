"""The audit log: one JSON object per line, in the spirit of IHE ATNA (who, what, when, from
where, outcome), one record shape for every writer: the web pages (sign-in, study views,
feedback, refused CSRF, second opinions, re-queues), ``cxr-ai jobs --retry-dead`` and
``cxr-ai retract``.

Every record has ``time`` (UTC, ISO 8601), ``event``, ``user``, ``client`` (the address of a
web client; empty for a command line) and ``outcome``, then the event's details. Studies are
named by their opaque job id (and, for a retraction, the Study Instance UID), never by
patient data. The file is created mode 0600; each record is one ``write`` in append mode, so
writers in other processes never interleave lines.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any


class AuditLog:
    """Append-only JSON lines at ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, event: str, *, user: str, client: str = "", outcome: str = "success", durable: bool = False,
              **detail: Any) -> dict[str, Any]:
        """Append one record; ``durable`` syncs it to disk before returning (a retraction's
        record must survive a power cut). Returns the record."""
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                  "user": user, "client": client, "outcome": outcome, **detail}
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
