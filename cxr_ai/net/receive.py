"""The listener's receive path: pynetdicom's upper layer, with a direct path for data sets.

pynetdicom handles every PDU in pure Python: a 7 MB radiograph sent as 128 KiB P-DATA-TF
PDUs goes 56 times through the reactor loop, two queues, the state machine, an event object,
a primitive and the DIMSE decoder, and each byte is copied four times after the kernel hands
it over. Its two threads per association also sleep 1 ms whenever a loop found nothing to
do, which happens on every pause of the sender and before every C-STORE answer. Per
connection, :class:`FastReceiveRequestHandler` changes four things and leaves the state
machine, the association and the DIMSE layer as they are:

* **Buffered reads** (:class:`Connection`). ``recv_into`` fills a 1 MiB buffer with what
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
  ``select`` (:func:`~cxr_ai.net.reactor.wait_transport_event`) until the peer sends, the association queues
  a primitive (:class:`~cxr_ai.net.reactor.Waker`), or ``IDLE_WAIT_SECONDS`` pass for the
  reactor's timer checks; the association's thread waits at its checkpoint (:class:`~cxr_ai.net.reactor.ReactorGate`) until a message
  is complete, the peer asks to release or abort, or the same time passed.

Handlers bound to ``EVT_DATA_RECV`` or ``EVT_PDU_RECV`` (other than pynetdicom's logging
handler, which logs nothing for P-DATA-TF) see every PDU: with one bound, the direct path is
off. A PDU whose items overrun it is an invalid PDU (Evt19, A-ABORT), as in pynetdicom.

What a peer may do is bounded (:class:`ReceiveLimits`, from ``[listener]``): the length and
arrival time of each PDU (:mod:`cxr_ai.net.pdus`), connections per address at accept
(:class:`~cxr_ai.net.connections.PeerLimiter`; the TLS handshake runs in the connection's
thread), and the disk: every ``SPACE_CHECK_BYTES`` written, the free space of the data set's
file system is compared with the watermark; below it, or when a write fails (disk full), the
file is emptied and the rest of the data set dropped, and the C-STORE handler answers out of
resources (:func:`discarded_reason`). When an association ends however it ends, the
temporary files of its unfinished data sets are deleted
(:func:`~cxr_ai.net.connections.remove_unfinished_transfers`).

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

import ctypes
import functools
import logging
import os
import socket
import ssl
import sys
import time
import types

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

from cxr_ai.net import answer
from cxr_ai.net.connections import CheaplyCopiedContexts, PeerLimiter, peer_host, remove_unfinished_transfers
from cxr_ai.net.pdus import (
    CONTROL_PDU_MAX,
    HEADER,
    MSG_PDU_TIMEOUT,
    MSG_PDU_TOO_LONG,
    P_DATA_TF_TYPE,
    PDU_TYPES,
    PREALLOCATE_MAX_BYTES,
    UNLIMITED_PDU_CEILING,
    Connection,
    PduTimeout,
    ReceiveLimits,
    decode_p_data_tf,
    pdv_spans,
    recv_into,
    recv_large,
)
from cxr_ai.net.reactor import ReactorGate, Waker, wait_transport_event, waking_copy

#: Names from before the receive path was split into :mod:`cxr_ai.net.pdus` (reading PDUs),
#: :mod:`cxr_ai.net.connections` (the server's connections), :mod:`cxr_ai.net.reactor`
#: (waiting) and this module (the direct data-set path and its installation, the seam with
#: pynetdicom); callers and tests may use them from here.
__all__ = [
    "CONTROL_PDU_MAX", "PREALLOCATE_MAX_BYTES", "UNLIMITED_PDU_CEILING", "CheaplyCopiedContexts",
    "FastReceiveRequestHandler", "PduTimeout", "PeerLimiter", "ReactorGate", "ReceiveLimits", "Waker",
    "decode_p_data_tf", "discarded_reason", "fast_path_supported", "install", "install_on_server", "read_pdus",
    "remove_unfinished_transfers", "start_writeback", "wait_transport_event",
]
_Connection = Connection
_recv_into = recv_into

logger = logging.getLogger(__name__)

#: Bytes of a data set written between two write-back requests.
WRITE_BEHIND_BYTES = 1 << 20
#: Most PDUs one call of :func:`read_pdus` takes the direct path for before it returns to
#: the reactor (which then checks its timers and queues).
DIRECT_PDUS_PER_CALL = 64
#: Data-set bytes written between two checks of the file system's free space.
SPACE_CHECK_BYTES = 1 << 20

MSG_LOW_SPACE = ("free space on the file system of the data set being received is {free} MiB, below the "
                 "{limit} MiB watermark: stopped writing it and removed the partial file; free disk space there "
                 "or lower [listener] min_free_mb")
MSG_WRITE_FAILED = "writing the data set being received failed ({error}): stopped writing it, partial file removed"

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


def _write_direct(conn: Connection, target, buf: bytearray | memoryview, length: int) -> int:
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
    spans = list(pdv_spans(buf, 6, 6 + length))
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


def _discard(conn: Connection, f, reason: str) -> None:
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
    return bytearray(bytes((P_DATA_TF_TYPE, 0)) + len(body).to_bytes(4, "big") + body)


def read_pdus(self: DULServiceProvider) -> None:
    """:meth:`DULServiceProvider._read_pdu_data`, with the direct path for data-set PDUs.

    Takes one PDU from the connection's buffer (receiving as needed); while it is a data-set
    PDU that :func:`_write_direct` takes and more data is buffered or waiting, takes the next
    (at most ``DIRECT_PDUS_PER_CALL``). The first PDU it does not take is handled as
    pynetdicom does: Evt17 when the connection closes before a whole PDU arrived, Evt19 for
    an unknown or undecodable PDU, else the PDU's event on ``event_queue`` and the PDU on
    ``_recv_pdu``.

    Each PDU must arrive whole within ``pdu_timeout`` of the first sign of it, and be no
    longer than :meth:`Connection.max_length`; otherwise the association is aborted
    (Evt19: A-ABORT to the peer) and the connection reads nothing more (Evt17 next time).
    """
    conn: Connection = self._cxr_connection
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
                pdu_type, _, length = HEADER.unpack_from(conn.buffer, conn.start)
                if pdu_type not in PDU_TYPES:
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
                    buf = recv_large(raw, conn.take(6 + length), length, deadline)
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
        target = _data_set_in_progress(self) if pdu_type == P_DATA_TF_TYPE else None
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


def _abort(dul: DULServiceProvider, conn: Connection) -> None:
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
    if pdu_type == P_DATA_TF_TYPE and not dul.assoc.get_handlers(evt.EVT_DATA_RECV):
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
    dul._cxr_connection = Connection(limits, peer)
    raw = getattr(dul.socket, "socket", None)
    if raw is not None and limits.pdu_timeout:
        raw.settimeout(limits.pdu_timeout)      # also bounds a send to a peer that reads nothing
    dul._read_pdu_data = types.MethodType(read_pdus, dul)

    waker = Waker()
    dul._cxr_waker = waker
    dul.to_provider_queue = waking_copy(dul.to_provider_queue, waker.wake)
    gate = ReactorGate(assoc)
    assoc._reactor_checkpoint = gate
    assoc.dimse.msg_queue = waking_copy(assoc.dimse.msg_queue, gate.wake)
    dul.to_user_queue = waking_copy(dul.to_user_queue, gate.wake)
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
        return limiter.acquire(peer_host(client_address))

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
        host = peer_host(self.client_address)
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
        host = peer_host(self.client_address)
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
