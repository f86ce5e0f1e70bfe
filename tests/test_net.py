"""The DICOM listener against real peers: pynetdicom and dcmtk storescu on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from helpers_net import ALLOWED, make_scp, serving
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_ai.net.common import Status
from cxr_ai.net.scp import (
    DatasetProblem,
    ListenerSettings,
    StorageSCP,
    inspect_received,
)
from cxr_ai.net.scu import SCU_HANDLERS, Peer, SendError, echo, send_files
from cxr_ai.net.tls import client_context, server_context
from cxr_ai.store import InstanceState, JobStore, Spool, StudyState

CR = "1.2.840.10008.5.1.4.1.1.1"
@pytest.fixture
def scp(tmp_path: Path):
    with serving(tmp_path) as s:
        yield s


def associate(port: int, *, calling: str = "TESTSCU", called: str = "CXR_AI", contexts=None, **kw):
    ae = AE(ae_title=calling)
    # one context per transfer syntax: the acceptor picks one syntax per context
    ae.requested_contexts = contexts or [build_context(CR, [ts]) for ts in (
        ExplicitVRLittleEndian, "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")] + [
        build_context(Verification)]
    seen: list = []
    handlers = [*SCU_HANDLERS, (evt.EVT_ACSE_RECV, lambda e: seen.append(e.primitive))]
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=handlers, **kw)
    return assoc, seen


def test_echo_and_store_rg1_all_transfer_syntaxes_pynetdicom(scp: StorageSCP, rg1_paths) -> None:
    nodelay: list[int] = []
    scp._server.bind(evt.EVT_ESTABLISHED, lambda e: nodelay.append(
        e.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
    assoc, _ = associate(scp.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    for name, path in rg1_paths.items():
        ds = pydicom.dcmread(path)
        assert assoc.send_c_store(ds).Status == Status.SUCCESS, name
    assoc.release()
    assert nodelay and all(v for v in nodelay), "TCP_NODELAY not set on the accepted socket"
    [study] = scp.store.studies()
    insts = scp.store.instances(study.study_key)
    # RG1_UNCR/J2KR share a SOP Instance UID? count distinct UIDs across the four files
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in rg1_paths.values()}
    assert {i.sop_uid for i in insts} == uids
    for i in insts:
        assert Path(i.path).is_file() and Path(i.path).resolve().is_relative_to(scp.spool.instances)
        assert i.calling_ae == "TESTSCU" and i.state is InstanceState.RECEIVED
    # the spooled bytes are the data set as sent: same pixel data as the source
    src = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p).PixelData for p in rg1_paths.values()}
    for i in insts:
        assert pydicom.dcmread(i.path).PixelData == src[i.sop_uid]
    # the association was released: the study gets ready (quiet period 0)
    assert scp.store.study(study.study_key).ready_at is not None
    assert study.state is StudyState.RECEIVED


@pytest.mark.parametrize("option,names,ts", [
    ("-xe", ("RG1_UNCR", "RG1_UNCI"), "1.2.840.10008.1.2.1"),    # explicit VR little endian
    ("-xi", ("RG1_UNCR",), "1.2.840.10008.1.2"),                 # implicit VR little endian
    ("-xv", ("RG1_J2KR",), "1.2.840.10008.1.2.4.90"),            # JPEG 2000 lossless
    ("-xw", ("RG1_J2KI",), "1.2.840.10008.1.2.4.91"),            # JPEG 2000
    ("-xs", ("JPEG-LL",), "1.2.840.10008.1.2.4.70"),             # JPEG lossless SV1
    ("-xr", ("MR_small_RLE",), "1.2.840.10008.1.2.5"),           # RLE lossless
])
def test_dcmtk_storescu_transfer_syntaxes(scp: StorageSCP, rg1_paths, option: str, names, ts: str) -> None:
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk storescu is required (apt-get install dcmtk)"
    files = [rg1_paths.get(n) or Path(pydicom.data.get_testdata_file(n + ".dcm")) for n in names]
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run([storescu, option, "-aet", "STORESCU", "-aec", "CXR_AI", "127.0.0.1", str(scp.port),
                        *map(str, files)], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    insts = scp.store.instances()
    assert {i.sop_uid for i in insts} == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                          for p in files}
    for i in insts:
        assert i.calling_ae == "STORESCU"
        assert pydicom.dcmread(i.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts


def test_unknown_calling_ae_is_refused_at_association(scp: StorageSCP, rg1_paths) -> None:
    assoc, seen = associate(scp.port, calling="INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    rj = next(p for p in seen if getattr(p, "result", None) in (1, 2))
    # PS3.8 §9.3.4: rejected-permanent (1), DICOM UL service-user (1), calling-AE-title-not-recognized (3)
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
    # dcmtk sees the same refusal
    r = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "CXR_AI", "127.0.0.1", str(scp.port),
                        str(rg1_paths["RG1_J2KI"])], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in (r.stdout + r.stderr)
    assert scp.store.instances() == []


def test_wrong_called_ae_is_refused(scp: StorageSCP) -> None:
    assoc, seen = associate(scp.port, called="SOMEONE_ELSE")
    assert assoc.is_rejected
    rj = next(p for p in seen if getattr(p, "result", None) in (1, 2))
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)  # called-AE-title-not-recognized


def _part10(path: Path, *, sop_class: str, sop_instance: str, body: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    from pydicom.filewriter import write_file_meta_info

    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(body)
    return path


def _truncate_dataset(src: Path, dst: Path, *, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning", "ignore:End of file reached:UserWarning")
def test_bad_data_gets_named_statuses_and_the_listener_keeps_serving(scp: StorageSCP, tmp_path: Path,
                                                                     rg1_paths, data_store_dir: Path,
                                                                     monkeypatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)   # send bytes as they are in the file
    rng_bytes = bytes((i * 7919 + 13) % 251 for i in range(50_000))
    garbage = _part10(tmp_path / "garbage.dcm", sop_class=CR, sop_instance=generate_uid(), body=rng_bytes)
    trunc_native = _truncate_dataset(rg1_paths["RG1_UNCR"], tmp_path / "trunc_uncr.dcm", keep=0.5)
    trunc_j2k = _truncate_dataset(rg1_paths["RG1_J2KR"], tmp_path / "trunc_j2kr.dcm", keep=0.999)
    ct = data_store_dir / "CT1_UNC.dcm"
    ct = ct if ct.exists() else Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    # A CT data set announced as CR: the data set does not match the SOP class
    ct_ds = pydicom.dcmread(ct)
    mismatch = tmp_path / "mismatch.dcm"
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ct_ds)
    _part10(mismatch, sop_class=CR, sop_instance=str(ct_ds.SOPInstanceUID), body=buf.getvalue())
    ct_cx = [build_context(str(ct_ds.SOPClassUID), [str(ct_ds.file_meta.TransferSyntaxUID)])]
    rg1_cx = [build_context(CR, [str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)])
              for p in (rg1_paths["RG1_UNCR"], rg1_paths["RG1_J2KR"])]
    assoc, _ = associate(scp.port, contexts=[build_context(CR, [ExplicitVRLittleEndian])] + ct_cx + rg1_cx[1:])
    assert assoc.is_established
    assert assoc.send_c_store(garbage).Status == Status.CANNOT_UNDERSTAND
    assert assoc.send_c_store(trunc_native).Status == Status.CANNOT_UNDERSTAND
    assert assoc.send_c_store(trunc_j2k).Status == Status.CANNOT_UNDERSTAND
    assert assoc.send_c_store(mismatch).Status == Status.DATASET_DOES_NOT_MATCH
    assert assoc.send_c_store(ct).Status == Status.SUCCESS           # stored; the pipeline says not applicable
    assert assoc.send_c_store(rg1_paths["RG1_J2KR"]).Status == Status.SUCCESS   # still serving
    assoc.release()
    stored = {i.sop_class_uid for i in scp.store.instances()}
    assert stored == {str(ct_ds.SOPClassUID), CR}
    assert len(scp.store.instances()) == 2


def test_disk_below_watermark_answers_out_of_resources(tmp_path: Path, rg1_paths, caplog) -> None:
    settings = ListenerSettings(ae_title="CXR_AI", host="127.0.0.1", port=0, allowed_calling_aes=ALLOWED,
                                min_free_bytes=1 << 62)
    scp = StorageSCP(settings=settings, spool=Spool(tmp_path / "spool"), store=JobStore(tmp_path / "j.sqlite3"),
                     quiet_seconds=0.0)
    scp.start()
    try:
        assoc, _ = associate(scp.port)
        with caplog.at_level("ERROR", logger="cxr_ai.net.scp"):
            assert assoc.send_c_store(pydicom.dcmread(rg1_paths["RG1_J2KI"])).Status == Status.OUT_OF_RESOURCES
        assert "below the" in caplog.text and "lower [listener] min_free_mb" in caplog.text
        assoc.release()
        assert scp.store.instances() == []
    finally:
        scp.stop()


def test_storage_transfer_syntaxes_are_known_to_pynetdicom_and_pydicom() -> None:
    from pydicom.uid import UID
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    from cxr_ai.net.common import STORAGE_TRANSFER_SYNTAXES

    assert set(STORAGE_TRANSFER_SYNTAXES) <= set(ALL_TRANSFER_SYNTAXES)
    assert all(UID(ts).is_transfer_syntax for ts in STORAGE_TRANSFER_SYNTAXES)
    assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5"} <= set(STORAGE_TRANSFER_SYNTAXES)


def test_inspect_received_messages(tmp_path: Path, rg1_paths) -> None:
    p = _truncate_dataset(rg1_paths["RG1_UNCR"], tmp_path / "t.dcm", keep=0.9)
    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    with pytest.raises(DatasetProblem, match="truncated: element \\(7FE0,0010\\) needs") as err:
        inspect_received(p, affected_sop_class=str(ds.SOPClassUID), affected_sop_instance=str(ds.SOPInstanceUID))
    assert err.value.status == Status.CANNOT_UNDERSTAND
    info = inspect_received(rg1_paths["RG1_J2KR"], affected_sop_class=CR,
                            affected_sop_instance=str(pydicom.dcmread(rg1_paths["RG1_J2KR"]).SOPInstanceUID))
    assert info.study_instance_uid == str(ds.StudyInstanceUID)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def throwaway_ca(tmp_path_factory) -> Path:
    """A CA and a server certificate for 127.0.0.1, made with openssl for this test only."""
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=cxr-ai test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


def test_tls_association_and_plain_client_refused(tmp_path: Path, throwaway_ca: Path, rg1_paths) -> None:
    ctx = server_context(cert_file=throwaway_ca / "server.pem", key_file=throwaway_ca / "server.key")
    scp = make_scp(tmp_path, ssl_context=ctx)
    try:
        peer = Peer(host="127.0.0.1", port=scp.port, ae_title="CXR_AI", calling_ae="TESTSCU",
                    ssl_context=client_context(ca_file=throwaway_ca / "ca.pem"), timeout=10)
        assert echo(peer) == 0
        assert send_files([rg1_paths["RG1_J2KI"]], peer) == [0]
        assert len(scp.store.instances()) == 1
        plain = Peer(host="127.0.0.1", port=scp.port, ae_title="CXR_AI", calling_ae="TESTSCU", timeout=5)
        with pytest.raises(SendError, match="could not open an association"):
            echo(plain)
    finally:
        scp.stop()
