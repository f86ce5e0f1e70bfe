"""Batch over a CSV of study UIDs pulled from a real Orthanc by C-GET and C-MOVE (and DICOMweb)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers_orthanc import free_port, start_orthanc
from pynetdicom import _config
from test_batch import config, pipeline, tiny_bundle  # noqa: F401 - shared fixtures

from cxr_ai import batch
from cxr_ai.net.scu import Peer, send_files
from cxr_ai.phantoms import PhantomConfig, generate_studies

pytestmark = [pytest.mark.slow]

SCU_AET = "CXR_AI_TEST"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc")
    move_port = free_port()
    server = start_orthanc(root / "srv", cxr_ai_port=None, query_retrieve=(SCU_AET, move_port))
    labels = generate_studies(root / "ph", PhantomConfig(n_studies=5, seed=21, size=256, fraction_lateral=0.5,
                                                         fraction_non_chest=0.0))
    peer = Peer(host="127.0.0.1", port=server.dicom_port, ae_title=server.aet, calling_ae=SCU_AET)
    send_files([root / "ph" / f for f in labels["file"]], peer)
    try:
        yield server, peer, labels, move_port
    finally:
        server.stop()


def _csv(path: Path, uids) -> Path:
    pd.DataFrame({"StudyInstanceUID": list(uids)}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("method,chunked", [("get", False), ("move", False), ("get", True), ("move", True)])
def test_batch_over_study_csv_from_orthanc(pacs, config, pipeline, tmp_path: Path, method: str,  # noqa: F811
                                           chunked: bool, monkeypatch) -> None:
    # chunked: as in a process where the listener runs (it turns pynetdicom's chunked
    # receive on for the process), retrieved instances arrive as files, not in memory
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", chunked)
    _server, peer, labels, move_port = pacs
    wanted = sorted(labels["study_uid"].unique())[:3]
    csv_path = _csv(tmp_path / "studies.csv", wanted)
    out = tmp_path / "out"
    wl = batch.retrieve_studies(out_dir=out, pacs=peer, studies=batch.read_study_csv(csv_path),
                                method=method, move_port=move_port)
    expected = labels[labels["study_uid"].isin(wanted)]
    assert sorted(i.sop_uid for i in wl.items) == sorted(expected["sop_uid"])
    summary = batch.run_batch(wl, options=batch.BatchOptions(out_dir=out, progress=False), config=config,
                              pipeline=pipeline)
    assert summary.done == len(expected) and not summary.failed
    table = pd.read_csv(out / "results.csv")
    assert sorted(table["study_uid"].unique()) == wanted
    assert summary.processed == int(expected["frontal_chest"].astype(bool).sum())

    # a second run finds everything done and retrieves nothing
    state = batch.BatchState(out / batch.STATE_DB_NAME)
    done = state.finished("batch-test", "0.0.1")
    state.close()
    before = {p: p.stat().st_mtime_ns for p in (out / batch.RETRIEVED_DIR).rglob("*.dcm")}
    wl2 = batch.retrieve_studies(out_dir=out, pacs=peer, studies=batch.read_study_csv(csv_path),
                                 method=method, move_port=move_port, skip_sops=done)
    assert {p: p.stat().st_mtime_ns for p in (out / batch.RETRIEVED_DIR).rglob("*.dcm")} == before
    again = batch.run_batch(wl2, options=batch.BatchOptions(out_dir=out, progress=False), config=config,
                            pipeline=pipeline)
    assert again.skipped == len(expected) and again.done == 0


def test_find_by_accession_and_date(pacs) -> None:
    from cxr_ai.net.query import DimseSource

    _server, peer, labels, _ = pacs
    src = DimseSource(peer)
    row = labels.iloc[0]
    assert src.find_study_uids(accession=str(row["accession"])) == [row["study_uid"]]
    assert src.find_study_uids(date_from="19000101", date_to="21001231") == sorted(labels["study_uid"].unique())
    assert set(src.list_instances(row["study_uid"])) == set(labels.loc[labels["study_uid"] == row["study_uid"], "sop_uid"])


def test_dicomweb_retrieve(pacs, tmp_path: Path) -> None:
    import dicomweb_client  # noqa: F401 - a dependency of cxr-ai
    server, _peer, labels, _ = pacs
    uid = max(labels["study_uid"].unique())
    wl = batch.retrieve_studies(out_dir=tmp_path, dicomweb=server.dicomweb_url, studies=[{"StudyInstanceUID": uid}])
    assert sorted(i.sop_uid for i in wl.items) == sorted(labels.loc[labels["study_uid"] == uid, "sop_uid"])
