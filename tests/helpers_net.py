"""The listener as the network tests start it: loopback, any free port, a spool in tmp_path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cxr_ai.net.scp import ListenerSettings, StorageSCP
from cxr_ai.store import JobStore, Spool

#: Calling AE titles the test listeners accept (dcmtk's default and the tests' own).
ALLOWED = ["STORESCU", "TESTSCU"]


def make_scp(tmp_path: Path, **overrides) -> StorageSCP:
    """A started listener (quiet period 0) with ``ListenerSettings`` overrides; stop() it after."""
    settings = ListenerSettings(ae_title="CXR_AI", host="127.0.0.1", port=0, allowed_calling_aes=ALLOWED,
                                min_free_bytes=0, **overrides)
    scp = StorageSCP(settings=settings, spool=Spool(tmp_path / "spool"), store=JobStore(tmp_path / "jobs.sqlite3"),
                     quiet_seconds=0.0)
    scp.start()
    return scp


@contextlib.contextmanager
def serving(tmp_path: Path, **overrides) -> Iterator[StorageSCP]:
    """:func:`make_scp`, stopped (and its job store closed) on the way out."""
    scp = make_scp(tmp_path, **overrides)
    try:
        yield scp
    finally:
        scp.stop()
        scp.store.close()
