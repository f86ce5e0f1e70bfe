"""Security: no PHI or secrets in anything the service or batch writes for operators;
hostile UIDs never become paths outside the spool.

(Unknown calling AE refused and TLS with a throwaway CA are tested in tests/test_net.py.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cxr_ai.phantoms import make_phantom_dataset
from cxr_ai.service import Service
from cxr_ai.store.spool import Spool, safe_key
from test_hardening_inputs import pipeline_config, real_pipeline_factory, record, tiny_bundle_dir  # noqa: F401
from test_service import http_get, send

NAMES = ["Zyxwvut^Hardening", "Qpqpqp^Phi"]
IDS = ["PHI-ID-778899", "PHI-ID-112233"]
TOKEN = "sec-token-abcdef0123456789"
HOSTILE = ["../../x", "../../../etc/passwd", "/abs/path", "1.2.3/../../x", "..", ".", "a\x00b", "C:\\win",
           "1.2." + "3" * 200, "", "~root"]


def test_hostile_uids_never_leave_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    src = tmp_path / "src.bin"
    for i, uid in enumerate(HOSTILE):
        key = safe_key(uid)
        assert "/" not in key and "\\" not in key and key not in ("", ".", "..")
        src.write_bytes(b"x" * 10)
        dest = spool.commit_file(src, study_uid=uid, sop_uid=uid)
        assert dest.resolve().is_relative_to((tmp_path / "spool").resolve())
        assert spool.write_bytes(b"y", study_uid=uid, sop_uid=f"{uid}{i}").resolve().is_relative_to(
            (tmp_path / "spool").resolve())
    outside = [p for p in tmp_path.rglob("*") if not p.resolve().is_relative_to((tmp_path / "spool").resolve())
               and p != src]
    assert outside == []
    record("security_paths", {"hostile_uids": len(HOSTILE), "files_outside_spool": 0})


@pytest.mark.slow
def test_full_run_logs_and_endpoints_carry_no_phi_or_secrets(tmp_path: Path, tiny_bundle_dir: Path,
                                                             caplog) -> None:
    from cxr_ai import batch

    caplog.set_level(logging.INFO)
    files = []
    for i, (name, pid) in enumerate(zip(NAMES, IDS)):
        ds = make_phantom_dataset(size=256, random_state=i)
        ds.PatientName, ds.PatientID = name, pid
        files.append(tmp_path / "in" / f"{i}.dcm")
        files[-1].parent.mkdir(exist_ok=True)
        ds.save_as(files[-1], enforce_file_format=True)
    cfg = pipeline_config(tmp_path, tiny_bundle_dir, [
        {"name": "files", "kind": "folder", "path": "out"},
        # a FHIR server that is down: its errors are logged; the token must not be
        {"name": "ehr", "kind": "fhir", "url": "http://127.0.0.1:9/fhir", "timeout": 1.0,
         "token_env": "CXR_AI_HARDENING_SEC_TOKEN"}], routing={"max_attempts": 2})
    svc = Service(cfg, secrets={"CXR_AI_HARDENING_SEC_TOKEN": TOKEN}, pipeline_factory=real_pipeline_factory,
                  base_dir=tmp_path).start()
    try:
        assert send(svc.dicom_port, files) == [0, 0]
        assert svc.wait_idle(timeout=120, expected_instances=2)
        endpoints = b"".join(http_get(svc.http_port, p)[1] for p in ("/healthz", "/metrics", "/status"))
    finally:
        svc.stop(grace=2)
    summary = batch.run_batch(batch.scan_inputs([tmp_path / "in"]),
                              options=batch.BatchOptions(out_dir=tmp_path / "batch", progress=False, explain=False),
                              config=cfg)
    assert summary.processed == 2
    texts = {"logs": "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records),
             "endpoints": endpoints.decode("utf-8", "replace"),
             "results_csv": (tmp_path / "batch" / "results.csv").read_text()}
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.suffix in (".log", ".jsonl", ".csv") and "in" not in p.parts:
            texts[str(p.relative_to(tmp_path))] = p.read_text(errors="replace")
    assert any("job J" in texts["logs"] for _ in [0])
    assert "dead-lettered" in texts["logs"] or "will retry" in texts["logs"]   # FHIR errors were logged
    leaks = [(where, s) for where, text in texts.items() for s in NAMES + IDS + [TOKEN, "Zyxwvut"] if s in text]
    assert leaks == []
    record("security_phi", {"scanned": sorted(texts), "patient_names": len(NAMES), "patient_ids": len(IDS),
                            "token_checked": True, "leaks": 0})
