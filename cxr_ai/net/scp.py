"""The DICOM listener: C-ECHO and C-STORE SCP that spools every instance durably.

* Accepts every storage SOP class pynetdicom knows (CR and DX For Presentation/Processing
  among them; the others are stored and later marked not applicable by the pipeline) in
  every transfer syntax pynetdicom knows (JPEG 2000, JPEG lossless, RLE, ...).
* Receives to disk without decoding (``STORE_RECV_CHUNKED_DATASET``); the handler parses the
  header only, checks the data set is complete, fsyncs, renames into the spool and records
  the instance in the job store **before** answering success.
* TCP_NODELAY on every accepted socket; calling AE titles on an allowlist (others are
  refused at association: A-ASSOCIATE-RJ rejected-permanent, service-user, "calling-AE-title
  not recognized", PS3.8 §9.3.4); called AE title checked (reason 7).
* The C-STORE handler never raises: it answers a named status (see :class:`Status`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_ai.dicom.uids import patient_study_fingerprint
from cxr_ai.net.common import (
    DEFAULT_MAX_PDU,
    STORAGE_TRANSFER_SYNTAXES,
    Status,
    handle_conn_open_nodelay,
)
from cxr_ai.service.metrics import ServiceMetrics
from cxr_ai.net.receive import ReceiveLimits, discarded_reason, install_on_server
from cxr_ai.store.jobs import JobStore
from cxr_ai.dicom.uids import is_valid_uid
from cxr_ai.store.spool import Spool, safe_key

logger = logging.getLogger(__name__)

_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_UNDEFINED = 0xFFFFFFFF

MSG_TRUNCATED = "data set is truncated: element {tag} needs {need} bytes, {have} received"
MSG_NO_DELIMITER = "data set is truncated: encapsulated element {tag} ends without its sequence delimiter"
MSG_EMPTY = "data set could not be parsed (no elements read)"
MSG_DISK_LOW = ("spool %s has %d MiB free, below the %d MiB watermark: C-STORE refused with 0xA700 (out of "
                "resources); free disk space on the spool or lower [listener] min_free_mb")

MSG_REJECT_CALLING = ("A-ASSOCIATE-RJ rejected-permanent, service-user, calling AE title not recognized: add it to "
                      "[listener] allowed_calling_aes")
MSG_REJECT_CALLED = ("A-ASSOCIATE-RJ rejected-permanent, service-user, called AE title not recognized: the caller "
                     "must use our [listener] ae_title")
MSG_INFLATED_TOO_LARGE = ("deflated data set inflates to more than {limit} MiB ([listener] max_inflated_mb): "
                          "refused with 0xA700 (out of resources), nothing kept; raise the setting if such "
                          "instances are expected")
MSG_DEFLATE_CORRUPT = "deflated data set could not be inflated: {detail}"
MSG_TRAILING = "inflated data set has {extra} bytes after its last element (damaged deflate stream)"
MSG_TOO_DEEP = ("data set could not be parsed: sequences nested too deeply ({detail}); refused as not "
                "understood")
MSG_REJECT_LIMIT = ("A-ASSOCIATE-RJ rejected-transient, service-provider, local limit exceeded: {limit} associations "
                    "already open; the sender should retry, or raise [listener] max_associations")


MSG_STUDY_UID_SHARED = ("C-STORE from %s: its Study Instance UID was already received for another patient; "
                        "each patient's images are a study (a job) of their own, never merged (see cxr-ai jobs)")
MSG_UID_REUSED = ("C-STORE from %s: its SOP Instance UID was already received for another study or patient; "
                  "both instances are kept and processed, with results of their own (see cxr-ai jobs)")


class DatasetProblem(Exception):
    """A received data set that cannot be stored; carries the DIMSE status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HeaderInfo:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    size: int
    patient_id: str = ""
    issuer_of_patient_id: str = ""


def _check_encapsulated(f, start: int, size: int, tag) -> int:
    """Walk the items of an undefined-length (encapsulated) element up to its delimiter;
    returns where the delimiter ends."""
    pos = start
    while True:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_NO_DELIMITER.format(tag=tag))
        if head == _SEQ_DELIMITER:
            return pos + 8
        if head[:4] != _ITEM_TAG:
            raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_NO_DELIMITER.format(tag=tag))
        length = int.from_bytes(head[4:], "little")
        pos += 8 + length
        if pos > size:
            raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_TRUNCATED.format(tag=tag, need=pos, have=size))


#: Bytes of a deflated stream read, and at most inflated, per step of :func:`inflate_received`.
INFLATE_CHUNK = 1 << 20


def is_deflated(path: str | os.PathLike) -> bool:
    """Whether the Part 10 file's transfer syntax is Deflated Explicit VR Little Endian."""
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, f"file meta information could not be parsed: {exc}") from exc
    return str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian


def inflate_received(path: str | os.PathLike, *, max_bytes: int) -> Path:
    """Inflate a received deflated data set into a new Part 10 file (Explicit VR Little
    Endian, the same elements) beside it, in steps of ``INFLATE_CHUNK``: memory stays
    bounded whatever the stream inflates to.

    Raises :class:`DatasetProblem`: out of resources when the inflated data set would pass
    ``max_bytes`` (a deflate bomb, or an instance too large for this listener); cannot
    understand when the stream is not valid deflate (PS3.5 A.5), stops before its end, or is
    followed by more than the one padding byte allowed. Raw deflate has no checksum: damage
    that keeps every code valid and the length unchanged is found only by the checks of
    :func:`inspect_received` (elements that overrun or fall short of the data set).
    """
    path = Path(path)
    meta = read_file_meta_info(path)
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_DEFLATE_CORRUPT.format(
            detail="file meta information has no group length"))
    start = 128 + 4 + 12 + int(group_length)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".inflated.dcm")
    out_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            out.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(out, meta, enforce_standard=True)
            src.seek(start)
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            chunk = src.read(INFLATE_CHUNK)
            while chunk and not d.eof:
                data = d.decompress(chunk, INFLATE_CHUNK)
                total += len(data)
                if total > max_bytes:
                    raise DatasetProblem(Status.OUT_OF_RESOURCES,
                                         MSG_INFLATED_TOO_LARGE.format(limit=max_bytes >> 20))
                out.write(data)
                chunk = d.unconsumed_tail or src.read(INFLATE_CHUNK)
            trailing = d.unused_data + src.read(2)
            if not d.eof:
                raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_DEFLATE_CORRUPT.format(
                    detail="the deflate stream ends before its last block (truncated or damaged)"))
            if len(trailing) > 1 or trailing.strip(b"\0"):
                raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_DEFLATE_CORRUPT.format(
                    detail=f"{len(trailing)}+ bytes follow the end of the deflate stream (damaged stream)"))
            if total == 0:
                raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_EMPTY)
    except zlib.error as exc:
        out_path.unlink(missing_ok=True)
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_DEFLATE_CORRUPT.format(detail=f"zlib: {exc}")) from exc
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return out_path


def inspect_received(path: str | os.PathLike, *, affected_sop_class: str, affected_sop_instance: str,
                     exact_end: bool = False) -> HeaderInfo:
    """Parse the header of a received Part 10 file (no pixel decoding) and check it.

    Raises :class:`DatasetProblem` with the status to answer when the data set cannot be
    parsed or is truncated (Cannot understand, PS3.4 B.2.3), or when it does not match the
    SOP class/instance announced in the C-STORE request or lacks a Type 1 UID (Data Set does
    not match SOP Class). With ``exact_end`` (a data set the listener inflated), bytes after
    the last element are a damaged stream too.
    """
    size = os.path.getsize(path)
    try:
        ds = pydicom.dcmread(path, defer_size=4096)
        elements = list(ds._dict.items())
    except RecursionError as exc:
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_TOO_DEEP.format(detail=exc)) from exc
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, f"data set could not be parsed: {exc}") from exc
    if not elements:
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_EMPTY)
    if str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
        # Offsets in a deflated file are not positions in it. The listener inflates first
        # (inflate_received); a deflated file already in the spool is taken as it is.
        elements = []
    end = None          # where the last element ends, when known
    with open(path, "rb") as f:
        for tag, el in elements:
            if not isinstance(el, RawDataElement):
                end = None
                continue
            if el.length == _UNDEFINED:
                end = None
                if el.value is None and el.VR in ("OB", "OW", "UN", None):
                    end = _check_encapsulated(f, el.value_tell, size, tag)
            elif el.value_tell + el.length > size:
                raise DatasetProblem(Status.CANNOT_UNDERSTAND,
                                     MSG_TRUNCATED.format(tag=tag, need=el.value_tell + el.length, have=size))
            else:
                end = el.value_tell + el.length
    if exact_end and end is not None and end != size:
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, MSG_TRAILING.format(extra=size - end))
    try:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        study = str(ds.get("StudyInstanceUID", "") or "")
        patient = (str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or ""))
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetProblem(Status.CANNOT_UNDERSTAND, f"UID attributes could not be decoded: {exc}") from exc
    if sop_class != affected_sop_class:
        raise DatasetProblem(Status.DATASET_DOES_NOT_MATCH,
                             f"SOP Class UID in the data set ({sop_class or 'missing'}) differs from the "
                             f"Affected SOP Class UID of the request ({affected_sop_class})")
    if sop_instance != affected_sop_instance:
        raise DatasetProblem(Status.DATASET_DOES_NOT_MATCH,
                             "SOP Instance UID in the data set differs from the Affected SOP Instance UID")
    if not study:
        raise DatasetProblem(Status.DATASET_DOES_NOT_MATCH, "Study Instance UID (Type 1) is missing")
    return HeaderInfo(sop_class, sop_instance, study, size, *patient)


def _context_syntax(event) -> str | None:
    """The transfer syntax of the C-STORE's presentation context (that of the data set)."""
    try:
        return str(event.context.transfer_syntax)
    except AttributeError:
        return None


@dataclass
class ListenerSettings:
    """The ``[listener]`` configuration, validated (see :func:`cxr_ai.service.validate_config`)."""

    ae_title: str = "CXR_AI"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: Sequence[str] = ("ORTHANC", "STORESCU", "CXR_AI_SCU")
    require_called_ae: bool = True
    max_pdu: int = DEFAULT_MAX_PDU
    max_associations: int = 48
    min_free_bytes: int = 512 * 1024 * 1024
    max_associations_per_address: int = 32
    max_inflated_bytes: int = 1024 * 1024 * 1024
    acse_timeout: float = 15.0
    dimse_timeout: float = 60.0
    network_timeout: float = 30.0
    pdu_timeout: float = 10.0
    #: The fast receive path (:mod:`cxr_ai.net.receive`); False: pynetdicom's stock path.
    fast_receive: bool = True
    shutdown_seconds: float = 2.0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def receive_limits(self) -> ReceiveLimits:
        per_address = int(self.max_associations_per_address)
        if per_address <= 0 or per_address > int(self.max_associations):
            per_address = int(self.max_associations)
        return ReceiveLimits(pdu_timeout=float(self.pdu_timeout), max_per_address=per_address,
                             min_free_bytes=lambda: int(self.min_free_bytes))


class StorageSCP:
    """The listener. ``start()`` binds and returns; ``stop()`` shuts the server down.

    Parameters
    ----------
    settings
        Listener settings.
    spool, store
        Where instances go (files) and where they are recorded (job store).
    quiet_seconds
        Quiet period after an association ends before its studies are ready.
    metrics
        Optional service metrics to update.
    on_studies_closed
        Called after an association's studies were given their ready time (wakes workers).
    """

    def __init__(self, *, settings: ListenerSettings, spool: Spool, store: JobStore, quiet_seconds: float,
                 metrics: ServiceMetrics | None = None, on_studies_closed=None) -> None:
        self.on_studies_closed = on_studies_closed
        self.settings = settings
        self.spool = spool
        self.store = store
        self.quiet_seconds = quiet_seconds
        self.metrics = metrics
        self._server = None
        self._assoc_studies: dict[int, set[str]] = {}
        self._assoc_counts: dict[int, int] = {}
        self._lock = threading.Lock()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, STORAGE_TRANSFER_SYNTAXES[:3])
        ae.maximum_pdu_size = int(s.max_pdu)
        ae.maximum_associations = int(s.max_associations)
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.require_called_aet = bool(s.require_called_ae)
        allowed = [a.strip() for a in s.allowed_calling_aes]
        if "*" in allowed:
            logger.warning("[listener] allowed_calling_aes contains '*': any calling AE title is accepted")
            ae.require_calling_aet = []
        else:
            ae.require_calling_aet = allowed
        return ae

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        # Receive data sets straight to a temporary file without decoding (DESIGN.md §3).
        _config.STORE_RECV_CHUNKED_DATASET = True
        handlers = [
            (evt.EVT_CONN_OPEN, handle_conn_open_nodelay),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_assoc_end),
            (evt.EVT_ABORTED, self._on_assoc_end),
            (evt.EVT_CONN_CLOSE, self._on_assoc_end),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        s = self.settings
        self._server = self.ae.start_server((s.host, int(s.port)), block=False, evt_handlers=handlers,
                                            ssl_context=s.ssl_context)
        limits = s.receive_limits()
        if self.metrics is not None:
            counter = self.metrics.listener_refusals
            limits = dataclasses.replace(limits, on_refusal=lambda reason: counter.labels(reason).inc())
        install_on_server(self._server, limits=limits, fast=bool(s.fast_receive))
        if limits.max_per_address >= int(s.max_associations):
            logger.warning("[listener] max_associations_per_address (%d) is not below max_associations (%d): one "
                           "address can take every association", limits.max_per_address, s.max_associations)
        logger.info("DICOM listener %s on %s:%d (TLS %s, max PDU %d, %d associations, %d per address, PDU timeout "
                    "%g s, idle timeout %g s, %s receive path)", s.ae_title, s.host, self.port, "on" if s.ssl_context else "off",
                    s.max_pdu, s.max_associations, limits.max_per_address, s.pdu_timeout, s.network_timeout,
                    "fast" if s.fast_receive else "stock")

    @property
    def port(self) -> int:
        if self._server is None:
            return int(self.settings.port)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations and close open ones, whatever their peers do.

        The open connections are shut down (their threads then end at once, blocked in a
        read or not), and their threads are given ``shutdown_seconds`` to finish; the
        temporary files of data sets cut short are removed as each association ends.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        assocs = list(server.active_associations)
        for assoc in assocs:
            raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
            if raw is not None:
                try:
                    socket.socket.shutdown(raw, socket.SHUT_RDWR)
                except OSError:
                    pass
            # the upper layer's thread is the one that keeps the process alive
            assoc.dul.kill_dul()
            if not assoc.is_established:
                # one still waiting for its A-ASSOCIATE-RQ: "none came" (it ends at once)
                assoc.dul.to_user_queue.put(None)
        deadline = time.monotonic() + float(self.settings.shutdown_seconds)
        for assoc in assocs:
            for thread in (assoc.dul, assoc):       # the association's thread removes temp files
                if thread.is_alive():
                    thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(a.dul.is_alive() or a.is_alive() for a in assocs)
        if left:
            logger.warning("DICOM listener stopped with %d associations still ending", left)
        logger.info("DICOM listener stopped (%d open associations closed)", len(assocs))

    # -- handlers -------------------------------------------------------------------------
    def _on_echo(self, event) -> int:
        return Status.SUCCESS

    def _on_established(self, event) -> None:
        logger.info("association from %s accepted", event.assoc.requestor.ae_title)
        if self.metrics is not None:
            self.metrics.associations.labels("accepted").inc()

    def rejection_reason(self, *, calling_ae: str, called_ae: str) -> str:
        """Why pynetdicom refused an association (its EVT_REJECTED carries no reason)."""
        ae = self.ae
        # pynetdicom checks the calling AE title, then the called one, and the last failed
        # check is the reason sent: with both wrong, the wire says reason 7 (called AE)
        if ae.require_called_aet and called_ae.strip() != ae.ae_title.strip():
            return MSG_REJECT_CALLED
        if ae.require_calling_aet and calling_ae.strip() not in [a.strip() for a in ae.require_calling_aet]:
            return MSG_REJECT_CALLING
        return MSG_REJECT_LIMIT.format(limit=ae.maximum_associations)

    def _on_rejected(self, event) -> None:
        req = event.assoc.requestor
        logger.warning("association from calling AE %r refused: %s", req.ae_title,
                       self.rejection_reason(calling_ae=str(req.ae_title),
                                             called_ae=str(getattr(req.primitive, "called_ae_title", "") or "")))
        if self.metrics is not None:
            self.metrics.associations.labels("rejected").inc()

    def _on_assoc_end(self, event) -> None:
        key = id(event.assoc)
        with self._lock:
            studies = self._assoc_studies.pop(key, set())
            n = self._assoc_counts.pop(key, 0)
        if not studies and event.event is evt.EVT_CONN_CLOSE:
            return
        try:
            self.store.association_closed(studies, quiet_seconds=self.quiet_seconds)
        except Exception:  # broad on purpose: studies are released later by release_stale()
            logger.exception("could not mark %d studies ready after association end", len(studies))
        if self.on_studies_closed is not None:
            self.on_studies_closed()
        if n:
            logger.info("association from %s ended (%s): %d instances in %d studies",
                        event.assoc.requestor.ae_title, event.event.name, n, len(studies))

    def _on_store(self, event) -> int:
        """C-STORE: never raises; answers a status from :class:`Status` (PS3.4 B.2.3)."""
        t0 = time.perf_counter()
        status = Status.CANNOT_UNDERSTAND
        try:
            status = self._accept_instance(event)
        except Exception:  # broad on purpose: the network boundary must not crash the association
            logger.exception("unexpected error storing an instance; answered 0x%04X", Status.OUT_OF_RESOURCES)
            status = Status.OUT_OF_RESOURCES
        finally:
            # time spent here (an fsync on a busy disk, a large inflation) is not the peer's
            # idleness: network_timeout counts from the answer
            timer = getattr(getattr(event.assoc, "dul", None), "_idle_timer", None)
            if timer is not None:
                timer.restart()
            if self.metrics is not None:
                self.metrics.received.labels(Status.NAMES.get(status, hex(status))).inc()
                if status == Status.SUCCESS:
                    self.metrics.stage_seconds.labels("receive").observe(time.perf_counter() - t0)
        return status

    def _accept_instance(self, event) -> int:
        req = event.request
        calling = event.assoc.requestor.ae_title
        try:
            path = Path(event.dataset_path)
        except AttributeError:  # STORE_RECV_CHUNKED_DATASET turned off by someone else
            path = None
        if path is not None:
            cut = discarded_reason(event.assoc, path)
            if cut is not None:
                # the receive path stopped writing it (low space, failed write); emptied already
                logger.error("C-STORE from %s refused (0x%04X out_of_resources): %s", calling,
                             Status.OUT_OF_RESOURCES, cut)
                return Status.OUT_OF_RESOURCES
        free = self.spool.free_bytes()
        if free < self.settings.min_free_bytes:
            logger.error(MSG_DISK_LOW, self.spool.root, free // 2**20, self.settings.min_free_bytes // 2**20)
            return Status.OUT_OF_RESOURCES
        if path is None:
            path = self.spool.write_incoming(event.encoded_dataset(include_meta=True))
        inflated = None
        try:
            if _context_syntax(event) == DeflatedExplicitVRLittleEndian or \
                    (_context_syntax(event) is None and is_deflated(path)):
                inflated = path = inflate_received(path, max_bytes=int(self.settings.max_inflated_bytes))
            info = inspect_received(path, affected_sop_class=str(req.AffectedSOPClassUID),
                                    affected_sop_instance=str(req.AffectedSOPInstanceUID),
                                    exact_end=inflated is not None)
        except DatasetProblem as exc:
            if inflated is not None:
                inflated.unlink(missing_ok=True)
            logger.warning("C-STORE from %s refused (0x%04X %s): %s", calling, exc.status,
                           Status.NAMES[exc.status], exc)
            return exc.status
        except BaseException:
            if inflated is not None:
                inflated.unlink(missing_ok=True)
            raise
        study_key, sop_key = safe_key(info.study_instance_uid), safe_key(info.sop_instance_uid)
        if not (is_valid_uid(info.study_instance_uid) and is_valid_uid(info.sop_instance_uid)):
            logger.warning("C-STORE from %s carries a malformed UID; stored under a hashed name", calling)
        fingerprint = patient_study_fingerprint(study_instance_uid=info.study_instance_uid,
                                                patient_id=info.patient_id,
                                                issuer_of_patient_id=info.issuer_of_patient_id)
        study_key, shared = self.store.study_key(study_uid=info.study_instance_uid, patient_fp=fingerprint,
                                                 proposed=study_key)
        if shared:
            logger.warning(MSG_STUDY_UID_SHARED, calling)
        sop_key, reused = self.store.instance_key(study_key=study_key, sop_key=sop_key,
                                                  sop_uid=info.sop_instance_uid, patient_fp=fingerprint)
        if reused:
            logger.warning(MSG_UID_REUSED, calling)
            if self.metrics is not None:
                self.metrics.sop_uid_reused.inc()
        dest = self.spool.commit_file(path, study_uid=info.study_instance_uid, sop_uid=info.sop_instance_uid,
                                      sop_key=sop_key)
        try:
            study = self.store.record_instance(
                study_key=study_key, study_uid=info.study_instance_uid, sop_key=sop_key,
                sop_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid, path=dest,
                size=info.size, calling_ae=calling, patient_fp=fingerprint)
        except Exception:  # broad on purpose: answered as out of resources; the sender retries
            logger.exception("job store could not record an instance from %s; answered out of resources", calling)
            return Status.OUT_OF_RESOURCES
        with self._lock:
            self._assoc_studies.setdefault(id(event.assoc), set()).add(study.study_key)
            self._assoc_counts[id(event.assoc)] = self._assoc_counts.get(id(event.assoc), 0) + 1
        if self.metrics is not None:
            self.metrics.received_bytes.inc(info.size)
        logger.debug("stored SOP instance %s of study %s (job %s), %d bytes", info.sop_instance_uid,
                     info.study_instance_uid, study.job_id, info.size)
        return Status.SUCCESS
