"""C-STORE SCU: send a batch of DICOM files to a peer over one association.

Presentation contexts are negotiated for exactly the SOP classes and transfer syntaxes of
what is sent; TCP_NODELAY is set on the socket (DESIGN.md §3).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_ai.net.common import DEFAULT_MAX_PDU, handle_conn_open_nodelay
from cxr_ai.net.reactor import handle_conn_open_pause_safe

logger = logging.getLogger(__name__)

#: pynetdicom (and PS3.8) allow at most 128 presentation contexts per association.
MAX_CONTEXTS = 128

MSG_ASSOC_FAILED = (
    "could not open an association to {ae}@{host}:{port} ({why}); check that the peer is "
    "running and knows the calling AE title {calling}"
)


class SendError(Exception):
    """Sending failed as a whole (association refused, aborted, or an instance refused)."""


@dataclass(frozen=True)
class Peer:
    """A remote DICOM application entity."""

    host: str
    port: int
    ae_title: str
    calling_ae: str = "CXR_AI"
    max_pdu: int = DEFAULT_MAX_PDU
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    timeout: float = 60.0


#: Event handlers for every association cxr-ai requests: TCP_NODELAY, and a reactor
#: checkpoint that cannot lose a fast answer (:mod:`cxr_ai.net.reactor`).
SCU_HANDLERS = [(evt.EVT_CONN_OPEN, handle_conn_open_nodelay), (evt.EVT_CONN_OPEN, handle_conn_open_pause_safe)]


def _assoc_kwargs(peer: Peer) -> dict:
    kw: dict = {"ae_title": peer.ae_title, "max_pdu": peer.max_pdu, "evt_handlers": list(SCU_HANDLERS)}
    if peer.ssl_context is not None:
        kw["tls_args"] = (peer.ssl_context, peer.server_hostname or peer.host)
    return kw


def _new_ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout
    ae.connection_timeout = min(peer.timeout, 10.0)
    return ae


def echo(peer: Peer) -> int:
    """C-ECHO the peer; returns the status (0x0000 is success). Raises :class:`SendError`."""
    ae = _new_ae(peer)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, **_assoc_kwargs(peer))
    if not assoc.is_established:
        raise SendError(MSG_ASSOC_FAILED.format(ae=peer.ae_title, host=peer.host, port=peer.port,
                                                why="refused or unreachable", calling=peer.calling_ae))
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def send_files(paths: Sequence[str | os.PathLike], peer: Peer) -> list[int]:
    """C-STORE every file in ``paths`` over one association; return their statuses.

    Success (0x0000) and warnings (0x0001, 0xBxxx, PS3.4 B.2.3) count as stored; any other
    status, a refused association or a lost connection raises :class:`SendError` so the
    caller (the outbox) retries the batch later. Re-sending an instance the peer already
    holds is harmless: it is identified by its SOP Instance UID.
    """
    files = [Path(p) for p in paths]
    if not files:
        return []
    metas = []
    for p in files:
        meta = read_file_meta_info(p)
        metas.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    ae = _new_ae(peer)
    wanted: dict[str, list[str]] = {}
    for sop_class, ts in metas:
        wanted.setdefault(sop_class, [])
        if ts not in wanted[sop_class]:
            wanted[sop_class].append(ts)
    contexts = []
    for sop_class, syntaxes in wanted.items():
        # the file's own syntax first; uncompressed ones let the peer choose if it lacks it
        for ts in syntaxes:
            contexts.append(build_context(sop_class, [ts]))
        if not set(syntaxes) & {ExplicitVRLittleEndian, ImplicitVRLittleEndian}:
            contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if len(contexts) > MAX_CONTEXTS:
        raise SendError(f"{len(contexts)} presentation contexts needed, more than {MAX_CONTEXTS}; send in smaller batches")
    ae.requested_contexts = contexts
    assoc = ae.associate(peer.host, peer.port, **_assoc_kwargs(peer))
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "unreachable"
        raise SendError(MSG_ASSOC_FAILED.format(ae=peer.ae_title, host=peer.host, port=peer.port, why=why,
                                                calling=peer.calling_ae))
    statuses: list[int] = []
    try:
        for p in files:
            ds = pydicom.dcmread(p)
            rsp = assoc.send_c_store(ds)
            if not rsp or "Status" not in rsp:
                raise SendError(f"no C-STORE response from {peer.ae_title}@{peer.host}:{peer.port} "
                                "(connection lost or timed out)")
            status = int(rsp.Status)
            statuses.append(status)
            if not (status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF):
                raise SendError(f"{peer.ae_title} refused an instance with status 0x{status:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info("sent %d instances to %s@%s:%d", len(files), peer.ae_title, peer.host, peer.port)
    return statuses
