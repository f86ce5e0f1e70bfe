"""Hardening: the whole bad-input corpus over C-STORE (real listener, real pipeline) and batch.

Every case of :mod:`badinput` is sent by a real pynetdicom SCU to a running
:class:`cxr_ai.service.Service` whose workers run the real :class:`cxr_ai.pipeline.Pipeline`
on a tiny (64 px) real bundle, and the whole corpus is fed to :func:`cxr_ai.batch.run_batch`.
Each case must end with a clear outcome: a named DICOM refusal status, or a job-store /
results-table record whose state and reason are the corpus's expectation. Nothing crashes,
and the listener still answers C-ECHO and stores and processes a good RG1 afterwards.

The per-case outcomes are written for the hardening report when ``CXR_AI_HARDENING_OUT``
names a folder (``benchmarks/hardening_report.py`` sets it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest
from badinput import Case, build_corpus
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context
from test_batch import make_tiny_bundle
from test_service import base_config, send

from cxr_ai.net.common import Status
from cxr_ai.net.scu import SCU_HANDLERS, Peer, echo

#: Statuses that refuse an instance with a stated reason (PS3.4 B.2.3).
REFUSALS = {Status.CANNOT_UNDERSTAND: "cannot_understand", Status.DATASET_DOES_NOT_MATCH: "dataset_does_not_match",
            Status.OUT_OF_RESOURCES: "out_of_resources"}


def record(section: str, payload: Any) -> None:
    """Write ``payload`` as ``<section>.json`` under ``$CXR_AI_HARDENING_OUT`` (if set)."""
    out = os.environ.get("CXR_AI_HARDENING_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{section}.json").write_text(json.dumps(payload, indent=1, default=str))


@pytest.fixture(scope="module")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("hbundle") / "hardening-test")


def pipeline_config(tmp: Path, bundle: Path, destinations: list[dict], **sections: dict) -> dict:
    """The test service configuration with the real pipeline on the tiny bundle, one worker."""
    cfg = base_config(tmp, destinations, **sections)
    cfg["models"].update(bundle=str(bundle), num_threads=1, batch_size=4)
    cfg["workers"].update(pipeline="cxr_ai.pipeline:Pipeline", count=1)
    return cfg


def real_pipeline_factory(*, config: dict):
    from cxr_ai.pipeline import Pipeline

    return Pipeline(config=config, explain=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_store_dir: Path) -> list[Case]:
    return build_corpus(tmp_path_factory.mktemp("hbad"), data_store_dir)


def uid_of(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
        return str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - unreadable: no UID
        return ""


def send_case(port: int, path: Path, *, calling: str = "TESTSCU", called: str = "CXR_AI") -> dict[str, Any]:
    """C-STORE one file as a peer would: its bytes as they are when it has a file meta
    (chunked send), else the parsed data set. Returns what happened."""
    sop_class = sop_inst = ts = None
    payload: Any = path
    try:
        meta = read_file_meta_info(path)
        sop_class, sop_inst = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
        ts = str(meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - no usable file meta: fall back to the data set
        try:
            ds = pydicom.dcmread(path, force=True)
            sop_class, sop_inst = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            ts = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ts
            payload = ds
        except Exception as exc:  # noqa: BLE001 - an SCU cannot build a C-STORE request
            return {"sent": False, "why": f"SCU cannot build a request: {type(exc).__name__}"}
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(sop_class, [ts])]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=SCU_HANDLERS)
    if not assoc.is_established:
        return {"sent": False, "why": "association refused", "sop_uid": sop_inst}
    try:
        if not assoc.accepted_contexts:
            return {"sent": False, "why": "no presentation context accepted", "sop_uid": sop_inst}
        try:
            rsp = assoc.send_c_store(payload)
        except Exception as exc:  # noqa: BLE001 - pynetdicom refuses to send it: recorded
            return {"sent": False, "why": f"SCU refused to send: {type(exc).__name__}: {str(exc)[:120]}",
                    "sop_uid": sop_inst}
        status = int(rsp.Status) if rsp and "Status" in rsp else None
        return {"sent": True, "status": status, "sop_uid": sop_inst}
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corpus_over_cstore_every_case_has_an_outcome_and_the_listener_keeps_serving(
        corpus: list[Case], tiny_bundle_dir: Path, tmp_path: Path, rg1_paths, monkeypatch) -> None:
    from cxr_ai.service import Service

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send file bytes as they are
    cfg = pipeline_config(tmp_path, tiny_bundle_dir, [{"name": "files", "kind": "folder", "path": "out"}])
    svc = Service(cfg, pipeline_factory=real_pipeline_factory, base_dir=tmp_path).start()
    rows: list[dict[str, Any]] = []
    try:
        sent = {c.name: send_case(svc.dicom_port, c.path) for c in corpus if c.sendable}
        assert svc.wait_idle(timeout=300), "the service did not settle"
        by_uid = {i.sop_uid: i for i in svc.store.instances()}
        problems = []
        for c in corpus:
            if not c.sendable:
                rows.append({"case": c.name, "expected": f"{c.status}/{c.reason}", "cstore": "not sendable",
                             "outcome": "n/a (not a data set a peer can send)", "ok": True})
                continue
            s = sent[c.name]
            if not s["sent"]:
                outcome, ok = s["why"], c.status == "failed"
            elif s["status"] in REFUSALS:
                outcome, ok = f"refused 0x{s['status']:04X} {REFUSALS[s['status']]}", c.status == "failed"
            elif s["status"] == Status.SUCCESS:
                inst = by_uid.get(s["sop_uid"])
                if inst is None:
                    outcome, ok = "stored but NOT recorded", False
                else:
                    outcome = f"{inst.state.value}/{inst.reason}"
                    ok = (inst.state.value, inst.reason) == (c.status, c.reason) or (
                        # a duplicate SOP Instance UID replaces the earlier instance: same outcome
                        c.name == "duplicate_sop_uid_other_content" and inst.state.value == "processed")
            else:
                outcome, ok = f"unexpected status {s['status']}", False
            rows.append({"case": c.name, "expected": f"{c.status}/{c.reason}",
                         "cstore": "" if not s["sent"] else f"0x{s['status']:04X}", "outcome": outcome, "ok": ok})
            if not ok:
                problems.append(rows[-1])
            # an instance the corpus says is readable must be accepted by the listener
            if c.status in ("processed", "not_applicable"):
                assert s.get("status") == Status.SUCCESS, (c.name, s)
        # nothing in the job store is left unfinished, and every failure carries a reason
        for inst in svc.store.instances():
            assert inst.state.value in ("processed", "not_applicable", "failed"), inst
            if inst.state.value != "processed":
                assert inst.reason, inst
        # still serving: C-ECHO and a good RG1 (a new instance) stored and processed
        peer = Peer(host="127.0.0.1", port=svc.dicom_port, ae_title="CXR_AI", calling_ae="TESTSCU")
        assert echo(peer) == 0
        good = pydicom.dcmread(rg1_paths["RG1_J2KI"])
        good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        good.save_as(tmp_path / "good.dcm")
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
        assert send(svc.dicom_port, [tmp_path / "good.dcm"]) == [0]
        assert svc.wait_idle(timeout=120)
        assert {i.sop_uid: i for i in svc.store.instances()}[str(good.SOPInstanceUID)].state.value == "processed"
        code = svc.health()["status"]
        assert code == "ok", svc.health()
    finally:
        svc.stop(grace=2)
    record("cstore_corpus", {"cases": len(corpus), "sendable": sum(c.sendable for c in corpus), "rows": rows})
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corpus_through_batch_every_case_has_a_row_or_is_reported(corpus: list[Case], tiny_bundle_dir: Path,
                                                                  tmp_path: Path) -> None:
    from cxr_ai import batch
    from cxr_ai.config import default_config

    cfg = default_config()
    cfg["store"]["root"] = str(tmp_path / "var")
    cfg["models"].update(bundle=str(tiny_bundle_dir), num_threads=1, batch_size=4)
    folder = corpus[0].path.parent
    wl = batch.scan_inputs([folder])
    summary = batch.run_batch(wl, options=batch.BatchOptions(out_dir=tmp_path / "out", progress=False, explain=False,
                                                             threads=2), config=cfg)
    table = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str, keep_default_na=False)
    by_source = {Path(r["source"]).name: r for r in table.to_dict("records")}
    ignored = {Path(p).name for p in wl.ignored}
    listed = {Path(i.path).name for i in wl.items}
    processed_uids = set(table["sop_uid"])
    rows, problems, dedup = [], [], []
    for c in corpus:
        name = c.path.name
        if name in by_source:
            r = by_source[name]
            outcome = f"{r['status']}/{r['reason']}"
            ok = (r["status"], r["reason"]) == (c.status, c.reason)
            assert r["message"], (c.name, r)
        elif name in ignored:
            outcome = "ignored: not DICOM (counted in the summary)"
            ok = c.status == "failed" and c.reason in ("not_dicom", "truncated")
        elif name not in listed and uid_of(c.path) in processed_uids:
            # scan_inputs keeps one file per SOP Instance UID; the other copy has no row
            outcome = "deduplicated: another file with the same SOP Instance UID has the row"
            ok = True
            dedup.append(c.name)
        else:
            outcome, ok = "NO ROW", False
        rows.append({"case": c.name, "expected": f"{c.status}/{c.reason}", "outcome": outcome, "ok": ok})
        if not ok:
            problems.append(rows[-1])
    assert summary.ignored_files == len(ignored)
    assert summary.done == len(table) == len(wl.items)
    # a raw (preamble-less) data set is DICOM: it must get a row, not be ignored
    assert "preambleless_implicit.dcm" in by_source
    record("batch_corpus", {"cases": len(corpus), "rows": rows, "deduplicated": dedup, "summary": summary.text()})
    assert not problems, "\n".join(map(str, problems))
