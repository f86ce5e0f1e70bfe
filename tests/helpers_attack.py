"""Hostile and careless peers for the network hardening tests: raw DICOM upper-layer PDUs on
loopback sockets (any 127.0.0.0/8 source address), and the listener service as a process
whose memory can be read.

The PDUs are written byte by byte from PS3.8 §9.3 so that a test can stop, stall or lie
anywhere in them; pynetdicom's own SCU is used where a well-behaved sender is meant.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from cxr_ai.config import config_to_toml

REPO = Path(__file__).resolve().parents[1]
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
A_ABORT = bytes.fromhex("07000000000400000000")
A_RELEASE_RQ = bytes.fromhex("05000000000400000000")


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)


def associate_rq(*, calling: str = "TESTSCU", called: str = "CXR_AI", max_pdu: int = 131072,
                 transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing CR Image Storage (context 1) in one transfer syntax."""
    context = bytes((1, 0, 0, 0)) + _item(0x30, CR_STORAGE.encode()) + _item(0x40, transfer_syntax.encode())
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.3811.1")
    body = (struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, context) + _item(0x50, user))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def connect(port: int, *, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(type, body) of the next PDU; (0, b"") when the connection closed first."""
    head = _read_exact(sock, 6)
    if len(head) < 6:
        return 0, b""
    kind, _, length = struct.unpack(">BBL", head)
    return kind, _read_exact(sock, length)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def raw_associate(port: int, *, source: str = "127.0.0.1", **rq) -> socket.socket:
    """A connection with an established association (A-ASSOCIATE-AC received), context 1."""
    sock = connect(port, source=source)
    sock.sendall(associate_rq(**rq))
    kind, _ = read_pdu(sock)
    if kind != 0x02:
        sock.close()
        raise ConnectionError(f"association not accepted (PDU type 0x{kind:02X})")
    return sock


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def c_store_command(*, sop_instance: str, sop_class: str = CR_STORAGE, message_id: int = 1) -> bytes:
    """The encoded command set of a C-STORE-RQ announcing a data set (PS3.7 §9.3.1.1)."""
    from pydicom.dataset import Dataset

    cs = Dataset()
    cs.AffectedSOPClassUID = sop_class
    cs.CommandField = 0x0001
    cs.MessageID = message_id
    cs.Priority = 0
    cs.CommandDataSetType = 0x0000
    cs.AffectedSOPInstanceUID = sop_instance
    body = encode(cs, True, True)
    head = Dataset()
    head.CommandGroupLength = len(body)
    return encode(head, True, True) + body


def send_partial_store(sock: socket.socket, *, sop_instance: str, nbytes: int, pdu_data: int = 131066) -> None:
    """Send a C-STORE-RQ command and ``nbytes`` of its data set, never the last fragment."""
    sock.sendall(p_data(1, 0x03, c_store_command(sop_instance=sop_instance)))
    chunk = bytes(pdu_data)
    sent = 0
    while sent < nbytes:
        n = min(pdu_data, nbytes - sent)
        sock.sendall(p_data(1, 0x00, chunk[:n]))
        sent += n


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a peer that crashed or was cut off."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock: socket.socket, *, within: float) -> float | None:
    """Seconds until the other side closed (or aborted and closed) ``sock``; None if it did not
    within ``within`` seconds. What it sends meanwhile (an A-ABORT) is read and dropped."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < within:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
        if not data:
            return time.monotonic() - t0
    return None


# -- the service as a process -----------------------------------------------------------------------
@dataclass
class ServiceProcess:
    proc: subprocess.Popen
    dicom_port: int
    http_port: int
    store_root: Path
    log: Path

    @property
    def tmp(self) -> Path:
        """The spool's temporary folder, where data sets are received."""
        return self.store_root / "spool" / "tmp"

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def rss(self) -> int:
        """Resident memory now, bytes."""
        return self._status("VmRSS")

    def reset_peak(self) -> bool:
        """Reset the peak resident memory (Linux clear_refs 5); False where not allowed."""
        try:
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak(self) -> int:
        """Peak resident memory since the start or the last :meth:`reset_peak`, bytes."""
        return self._status("VmHWM")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service_process(root: Path, *, grace: float = 2.0, env_extra: dict | None = None,
                    store_root: Path | None = None, **listener) -> Iterator[ServiceProcess]:
    """``python -m cxr_ai.service`` with a stub pipeline and test-sized listener settings
    (``listener`` overrides them); SIGKILLed on the way out if still running."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {"port": free_port(), "allowed_calling_aes": ["TESTSCU"], "min_free_mb": 0.0,
                "acse_timeout": 3.0, "network_timeout": 3.0, "pdu_timeout": 2.0} | listener
    cfg = root / "cxr-ai.toml"
    cfg.write_text(config_to_toml({
        "listener": settings,
        "store": {"root": str(store_root or root / "var"), "quiet_seconds": 0.1, "keep_hours": -1.0},
        "workers": {"pipeline": "test_service:StubPipeline", "poll_seconds": 0.05,
                    "shutdown_grace_seconds": grace},
        "routing": {"poll_seconds": 0.1, "destinations": []},
        "http": {"port": 0},
    }))
    ready = root / "ready.json"
    log = root / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_AI__") and k != "TMPDIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    env.update(env_extra or {})
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cxr_ai.service", "--config", str(cfg), "--ready-file",
                                 str(ready)], env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"service exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("service did not start within 90 s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        yield ServiceProcess(proc, int(info["dicom_port"]), int(info["http_port"]), store_root or root / "var", log)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# -- hostile data sets -------------------------------------------------------------------------------
def _explicit(group: int, element: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    if vr in ("OB", "OW", "SQ", "UN", "UT"):
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _uids(sop_instance: str, study: str) -> bytes:
    return (_explicit(0x0008, 0x0016, "UI", CR_STORAGE.encode()) + _explicit(0x0008, 0x0018, "UI", sop_instance.encode())
            + _explicit(0x0020, 0x000D, "UI", study.encode()))


def write_part10(path: Path, body: bytes | None, *, transfer_syntax: str, sop_instance: str,
                 chunks=None) -> Path:
    """A Part 10 file: preamble, file meta for CR Image Storage in ``transfer_syntax``, then
    ``body`` (or the byte strings ``chunks`` yields) exactly as given."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        if body is not None:
            f.write(body)
        for chunk in chunks or ():
            f.write(chunk)
    return path


def deflate_bomb(path: Path, *, inflated_bytes: int, sop_instance: str, study: str) -> Path:
    """A deflated data set whose pixel data (zeros) inflates to ``inflated_bytes``; written
    1 MiB at a time (about 1 MB on disk per GiB)."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    def chunks():
        z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        yield z.compress(_uids(sop_instance, study) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes))
        zeros = bytes(1 << 20)
        left = inflated_bytes
        while left:
            n = min(left, len(zeros))
            yield z.compress(zeros[:n])
            left -= n
        tail = z.flush()
        yield tail + (b"\0" if (len(tail) % 2) else b"")

    return write_part10(path, None, transfer_syntax=DeflatedExplicitVRLittleEndian, sop_instance=sop_instance,
                        chunks=chunks())


def nested_sequences(path: Path, *, depth: int, sop_instance: str, study: str) -> Path:
    """An explicit VR little endian data set with sequences nested ``depth`` deep, every
    sequence and item of undefined length (PS3.5 §7.5.2)."""
    seq = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    body = _uids(sop_instance, study) + (seq + item) * depth + (item_end + seq_end) * depth
    return write_part10(path, body, transfer_syntax=ExplicitVRLittleEndian, sop_instance=sop_instance)


def raw_store(port: int, path: Path, *, transfer_syntax: str, source: str = "127.0.0.1",
              timeout: float = 120.0) -> int | None:
    """C-STORE the data set of the Part 10 file ``path`` byte for byte (no decoding, as a
    sender that forwards what it holds); the status answered, or None when the listener
    aborted or closed instead. Releases the association after."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom.dsutils import decode

    meta = read_file_meta_info(path)
    start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    sock = raw_associate(port, source=source, transfer_syntax=transfer_syntax)
    sock.settimeout(timeout)
    try:
        sock.sendall(p_data(1, 0x03, c_store_command(sop_instance=str(meta.MediaStorageSOPInstanceUID),
                                                     sop_class=str(meta.MediaStorageSOPClassUID))))
        with open(path, "rb") as f:
            f.seek(start)
            piece = f.read(131066)
            while piece:
                nxt = f.read(131066)
                sock.sendall(p_data(1, 0x00 if nxt else 0x02, piece))
                piece = nxt
        kind, body = read_pdu(sock)
        if kind != 0x04:
            return None
        command = bytearray()
        offset = 0
        while offset < len(body):
            (length,) = struct.unpack_from(">L", body, offset)
            command += body[offset + 6:offset + 4 + length]
            offset += 4 + length
        status = int(decode(io.BytesIO(bytes(command)), True, True).Status)
        sock.sendall(A_RELEASE_RQ)
        read_pdu(sock)
        return status
    except OSError:
        return None
    finally:
        sock.close()
