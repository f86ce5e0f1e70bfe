"""Pieces shared by the SCP and the SCU: socket options, transfer syntaxes, DIMSE statuses."""

from __future__ import annotations

import logging
import socket
from typing import ClassVar

logger = logging.getLogger(__name__)

#: Maximum PDU we offer by default. 128 KiB was consistently the fastest on loopback
#: (DESIGN.md §3); 0 (unlimited) makes pynetdicom send a 7 MB dataset as one PDU, slower.
DEFAULT_MAX_PDU = 131072

#: Transfer syntaxes the SCP accepts for every storage SOP class (PS3.5 Annex A): the
#: uncompressed ones, Deflated, JPEG baseline/extended, JPEG Lossless (.57, .70), JPEG-LS,
#: JPEG 2000 (.90, .91), RLE Lossless and HTJ2K. Video syntaxes (MPEG, H.264, HEVC) and JPIP
#: are left out on purpose: radiographs never use them, and pynetdicom deep-copies every
#: (SOP class x syntax) pair for each association (~8,000 UIDs cost ~0.1-0.3 s per
#: association with all of them).
STORAGE_TRANSFER_SYNTAXES: list[str] = [
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",   # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.5",      # RLE Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]


class Status:
    """C-STORE response statuses used here (PS3.4 Annex B.2.3, PS3.7 Annex C).

    The first four are the Storage Service Class's own; ``0xC000`` is the start of its
    "Error: Cannot understand" range (Cxxx).
    """

    SUCCESS = 0x0000
    #: Refused: Out of Resources (PS3.4 B.2.3, A7xx) - spool disk below the watermark, or the
    #: job store could not record the instance.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (PS3.4 B.2.3, A9xx) - e.g. SOP Class UID in
    #: the data set differs from the Affected SOP Class UID, or a Type 1 UID is missing.
    DATASET_DOES_NOT_MATCH = 0xA900
    #: Error: Cannot understand (PS3.4 B.2.3, Cxxx) - the data set cannot be parsed or is
    #: truncated.
    CANNOT_UNDERSTAND = 0xC000

    NAMES: ClassVar[dict[int, str]] = {
        0x0000: "success",
        0xA700: "out_of_resources",
        0xA900: "dataset_does_not_match_sop_class",
        0xC000: "cannot_understand",
    }


def set_tcp_nodelay(sock: socket.socket | None) -> bool:
    """Disable Nagle's algorithm on ``sock`` (plain or TLS). Returns False if it could not.

    pynetdicom never sets TCP_NODELAY; Nagle plus delayed ACK costs 40-90 ms per C-STORE of
    a small object on loopback (measured: 48 ms -> 7 ms per store, DESIGN.md §3).
    """
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # e.g. a socket already closed by the peer
        logger.debug("could not set TCP_NODELAY: %s", exc)
        return False
    return True


def handle_conn_open_nodelay(event) -> None:
    """pynetdicom ``EVT_CONN_OPEN`` handler: set TCP_NODELAY on the association's socket.

    The event fires for accepted connections (SCP) right after the socket is attached to
    the association, and for requested ones (SCU) right after ``connect()``.
    """
    dul_socket = getattr(event.assoc.dul, "socket", None)
    set_tcp_nodelay(getattr(dul_socket, "socket", None))
