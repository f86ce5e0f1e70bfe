"""The listener's server and its connections, whichever receive path runs: the per-address
limit at accept (:class:`PeerLimiter`), cheap copies of the supported contexts for each
association (:class:`CheaplyCopiedContexts`), and the clean-up of the temporary files of
data sets an association left unfinished (:func:`remove_unfinished_transfers`).
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

MSG_PEER_LIMIT = ("connection from {peer} refused at accept: {count} connections from that address already open "
                  "([listener] max_associations_per_address = {limit}); {refused} refused since the last message")


class CheaplyCopiedContexts(list):
    """An association server's supported presentation contexts, cheap to copy.

    pynetdicom deep-copies the server's contexts for every association it accepts: 45 ms
    for the listener's 170 SOP classes x 16 transfer syntaxes, paid by each instance a PACS
    routes in its own association. A context's fields are immutable (UIDs, ints, bools,
    None) apart from its list of transfer syntaxes, so a copy of each context with its own
    lists is the same copy (1 ms). A context with any other kind of field is deep-copied.
    """

    def __deepcopy__(self, memo):
        out = []
        for cx in self:
            fields = vars(cx)
            if all(isinstance(v, (str, int, type(None))) or
                   (isinstance(v, list) and all(isinstance(i, str) for i in v)) for v in fields.values()):
                dup = copy.copy(cx)
                for name, value in fields.items():
                    if isinstance(value, list):
                        setattr(dup, name, list(value))
                out.append(dup)
            else:
                out.append(copy.deepcopy(cx, memo))
        return out


class PeerLimiter:
    """Open connections per peer IP address, refused at accept beyond ``limit`` (0: none).

    A hospital PACS often sends every association from one address, so the limit is a share
    of ``[listener] max_associations``, not one: what it keeps is room for other addresses
    whatever one address does (connections that send nothing or trickle bytes included).
    """

    def __init__(self, limit: int, on_refusal: Callable[[str], None] | None = None) -> None:
        self.limit = int(limit)
        self._on_refusal = on_refusal
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._refused: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def acquire(self, host: str) -> bool:
        with self._lock:
            n = self._open.get(host, 0)
            if self.limit and n >= self.limit:
                self._refused[host] = self._refused.get(host, 0) + 1
                now = time.monotonic()
                if now - self._logged.get(host, -1e9) >= 10.0:    # at most one line per 10 s per address
                    self._logged[host] = now
                    logger.warning(MSG_PEER_LIMIT.format(peer=host, count=n, limit=self.limit,
                                                         refused=self._refused.pop(host)))
                refused = True
            else:
                self._open[host] = n + 1
                refused = False
        if refused and self._on_refusal is not None:
            self._on_refusal("per_address_limit")
        return not refused

    def release(self, host: str) -> None:
        with self._lock:
            n = self._open.get(host, 0) - 1
            if n > 0:
                self._open[host] = n
            else:
                self._open.pop(host, None)

    def count(self, host: str) -> int:
        with self._lock:
            return self._open.get(host, 0)


def peer_host(client_address) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)


def remove_data_set_file(f) -> bool:
    """Close and delete a C-STORE data set's temporary file; True when one was deleted."""
    if f is None:
        return False
    name = getattr(f, "name", None)
    try:
        f.close()
    except (OSError, ValueError):
        pass
    if not isinstance(name, str):
        return False
    try:
        os.unlink(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not remove the partial data set file %s: %s", name, exc)
        return False
    return True


def remove_unfinished_transfers(assoc) -> int:
    """Delete the temporary files of ``assoc``'s data sets that no handler will take: the one
    being received when the association ended (abort, reset, timeout, error) and those
    complete but still queued. Call once the association's threads have stopped."""
    removed = 0
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    if message is not None:
        removed += remove_data_set_file(getattr(message, "_data_set_file", None))
        message._data_set_file = None
    msg_queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    while msg_queue is not None:
        try:
            _, primitive = msg_queue.get_nowait()
        except queue.Empty:
            break
        except (TypeError, ValueError):
            continue
        removed += remove_data_set_file(getattr(primitive, "_dataset_file", None))
    conn = getattr(getattr(assoc, "dul", None), "_cxr_connection", None)
    if conn is not None:
        conn.discarded.clear()
    return removed
