"""Reading PDUs off the listener's sockets: what a peer may send, and how fast.

:class:`Connection` is one connection's receive buffer: ``recv_into`` fills it with what the
socket holds, often several PDUs, which are then taken one by one (one system call per
buffer-full rather than several per PDU; pynetdicom reads 4 KiB at a time). It also holds
the state of the data set being written directly (:mod:`cxr_ai.net.receive`).

What a peer may do is bounded (:class:`ReceiveLimits`, from ``[listener]``):

* **Length.** A P-DATA-TF PDU longer than the maximum the listener offered (PS3.8 D.1), or
  any other PDU longer than ``CONTROL_PDU_MAX``, is refused from its header: A-ABORT, and
  nothing more is read. A PDU longer than ``PREALLOCATE_MAX_BYTES`` (possible only with a
  larger offered maximum) is read in pieces (:func:`recv_large`), never into a buffer sized
  by its length field.
* **Time.** A PDU, once its first byte is seen, must arrive whole within ``pdu_timeout``,
  however slowly its bytes trickle in (the socket's timeout is shortened to the deadline,
  :func:`check_deadline`); else :class:`PduTimeout` and A-ABORT. Between PDUs pynetdicom's
  own timers apply (ARTIM before the association, ``network_timeout`` after).

A P-DATA-TF PDU is decoded here (:func:`decode_p_data_tf`) with its values as views of the
buffer; a PDU whose items overrun it is an invalid PDU (Evt19, A-ABORT), as in pynetdicom.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

logger = logging.getLogger(__name__)

#: PDUs longer than this are read in pieces of this size rather than into a buffer
#: allocated from the PDU's length field (which is the peer's word).
PREALLOCATE_MAX_BYTES = 4 << 20
#: Bytes the receive buffer takes in one ``recv_into`` (grown for a longer PDU).
RECEIVE_BUFFER_BYTES = 1 << 20
#: Longest P-DATA-TF PDU accepted when the listener's maximum PDU is 0 (unlimited): a peer's
#: length field never makes the listener buffer more than this.
UNLIMITED_PDU_CEILING = 64 << 20
#: Longest PDU of any other type (A-ASSOCIATE-RQ with many contexts and a user identity is
#: well below it).
CONTROL_PDU_MAX = PREALLOCATE_MAX_BYTES

MSG_PDU_TOO_LONG = ("PDU of type 0x{type:02X} from {peer} announces {length} bytes, above the {limit} this listener "
                    "accepts (negotiated maximum PDU): association aborted without reading it")
MSG_PDU_TIMEOUT = ("PDU from {peer} not received whole within {timeout:g} s ([listener] pdu_timeout; {got} of "
                   "{need} bytes): association aborted")


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


P_DATA_TF_TYPE = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))
HEADER = struct.Struct(">BBL")
PDV_LENGTH = struct.Struct(">L")


def recv_into(sock: socket.socket, view: memoryview, nr_bytes: int, start: int = 0) -> int:
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


def recv_large(sock: socket.socket, start: bytearray, length: int, deadline: float | None = None) -> bytearray:
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
            check_deadline(sock, deadline)
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


def check_deadline(sock: socket.socket, deadline: float | None) -> None:
    """Raise :class:`PduTimeout` past ``deadline``; shorten the socket's timeout to it when it
    is nearer than the socket's own (restored by :func:`restore_timeout`)."""
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise PduTimeout
    current = sock.gettimeout()
    if current is None or remaining < current - 0.25:
        sock.settimeout(remaining)


def restore_timeout(sock: socket.socket, timeout: float | None) -> None:
    if sock.gettimeout() != timeout:
        try:
            sock.settimeout(timeout)
        except OSError:        # closed meanwhile
            pass


def decode_p_data_tf(buf: bytearray) -> P_DATA_TF | None:
    """A P-DATA-TF PDU whose PDV values are views of ``buf``; None when an item overruns it."""
    view = memoryview(buf)
    items = []
    for context_id, start, stop in pdv_spans(buf, 6, len(buf)):
        if context_id < 0:
            return None
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        item.presentation_data_value = view[start:stop]
        items.append(item)
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu


def pdv_spans(buf, offset: int, end: int):
    """(context ID, start, stop) of each PDV item's value in ``buf[offset:end]``.

    A context ID of -1 marks an item that overruns the PDU or has no message control header
    (PS3.8 §9.3.5.1, Annex E.2); nothing follows it.
    """
    while offset < end:
        if end - offset < 6:
            yield -1, offset, end
            return
        (length,) = PDV_LENGTH.unpack_from(buf, offset)
        stop = offset + 4 + length
        if length < 2 or stop > end:
            yield -1, offset, end
            return
        yield buf[offset + 4], offset + 5, stop
        offset = stop


class Connection:
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
                check_deadline(sock, deadline)
                try:
                    n = sock.recv_into(view[self.end:], len(self.buffer) - self.end)
                except TimeoutError:
                    raise PduTimeout from None
                if not n:
                    return False
                self.end += n
        finally:
            view.release()
            restore_timeout(sock, timeout)
        return True

    def max_length(self, pdu_type: int, assoc) -> int:
        """The longest PDU body of ``pdu_type`` this connection accepts: the maximum PDU
        the listener offered for P-DATA-TF (PS3.8 D.1), ``CONTROL_PDU_MAX`` for others."""
        if pdu_type != P_DATA_TF_TYPE:
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
