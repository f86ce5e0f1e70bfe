"""The listener's receive path (cxr_ai.net.receive) against real senders on 127.0.0.1.

The oracle for "received right" is dcmtk: the same ``storescu`` run sends the same files to
dcmtk's ``storescp`` in bit-preserving mode and to cxr-ai, and the data sets both wrote must
be byte-identical. Hand-fragmented messages (several fragments per PDU, the last fragment
sharing a PDU with others, a command and its data set in one PDU) and malformed PDUs are
sent over a pynetdicom association's socket.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import types
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from helpers_net import serving
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_ai.net import pdus, reactor, receive
from cxr_ai.net.common import Status
from cxr_ai.net.scp import StorageSCP
from cxr_ai.net.scu import SCU_HANDLERS, Peer, echo, send_files

CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture
def small_pdu_scp(tmp_path: Path):
    """The listener with 16 KiB PDUs: a radiograph arrives in hundreds of PDUs."""
    with serving(tmp_path, max_pdu=16384) as scp:
        yield scp


@pytest.fixture
def direct_writes(monkeypatch) -> list[int]:
    """Counts the PDUs that took the direct path (one entry per PDU written directly)."""
    taken: list[int] = []
    real = receive._write_direct

    def counting(conn, target, buf, length):
        ok = real(conn, target, buf, length)
        if ok:
            taken.append(length)
        return ok

    monkeypatch.setattr(receive, "_write_direct", counting)
    return taken


def data_set_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (what came over the network), without its meta."""
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def stored(scp: StorageSCP, uid: str) -> Path:
    """The spool file of the instance with SOP Instance UID ``uid``."""
    [inst] = [i for i in scp.store.instances() if i.sop_uid == uid]
    return Path(inst.path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storescu(port: int, called: str, option: str, files: list[Path]) -> None:
    r = subprocess.run(["storescu", option, "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port),
                        *map(str, files)], env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def dcmtk_received(tmp_path: Path, option: str, files: list[Path]) -> dict[str, Path]:
    """What dcmtk's storescp (bit-preserving, 16 KiB PDUs) wrote for ``files``, by SOP Instance UID."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "+B", "+xa", "--max-pdu", "16384", "--output-directory", str(out), str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "storescp did not start listening"
                time.sleep(0.05)
        storescu(port, "ANY-SCP", option, files)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    return {uid_of(p): p for p in out.iterdir()}


@pytest.mark.parametrize("option,names", [
    ("-xe", ("RG1_UNCR", "RG1_UNCI", "RG3_UNCR")),           # explicit VR little endian, 7 MB and 4 MB
    ("-xi", ("RG1_UNCR",)),                                  # implicit VR little endian
    ("-xw", ("RG1_J2KI", "RG3_J2KI")),                       # JPEG 2000: encapsulated fragments
    ("-xs", ("JPEG-LL",)),                                   # JPEG lossless SV1
])
def test_data_sets_arrive_byte_identical_to_dcmtk_storescp(small_pdu_scp: StorageSCP, direct_writes, tmp_path,
                                                           data_store_dir: Path, option: str, names) -> None:
    files = [data_store_dir / f"{n}.dcm" for n in names]
    reference = dcmtk_received(tmp_path, option, files)
    storescu(small_pdu_scp.port, "CXR_AI", option, files)
    for f in files:
        uid = uid_of(f)
        ours = stored(small_pdu_scp, uid)
        assert data_set_bytes(ours) == data_set_bytes(reference[uid]), f.name
        assert pydicom.dcmread(ours, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            pydicom.dcmread(reference[uid], stop_before_pixels=True).file_meta.TransferSyntaxUID
    # the direct path carried almost all of it: every PDU but those holding a command
    total = sum(len(data_set_bytes(stored(small_pdu_scp, uid_of(f)))) for f in files)
    assert sum(direct_writes) > total - len(files) * 16384


def test_direct_path_is_installed_with_this_pynetdicom(small_pdu_scp: StorageSCP) -> None:
    assert receive.fast_path_supported(), "pynetdicom changed: the listener's receive path fell back to the stock one"
    seen: list = []
    small_pdu_scp._server.bind(evt.EVT_ESTABLISHED, lambda e: seen.append(e.assoc.dul))
    peer = Peer(host="127.0.0.1", port=small_pdu_scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=10)
    assert echo(peer) == 0
    [dul] = seen
    assert dul._read_pdu_data.__func__ is receive.read_pdus
    assert dul._is_transport_event.__func__ is receive.wait_transport_event
    assert isinstance(dul.assoc._reactor_checkpoint, receive.ReactorGate)


def test_an_idle_association_wakes_its_reactor_rarely_and_still_answers(small_pdu_scp: StorageSCP,
                                                                         monkeypatch) -> None:
    """pynetdicom's association loop runs every 1 ms; with the gate, an idle one runs about
    every IDLE_WAIT_SECONDS, and a request or a release still gets through."""
    loops: list[float] = []
    real = receive.ReactorGate.wait

    def counting(gate, timeout=None):
        if threading.current_thread() is gate._assoc:
            loops.append(time.monotonic())
        return real(gate, timeout)

    monkeypatch.setattr(receive.ReactorGate, "wait", counting)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", small_pdu_scp.port, ae_title="CXR_AI", evt_handlers=SCU_HANDLERS)
    assert assoc.is_established
    try:
        loops.clear()
        time.sleep(0.5)
        idle = len(loops)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    # 0.5 s idle: about 50 loops at 10 ms; pynetdicom's 1 ms sleep alone would allow 500
    assert 5 <= idle <= 0.5 / reactor.IDLE_WAIT_SECONDS * 2.5, idle


def test_each_association_gets_its_own_copy_of_the_servers_contexts(small_pdu_scp: StorageSCP) -> None:
    import copy

    contexts = small_pdu_scp._server.contexts
    assert isinstance(contexts, receive.CheaplyCopiedContexts) and len(contexts) > 100
    dup = copy.deepcopy(contexts)
    assert [(c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role, c.context_id) for c in dup] == \
        [(c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role, c.context_id) for c in contexts]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax for a, b in zip(dup, contexts, strict=True))
    before = list(contexts[0].transfer_syntax)
    dup[0]._transfer_syntax.append("1.2.3")
    dup[0].context_id = 7
    assert contexts[0].transfer_syntax == before and contexts[0].context_id is None
    # a context carrying any other kind of field is deep-copied
    contexts[1].extra = {"k": ["v"]}
    try:
        odd = copy.deepcopy(contexts)[1]
        assert odd.extra == {"k": ["v"]} and odd.extra is not contexts[1].extra
    finally:
        del contexts[1].extra
    # and an association negotiates on its copy
    seen: list = []
    small_pdu_scp._server.bind(evt.EVT_ESTABLISHED, lambda e: seen.append(e.assoc.acceptor.supported_contexts))
    peer = Peer(host="127.0.0.1", port=small_pdu_scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=10)
    assert echo(peer) == 0
    [theirs] = seen
    assert len(theirs) == len(contexts) and not {id(c) for c in theirs} & {id(c) for c in contexts}


def test_write_back_starts_while_the_data_set_arrives(tmp_path: Path, rg1_paths, monkeypatch) -> None:
    requests: list[tuple[int, int]] = []
    real = receive.start_writeback

    def recording(fd: int, offset: int, nbytes: int) -> bool:
        requests.append((offset, nbytes))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(receive, "start_writeback", recording)
    with serving(tmp_path) as scp:
        peer = Peer(host="127.0.0.1", port=scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=30)
        assert send_files([rg1_paths["RG1_UNCR"]], peer) == [Status.SUCCESS]
        size = stored(scp, uid_of(rg1_paths["RG1_UNCR"])).stat().st_size
    assert requests, "no write-back was started while receiving a 7 MB data set"
    # contiguous ranges from where the data set starts, each at least the step but the tail,
    # which is asked for as soon as the last fragment is in
    for (off, n), (nxt, _) in itertools.pairwise(requests):
        assert nxt == off + n and n >= receive.WRITE_BEHIND_BYTES
    assert requests[-1][0] + requests[-1][1] == size


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="sync_file_range is Linux only")
def test_start_writeback_asks_the_kernel_on_linux(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        assert receive.start_writeback(f.fileno(), 0, 1 << 20) is True
    r, w = os.pipe()                                          # the kernel refuses a pipe (ESPIPE)
    try:
        assert receive.start_writeback(r, 0, 1) is False
    finally:
        os.close(r)
        os.close(w)


def test_a_data_recv_handler_sees_every_pdu_and_turns_the_direct_path_off(small_pdu_scp: StorageSCP,
                                                                          direct_writes, rg1_paths) -> None:
    received: list[int] = []
    small_pdu_scp._server.bind(evt.EVT_DATA_RECV, lambda e: received.append(len(e.data)))
    peer = Peer(host="127.0.0.1", port=small_pdu_scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=30)
    assert send_files([rg1_paths["RG1_UNCR"]], peer) == [Status.SUCCESS]
    assert direct_writes == []
    ours = stored(small_pdu_scp, uid_of(rg1_paths["RG1_UNCR"]))
    assert sum(received) > len(data_set_bytes(ours))
    assert pydicom.dcmread(ours).PixelData == pydicom.dcmread(rg1_paths["RG1_UNCR"]).PixelData


# -- hand-made PDUs -------------------------------------------------------------------------------
class RawSender:
    """A pynetdicom association whose P-DATA-TF PDUs the test writes itself."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="TESTSCU")
        ae.requested_contexts = [build_context(CR, [ExplicitVRLittleEndian]), build_context(Verification)]
        self.assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI", evt_handlers=SCU_HANDLERS)
        assert self.assoc.is_established
        self.context_id = next(cx.context_id for cx in self.assoc.accepted_contexts if cx.abstract_syntax == CR)
        # hold the requestor's reactor, as pynetdicom's own send_* calls do, so that the
        # response is left for response_status()
        self.assoc._reactor_checkpoint.clear()
        deadline = time.monotonic() + 10
        while not self.assoc._is_paused:
            assert time.monotonic() < deadline, "the association reactor did not pause"
            time.sleep(0.005)

    def release(self) -> None:
        self.assoc._reactor_checkpoint.set()
        self.assoc.release()

    def fragments(self, ds: pydicom.Dataset, size: int) -> list[bytes]:
        """The C-STORE-RQ for ``ds`` as PDV values (control header + fragment) of ``size`` bytes."""
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = ds.SOPClassUID
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = BytesIO(encode(ds, False, True))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        return [value for p in msg.encode_msg(self.context_id, size + 6)
                for _, value in p.presentation_data_value_list]

    def encode(self, values: list[bytes]) -> bytes:
        """A P-DATA-TF PDU carrying ``values`` as items of the CR context."""
        pdu = P_DATA_TF()
        for value in values:
            item = PresentationDataValueItem()
            item.presentation_context_id = self.context_id
            item.presentation_data_value = value
            pdu.presentation_data_value_items.append(item)
        return pdu.encode()

    def send(self, *groups: list[bytes]) -> None:
        for values in groups:
            self.send_raw(self.encode(values))

    def send_raw(self, data: bytes) -> None:
        self.assoc.dul.socket.send(data)

    def hang_up(self) -> None:
        """Close the connection without a release (nothing more is sent)."""
        self.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        self.assoc._reactor_checkpoint.set()
        self.assoc.abort()

    def aborted_by_peer(self, timeout: float = 30) -> bool:
        """Let the requestor's reactor run; whether the listener's A-ABORT arrived in time."""
        self.assoc._reactor_checkpoint.set()
        deadline = time.monotonic() + timeout
        while not self.assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.assoc.is_aborted

    def response_status(self) -> int:
        _, rsp = self.assoc.dimse.get_msg(block=True)  # blocks up to the DIMSE timeout
        assert rsp is not None, "no C-STORE response within the DIMSE timeout"
        return int(rsp.Status)


def synthetic_cr(rows: int = 512) -> pydicom.Dataset:
    """A small CR data set (512 KiB of 16-bit pixels) with fresh UIDs."""
    import numpy as np

    ds = pydicom.Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PHANTOM-RAW"
    ds.Modality = "CR"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(rows * rows, dtype=np.uint16) * 7).tobytes()
    return ds


def fragment_groups(values: list, layout: str) -> list[list]:
    """The PDUs (lists of PDV values) of one C-STORE laid out as ``layout`` says."""
    cmd = [v for v in values if v[0] & 1]
    data = [v for v in values if not v[0] & 1]
    if layout == "one_pdu":                 # everything in one PDU
        return [values]
    if layout == "pairs":                   # two fragments per PDU
        return [cmd] + [data[i:i + 2] for i in range(0, len(data), 2)]
    if layout == "last_with_others":        # the last fragment shares its PDU with earlier ones
        return [cmd] + [[v] for v in data[:-3]] + [data[-3:]]
    return [cmd + data[:3]] + [[v] for v in data[3:]]  # the command and the first data fragments together


@pytest.fixture
def raw_scp(tmp_path: Path):
    with serving(tmp_path, max_pdu=0) as scp:      # no limit: the test chooses the PDU sizes
        yield scp


@pytest.fixture(params=["fast", "stock"])
def raw_scp_each_path(request, tmp_path: Path):
    """:func:`raw_scp` on the fast receive path and on pynetdicom's stock path
    (``[listener] fast_receive = false``)."""
    with serving(tmp_path, max_pdu=0, fast_receive=request.param == "fast") as scp:
        yield scp


@pytest.mark.parametrize("layout", ["one_pdu", "pairs", "last_with_others", "cmd_with_data"])
def test_hand_fragmented_messages_are_stored_whole(raw_scp: StorageSCP, direct_writes, layout: str) -> None:
    ds = synthetic_cr()
    sender = RawSender(raw_scp.port)
    values = sender.fragments(ds, 16384)
    cmd = [v for v in values if v[0] & 1]
    data = [v for v in values if not v[0] & 1]
    assert len(cmd) == 1 and len(data) > 8 and data[-1][0] == 0x02 and all(v[0] == 0 for v in data[:-1])
    groups = fragment_groups(values, layout)
    sender.send(*groups)
    assert sender.response_status() == Status.SUCCESS
    sender.release()
    got = pydicom.dcmread(stored(raw_scp, ds.SOPInstanceUID))
    assert got.PixelData == ds.PixelData and got.PatientID == "PHANTOM-RAW"
    if layout in ("pairs", "last_with_others"):
        assert len(direct_writes) == len(groups) - 1      # all but the command
    if layout == "one_pdu":
        assert direct_writes == []


def test_a_pdv_item_overrunning_its_pdu_aborts_the_association_and_the_listener_goes_on(
        raw_scp: StorageSCP) -> None:
    ds = synthetic_cr()
    sender = RawSender(raw_scp.port)
    values = sender.fragments(ds, 16384)
    sender.send([values[0]], [values[1]])                  # command, first data fragment
    raw = bytearray(sender.encode([values[2]]))
    raw[6:10] = (len(values[2]) + 1 + 100).to_bytes(4, "big")  # item length past the PDU's end
    sender.send_raw(bytes(raw))
    assert sender.aborted_by_peer()
    assert raw_scp.store.instances() == []
    peer = Peer(host="127.0.0.1", port=raw_scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=10)
    assert echo(peer) == 0


def test_a_connection_lost_mid_data_set_stores_nothing_and_the_listener_goes_on(raw_scp_each_path: StorageSCP) -> None:
    raw_scp = raw_scp_each_path
    ds = synthetic_cr()
    sender = RawSender(raw_scp.port)
    values = sender.fragments(ds, 16384)
    sender.send([values[0]], *[[v] for v in values[1:5]])
    sender.send_raw(sender.encode([values[5]])[:5000])       # half a PDU, then the connection goes
    sender.hang_up()
    peer = Peer(host="127.0.0.1", port=raw_scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=10)
    assert echo(peer) == 0
    assert raw_scp.store.instances() == []
    assert send_files([_part10(ds, raw_scp.spool.root / "whole.dcm")], peer) == [Status.SUCCESS]
    assert [i.sop_uid for i in raw_scp.store.instances()] == [ds.SOPInstanceUID]


def _part10(ds: pydicom.Dataset, path: Path) -> Path:
    ds = ds.copy()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_a_failed_write_aborts_the_association_and_the_listener_goes_on(raw_scp: StorageSCP, monkeypatch) -> None:
    import errno

    real = receive._write_direct
    calls: list[int] = []

    def disk_full_on_third(conn, target, buf, length):
        calls.append(length)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(conn, target, buf, length)

    monkeypatch.setattr(receive, "_write_direct", disk_full_on_third)
    ds = synthetic_cr()
    sender = RawSender(raw_scp.port)
    sender.send(*[[v] for v in sender.fragments(ds, 16384)])
    assert sender.aborted_by_peer() and len(calls) == 3
    assert raw_scp.store.instances() == []
    monkeypatch.setattr(receive, "_write_direct", real)      # the disk has room again
    peer = Peer(host="127.0.0.1", port=raw_scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=10)
    assert send_files([_part10(ds, raw_scp.spool.root / "retry.dcm")], peer) == [Status.SUCCESS]
    assert [i.sop_uid for i in raw_scp.store.instances()] == [ds.SOPInstanceUID]


def test_a_pdu_header_claiming_4_gib_allocates_nothing_of_the_kind(raw_scp: StorageSCP) -> None:
    import resource

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux
    ds = synthetic_cr()
    sender = RawSender(raw_scp.port)
    values = sender.fragments(ds, 16384)
    sender.send([values[0]])                                 # a C-STORE whose data set is next
    sender.send_raw(b"\x04\x00\xff\xff\xff\xf0" + b"\x00" * 65536)
    sender.hang_up()                                         # and then nothing more
    peer = Peer(host="127.0.0.1", port=raw_scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=10)
    assert echo(peer) == 0
    deadline = time.monotonic() + 30
    while raw_scp._server.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not raw_scp._server.active_associations
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB for a PDU that never came"
    assert raw_scp.store.instances() == []


# -- pieces ---------------------------------------------------------------------------------------
def test_recv_into_fills_what_was_asked_or_what_came_before_close() -> None:
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 1024                      # 256 KiB, more than one recv returns
    sender = threading.Thread(target=a.sendall, args=(payload + b"tail",))
    sender.start()
    buf = bytearray(len(payload))
    assert receive._recv_into(b, memoryview(buf), len(payload)) == len(payload)
    assert buf == payload
    sender.join()
    a.close()                                               # the peer goes away mid-read
    buf = bytearray(100)
    assert receive._recv_into(b, memoryview(buf), 100, 10) == 14
    assert buf[10:14] == b"tail"
    b.close()


def test_pdv_items_that_overrun_or_lack_a_header_are_invalid() -> None:
    def pdu(*items: bytes) -> bytearray:
        body = b"".join(items)
        return bytearray(b"\x04\x00" + len(body).to_bytes(4, "big") + body)

    good = len(b"\x01\x02abc").to_bytes(4, "big") + b"\x01\x02abc"
    decoded = receive.decode_p_data_tf(pdu(good, good))
    assert [(i.presentation_context_id, bytes(i.presentation_data_value)) for i in
            decoded.presentation_data_value_items] == [(1, b"\x02abc")] * 2
    assert receive.decode_p_data_tf(pdu(good, (50).to_bytes(4, "big") + b"\x01\x02")) is None   # overruns
    assert receive.decode_p_data_tf(pdu((1).to_bytes(4, "big") + b"\x01")) is None             # no header
    assert receive.decode_p_data_tf(pdu(good, b"\x00\x00")) is None                            # cut short


def test_the_receive_buffer_takes_pdus_whole_however_they_arrive(monkeypatch) -> None:
    monkeypatch.setattr(pdus, "RECEIVE_BUFFER_BYTES", 64)
    conn = receive._Connection()
    a, b = socket.socketpair()
    small = [bytes([4, 0]) + (n).to_bytes(4, "big") + bytes([n]) * n for n in (10, 20, 30)]
    big = bytes([4, 0]) + (200).to_bytes(4, "big") + bytes(range(200))         # longer than the buffer
    a.sendall(b"".join(small) + big + big[:50])
    taken = []
    for _ in range(4):
        assert conn.fill(b, 6)
        length = int.from_bytes(conn.buffer[conn.start + 2:conn.start + 6], "big")
        assert conn.fill(b, 6 + length)
        taken.append(bytes(conn.take(6 + length)))
    assert taken == [*small, big]
    assert len(conn.buffer) >= 206                                             # grown for the long one
    assert conn.fill(b, 6) and conn.buffered == 50
    a.close()                                                                  # the rest never comes
    assert not conn.fill(b, 206)
    b.close()


class FakeReactor(threading.Thread):
    """A thread with what :class:`receive.ReactorGate` reads of an association."""

    def __init__(self, body) -> None:
        super().__init__(daemon=True)
        self._kill = False
        self.dimse = types.SimpleNamespace(msg_queue=queue.Queue())
        self.gate = receive.ReactorGate(self)
        self.body = body

    def run(self) -> None:
        self.body(self.gate)


def test_a_paused_reactor_stays_paused_when_work_arrives() -> None:
    """Other threads pause pynetdicom's reactor (clear the checkpoint) to message on their own."""
    woke = threading.Event()
    r = FakeReactor(lambda gate: gate.wait() and woke.set())
    r.gate.clear()
    r.start()
    r.gate.wake()                                       # a message arrives while paused
    assert not woke.wait(3 * reactor.IDLE_WAIT_SECONDS)
    r.gate.set()                                        # the other thread is done
    assert woke.wait(10)
    r.join(10)


def test_work_that_came_while_the_reactor_was_busy_ends_its_next_wait(monkeypatch) -> None:
    """A release request queued while the reactor served a message (after it looked for one)
    must not wait out the idle wait."""
    monkeypatch.setattr(reactor, "IDLE_WAIT_SECONDS", 60)
    woke = threading.Event()

    def body(gate) -> None:
        gate.wake()                                     # queued while busy
        gate.wait()
        woke.set()

    r = FakeReactor(body)
    r.start()
    assert woke.wait(10), "the reactor waited although work had come"
    r.join(10)


def test_waker_ends_a_wait_at_once() -> None:
    waker = receive.Waker()
    a, b = socket.socketpair()
    done = threading.Event()

    def wait() -> None:
        waker.wait(a, 60)
        done.set()

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    waker.wake()
    assert done.wait(10), "a woken wait kept waiting"
    t.join(10)
    waker.close()
    a.close()
    b.close()


# -- limits ------------------------------------------------------------------------------------
def test_fill_raises_past_its_deadline_however_slowly_bytes_trickle() -> None:
    a, b = socket.socketpair()
    b.settimeout(5.0)
    conn = receive._Connection()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.05):
            try:
                a.send(b"\x04")
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(receive.PduTimeout):
            conn.fill(b, 1000, time.monotonic() + 0.5)
        assert time.monotonic() - t0 < 4.0           # the deadline, not the socket's 5 s, ended it
        assert 0 < conn.buffered < 1000
        assert b.gettimeout() == 5.0                  # the socket's own timeout is restored
    finally:
        stop.set()
        a.close()
        b.close()


def test_max_length_is_the_offered_maximum_for_p_data_only() -> None:
    conn = receive._Connection()
    assoc = types.SimpleNamespace(acceptor=types.SimpleNamespace(maximum_length=131072))
    assert conn.max_length(0x04, assoc) == 131072
    assert conn.max_length(0x01, assoc) == receive.CONTROL_PDU_MAX
    assoc.acceptor.maximum_length = 0                 # unlimited offered: still a ceiling
    assert conn.max_length(0x04, assoc) == receive.UNLIMITED_PDU_CEILING


def test_peer_limiter_counts_per_address() -> None:
    limiter = receive.PeerLimiter(2)
    assert limiter.acquire("127.0.0.2") and limiter.acquire("127.0.0.2")
    assert not limiter.acquire("127.0.0.2")
    assert limiter.acquire("127.0.0.3")              # another address keeps its room
    limiter.release("127.0.0.2")
    assert limiter.acquire("127.0.0.2")
    assert receive.PeerLimiter(0).acquire("x")       # 0: no limit of its own


def test_discarded_data_set_file_is_emptied_and_later_writes_go_nowhere(tmp_path: Path) -> None:
    import tempfile

    f = tempfile.NamedTemporaryFile(dir=tmp_path, delete=False, mode="wb", suffix=".dcm")
    f.write(bytes(3 << 20))
    conn = receive._Connection()
    receive._discard(conn, f, "test reason")
    assert Path(f.name).stat().st_size == 0
    f.write(bytes(1 << 20))                          # what pynetdicom still writes
    f.file.flush()
    f.close()
    assert Path(f.name).stat().st_size == 0
    assoc = types.SimpleNamespace(dul=types.SimpleNamespace(_cxr_connection=conn))
    assert receive.discarded_reason(assoc, f.name) == "test reason"
    assert receive.discarded_reason(assoc, f.name) is None


# -- the same transfers over pynetdicom's stock path ([listener] fast_receive = false) ----------
# The tests above check the fast path, its direct writes and its limits. These send the same
# data over the same listener with each path, so both stay correct (the stock path is the
# reference the fast one replaces, and the way back if a pynetdicom release breaks the seam).


@pytest.fixture(params=["fast", "stock"])
def each_path_scp(request, tmp_path: Path):
    """The listener with 16 KiB PDUs on the fast receive path and on pynetdicom's stock path."""
    with serving(tmp_path, max_pdu=16384, fast_receive=request.param == "fast") as scp:
        yield scp, request.param


def _dul_of_next_association(scp: StorageSCP) -> list:
    seen: list = []
    scp._server.bind(evt.EVT_ESTABLISHED, lambda e: seen.append(e.assoc.dul))
    return seen


@pytest.mark.parametrize("option,names", [
    ("-xe", ("RG1_UNCR", "RG3_UNCR")),
    ("-xw", ("RG1_J2KI",)),
])
def test_each_path_stores_data_sets_byte_identical_to_dcmtk_storescp(each_path_scp, tmp_path, data_store_dir: Path,
                                                                     option: str, names) -> None:
    scp, path = each_path_scp
    seen = _dul_of_next_association(scp)
    files = [data_store_dir / f"{n}.dcm" for n in names]
    reference = dcmtk_received(tmp_path, option, files)
    storescu(scp.port, "CXR_AI", option, files)
    for f in files:
        uid = uid_of(f)
        assert data_set_bytes(stored(scp, uid)) == data_set_bytes(reference[uid]), (path, f.name)
    [dul] = seen
    assert (dul._read_pdu_data.__func__ is receive.read_pdus) is (path == "fast")


@pytest.mark.parametrize("layout", ["one_pdu", "pairs", "last_with_others", "cmd_with_data"])
def test_each_path_stores_hand_fragmented_messages_whole(raw_scp_each_path: StorageSCP, layout: str) -> None:
    ds = synthetic_cr()
    sender = RawSender(raw_scp_each_path.port)
    sender.send(*fragment_groups(sender.fragments(ds, 16384), layout))
    assert sender.response_status() == Status.SUCCESS
    sender.release()
    got = pydicom.dcmread(stored(raw_scp_each_path, ds.SOPInstanceUID))
    assert got.PixelData == ds.PixelData and got.PatientID == "PHANTOM-RAW"
