"""The listener's receive path: pynetdicom's upper layer, with a direct path for data sets.

pynetdicom handles every PDU in pure Python: a 7 MB radiograph sent as 128 KiB P-DATA-TF
PDUs goes 56 times through the reactor loop, two queues, the state machine, an event object,
a primitive and the DIMSE decoder, and each byte is copied four times after the kernel hands
it over. Its two threads per association also sleep 1 ms whenever a loop found nothing to
do, which happens on every pause of the sender and before every C-STORE answer. Per
connection, :class:`FastReceiveRequestHandler` changes four things and leaves the state
machine, the association and the DIMSE layer as they are:

* **Buffered reads** (:class:`_Connection`). ``recv_into`` fills a 1 MiB buffer with what
  the socket holds, often several PDUs, instead of reading each PDU's header and body with
  their own calls (pynetdicom reads 4 KiB at a time).
* **Direct data-set path** (:func:`read_pdus`). While the DIMSE layer is receiving a C-STORE
  data set into its file (``STORE_RECV_CHUNKED_DATASET``), a P-DATA-TF PDU whose items are
  all data-set fragments of that message's presentation context has its fragments written
  from the buffer to the file directly: that is what the DIMSE layer does with them, minus
  the machinery. When the last fragment was among them, the DIMSE layer is then handed an
  empty last fragment, so the message completes, and the C-STORE handler runs, exactly as
  before. Every other PDU goes the normal way (event, state machine, DIMSE).
* **Write-back while receiving** (:func:`start_writeback`). Every ``WRITE_BEHIND_BYTES``
  written, the kernel is asked to start writing those pages to disk (``sync_file_range``,
  Linux), and at the data set's end for the tail, so the fsync before the answer finds
  most pages written or on their way. Elsewhere the fsync does all the writing, as before.
* **Waiting instead of sleeping.** With nothing to do, the connection's thread blocks in
  ``select`` (:func:`wait_transport_event`) until the peer sends, the association queues a
  primitive (:class:`Waker`), or ``IDLE_WAIT_SECONDS`` pass for the reactor's timer checks;
  the association's thread waits at its checkpoint (:class:`ReactorGate`) until a message
  is complete, the peer asks to release or abort, or the same time passed.

Handlers bound to ``EVT_DATA_RECV`` or ``EVT_PDU_RECV`` (other than pynetdicom's logging
handler, which logs nothing for P-DATA-TF) see every PDU: with one bound, the direct path is
off. A PDU whose items overrun it is an invalid PDU (Evt19, A-ABORT), as in pynetdicom.

What a peer may do is bounded (:class:`ReceiveLimits`, from ``[listener]``):

* **Length.** A P-DATA-TF PDU longer than the maximum the listener offered (PS3.8 D.1), or
  any other PDU longer than ``CONTROL_PDU_MAX``, is refused from its header: A-ABORT, and
  nothing more is read. A PDU longer than ``PREALLOCATE_MAX_BYTES`` (possible only with a
  larger offered maximum) is read in pieces, never into a buffer sized by its length field.
* **Time.** A PDU, once its first byte is seen, must arrive whole within ``pdu_timeout``,
  however slowly its bytes trickle in (the socket's timeout is shortened to the deadline);
  else A-ABORT. Between PDUs pynetdicom's own timers apply (ARTIM before the association,
  ``network_timeout`` after).
* **Addresses.** :class:`PeerLimiter` closes a connection at accept when its IP address
  already has ``max_per_address`` open; the TLS handshake runs in the connection's thread.
* **Disk.** Every ``SPACE_CHECK_BYTES`` written, the free space of the data set's file system
  is compared with the watermark; below it, or when a write fails (disk full), the file is
  emptied and the rest of the data set dropped, and the C-STORE handler answers out of
  resources (:func:`discarded_reason`). When an association ends however it ends, the
  temporary files of its unfinished data sets are deleted
  (:func:`remove_unfinished_transfers`).

The hooks rely on pynetdicom 3's upper-layer contract (``_read_pdu_data`` puts one event on
``event_queue`` and the PDU on ``_recv_pdu``; ``_is_transport_event``; the DIMSE message's
``context_id`` and ``_data_set_file``; the association's ``_reactor_checkpoint``, the DIMSE
``msg_queue``); :func:`fast_path_supported` checks for them and the handler keeps
pynetdicom's own path when one is missing. ``tests/test_receive.py`` runs the
direct path against dcmtk's ``storescu`` and pynetdicom's own SCU, fragment by fragment, and
the same transfers over pynetdicom's stock path (``[listener] fast_receive = false``). The
whole seam, and what to run before raising the pynetdicom pin, is listed in
``docs/architecture.md``.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
import os
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.transport import AssociationSocket, RequestHandler

from cxr_ai.net import answer
from cxr_ai.net.reactor import PauseSafeCheckpoint

logger = logging.getLogger(__name__)

#: Bytes of a data set written between two write-back requests.
WRITE_BEHIND_BYTES = 1 << 20
#: Longest an idle connection's upper-layer thread waits before checking its timers again.
IDLE_WAIT_SECONDS = 0.01
#: PDUs longer than this are read in pieces of this size rather than into a buffer
#: allocated from the PDU's length field (which is the peer's word).
PREALLOCATE_MAX_BYTES = 4 << 20
#: Bytes the receive buffer takes in one ``recv_into`` (grown for a longer PDU).
RECEIVE_BUFFER_BYTES = 1 << 20
#: Most PDUs one call of :func:`read_pdus` takes the direct path for before it returns to
#: the reactor (which then checks its timers and queues).
DIRECT_PDUS_PER_CALL = 64
#: Longest P-DATA-TF PDU accepted when the listener's maximum PDU is 0 (unlimited): a peer's
#: length field never makes the listener buffer more than this.
UNLIMITED_PDU_CEILING = 64 << 20
#: Longest PDU of any other type (A-ASSOCIATE-RQ with many contexts and a user identity is
#: well below it).
CONTROL_PDU_MAX = PREALLOCATE_MAX_BYTES
#: Data-set bytes written between two checks of the file system's free space.
SPACE_CHECK_BYTES = 1 << 20

MSG_PDU_TOO_LONG = ("PDU of type 0x{type:02X} from {peer} announces {length} bytes, above the {limit} this listener "
                    "accepts (negotiated maximum PDU): association aborted without reading it")
MSG_PDU_TIMEOUT = ("PDU from {peer} not received whole within {timeout:g} s ([listener] pdu_timeout; {got} of "
                   "{need} bytes): association aborted")
MSG_LOW_SPACE = ("free space on the file system of the data set being received is {free} MiB, below the "
                 "{limit} MiB watermark: stopped writing it and removed the partial file; free disk space there "
                 "or lower [listener] min_free_mb")
MSG_WRITE_FAILED = "writing the data set being received failed ({error}): stopped writing it, partial file removed"
MSG_PEER_LIMIT = ("connection from {peer} refused at accept: {count} connections from that address already open "
                  "([listener] max_associations_per_address = {limit}); {refused} refused since the last message")


@dataclass(frozen=True)
class ReceiveLimits:
    """What the receive path allows a peer (from ``[listener]``).

    ``pdu_timeout``: a PDU begun must arrive whole within it (and the header of the next one,
    once the socket showed data), else the association is aborted; also the longest a send
    to the peer may block. ``max_per_address``: connections from one IP address at once
    (0: no limit of its own). ``min_free_bytes``: the free-space watermark checked while a
    data set is written.
    """

    pdu_timeout: float = 10.0
    max_per_address: int = 0
    min_free_bytes: int | Callable[[], int] = 0
    #: called with a reason ("per_address_limit", "pdu_too_long", "pdu_timeout",
    #: "invalid_pdu", "low_space", "write_failed") each time the receive path refuses something
    on_refusal: Callable[[str], None] | None = None

    def refused(self, reason: str) -> None:
        if self.on_refusal is not None:
            try:
                self.on_refusal(reason)
            except Exception:  # noqa: BLE001 - counting must never break the receive path
                logger.debug("refusal counter failed", exc_info=True)

    def watermark(self) -> int:
        """The free-space watermark now (a callable follows a setting changed at run time)."""
        value = self.min_free_bytes
        return int(value() if callable(value) else value)


class PduTimeout(Exception):
    """A PDU did not arrive whole within ``pdu_timeout``."""

_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
_HEADER = struct.Struct(">BBL")
_PDV_LENGTH = struct.Struct(">L")


# -- write-back --------------------------------------------------------------------------------
def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # the process's own symbols include libc's; find_library would run ldconfig at import
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2      # start write-out of dirty pages not already under write-out


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``nbytes`` of ``fd`` from ``offset`` to disk; no wait.

    False where that is not available (then the later fsync writes everything).
    """
    if _SYNC_FILE_RANGE is None:
        return False
    if _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
        logger.debug("sync_file_range on fd %d failed: errno %d", fd, ctypes.get_errno())
        return False
    return True


# -- PDUs ---------------------------------------------------------------------------------------
def _recv_into(sock: socket.socket, view: memoryview, nr_bytes: int, start: int = 0) -> int:
    """Fill ``view[start:nr_bytes]`` from ``sock``; the number of bytes in ``view`` after.

    Fewer than ``nr_bytes`` when the peer closed the connection.
    """
    got = start
    try:
        while got < nr_bytes:
            n = sock.recv_into(view[got:nr_bytes], nr_bytes - got)
            if not n:
                break
            got += n
    finally:
        view.release()
    return got


def _recv_large(sock: socket.socket, start: bytearray, length: int, deadline: float | None = None) -> bytearray:
    """Read the rest of a PDU body of ``length`` bytes in pieces, growing ``start`` (the
    PDU's first bytes, header included) as data arrives.

    For PDUs above ``PREALLOCATE_MAX_BYTES`` (and within the negotiated maximum): the length
    field is the peer's word, and a header claiming 60 MB must not make the listener
    allocate them before anything arrived. Returns fewer bytes than ``6 + length`` when the
    connection closed first; raises :class:`PduTimeout` past ``deadline`` (monotonic).
    """
    buf = start
    piece = bytearray(PREALLOCATE_MAX_BYTES)
    view = memoryview(piece)
    try:
        while len(buf) < 6 + length:
            _check_deadline(sock, deadline)
            try:
                n = sock.recv_into(view, min(len(piece), 6 + length - len(buf)))
            except TimeoutError:
                raise PduTimeout from None
            if not n:
                break
            buf += view[:n]
    finally:
        view.release()
    return buf


def _check_deadline(sock: socket.socket, deadline: float | None) -> None:
    """Raise :class:`PduTimeout` past ``deadline``; shorten the socket's timeout to it when it
    is nearer than the socket's own (restored by :func:`_restore_timeout`)."""
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise PduTimeout
    current = sock.gettimeout()
    if current is None or remaining < current - 0.25:
        sock.settimeout(remaining)


def _restore_timeout(sock: socket.socket, timeout: float | None) -> None:
    if sock.gettimeout() != timeout:
        try:
            sock.settimeout(timeout)
        except OSError:        # closed meanwhile
            pass


def decode_p_data_tf(buf: bytearray) -> P_DATA_TF | None:
    """A P-DATA-TF PDU whose PDV values are views of ``buf``; None when an item overruns it."""
    view = memoryview(buf)
    items = []
    for context_id, start, stop in _pdv_spans(buf, 6, len(buf)):
        if context_id < 0:
            return None
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        item.presentation_data_value = view[start:stop]
        items.append(item)
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu


def _pdv_spans(buf, offset: int, end: int):
    """(context ID, start, stop) of each PDV item's value in ``buf[offset:end]``.

    A context ID of -1 marks an item that overruns the PDU or has no message control header
    (PS3.8 §9.3.5.1, Annex E.2); nothing follows it.
    """
    while offset < end:
        if end - offset < 6:
            yield -1, offset, end
            return
        (length,) = _PDV_LENGTH.unpack_from(buf, offset)
        stop = offset + 4 + length
        if length < 2 or stop > end:
            yield -1, offset, end
            return
        yield buf[offset + 4], offset + 5, stop
        offset = stop


class _Connection:
    """Per-connection state: the receive buffer and the data set file being written directly.

    ``recv_into`` fills the buffer with whatever the socket holds (up to
    ``RECEIVE_BUFFER_BYTES``), often several PDUs, which are then taken one by one from
    ``buffer[start:end]``: one system call per buffer-full rather than several per PDU.
    """

    def __init__(self, limits: ReceiveLimits | None = None, peer: str = "peer") -> None:
        self.buffer = bytearray(RECEIVE_BUFFER_BYTES)
        self.start = 0                 # buffer[start:end] is received and not yet taken
        self.end = 0
        self.file = None               # the data set file written directly, and its progress
        self.written = 0
        self.synced = 0
        self.checked = 0               # written bytes at the last free-space check
        self.limits = limits or ReceiveLimits()
        self.peer = peer
        self.broken = False            # aborted for a bad or late PDU: read nothing more
        #: data set files whose writing stopped (path -> reason), for the C-STORE handler
        self.discarded: dict[str, str] = {}
        self.discarding = None         # the file object of the data set being discarded

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def fill(self, sock: socket.socket, nbytes: int, deadline: float | None = None) -> bool:
        """Have at least ``nbytes`` in ``buffer[start:]``; False when the peer closed first.

        Receives as much as the socket holds and the buffer can take. Moves what is left to
        the buffer's front when ``nbytes`` would not fit behind it, and grows the buffer when
        it is too small for ``nbytes`` (a caller never asks for more than
        ``PREALLOCATE_MAX_BYTES`` plus a header). Raises :class:`PduTimeout` when ``nbytes``
        are not there by ``deadline`` (``time.monotonic``), however slowly bytes trickle in.
        """
        if self.buffered >= nbytes:
            return True
        if self.start + nbytes > len(self.buffer):
            left = self.buffered
            if nbytes > len(self.buffer):
                grown = bytearray(nbytes)
                grown[:left] = memoryview(self.buffer)[self.start:self.end]
                self.buffer = grown
            elif left:
                # through a copy: the two ranges may overlap, and a bytearray slice
                # assignment from a view of itself copies with memcpy
                self.buffer[:left] = self.buffer[self.start:self.end]
            self.start, self.end = 0, left
        view = memoryview(self.buffer)
        timeout = sock.gettimeout()
        try:
            while self.buffered < nbytes:
                _check_deadline(sock, deadline)
                try:
                    n = sock.recv_into(view[self.end:], len(self.buffer) - self.end)
                except TimeoutError:
                    raise PduTimeout from None
                if not n:
                    return False
                self.end += n
        finally:
            view.release()
            _restore_timeout(sock, timeout)
        return True

    def max_length(self, pdu_type: int, assoc) -> int:
        """The longest PDU body of ``pdu_type`` this connection accepts: the maximum PDU
        the listener offered for P-DATA-TF (PS3.8 D.1), ``CONTROL_PDU_MAX`` for others."""
        if pdu_type != _P_DATA_TF:
            return CONTROL_PDU_MAX
        offered = getattr(getattr(assoc, "acceptor", None), "maximum_length", 0) or 0
        return int(offered) if offered > 0 else UNLIMITED_PDU_CEILING

    def take(self, nbytes: int) -> bytearray:
        """The next ``nbytes`` buffered bytes, copied out (at most what is buffered)."""
        out = bytearray(memoryview(self.buffer)[self.start:self.start + nbytes])
        self.skip(len(out))
        return out

    def skip(self, nbytes: int) -> None:
        self.start += nbytes
        if self.start == self.end:
            self.start = self.end = 0


def _data_set_in_progress(dul: DULServiceProvider):
    """(context ID, file) of the C-STORE data set the DIMSE layer is receiving, or None."""
    message = getattr(dul.assoc.dimse, "message", None)
    if message is None:
        return None
    f = getattr(message, "_data_set_file", None)
    if f is None or f.closed or message.context_id is None:
        return None
    return message.context_id, f


def _only_standard_pdu_handlers(assoc) -> bool:
    if assoc.get_handlers(evt.EVT_DATA_RECV):
        return False
    return all(h[0] is standard_pdu_recv_handler for h in assoc.get_handlers(evt.EVT_PDU_RECV))


#: What :func:`_write_direct` did with a PDU.
NOT_TAKEN, WRITTEN, WRITTEN_LAST = 0, 1, 2


def _write_direct(conn: _Connection, target, buf: bytearray | memoryview, length: int) -> int:
    """Write the PDU in ``buf[6:6 + length]`` to the data set file when all its items are
    data-set fragments of the target's presentation context (only the PDU's final item may
    be the data set's last fragment).

    Returns NOT_TAKEN (nothing written), WRITTEN, or WRITTEN_LAST when the data set is now
    complete in the file; then write-back of its tail has started, and the DIMSE layer still
    has to be given the last fragment (:func:`_last_fragment_pdu`).

    Every ``SPACE_CHECK_BYTES`` the file system's free space is compared with the watermark;
    below it, or when a write fails (disk full), the file is emptied and the rest of the data
    set is read and dropped: the C-STORE handler then finds the reason in
    ``conn.discarded`` and answers out of resources, and the association goes on.
    """
    context_id, f = target
    spans = list(_pdv_spans(buf, 6, 6 + length))
    if not spans:
        return NOT_TAKEN
    for i, (cx, start, _) in enumerate(spans):
        # control header: bit 0 set = command fragment, bit 1 set = last fragment
        control = buf[start] & 0x03
        if cx != context_id or control & 0x01 or (control and i != len(spans) - 1):
            return NOT_TAKEN
    last = bool(buf[spans[-1][1]] & 0x02)
    if f is not conn.file:
        f.flush()
        conn.file, conn.written = f, f.tell()
        conn.synced = conn.written
        conn.checked = -SPACE_CHECK_BYTES           # check before the first write
    if conn.discarding is not f:
        try:
            if conn.written - conn.checked >= SPACE_CHECK_BYTES:
                conn.checked = conn.written
                watermark = conn.limits.watermark()
                if watermark:
                    st = os.fstatvfs(f.fileno())
                    free = st.f_bavail * st.f_frsize
                    if free < watermark:
                        conn.limits.refused("low_space")
                        _discard(conn, f, MSG_LOW_SPACE.format(free=free >> 20, limit=watermark >> 20))
            if conn.discarding is not f:
                view = memoryview(buf)
                try:
                    for _, start, stop in spans:
                        f.write(view[start + 1:stop])
                        conn.written += stop - start - 1
                finally:
                    view.release()
                if last or conn.written - conn.synced >= WRITE_BEHIND_BYTES:
                    f.flush()
                    start_writeback(f.fileno(), conn.synced, conn.written - conn.synced)
                    conn.synced = conn.written
        except OSError as exc:                      # disk full, quota, I/O error
            if conn.discarding is not f:
                conn.limits.refused("write_failed")
            _discard(conn, f, MSG_WRITE_FAILED.format(error=exc.strerror or exc))
    if last:
        conn.file = None
        conn.discarding = None
        return WRITTEN_LAST
    return WRITTEN


def _discard(conn: _Connection, f, reason: str) -> None:
    """Stop writing the data set file ``f``: empty it (its space returns now) and note why."""
    if conn.discarding is f:
        return
    conn.discarding = f
    conn.discarded[str(getattr(f, "name", ""))] = reason
    logger.error("from %s: %s", conn.peer, reason)
    try:
        try:
            f.flush()
        except OSError:
            pass                # what the file's buffer still holds goes to /dev/null below
        fd = f.fileno()
        os.ftruncate(fd, 0)
        # Whatever pynetdicom still writes to this file (its last fragment, the buffer's
        # leftovers on close) now goes nowhere, and cannot fail on a full disk.
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (OSError, ValueError) as exc:
        logger.warning("could not empty the partial data set file: %s", exc)


def discarded_reason(assoc, path: str | os.PathLike) -> str | None:
    """Why the receive path stopped writing the data set file ``path`` of ``assoc`` (low
    space, failed write), or None when it was written whole. Forgets it once asked."""
    conn = getattr(getattr(assoc, "dul", None), "_cxr_connection", None)
    if conn is None:
        return None
    return conn.discarded.pop(str(path), None)


def _last_fragment_pdu(context_id: int) -> bytearray:
    """A P-DATA-TF PDU with an empty last data-set fragment: completes the DIMSE message
    whose data :func:`_write_direct` already wrote."""
    item = bytes((context_id, 0x02))
    body = len(item).to_bytes(4, "big") + item
    return bytearray(bytes((_P_DATA_TF, 0)) + len(body).to_bytes(4, "big") + body)


def read_pdus(self: DULServiceProvider) -> None:
    """:meth:`DULServiceProvider._read_pdu_data`, with the direct path for data-set PDUs.

    Takes one PDU from the connection's buffer (receiving as needed); while it is a data-set
    PDU that :func:`_write_direct` takes and more data is buffered or waiting, takes the next
    (at most ``DIRECT_PDUS_PER_CALL``). The first PDU it does not take is handled as
    pynetdicom does: Evt17 when the connection closes before a whole PDU arrived, Evt19 for
    an unknown or undecodable PDU, else the PDU's event on ``event_queue`` and the PDU on
    ``_recv_pdu``.

    Each PDU must arrive whole within ``pdu_timeout`` of the first sign of it, and be no
    longer than :meth:`_Connection.max_length`; otherwise the association is aborted
    (Evt19: A-ABORT to the peer) and the connection reads nothing more (Evt17 next time).
    """
    conn: _Connection = self._cxr_connection
    if conn.broken:
        self.event_queue.put("Evt17")
        return
    sock = self.socket
    raw = sock.socket
    timeout = conn.limits.pdu_timeout
    for _ in range(DIRECT_PDUS_PER_CALL):
        deadline = time.monotonic() + timeout
        need = 6
        try:
            got = conn.fill(raw, 6, deadline)
            if got:
                pdu_type, _, length = _HEADER.unpack_from(conn.buffer, conn.start)
                if pdu_type not in _PDU_TYPES:
                    logger.error("unknown PDU type 0x%02X received from %s", pdu_type, conn.peer)
                    conn.limits.refused("invalid_pdu")
                    _abort(self, conn)
                    return
                limit = conn.max_length(pdu_type, self.assoc)
                if length > limit:
                    logger.error(MSG_PDU_TOO_LONG.format(type=pdu_type, peer=conn.peer, length=length, limit=limit))
                    conn.limits.refused("pdu_too_long")
                    _abort(self, conn)
                    return
                need = 6 + length
                if length > PREALLOCATE_MAX_BYTES:         # never taken directly
                    buf = _recv_large(raw, conn.take(6 + length), length, deadline)
                    if len(buf) == 6 + length:
                        _queue_pdu(self, pdu_type, buf)
                        return
                    got = False
                else:
                    got = conn.fill(raw, 6 + length, deadline)
        except PduTimeout:
            logger.error(MSG_PDU_TIMEOUT.format(peer=conn.peer, timeout=timeout, got=conn.buffered, need=need))
            conn.limits.refused("pdu_timeout")
            _abort(self, conn)
            return
        except OSError as exc:
            logger.debug("connection from %s closed while a PDU was received: %s", conn.peer, exc)
            got = False
        if not got:
            if conn.buffered:
                logger.error("the connection closed before the entire PDU (%d bytes) was received", need)
            conn.broken = True
            self.event_queue.put("Evt17")
            return
        target = _data_set_in_progress(self) if pdu_type == _P_DATA_TF else None
        if target is not None and _only_standard_pdu_handlers(self.assoc):
            view = memoryview(conn.buffer)[conn.start:conn.start + 6 + length]
            try:
                taken = _write_direct(conn, target, view, length)
            finally:
                view.release()
            if taken == WRITTEN:
                conn.skip(6 + length)
                if not conn.buffered and not sock.ready:
                    return
                continue
            if taken == WRITTEN_LAST:
                conn.skip(6 + length)
                _queue_pdu(self, pdu_type, _last_fragment_pdu(target[0]))
                return
        _queue_pdu(self, pdu_type, conn.take(6 + length))
        return


def _abort(dul: DULServiceProvider, conn: _Connection) -> None:
    """An invalid or late PDU: Evt19 (the state machine sends A-ABORT), then read no more."""
    conn.broken = True
    conn.start = conn.end = 0
    dul.event_queue.put("Evt19")
    raw = getattr(dul.socket, "socket", None)
    if raw is not None:
        try:
            # the A-ABORT still goes out; the next read sees the end at once (Evt17), so the
            # connection closes without waiting for the ARTIM timer
            socket.socket.shutdown(raw, socket.SHUT_RD)
        except OSError:
            pass


def _queue_pdu(dul: DULServiceProvider, pdu_type: int, buf: bytearray) -> None:
    """Decode a whole PDU and queue its event, as pynetdicom's ``_read_pdu_data`` ends."""
    if pdu_type == _P_DATA_TF and not dul.assoc.get_handlers(evt.EVT_DATA_RECV):
        pdu = decode_p_data_tf(buf)
        if pdu is None:
            logger.error("P-DATA-TF PDU with a presentation data value item that overruns the PDU")
            dul.event_queue.put("Evt19")
            return
        evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        event = "Evt10"
    else:
        try:
            pdu, event = dul._decode_pdu(buf)
        except Exception as exc:  # noqa: BLE001 - as in pynetdicom: any decoding failure is an invalid PDU
            logger.error("unable to decode the received PDU data: %s", exc)
            dul.event_queue.put("Evt19")
            return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


# -- waiting -----------------------------------------------------------------------------------
class Waker:
    """Wakes a connection's upper-layer thread when there is something to send or to stop."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def wake(self) -> None:
        try:
            self._w.send(b"\0")
        except OSError:          # full (a wake-up is pending anyway) or closed
            pass

    def wait(self, sock: socket.socket, timeout: float) -> None:
        """Block until ``sock`` is readable, :meth:`wake` was called, or ``timeout`` passed."""
        try:
            readable, _, _ = select.select([sock, self._r], [], [], timeout)
        except (OSError, ValueError):    # closed under us: the reactor's own checks report it
            return
        if self._r in readable:
            try:
                while self._r.recv(4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class _WakingQueue(queue.Queue):
    """A queue whose every put calls ``wake`` (the consumer's thread then stops waiting)."""

    def __init__(self, wake) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _waking_copy(q: queue.Queue, wake) -> _WakingQueue:
    """A :class:`_WakingQueue` holding what ``q`` holds (nothing, before the threads start)."""
    waking = _WakingQueue(wake)
    while True:
        try:
            waking.put(q.get_nowait())
        except queue.Empty:
            return waking


class ReactorGate(PauseSafeCheckpoint):
    """The association's reactor checkpoint, which also waits for the reactor's work.

    pynetdicom's association loop sleeps 1 ms, waits on this checkpoint (cleared while
    another thread pauses the reactor to do its own messaging), then looks for a complete
    DIMSE message, a release request, an abort, a dead DUL thread and its network timeout.
    Idle, that is a thousand wake-ups a second, and a message waits up to 1 ms for the next
    one. Here, once the checkpoint is open, the reactor's own thread also waits until there
    is work: :meth:`wake` is called by every put on the DIMSE message queue and the DUL's
    queue of primitives for the user, by :meth:`set` (``kill`` sets it) and when the DUL
    thread ends; ``IDLE_WAIT_SECONDS`` bound the wait for the timer checks. While it waits
    the reactor counts as paused, as in pynetdicom, so other threads may message at once,
    and it goes on only if the checkpoint is still open (:class:`PauseSafeCheckpoint`).
    """

    def __init__(self, assoc) -> None:
        self._work = threading.Event()
        super().__init__(assoc)

    def wake(self) -> None:
        self._work.set()

    def set(self) -> None:
        super().set()
        self._work.set()

    def _idle(self) -> None:
        assoc = self._assoc
        if assoc.dimse.msg_queue.empty() and not assoc._kill:
            self._work.wait(IDLE_WAIT_SECONDS)
        # Consumed only now: work that came since the reactor last looked (a release
        # request queued while it served a message) ends the wait at once; work that
        # comes after this is seen by the loop that follows, or ends the next wait.
        self._work.clear()


_STOCK_TRANSPORT_EVENT = DULServiceProvider._is_transport_event


def wait_transport_event(self: DULServiceProvider) -> bool:
    """:meth:`DULServiceProvider._is_transport_event`, waiting for data when idle.

    Returns as pynetdicom's: True when a PDU was read. With nothing queued for the state
    machine, blocks in ``select`` until the peer sends, a primitive is queued, the DUL is
    killed, or ``IDLE_WAIT_SECONDS`` pass.
    """
    sock = self.socket
    if sock is None or self.state_machine.current_state == "Sta13":
        return _STOCK_TRANSPORT_EVENT(self)
    if not self._cxr_connection.buffered and not sock.ready:
        if self._kill_thread or sock.socket is None or not self.event_queue.empty() \
                or not self.to_provider_queue.empty():
            return False
        self._cxr_waker.wait(sock.socket, IDLE_WAIT_SECONDS)
        if not sock.ready:
            return False
    self._read_pdu_data()
    return True


# -- installation -------------------------------------------------------------------------------
@functools.cache
def fast_path_supported() -> bool:
    """Whether this pynetdicom has the upper-layer hooks this module replaces."""
    dul_hooks = ("_read_pdu_data", "_decode_pdu", "_is_transport_event", "kill_dul")
    # attributes the constructors set (an assignment names the attribute in the code object)
    assoc_attrs = Association.__init__.__code__.co_names
    return (all(hasattr(DULServiceProvider, name) for name in dul_hooks)
            and hasattr(AssociationSocket, "ready")
            and all(hasattr(DIMSEMessage(), name) for name in ("context_id", "_data_set_file"))
            and "_reactor_checkpoint" in assoc_attrs and hasattr(Association, "_run_reactor")
            and "msg_queue" in DIMSEServiceProvider.__init__.__code__.co_names
            and "to_user_queue" in DULServiceProvider.__init__.__code__.co_names)


def install(assoc, limits: ReceiveLimits | None = None, peer: str = "peer") -> None:
    """Put this module's receive path on a new, not yet started, acceptor association."""
    dul = assoc.dul
    limits = limits or ReceiveLimits()
    dul._cxr_connection = _Connection(limits, peer)
    raw = getattr(dul.socket, "socket", None)
    if raw is not None and limits.pdu_timeout:
        raw.settimeout(limits.pdu_timeout)      # also bounds a send to a peer that reads nothing
    dul._read_pdu_data = types.MethodType(read_pdus, dul)

    waker = Waker()
    dul._cxr_waker = waker
    dul.to_provider_queue = _waking_copy(dul.to_provider_queue, waker.wake)
    gate = ReactorGate(assoc)
    assoc._reactor_checkpoint = gate
    assoc.dimse.msg_queue = _waking_copy(assoc.dimse.msg_queue, gate.wake)
    dul.to_user_queue = _waking_copy(dul.to_user_queue, gate.wake)
    dul._is_transport_event = types.MethodType(wait_transport_event, dul)
    stock_kill = dul.kill_dul

    def kill_dul() -> None:
        stock_kill()
        waker.wake()

    dul.kill_dul = kill_dul
    dul._run_loop_delay = 0.0           # the reactor waits in select, not in a sleep
    target = dul._target

    def run() -> None:
        try:
            target()
        finally:
            waker.close()
            gate.wake()

    dul._target = run


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


def _peer_host(client_address) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)


def _remove_data_set_file(f) -> bool:
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
        removed += _remove_data_set_file(getattr(message, "_data_set_file", None))
        message._data_set_file = None
    msg_queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    while msg_queue is not None:
        try:
            _, primitive = msg_queue.get_nowait()
        except queue.Empty:
            break
        except (TypeError, ValueError):
            continue
        removed += _remove_data_set_file(getattr(primitive, "_dataset_file", None))
    conn = getattr(getattr(assoc, "dul", None), "_cxr_connection", None)
    if conn is not None:
        conn.discarded.clear()
    return removed


def install_on_server(server, *, limits: ReceiveLimits | None = None, fast: bool = True) -> None:
    """Use this module's connection handler and context copies on a pynetdicom server, with
    ``limits`` on what each connection may do, and the per-address limit at accept.

    ``fast=False`` (``[listener] fast_receive = false``) keeps pynetdicom's stock PDU path on
    every association; the per-address limit, the TLS handshake in the connection's thread and
    the clean-up of unfinished transfers stay."""
    limits = limits or ReceiveLimits()
    server._cxr_fast = fast
    server.contexts = CheaplyCopiedContexts(server.contexts)
    server._cxr_limits = limits
    limiter = PeerLimiter(limits.max_per_address, limits.refused)
    server._cxr_peers = limiter

    def verify_request(request, client_address) -> bool:
        # socketserver closes a connection refused here, before any thread or buffer exists
        return limiter.acquire(_peer_host(client_address))

    server.verify_request = verify_request

    def get_request():
        # pynetdicom's accepts and completes the TLS handshake here, in the one thread that
        # accepts: a peer that never finishes it would stop every other connection. The
        # handshake happens in the connection's own thread instead, within pdu_timeout.
        client, address = server.socket.accept()
        client.settimeout(limits.pdu_timeout or None)
        if server.ssl_context:
            client = server.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    server.get_request = get_request
    # socketserver makes one handler per connection from this class attribute
    server.RequestHandlerClass = FastReceiveRequestHandler


class FastReceiveRequestHandler(RequestHandler):
    """pynetdicom's connection handler with this module's receive path, and the plain
    C-STORE answers of :mod:`cxr_ai.net.answer`, on the association; and, when the
    association's thread ends however it ends, the per-address count released and the
    temporary files of unfinished data sets deleted."""

    def handle(self) -> None:
        host = _peer_host(self.client_address)
        limiter = getattr(self.server, "_cxr_peers", None)
        started = False
        try:
            request = self.request
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.do_handshake()
                except (OSError, ValueError) as exc:       # ssl.SSLError and TimeoutError are OSErrors
                    logger.warning("TLS handshake with %s failed: %s", host, exc)
                    self.server.shutdown_request(request)
                    return
            started = self._start_association()
        finally:
            if not started and limiter is not None:
                limiter.release(host)

    def _start_association(self) -> bool:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        return True

    def _create_association(self):
        assoc = super()._create_association()
        dul = assoc.dul
        host = _peer_host(self.client_address)
        if (getattr(self.server, "_cxr_fast", True) and dul.socket is not None
                and getattr(dul, "_target", None) is not None and fast_path_supported()):
            install(assoc, getattr(self.server, "_cxr_limits", None), host)
            answer.install(assoc)
        limiter = getattr(self.server, "_cxr_peers", None)
        run = assoc.run

        def run_then_clean_up() -> None:
            try:
                run()
            finally:
                try:
                    n = remove_unfinished_transfers(assoc)
                    if n:
                        logger.info("association from %s ended with %d data sets unfinished: their temporary "
                                    "files were removed", host, n)
                finally:
                    if limiter is not None:
                        limiter.release(host)

        assoc.run = run_then_clean_up
        return assoc
