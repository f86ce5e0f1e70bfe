"""Query/Retrieve SCU: find studies on a PACS (C-FIND) and fetch them (C-GET or C-MOVE),
or the same over DICOMweb (QIDO-RS / WADO-RS, ``dicomweb-client``).

Both sources offer the same three calls, used by the batch processor
(:func:`cxr_ai.batch.inputs.retrieve_studies`):

- ``find_study_uids(study_uid=, accession=, date_from=, date_to=, modalities=)``;
- ``list_instances(study_uid) -> {SOPInstanceUID: SOPClassUID}``;
- ``fetch_study(study_uid, dest) -> [paths]``: files land in ``dest/<StudyInstanceUID>/
  <SOPInstanceUID>.dcm`` (temporary name, then rename), so a re-fetch overwrites.

Study Root Query/Retrieve (PS3.4 C.6.2). TCP_NODELAY is set on every association
(DESIGN.md §3). C-MOVE needs our own Storage SCP: it is started on ``127.0.0.1`` for the
duration of the move, with the calling AE title, which the PACS must know as a destination.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from cxr_ai.net.common import Status, handle_conn_open_nodelay
from cxr_ai.net.scu import MSG_ASSOC_FAILED, Peer, SendError, _assoc_kwargs, _new_ae
from cxr_ai.store.spool import safe_key

logger = logging.getLogger(__name__)

MSG_FIND_FAILED = "C-FIND on {ae}@{host}:{port} failed with status 0x{status:04X} at {level} level; check the query keys"
MSG_RETRIEVE_FAILED = (
    "{op} of study {study} from {ae}@{host}:{port} ended with status 0x{status:04X} "
    "({failed} sub-operations failed); check that the PACS knows our AE {calling}"
)
MSG_MOVE_NEEDS_PORT = "C-MOVE needs our Storage SCP port (--move-port) configured on the PACS as AE {calling}"
MSG_NO_DICOMWEB = "DICOMweb retrieval needs the 'dicomweb-client' package; pip install dicomweb-client"

_PENDING = (0xFF00, 0xFF01)


def _store_handler(dest: Path, received: list[Path]):
    """EVT_C_STORE handler writing each instance to ``dest/<study>/<sop>.dcm`` atomically."""
    lock = threading.Lock()

    def handle(event) -> int:
        try:
            try:
                # pynetdicom's chunked mode (the listener turns it on for the whole process):
                # the data set is in a Part 10 file, and request.DataSet is empty
                received_file = event.dataset_path
            except AttributeError:
                received_file = None
            ds = dcmread(received_file, stop_before_pixels=True) if received_file else event.dataset
            study = safe_key(str(ds.get("StudyInstanceUID", "") or "unknown"))
            sop = safe_key(str(event.request.AffectedSOPInstanceUID))
            folder = dest / study
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / f"{sop}.dcm"
            tmp = folder / f".tmp-{sop}.dcm"
            if received_file:
                shutil.move(received_file, tmp)      # pynetdicom removes it after this handler
            else:
                tmp.write_bytes(event.encoded_dataset())
            os.replace(tmp, final)
            with lock:
                received.append(final)
            return Status.SUCCESS
        except Exception as exc:  # noqa: BLE001 - the network boundary never crashes
            logger.warning("could not store a retrieved instance: %s", type(exc).__name__)
            return Status.OUT_OF_RESOURCES

    return handle


class DimseSource:
    """A PACS reached by DIMSE: C-FIND, then C-GET (default) or C-MOVE."""

    def __init__(self, peer: Peer, *, method: str = "get", move_port: int = 0) -> None:
        if method not in ("get", "move"):
            raise ValueError(f"retrieve method {method!r}: use 'get' or 'move'")
        self.peer = peer
        self.method = method
        self.move_port = int(move_port)

    # --- C-FIND ---------------------------------------------------------------------------

    def _find(self, query: Dataset) -> list[Dataset]:
        ae = _new_ae(self.peer)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(self.peer.host, self.peer.port, **_assoc_kwargs(self.peer))
        if not assoc.is_established:
            raise SendError(MSG_ASSOC_FAILED.format(ae=self.peer.ae_title, host=self.peer.host, port=self.peer.port,
                                                    why="refused or unreachable", calling=self.peer.calling_ae))
        out: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(status.Status) if status and "Status" in status else -1
                if code in _PENDING and identifier is not None:
                    out.append(identifier)
                elif code not in (0x0000,) + _PENDING:
                    raise SendError(MSG_FIND_FAILED.format(ae=self.peer.ae_title, host=self.peer.host,
                                                           port=self.peer.port, status=code & 0xFFFF,
                                                           level=query.QueryRetrieveLevel))
        finally:
            if assoc.is_established:
                assoc.release()
        return out

    def find_study_uids(self, *, study_uid: str = "", accession: str = "", date_from: str = "",
                        date_to: str = "", modalities: Sequence[str] = ()) -> list[str]:
        """Study Instance UIDs matching the keys (all given keys must match)."""
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid or ""
        q.AccessionNumber = accession or ""
        q.StudyDate = f"{date_from}-{date_to}" if (date_from or date_to) else ""
        q.ModalitiesInStudy = "\\".join(modalities) if modalities else ""
        return sorted({str(r.StudyInstanceUID) for r in self._find(q) if r.get("StudyInstanceUID")})

    def list_instances(self, study_uid: str) -> dict[str, str]:
        """``{SOPInstanceUID: SOPClassUID}`` of the study (SERIES then IMAGE level C-FIND)."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        series = [str(r.SeriesInstanceUID) for r in self._find(q) if r.get("SeriesInstanceUID")]
        out: dict[str, str] = {}
        for se in series:
            qi = Dataset()
            qi.QueryRetrieveLevel = "IMAGE"
            qi.StudyInstanceUID = study_uid
            qi.SeriesInstanceUID = se
            qi.SOPInstanceUID = ""
            qi.SOPClassUID = ""
            for r in self._find(qi):
                if r.get("SOPInstanceUID"):
                    out[str(r.SOPInstanceUID)] = str(r.get("SOPClassUID", "") or "")
        return out

    # --- C-GET / C-MOVE -------------------------------------------------------------------

    def fetch_study(self, study_uid: str, dest: str | os.PathLike) -> list[Path]:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if self.method == "move":
            return self._move(study_uid, dest)
        return self._get(study_uid, dest)

    def _identifier(self, study_uid: str) -> Dataset:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid
        return q

    def _check_final(self, op: str, study_uid: str, status: Dataset | None, last: Dataset | None) -> None:
        code = int(status.Status) if status is not None and "Status" in status else -1
        failed = int(getattr(last, "NumberOfFailedSuboperations", 0) or 0) if last is not None else 0
        if code not in (0x0000,) or failed:
            raise SendError(MSG_RETRIEVE_FAILED.format(op=op, study=study_uid, ae=self.peer.ae_title,
                                                       host=self.peer.host, port=self.peer.port,
                                                       status=code & 0xFFFF, failed=failed,
                                                       calling=self.peer.calling_ae))

    def _get(self, study_uid: str, dest: Path) -> list[Path]:
        sop_classes = sorted(set(self.list_instances(study_uid).values()) - {""})
        ae = _new_ae(self.peer)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for uid in sop_classes[:127]:
            ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES)
            roles.append(build_role(uid, scp_role=True))
        received: list[Path] = []
        kw = _assoc_kwargs(self.peer)
        kw["evt_handlers"] = kw["evt_handlers"] + [(evt.EVT_C_STORE, _store_handler(dest, received))]
        assoc = ae.associate(self.peer.host, self.peer.port, ext_neg=roles, **kw)
        if not assoc.is_established:
            raise SendError(MSG_ASSOC_FAILED.format(ae=self.peer.ae_title, host=self.peer.host, port=self.peer.port,
                                                    why="refused or unreachable", calling=self.peer.calling_ae))
        final = last = None
        try:
            for status, ident in assoc.send_c_get(self._identifier(study_uid), StudyRootQueryRetrieveInformationModelGet):
                final = status
                if status is not None and "Status" in status:
                    last = status
        finally:
            if assoc.is_established:
                assoc.release()
        self._check_final("C-GET", study_uid, final, last)
        logger.info("C-GET: %d instances received", len(received))
        return received

    def _move(self, study_uid: str, dest: Path) -> list[Path]:
        from pynetdicom import AllStoragePresentationContexts

        received: list[Path] = []
        scp = AE(ae_title=self.peer.calling_ae)
        # All storage SOP classes, every transfer syntax (pynetdicom caps at 128 contexts).
        for cx in AllStoragePresentationContexts[:128]:
            scp.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        server = scp.start_server(("127.0.0.1", self.move_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, _store_handler(dest, received)),
                                                (evt.EVT_CONN_OPEN, handle_conn_open_nodelay)])
        try:
            ae = _new_ae(self.peer)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = ae.associate(self.peer.host, self.peer.port, **_assoc_kwargs(self.peer))
            if not assoc.is_established:
                raise SendError(MSG_ASSOC_FAILED.format(ae=self.peer.ae_title, host=self.peer.host,
                                                        port=self.peer.port, why="refused or unreachable",
                                                        calling=self.peer.calling_ae))
            final = last = None
            try:
                for status, _ident in assoc.send_c_move(self._identifier(study_uid), self.peer.calling_ae,
                                                        StudyRootQueryRetrieveInformationModelMove):
                    final = status
                    if status is not None and "Status" in status:
                        last = status
            finally:
                if assoc.is_established:
                    assoc.release()
            self._check_final("C-MOVE", study_uid, final, last)
        finally:
            server.shutdown()
        logger.info("C-MOVE: %d instances received", len(received))
        return received


class DicomWebSource:
    """A PACS reached by DICOMweb: QIDO-RS to find, WADO-RS to fetch (``dicomweb-client``)."""

    def __init__(self, url: str, *, session: Any = None) -> None:
        try:
            from dicomweb_client.api import DICOMwebClient
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise ImportError(MSG_NO_DICOMWEB) from exc
        self.client = DICOMwebClient(url=url, session=session)

    def find_study_uids(self, *, study_uid: str = "", accession: str = "", date_from: str = "",
                        date_to: str = "", modalities: Sequence[str] = ()) -> list[str]:
        filters: dict[str, str] = {}
        if study_uid:
            filters["StudyInstanceUID"] = study_uid
        if accession:
            filters["AccessionNumber"] = accession
        if date_from or date_to:
            filters["StudyDate"] = f"{date_from}-{date_to}"
        if modalities:
            filters["ModalitiesInStudy"] = ",".join(modalities)
        found = self.client.search_for_studies(search_filters=filters)
        return sorted({Dataset.from_json(r).StudyInstanceUID for r in found})

    def list_instances(self, study_uid: str) -> dict[str, str]:
        out = {}
        for r in self.client.search_for_instances(study_instance_uid=study_uid):
            ds = Dataset.from_json(r)
            out[str(ds.SOPInstanceUID)] = str(ds.get("SOPClassUID", "") or "")
        return out

    def fetch_study(self, study_uid: str, dest: str | os.PathLike) -> list[Path]:
        folder = Path(dest) / safe_key(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in self.client.iter_study(study_uid):
            final = folder / f"{safe_key(str(ds.SOPInstanceUID))}.dcm"
            tmp = folder / f".tmp-{final.name}"
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, final)
            paths.append(final)
        return paths
