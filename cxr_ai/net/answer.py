"""The listener's C-STORE answers, encoded without building a pydicom data set.

The sender of a C-STORE waits for its answer before it sends the next instance, so the time
the listener takes to answer is paid once per instance. pynetdicom turns the answer into a
command set by building a pydicom data set of seven elements and encoding it twice (once for
the group length, once to send): about 1 ms of the listener's thread per instance, as long
as the listener's own header check. A C-STORE-RSP with nothing but the answer's fields
(PS3.7 §9.3.1.2: Affected SOP Class and Instance UIDs, Message ID Being Responded To,
Status) has a fixed layout in the command set's transfer syntax (implicit VR little endian,
PS3.7 §6.3.1), and :func:`encode_c_store_rsp` writes that layout directly: the same bytes,
which ``tests/test_answer.py`` checks against pynetdicom's encoding.

Every other message, an answer carrying an Error Comment or Offending Element, an answer
whose command set would not fit one PDU, and every answer while a handler other than
pynetdicom's logging one is bound to ``EVT_DIMSE_SENT``, takes pynetdicom's path.
"""

from __future__ import annotations

import struct

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_ELEMENT = struct.Struct("<HHL")          # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
#: Control header of a PDV that holds a whole command set: command, last fragment (PS3.8 E.2).
_COMMAND_LAST = b"\x03"
#: A PDV item's length, context ID and control header, which a PDU's maximum length counts.
_PDV_OVERHEAD = 6


def _uid(value: str) -> bytes:
    """A UI value: ASCII, padded with one NUL to an even length (PS3.5 §6.2).

    Raises UnicodeEncodeError for a value that is not ASCII (pynetdicom's path handles it).
    """
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def encode_c_store_rsp(primitive) -> bytes | None:
    """The encoded command set of a plain C-STORE-RSP, or None for anything else.

    Plain: a C-STORE response primitive with an integer Status and no Error Comment or
    Offending Element. The elements are those pynetdicom writes, in tag order, and Affected
    SOP Class/Instance UIDs only when set, as there.
    """
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    status = primitive.Status
    if not isinstance(status, int) or not 0 <= status <= 0xFFFF or primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    try:
        return _encode(primitive, status)
    except UnicodeEncodeError:
        return None


def _encode(primitive, status: int) -> bytes:
    parts = []
    if primitive.AffectedSOPClassUID is not None:
        parts.append(_element(0x0002, _uid(str(primitive.AffectedSOPClassUID))))
    parts += [_element(0x0100, _US.pack(_C_STORE_RSP)),
              _element(0x0120, _US.pack(primitive.MessageIDBeingRespondedTo)),
              _element(0x0800, _US.pack(_NO_DATA_SET)),
              _element(0x0900, _US.pack(status))]
    if primitive.AffectedSOPInstanceUID is not None:
        parts.append(_element(0x1000, _uid(str(primitive.AffectedSOPInstanceUID))))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _only_standard_sent_handlers(assoc) -> bool:
    return all(h[0] is standard_dimse_sent_handler for h in assoc.get_handlers(evt.EVT_DIMSE_SENT))


def install(assoc) -> None:
    """Answer plain C-STOREs on ``assoc`` with :func:`encode_c_store_rsp`; all else as before."""
    dimse = assoc.dimse
    stock = dimse.send_msg

    def send_msg(primitive, context_id: int) -> None:
        command = encode_c_store_rsp(primitive) if _only_standard_sent_handlers(assoc) else None
        max_pdu = dimse.maximum_pdu_size
        if command is None or (max_pdu and len(command) + _PDV_OVERHEAD > max_pdu):
            stock(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _COMMAND_LAST + command))
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send_msg
