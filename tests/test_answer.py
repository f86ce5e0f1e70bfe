"""C-STORE answers encoded by cxr_ai.net.answer: pynetdicom's encoding is the oracle."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from helpers_net import serving
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from cxr_ai.net import answer
from cxr_ai.net.common import Status
from cxr_ai.net.scp import StorageSCP
from cxr_ai.net.scu import SCU_HANDLERS, Peer, send_files

CR = "1.2.840.10008.5.1.4.1.1.1"


def response(*, msg_id: int = 7, sop_class: str | None = CR, sop_instance: str | None = "1.2.3.4",
             status: int = 0x0000) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


def pynetdicom_pdv(rsp: C_STORE, context_id: int = 1) -> tuple[int, bytes]:
    """The PDV pynetdicom sends for ``rsp``: (context ID, control header + command set)."""
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    [pdata] = list(msg.encode_msg(context_id, 16384))
    [pdv] = pdata.presentation_data_value_list
    return pdv


@pytest.mark.parametrize("sop_instance", [
    "1.2.3.4",                                       # even length
    "1.2.3",                                         # odd: padded with NUL
    "1.2.826.0.1.3680043.8.498." + "1" * 38,         # 64 characters, the most a UID has
    generate_uid(),
    None,                                            # not set: no element
])
@pytest.mark.parametrize("status", [Status.SUCCESS, Status.OUT_OF_RESOURCES, Status.CANNOT_UNDERSTAND,
                                    Status.DATASET_DOES_NOT_MATCH, 0xB000, 0xFFFF])
@pytest.mark.parametrize("msg_id", [0, 1, 65535])
def test_the_command_set_is_the_one_pynetdicom_encodes(sop_instance, status: int, msg_id: int) -> None:
    rsp = response(msg_id=msg_id, sop_instance=sop_instance, status=status)
    context_id, value = pynetdicom_pdv(rsp, context_id=3)
    assert context_id == 3
    assert value[:1] == b"\x03"                      # command, last fragment
    assert answer.encode_c_store_rsp(rsp) == value[1:]


def test_without_an_affected_sop_class_too() -> None:
    rsp = response(sop_class=None)
    assert answer.encode_c_store_rsp(rsp) == pynetdicom_pdv(rsp)[1][1:]


def test_anything_but_a_plain_c_store_answer_is_left_to_pynetdicom() -> None:
    request = C_STORE()
    request.MessageID = 1
    assert answer.encode_c_store_rsp(request) is None                # a request
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.Status = 0
    assert answer.encode_c_store_rsp(echo) is None                   # another service
    with_comment = response(status=0xC000)
    with_comment.ErrorComment = "data set could not be parsed"
    assert answer.encode_c_store_rsp(with_comment) is None
    with_offender = response(status=0xA900)
    with_offender.OffendingElement = [0x00080016]
    assert answer.encode_c_store_rsp(with_offender) is None


@pytest.fixture
def scp(tmp_path: Path):
    with serving(tmp_path) as scp:
        yield scp


def test_the_listener_answers_with_it_and_senders_read_the_answers(scp: StorageSCP, rg1_paths, monkeypatch) -> None:
    encoded: list[bytes] = []
    real = answer.encode_c_store_rsp

    def recording(primitive):
        out = real(primitive)
        encoded.append(out)
        return out

    monkeypatch.setattr(answer, "encode_c_store_rsp", recording)
    peer = Peer(host="127.0.0.1", port=scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=30)
    assert send_files([rg1_paths["RG1_UNCR"], rg1_paths["RG1_J2KR"]], peer) == [Status.SUCCESS, Status.SUCCESS]
    assert len(encoded) == 2 and all(encoded)


def test_a_dimse_sent_handler_sees_the_answers_through_pynetdicoms_path(scp: StorageSCP, rg1_paths) -> None:
    sent: list = []
    scp._server.bind(evt.EVT_DIMSE_SENT, lambda e: sent.append(type(e.message).__name__))
    peer = Peer(host="127.0.0.1", port=scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=30)
    assert send_files([rg1_paths["RG1_UNCR"]], peer) == [Status.SUCCESS]
    assert sent == ["C_STORE_RSP"]


def test_a_peer_with_pdus_too_small_for_the_answer_gets_it_in_fragments(scp: StorageSCP, rg1_paths,
                                                                         monkeypatch) -> None:
    fragmented: list[int] = []
    real = C_STORE_RSP.encode_msg

    def recording(msg, context_id, max_pdu):
        pdatas = list(real(msg, context_id, max_pdu))
        fragmented.append(len(pdatas))
        yield from pdatas

    monkeypatch.setattr(C_STORE_RSP, "encode_msg", recording)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CR)
    # the answer's command set (about 140 bytes) does not fit one of this peer's PDUs
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXR_AI", max_pdu=64, evt_handlers=SCU_HANDLERS)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(pydicom.dcmread(rg1_paths["RG1_UNCR"]))
    finally:
        assoc.release()
    assert rsp.Status == Status.SUCCESS
    assert fragmented and fragmented[0] > 1
