"""The listener under hostile and careless peers on loopback: slow and idle connections,
one address taking every slot, PDUs longer than negotiated, transfers cut short, SIGTERM with
peers that never finish. Each test runs the service as a process (its memory is read from
/proc), is bounded in time and in bytes, and records what it saw for the hardening report
(``benchmarks/hardening_report.py``): the attack, the service's peak memory and how long the
listener took to serve again.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from cxr_ai.net.common import Status
from helpers_attack import (
    A_ABORT,
    A_RELEASE_RQ,
    CR_STORAGE,
    closed_by_peer,
    connect,
    deflate_bomb,
    nested_sequences,
    raw_store,
    write_part10,
    raw_associate,
    reset,
    send_partial_store,
    service_process,
)
from test_hardening_inputs import record
from test_net import throwaway_ca  # noqa: F401 - the fixture: a CA and server certificate for 127.0.0.1
from test_service import http_get

MIB = 1 << 20


def _rg1(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(dst)
    return dst


def store_from(port: int, path: Path, *, source: str = "127.0.0.1") -> int | None:
    """C-STORE ``path`` in its own association from ``source``; the status, or None when the
    association was refused or closed."""
    ae = AE(ae_title="TESTSCU")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()


def _open_attack(port: int, source: str, kind: str) -> socket.socket | None:
    """One hostile connection: 'idle' (connects, sends nothing), 'byte' (one byte of a PDU
    header), 'assoc' (associates, then sends nothing); None when refused at once."""
    try:
        if kind == "assoc":
            return raw_associate(port, source=source)
        sock = connect(port, source=source)
        if kind == "byte":
            sock.sendall(b"\x01")
        return sock
    except (ConnectionError, OSError):
        return None


def test_slow_and_idle_connections_leave_a_sender_served(tmp_path: Path, rg1_paths) -> None:
    files = [_rg1(rg1_paths["RG1_J2KI"], tmp_path / f"{i}.dcm") for i in range(6)]
    # the shipped limits (48, 32 per address); timeouts long enough that all 40 are open at once
    with service_process(tmp_path / "svc", acse_timeout=6.0, pdu_timeout=6.0, network_timeout=6.0) as svc:
        assert store_from(svc.dicom_port, files[5]) == 0          # warm-up: imports, first study processed
        time.sleep(1.0)
        svc.reset_peak()
        base = svc.rss()
        # 40 connections from one address: associated and idle, one byte of a header, nothing
        kinds = ["byte"] * 14 + ["idle"] * 13 + ["assoc"] * 13
        attack = [_open_attack(svc.dicom_port, "127.0.0.2", k) for k in kinds]
        # meanwhile a sender from another address is served, each instance in its own association
        t0 = time.monotonic()
        statuses = [store_from(svc.dicom_port, f) for f in files[:3]]
        served_after = time.monotonic() - t0
        assert statuses == [0, 0, 0]
        # the attacker's address got its share, not every slot: the rest was closed at accept,
        # and what it held is closed by the listener's timeouts
        held = [s for s in attack if s is not None]
        closed = [closed_by_peer(s, within=20) for s in held]
        assert all(c is not None for c in closed), closed
        # the same address is served again once its connections are gone
        assert store_from(svc.dicom_port, files[3], source="127.0.0.2") == 0
        peak = svc.peak() - base
        log = svc.log_text()
        _, metrics = http_get(svc.http_port, "/metrics")
    for s in held:
        s.close()
    counted = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'cxr_ai_listener_refusals_total\{reason="(\w+)"\} ([0-9.]+)', metrics.decode())}
    assert counted.get("per_address_limit", 0) >= 1, counted     # past the address's share of 32
    assert counted.get("pdu_timeout", 0) >= 1, counted           # the one-byte headers
    assert peak < 256 * MIB, f"service memory grew by {peak / MIB:.0f} MiB"
    assert "max_associations_per_address" in log           # the connections past the share
    assert "not received whole within" in log              # the one-byte headers timed out
    record("net_slow_idle", {
        "attack": "40 slow and idle connections from one address (13 associated idle, 14 one header byte, "
                  "13 silent)", "connections": len(attack), "legit_stores": "3/3 succeeded from another address",
        "legit_served_within_s": round(served_after, 2), "refusals_counted": counted,
        "time_to_recover_s": round(max(closed), 2),
        "peak_rss_growth_mib": round(peak / MIB, 1)})


def test_one_address_filling_its_share_recovers_within_the_timeouts(tmp_path: Path, rg1_paths) -> None:
    """The sender shares its address with the attacker: it is refused while the attacker
    holds the address's share, and served again once the timeouts close those connections."""
    f = _rg1(rg1_paths["RG1_J2KI"], tmp_path / "a.dcm")
    with service_process(tmp_path / "svc", max_associations=8, max_associations_per_address=4) as svc:
        held = [_open_attack(svc.dicom_port, "127.0.0.3", "byte") for _ in range(4)]
        assert all(s is not None for s in held)
        assert store_from(svc.dicom_port, f, source="127.0.0.3") is None        # the share is taken
        t0 = time.monotonic()
        status = None
        while status != 0 and time.monotonic() - t0 < 60:
            status = store_from(svc.dicom_port, f, source="127.0.0.3")
            if status != 0:
                time.sleep(0.25)
        recovered = time.monotonic() - t0
        assert status == 0
        # a PACS sending several associations at once from one address within the share works
        copies = [_rg1(rg1_paths["RG1_J2KI"], tmp_path / f"p{i}.dcm") for i in range(4)]
        results: list[int | None] = []
        threads = [threading.Thread(target=lambda p=p: results.append(store_from(svc.dicom_port, p,
                                                                                    source="127.0.0.3")))
                   for p in copies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [0, 0, 0, 0]
    for s in held:
        s.close()
    record("net_share_recovery", {"attack": "one address fills its share with one-byte connections; the sender "
                                            "uses the same address", "time_to_recover_s": round(recovered, 2),
                                  "parallel_associations_from_one_address": "4/4 succeeded"})


def test_pdu_longer_than_negotiated_is_aborted_unbuffered(tmp_path: Path, rg1_paths) -> None:
    claims = []
    with service_process(tmp_path / "svc") as svc:
        svc.reset_peak()
        base = svc.rss()
        socks = []
        for claim in (1 << 30, (1 << 32) - 1):           # 1 GiB and 4 GiB announced in P-DATA-TF
            s = raw_associate(svc.dicom_port)
            s.sendall(bytes((0x04, 0)) + claim.to_bytes(4, "big"))
            socks.append((s, claim))
        before = connect(svc.dicom_port)                 # the same before association
        before.sendall(bytes((0x01, 0)) + (1 << 30).to_bytes(4, "big"))
        socks.append((before, 1 << 30))
        for s, claim in socks:
            sent = 0
            chunk = bytes(MIB)
            try:
                while sent < 256 * MIB:                  # bounded: at most 256 MiB each
                    s.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            when = closed_by_peer(s, within=10)
            claims.append({"claimed_bytes": claim, "sent_before_refused_mib": sent // MIB, "closed_after_s": when})
            s.close()
        growth = svc.peak() - base
        assert store_from(svc.dicom_port, _rg1(rg1_paths["RG1_J2KI"], tmp_path / "a.dcm")) == 0
        log = svc.log_text()
    assert all(c["closed_after_s"] is not None for c in claims), claims
    assert all(c["sent_before_refused_mib"] < 256 for c in claims), claims
    assert growth < 256 * MIB, f"service memory grew by {growth / MIB:.0f} MiB"
    assert log.count("above the") >= 3
    record("net_pdu_claims", {"attack": "PDU headers claiming 1 GiB and 4 GiB (after and before association)",
                              "cases": claims, "peak_rss_growth_mib": round(growth / MIB, 1)})


def _wait_empty(folder: Path, *, within: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if not any(folder.iterdir()):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _wait_file(folder: Path, *, within: float = 10) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if any(folder.iterdir()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no temporary file appeared in {folder}")


def test_transfers_cut_short_leave_no_temp_files(tmp_path: Path, rg1_paths) -> None:
    """Five transfers of 40 MB each end early (A-ABORT, TCP reset, close, A-RELEASE-RQ mid data
    set, a stall past pdu_timeout); every temporary file goes with its transfer."""
    endings = {
        "a_abort": lambda s: (s.sendall(A_ABORT), s.close()),
        "tcp_reset": reset,
        "tcp_close": lambda s: s.close(),
        "release_mid_data_set": lambda s: (s.sendall(A_RELEASE_RQ), closed_by_peer(s, within=10), s.close()),
        "stall_mid_pdu": lambda s: (s.sendall(bytes((0x04, 0)) + (131072).to_bytes(4, "big") + bytes(1000)),
                                    closed_by_peer(s, within=20), s.close()),
    }
    rows = []
    with service_process(tmp_path / "svc") as svc:
        svc.reset_peak()
        base = svc.rss()
        for name, end in endings.items():
            s = raw_associate(svc.dicom_port)
            send_partial_store(s, sop_instance=generate_uid(), nbytes=40 * MIB)
            _wait_file(svc.tmp)
            t0 = time.monotonic()
            end(s)
            gone = _wait_empty(svc.tmp, within=30)
            assert gone is not None, f"{name}: {sorted(p.name for p in svc.tmp.iterdir())}"
            rows.append({"ending": name, "temp_files_removed_after_s": round(time.monotonic() - t0, 2)})
        assert store_from(svc.dicom_port, _rg1(rg1_paths["RG1_J2KI"], tmp_path / "a.dcm")) == 0
        assert not any(svc.tmp.iterdir())
        growth = svc.peak() - base
    record("net_cut_transfers", {"attack": "5 transfers of 40 MB cut short", "cases": rows,
                                 "time_to_recover_s": round(max(r["temp_files_removed_after_s"] for r in rows), 2),
                                 "spool_tmp_files_left": 0, "peak_rss_growth_mib": round(growth / MIB, 1)})


def test_stale_temp_files_are_swept_at_start(tmp_path: Path) -> None:
    tmp = tmp_path / "svc" / "var" / "spool" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "tmpleftover.dcm").write_bytes(bytes(1000))
    with service_process(tmp_path / "svc") as svc:
        assert not any(svc.tmp.iterdir())
        assert "partial files left in the spool" in svc.log_text()


def test_sigterm_ends_the_service_whatever_peers_do(tmp_path: Path) -> None:
    grace = 2.0
    with service_process(tmp_path / "svc", grace=grace) as svc:
        held = [_open_attack(svc.dicom_port, "127.0.0.2", k) for k in ("byte", "idle", "assoc") * 3]
        mid = raw_associate(svc.dicom_port, source="127.0.0.3")
        send_partial_store(mid, sop_instance=generate_uid(), nbytes=8 * MIB)
        mid.sendall(bytes((0x04, 0)) + (131072).to_bytes(4, "big") + bytes(10))      # a PDU never finished
        _wait_file(svc.tmp)
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        try:
            svc.proc.wait(timeout=grace + 10)
        except Exception:
            pass
        ended = svc.proc.poll()
        took = time.monotonic() - t0
        tmp_left = sorted(p.name for p in svc.tmp.iterdir())
    for s in [*held, mid]:
        if s is not None:
            s.close()
    assert ended is not None, "service still running after SIGTERM"
    assert tmp_left == []
    record("net_sigterm", {"attack": "SIGTERM with 9 hostile connections and a transfer stalled mid-PDU",
                           "shutdown_grace_seconds": grace, "exited_after_s": round(took, 2), "exit_code": ended})


def test_wrong_calling_and_called_ae_logs_the_reason_sent(tmp_path: Path, caplog) -> None:
    from helpers_net import serving

    with serving(tmp_path) as scp, caplog.at_level("WARNING", logger="cxr_ai.net.scp"):
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CR_STORAGE, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="NOT_CXR_AI")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 7          # PS3.8 §9.3.4: called AE title not recognized
    assert "called AE title not recognized" in caplog.text and "calling AE title not recognized" not in caplog.text


def test_defaults_release_idle_associations_well_before_two_minutes() -> None:
    from cxr_ai.config import load_config
    from cxr_ai.service import validate_config

    li = validate_config(load_config(env={})).listener
    assert li.network_timeout <= 60 and li.acse_timeout <= 30 and li.pdu_timeout <= 30
    assert 0 < li.receive_limits().max_per_address < li.max_associations


def test_healthz_degraded_below_the_watermark_without_restart(tmp_path: Path) -> None:
    with service_process(tmp_path / "svc", min_free_mb=1e9) as svc:
        code, body = http_get(svc.http_port, "/healthz")
        health = json.loads(body)
        assert code == 503 and health["status"] == "degraded"
        assert any("below the" in p and "min_free_mb" in p for p in health["problems"]), health


# -- data sets that lie about their size or structure ------------------------------------------------
def _store_file(port: int, path: Path, transfer_syntax: str) -> int | None:
    return raw_store(port, path, transfer_syntax=transfer_syntax)


def _deflated_rg1(src: Path, dst: Path) -> tuple[Path, bytes]:
    """RG1 re-encoded as Deflated Explicit VR Little Endian; (file, its pixel data)."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)
    return dst, bytes(ds.PixelData)


def _stream_start(path: Path) -> int:
    meta = pydicom.filereader.read_file_meta_info(path)
    return 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)


def _corrupt(path: Path, dst: Path, want: str) -> Path:
    """A copy of a deflated file with 8 bytes changed in its stream, at the first place (from
    the stream's middle on, deterministic) where zlib then fails ('zlib') or the stream
    inflates to another length ('length')."""
    raw = path.read_bytes()
    start = _stream_start(path)
    body = raw[start:]
    full = len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(body))
    for pos in range(len(body) // 2, len(body) - 64, 997):
        bad = bytearray(body)
        for k in range(8):
            bad[pos + k] ^= 0x5A
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            out = d.decompress(bytes(bad))
        except zlib.error:
            if want == "zlib":
                break
            continue
        if want == "length" and len(out) != full:
            break
    else:
        raise AssertionError(f"no corruption of kind {want} found")
    dst.write_bytes(raw[:start] + bytes(bad))
    return dst


def test_deflate_bomb_refused_in_bounded_memory(tmp_path: Path) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm", inflated_bytes=2 << 30, sop_instance=generate_uid(),
                        study=generate_uid())
    assert bomb.stat().st_size < 8 * MIB
    with service_process(tmp_path / "svc", max_inflated_mb=64.0) as svc:
        svc.reset_peak()
        base = svc.rss()
        t0 = time.monotonic()
        status = _store_file(svc.dicom_port, bomb, DeflatedExplicitVRLittleEndian)
        answered = time.monotonic() - t0
        growth = svc.peak() - base
        log = svc.log_text()
        assert not any(svc.tmp.iterdir())
        assert not list((svc.store_root / "spool" / "instances").rglob("*.dcm"))
    assert status == Status.OUT_OF_RESOURCES
    assert "max_inflated_mb" in log
    assert growth < 256 * MIB, f"service memory grew by {growth / MIB:.0f} MiB"
    record("net_deflate_bomb", {"attack": f"deflated data set of {bomb.stat().st_size // 1024} KiB inflating to "
                                          "2 GiB", "status": "0xA700 (past max_inflated_mb = 64)",
                                "answered_after_s": round(answered, 2), "peak_rss_growth_mib": round(growth / MIB, 1)})


def test_deflated_data_sets_inflated_to_disk_and_damage_refused(tmp_path: Path, rg1_paths) -> None:
    good, pixels = _deflated_rg1(rg1_paths["RG1_UNCR"], tmp_path / "good.dcm")
    damaged = {
        "zlib_error": _corrupt(good, tmp_path / "zlib.dcm", "zlib"),
        "length_changed": _corrupt(good, tmp_path / "length.dcm", "length"),
    }
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-20000])
    damaged["truncated_stream"] = truncated
    with service_process(tmp_path / "svc") as svc:
        statuses = {name: _store_file(svc.dicom_port, p, DeflatedExplicitVRLittleEndian) for name, p in damaged.items()}
        assert _store_file(svc.dicom_port, good, DeflatedExplicitVRLittleEndian) == 0
        stored = list((svc.store_root / "spool" / "instances").rglob("*.dcm"))
        log = svc.log_text()
        assert not any(svc.tmp.iterdir())
    assert statuses == dict.fromkeys(damaged, Status.CANNOT_UNDERSTAND), statuses
    assert "deflated data set could not be inflated" in log
    [kept] = stored                                   # only the good one, inflated
    ds = pydicom.dcmread(kept)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert bytes(ds.PixelData) == pixels
    record("net_deflate_damage", {"attack": "deflated RG1 with a damaged stream", "statuses":
                                  {k: f"0x{v:04X}" for k, v in statuses.items()},
                                  "note": "raw deflate has no checksum: damage that keeps every code valid and "
                                          "the length unchanged cannot be detected"})


def test_sequences_nested_too_deep_are_not_understood(tmp_path: Path) -> None:
    from helpers_net import serving

    deep = nested_sequences(tmp_path / "deep.dcm", depth=250, sop_instance=generate_uid(), study=generate_uid())
    shallow = nested_sequences(tmp_path / "shallow.dcm", depth=5, sop_instance=generate_uid(), study=generate_uid())
    with serving(tmp_path) as scp:
        assert _store_file(scp.port, deep, ExplicitVRLittleEndian) == Status.CANNOT_UNDERSTAND
        assert _store_file(scp.port, shallow, ExplicitVRLittleEndian) == 0       # still serving, nesting allowed
        assert len(scp.store.instances()) == 1
    record("net_deep_sequences", {"attack": "sequences nested 250 deep, undefined lengths",
                                  "status": "0xC000 cannot understand"})


# -- full disks ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MiB tmpfs mounted for the test; skipped where this process may not mount one."""
    import os
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); this test fills a real file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"the kernel refused a tmpfs mount here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _big(path: Path, mib: int) -> Path:
    """A CR Image Storage data set of ``mib`` MiB of pixel data, written as it is sent."""
    from helpers_attack import _uids

    sop = generate_uid()
    return write_part10(path, _uids(sop, generate_uid()) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, mib * MIB)
                        + bytes(mib * MIB), transfer_syntax=ExplicitVRLittleEndian, sop_instance=sop)


def _fill(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(bytes(MIB))


def test_disk_filling_mid_transfer_then_recovery_without_restart(small_disk: Path, tmp_path: Path) -> None:
    big = _big(tmp_path / "big.dcm", 24)
    small = _big(tmp_path / "small.dcm", 1)
    filler = small_disk / "filler"
    with service_process(tmp_path / "svc", store_root=small_disk / "var", min_free_mb=16.0) as svc:
        _fill(filler, 30)                               # 34 MiB free: the 24 MB transfer crosses 16 MiB
        crossed = raw_store(svc.dicom_port, big, transfer_syntax=ExplicitVRLittleEndian)
        assert crossed == Status.OUT_OF_RESOURCES
        assert not any(svc.tmp.iterdir())               # the partial file went at once
        code, _ = http_get(svc.http_port, "/healthz")
        assert code == 200                              # above the watermark again
        _fill(filler, 52)                               # now below it
        code, body = http_get(svc.http_port, "/healthz")
        health = json.loads(body)
        assert code == 503 and health["status"] == "degraded"
        assert any("below the 16 MiB watermark" in p for p in health["problems"]), health
        assert raw_store(svc.dicom_port, small, transfer_syntax=ExplicitVRLittleEndian) == Status.OUT_OF_RESOURCES
        filler.unlink()                                 # space returns
        t0 = time.monotonic()
        assert raw_store(svc.dicom_port, big, transfer_syntax=ExplicitVRLittleEndian) == 0
        recovered = time.monotonic() - t0
        code, _ = http_get(svc.http_port, "/healthz")
        assert code == 200
        log = svc.log_text()
        assert not any(svc.tmp.iterdir())
        assert len(list((svc.store_root / "spool" / "instances").rglob("*.dcm"))) == 1
    assert "stopped writing it and removed the partial file" in log
    record("net_disk_full", {"attack": "spool (64 MiB tmpfs) falls below the 16 MiB watermark during a 24 MB "
                                       "transfer, then below it before one",
                             "statuses": {"crossing_mid_transfer": "0xA700", "below_at_start": "0xA700"},
                             "healthz_below": "503 degraded", "partial_files_left": 0,
                             "time_to_recover_s": round(recovered, 2), "restart": False})


def test_disk_full_write_fails_mid_transfer_then_next_store_succeeds(small_disk: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """No watermark: the write itself fails (ENOSPC) part way; answered 0xA700, nothing left."""
    import tempfile

    from helpers_net import serving

    big = _big(tmp_path / "big.dcm", 40)                # larger than the 64 MiB disk once filled
    small = _big(tmp_path / "small.dcm", 1)
    tmp = small_disk / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    _fill(small_disk / "filler", 40)
    with serving(tmp_path / "scp") as scp:
        assert raw_store(scp.port, big, transfer_syntax=ExplicitVRLittleEndian) == Status.OUT_OF_RESOURCES
        assert not any(tmp.iterdir())
        assert raw_store(scp.port, small, transfer_syntax=ExplicitVRLittleEndian) == 0     # same association kind, no restart
        assert len(scp.store.instances()) == 1
    record("net_disk_enospc", {"attack": "spool temp folder runs out of space (ENOSPC) during a 40 MB transfer",
                               "status": "0xA700", "partial_files_left": 0, "next_store": "0x0000"})


def test_stale_temp_files_swept_while_running_live_ones_kept(tmp_path: Path) -> None:
    import os

    from cxr_ai.store import Spool

    spool = Spool(tmp_path / "spool")
    old, live = spool.tmp / "tmpold.dcm", spool.tmp / "tmplive.dcm"
    old.write_bytes(b"x")
    live.write_bytes(b"y")
    part = spool.incoming / "abc.part"
    part.write_bytes(b"z")
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    os.utime(part, (hours_ago, hours_ago))
    assert spool.clear_incoming(older_than=3600) == 2
    assert not old.exists() and not part.exists() and live.exists()
    assert spool.clear_incoming() == 1 and not live.exists()          # at start: everything


def test_tls_handshake_never_finished_blocks_no_one(tmp_path: Path, throwaway_ca: Path) -> None:
    """Connections that never finish the TLS handshake neither stop the accept loop nor stay."""
    from helpers_net import make_scp

    from cxr_ai.net.scu import Peer, echo
    from cxr_ai.net.tls import client_context, server_context

    ctx = server_context(cert_file=throwaway_ca / "server.pem", key_file=throwaway_ca / "server.key")
    scp = make_scp(tmp_path, ssl_context=ctx, pdu_timeout=2.0)
    try:
        stalled = [connect(scp.port) for _ in range(3)]
        stalled[0].sendall(b"\x16\x03\x01")                  # a TLS record begun, never finished
        peer = Peer(host="127.0.0.1", port=scp.port, ae_title="CXR_AI", calling_ae="TESTSCU",
                    ssl_context=client_context(ca_file=throwaway_ca / "ca.pem"), timeout=10)
        assert echo(peer) == 0
        closed = [closed_by_peer(s, within=15) for s in stalled]
        assert all(c is not None for c in closed), closed
        for s in stalled:
            s.close()
    finally:
        scp.stop()
        scp.store.close()
