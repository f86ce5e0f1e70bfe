"""Worklist FHIR Tasks reference the AI DiagnosticReports the batch made.

A real batch run (tiny untrained bundle, phantoms) writes SRs and FHIR bundles and its
``results.csv`` carries each instance's report identifier; the worklist loaded from that
table exports Tasks whose ``input`` names those DiagnosticReports. The bundles and the Tasks
go to the real FHIR engine, and the report each Task names is found there by its identifier.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from cxr_ai import batch
from cxr_ai.config import default_config
from cxr_ai.fhir import DICOM_UID_SYSTEM
from cxr_ai.phantoms import PhantomConfig, generate_studies
from cxr_ai.worklist import TriagePolicy, Worklist, load_results_table
from test_batch import make_tiny_bundle
from test_fhir import fhir_engine_installed, fhir_server  # noqa: F401 - fixtures

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tasks")
    generate_studies(base / "ph", PhantomConfig(n_studies=5, seed=3, size=256, fraction_lateral=0.3,
                                                fraction_non_chest=0.0))
    cfg = default_config()
    cfg["store"]["root"] = str(base / "var")
    cfg["models"].update(bundle=str(make_tiny_bundle(base / "bundle")), num_threads=1)
    summary = batch.run_batch(batch.scan_inputs([base / "ph"]), config=cfg,
                              options=batch.BatchOptions(out_dir=base / "out", progress=False, explain=False))
    assert summary.processed >= 3 and not summary.failed
    return base / "out"


def test_results_table_carries_the_report_identifiers(batch_run: Path) -> None:
    table = pd.read_csv(batch_run / "results.csv", dtype=str)
    processed = table[table["status"] == "processed"]
    assert processed["report_uid"].str.fullmatch(r"[0-9.]+").all()
    assert table.loc[table["status"] != "processed", "report_uid"].isna().all()  # no report, no identifier
    for row in processed.itertuples(index=False):
        sr = pydicom.dcmread(batch_run / batch.STUDIES_DIR / row.study_uid / f"{row.sop_uid}_sr1.dcm")
        assert sr.SOPInstanceUID == row.report_uid
        bundle = json.loads((batch_run / batch.STUDIES_DIR / row.study_uid / f"{row.sop_uid}_fhir.json").read_text())
        report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
        assert report["identifier"][0] == {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{row.report_uid}"}


@pytest.mark.slow
def test_every_task_references_its_diagnostic_report_on_the_fhir_engine(batch_run: Path, fhir_server, tmp_path) -> None:  # noqa: F811
    wl = Worklist(tmp_path / "wl.sqlite", policy=TriagePolicy())
    assert load_results_table(wl, batch_run / "results.csv", received_at=T0) >= 3
    table = pd.read_csv(batch_run / "results.csv", dtype=str)
    expected = {s: set(g["report_uid"].dropna()) for s, g in table[table["status"] == "processed"].groupby("study_uid")}

    for path in sorted((batch_run / batch.STUDIES_DIR).rglob("*_fhir.json")):
        status, response = fhir_server.request("POST", "/", path.read_text())
        assert status == 200, response
    tasks = json.loads(wl.export_fhir(tmp_path / "tasks.json", now=T0 + 60).read_text())["entry"]
    assert {t["resource"]["focus"]["identifier"]["value"] for t in tasks} == {f"urn:oid:{s}" for s in expected}
    for entry in tasks:
        task = entry["resource"]
        study = task["focus"]["identifier"]["value"][len("urn:oid:"):]
        inputs = task["input"]
        assert {i["valueReference"]["identifier"]["value"] for i in inputs} == {f"urn:oid:{u}" for u in expected[study]}
        status, created = fhir_server.request("POST", "/Task", task)
        assert status == 201, created
        for item in inputs:
            ref = item["valueReference"]
            assert ref["type"] == "DiagnosticReport"
            found = fhir_server.search("/DiagnosticReport?identifier=" + urllib.parse.quote(
                f"{ref['identifier']['system']}|{ref['identifier']['value']}"))
            assert len(found) == 1
            assert found[0]["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"


@pytest.mark.slow
def test_two_patients_under_one_study_uid_get_two_tasks_on_the_fhir_engine(batch_run: Path, fhir_server,  # noqa: F811
                                                                           tmp_path) -> None:
    """A sender reused one Study Instance UID for two patients: the second patient's processed
    rows (another study of the run, its own reports) are relabelled with the first study's UID.
    Each patient's entry exports its own Task (distinct id and identifier, its own reports),
    the Bundle validates, and the engine keeps both Tasks apart."""
    from fhir.resources.R4B.bundle import Bundle

    table = pd.read_csv(batch_run / "results.csv", dtype=str)
    processed = table[table["status"] == "processed"]
    first, second = sorted(processed["study_uid"].unique())[:2]
    reused = processed[processed["study_uid"].isin([first, second])].copy()
    reused["patient_key"] = ["a" * 64 if s == first else "b" * 64 for s in reused["study_uid"]]
    reports = {k: set(g["report_uid"]) for k, g in reused.groupby("patient_key")}
    reused["study_uid"] = first
    wl = Worklist(tmp_path / "wl.sqlite", policy=TriagePolicy())
    assert load_results_table(wl, reused, received_at=T0) == 2
    for path in sorted((batch_run / batch.STUDIES_DIR).rglob("*_fhir.json")):
        status, response = fhir_server.request("POST", "/", path.read_text())
        assert status == 200, response

    bundle = json.loads(wl.export_fhir(tmp_path / "tasks.json", now=T0 + 60).read_text())
    Bundle.model_validate(bundle)
    assert len(bundle["entry"]) == 2 and len({e["fullUrl"] for e in bundle["entry"]}) == 2
    tasks = [e["resource"] for e in bundle["entry"]]
    assert {t["focus"]["identifier"]["value"] for t in tasks} == {f"urn:oid:{first}"}
    assert len({t["identifier"][0]["value"] for t in tasks}) == 2
    assert ({frozenset(i["valueReference"]["identifier"]["value"][len("urn:oid:"):] for i in t["input"])
             for t in tasks} == {frozenset(r) for r in reports.values()})
    for task in tasks:
        status, created = fhir_server.request("POST", "/Task", task)
        assert status == 201, created
    for task in tasks:
        ident = task["identifier"][0]
        found = fhir_server.search("/Task?identifier=" + urllib.parse.quote(f"{ident['system']}|{ident['value']}"))
        assert len(found) == 1 and found[0]["input"] == task["input"]
