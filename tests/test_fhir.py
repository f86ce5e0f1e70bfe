"""FHIR output: validated with fhir.resources and by a real FHIR R4 engine.

The engine is Medplum's FHIR router and in-memory repository served by
``tests/fhir_server/server.mjs`` on 127.0.0.1 (``npm ci`` in that folder installs it). It
validates every resource against the R4 StructureDefinitions and required value sets, and the
tests show it *rejects* invalid resources: a server that accepts anything proves nothing.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import importlib
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydicom.dataset import Dataset

from cxr_ai.config import load_config
from cxr_ai.dicom import codes
from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.dicom.common import report_uid, tracking_uid
from cxr_ai.errors import ConfigError
from cxr_ai.fhir import (
    DICOM_UID_SYSTEM,
    MSG_BAD_SYSTEM_MAP,
    MSG_BAD_TIMEZONE,
    MSG_NO_FINDINGS,
    FhirOptions,
    build_bundle,
    effective_datetime,
    ndjson_resources,
    patient_system,
    save_ndjson,
    to_ndjson,
)
from cxr_ai.phantoms import make_phantom_dataset
from cxr_ai.results import FindingResult, ModelInfo

SERVER_DIR = Path(__file__).parent / "fhir_server"
R4_DEFINITIONS = SERVER_DIR / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
DEMO = ModelInfo(name="cxr-ai-demo", version="0.1.0", device_uid="2.25.271828182845904523536028747135266249",
                 intended_use="Research demonstration on phantoms")
FINDINGS = [
    FindingResult("cardiomegaly", "Cardiomegaly", 0.8312, 0.5),
    FindingResult("low_ef", "Low EF", 0.2107, 0.35),
]
ISSUED = dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def rg1(rg1_paths: dict[str, Path]) -> Dataset:
    return pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)


@pytest.fixture(scope="module")
def bundle(rg1: Dataset) -> Bundle:
    return build_bundle(rg1, DEMO, FINDINGS, issued=ISSUED)


def _resources(bundle: Bundle, kind: str) -> list[Any]:
    return [e.resource for e in bundle.entry if e.resource.get_resource_type() == kind]


# --- construction and fhir.resources validation -----------------------------------------------


def test_bundle_round_trips_through_fhir_resources(bundle):
    again = Bundle.model_validate_json(bundle.model_dump_json())
    assert again.model_dump() == bundle.model_dump()
    assert bundle.type == "transaction"
    assert [e.resource.get_resource_type() for e in bundle.entry] == [
        "Device", "Observation", "Observation", "DiagnosticReport"]
    for entry in bundle.entry:
        assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", entry.fullUrl)
        kind = entry.resource.get_resource_type()
        identifier = entry.resource.identifier[0]
        search = f"identifier={identifier.system}|{identifier.value}"
        if kind == "Device":  # shared by every result of the bundle version: create once
            assert entry.request.method == "POST" and entry.request.url == kind
            assert entry.request.ifNoneExist == search
        else:  # a resend replaces: conditional update on the identifier
            assert entry.request.method == "PUT" and entry.request.url == f"{kind}?{search}"
            assert entry.request.ifNoneExist is None
    for kind, cls in (("Observation", Observation), ("DiagnosticReport", DiagnosticReport), ("Device", Device)):
        for resource in _resources(bundle, kind):
            assert cls.model_validate(json.loads(resource.model_dump_json())) == resource


def test_observations_say_what_the_model_found(bundle, rg1):
    device_url = bundle.entry[0].fullUrl
    cardio, low_ef = _resources(bundle, "Observation")
    for obs, finding in ((cardio, FINDINGS[0]), (low_ef, FINDINGS[1])):
        code = codes.finding_code(finding.key)
        assert obs.status == "preliminary"
        assert (obs.code.coding[0].system, obs.code.coding[0].code) == ("http://snomed.info/sct", code.value)
        assert obs.category[0].coding[0].code == "imaging"
        value = codes.PRESENT if finding.positive else codes.ABSENT
        assert obs.valueCodeableConcept.coding[0].code == value.value
        assert obs.interpretation[0].coding[0].code == ("POS" if finding.positive else "NEG")
        probability, threshold = obs.component
        assert probability.code.coding[0].code == codes.PROBABILITY.value
        assert float(probability.valueQuantity.value) == pytest.approx(finding.probability)
        assert (probability.valueQuantity.system, probability.valueQuantity.code) == ("http://unitsofmeasure.org", "1")
        assert float(threshold.valueQuantity.value) == pytest.approx(finding.threshold)
        assert obs.method.coding[0].code == codes.ARTIFICIAL_INTELLIGENCE.value
        assert obs.device.reference == device_url
        assert obs.derivedFrom[0].type == "ImagingStudy"
        assert obs.derivedFrom[0].identifier.system == DICOM_UID_SYSTEM
        assert obs.derivedFrom[0].identifier.value == f"urn:oid:{rg1.StudyInstanceUID}"
        assert obs.subject.identifier.value == rg1.PatientID == "9RG1"
        assert obs.subject.identifier.type.coding[0].code == "MR"
        # RG1: StudyDate 20040826, StudyTime 185059, TimezoneOffsetFromUTC -0400.
        assert obs.effectiveDateTime.isoformat() == "2004-08-26T18:50:59-04:00"
        assert obs.identifier[0].value == f"urn:oid:{tracking_uid(rg1, DEMO.device_uid, finding.key)}"
        assert "NOT FOR CLINICAL USE" in obs.note[0].text


def test_report_and_device(bundle, rg1):
    report = _resources(bundle, "DiagnosticReport")[0]
    assert report.status == "preliminary"
    assert (report.code.coding[0].system, report.code.coding[0].code) == ("http://loinc.org", "36554-4")
    assert report.category[0].coding[0].code == "RAD"
    assert [r.reference for r in report.result] == [e.fullUrl for e in bundle.entry[1:3]]
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{rg1.StudyInstanceUID}"
    assert report.identifier[0].value == f"urn:oid:{report_uid(rg1, DEMO.device_uid)}"
    assert [c.coding[0].code for c in report.conclusionCode] == [codes.CARDIOMEGALY.value]
    assert "NOT FOR CLINICAL USE" in report.conclusion and "Cardiomegaly: present" in report.conclusion
    device = _resources(bundle, "Device")[0]
    assert device.identifier[0].value == f"urn:oid:{DEMO.device_uid}"
    assert [n.name for n in device.deviceName] == [DEMO.name, DEMO.label]
    assert device.version[0].value == DEMO.version and device.manufacturer == DEMO.manufacturer
    assert any("NOT FOR CLINICAL USE" in n.text for n in device.note)


def test_bundle_is_deterministic_for_the_same_result(rg1):
    first = build_bundle(rg1, DEMO, FINDINGS, issued=ISSUED)
    again = build_bundle(rg1, DEMO, FINDINGS, issued=ISSUED)
    assert first.model_dump_json() == again.model_dump_json()


def test_no_findings_no_bundle(rg1):
    with pytest.raises(ValueError) as info:
        build_bundle(rg1, DEMO, [])
    assert str(info.value) == MSG_NO_FINDINGS.format(sop=rg1.SOPInstanceUID)


# --- patient identifier systems and effective time --------------------------------------------


def _with(rg1: Dataset, **attributes: Any) -> Dataset:
    ds = copy.deepcopy(rg1)  # metadata only; never change the shared fixture
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _qualifiers(entity: str, kind: str) -> list[Dataset]:
    item = Dataset()
    item.UniversalEntityID = entity
    item.UniversalEntityIDType = kind
    return [item]


@pytest.mark.parametrize(
    "attributes, options, expected",
    [
        ({"IssuerOfPatientID": "HOSP_A"}, FhirOptions(patient_identifier_systems={"HOSP_A": "urn:oid:1.2.3.4"}),
         ("urn:oid:1.2.3.4", None)),
        ({"IssuerOfPatientID": "HOSP_A", "IssuerOfPatientIDQualifiersSequence": _qualifiers("1.2.840.99", "ISO")},
         FhirOptions(), ("urn:oid:1.2.840.99", None)),
        ({"IssuerOfPatientIDQualifiersSequence": _qualifiers("https://hospital.example/mrn", "URI")},
         FhirOptions(), ("https://hospital.example/mrn", None)),
        ({"IssuerOfPatientID": "2.16.840.1.113883.19.5"}, FhirOptions(), ("urn:oid:2.16.840.1.113883.19.5", None)),
        ({"IssuerOfPatientID": "https://hospital.example/mrn"}, FhirOptions(), ("https://hospital.example/mrn", None)),
        ({"IssuerOfPatientID": "HOSP_B"}, FhirOptions(default_patient_identifier_system="urn:oid:9.9"),
         ("urn:oid:9.9", "HOSP_B")),
        ({"IssuerOfPatientID": "HOSP_B"}, FhirOptions(), (None, "HOSP_B")),
        ({}, FhirOptions(), (None, None)),
    ],
)
def test_patient_identifier_system_rules(rg1, attributes, options, expected):
    assert patient_system(read_radiograph(_with(rg1, **attributes)), options) == expected


def test_unmapped_issuer_is_kept_as_assigner_and_still_valid_r4(rg1):
    bundle = build_bundle(_with(rg1, IssuerOfPatientID="HOSP_B"), DEMO, FINDINGS[:1])
    subject = _resources(bundle, "Observation")[0].subject
    assert subject.identifier.system is None and subject.identifier.assigner.display == "HOSP_B"


def test_image_without_patient_id_has_no_subject(rg1):
    bundle = build_bundle(_with(rg1, PatientID=""), DEMO, FINDINGS[:1])
    assert _resources(bundle, "Observation")[0].subject is None


def test_effective_time_zone_from_dicom_then_config_then_host(rg1, monkeypatch):
    import time

    from cxr_ai.fhir import effective_datetime_source

    no_tz = _with(rg1)
    del no_tz.TimezoneOffsetFromUTC
    rg = read_radiograph(no_tz)
    for zone, expected in (("Asia/Kolkata", "2004-08-26T18:50:59+05:30"), ("Europe/Berlin", "2004-08-26T18:50:59+02:00")):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        try:  # a time without zone is not FHIR: the host's zone (with its summer time on that date)
            assert effective_datetime(rg, FhirOptions()) == expected
            assert effective_datetime_source(rg, FhirOptions()) == "host"
        finally:
            monkeypatch.delenv("TZ")
            time.tzset()
    assert effective_datetime(rg, FhirOptions(default_timezone="America/New_York")) == "2004-08-26T18:50:59-04:00"
    assert effective_datetime_source(rg, FhirOptions(default_timezone="America/New_York")) == "config"
    assert effective_datetime_source(read_radiograph(rg1), FhirOptions(default_timezone="America/New_York")) == "dicom"
    assert effective_datetime(read_radiograph(_with(rg1, StudyTime="0930")), FhirOptions()) == "2004-08-26T09:30:00-04:00"
    assert effective_datetime(read_radiograph(_with(rg1, StudyDate="")), FhirOptions()) is None


def test_options_from_config_and_their_errors():
    config = load_config(env={})
    assert FhirOptions.from_config(config) == FhirOptions()
    config["fhir"]["patient_identifier_systems"] = [{"issuer": "HOSP_A", "system": "urn:oid:1.2.3"}]
    config["fhir"]["default_timezone"] = "Europe/Berlin"
    options = FhirOptions.from_config(config)
    assert options.patient_identifier_systems == {"HOSP_A": "urn:oid:1.2.3"}
    config["fhir"]["patient_identifier_systems"] = [{"issuer": "HOSP_A"}]
    with pytest.raises(ConfigError) as info:
        FhirOptions.from_config(config)
    assert str(info.value) == MSG_BAD_SYSTEM_MAP.format(value={"issuer": "HOSP_A"})
    with pytest.raises(ConfigError) as info:
        FhirOptions(default_timezone="Mars/Olympus")
    assert str(info.value) == MSG_BAD_TIMEZONE.format(value="Mars/Olympus")
    with pytest.raises(ConfigError, match='resend .maybe. is not known'):
        FhirOptions(resend="maybe")


def test_fhir_delivery_refuses_to_start_without_a_patient_identifier_system(tmp_path):
    from cxr_ai.fhir import MSG_NO_PATIENT_SYSTEM
    from cxr_ai.service import validate_config as service_settings

    config = load_config(env={})
    config["routing"]["destinations"] = [{"name": "ehr", "kind": "fhir", "url": "http://127.0.0.1:9/fhir"}]
    with pytest.raises(ConfigError) as info:
        service_settings(config, base_dir=tmp_path)
    assert str(info.value) == MSG_NO_PATIENT_SYSTEM.format(destination="ehr")
    assert "[fhir] default_patient_identifier_system" in str(info.value)
    config["fhir"]["default_patient_identifier_system"] = "urn:oid:2.16.840.1.113883.19.5"
    assert [d.name for d in service_settings(config, base_dir=tmp_path).destinations] == ["ehr"]
    # without FHIR delivery nothing is required
    config["fhir"]["default_patient_identifier_system"] = ""
    config["routing"]["destinations"] = [{"name": "out", "kind": "folder", "path": str(tmp_path)}]
    service_settings(config, base_dir=tmp_path)


# --- NDJSON -----------------------------------------------------------------------------------


def test_ndjson_has_ids_and_relative_references(bundle, tmp_path):
    text = to_ndjson(bundle)
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 4
    assert "urn:uuid:" not in text
    parsed = [json.loads(line) for line in lines]
    ids = {f"{r['resourceType']}/{r['id']}" for r in parsed}
    device, cardio, _, report = parsed
    assert cardio["device"]["reference"] == f"Device/{device['id']}"
    assert {r["reference"] for r in report["result"]} <= ids
    for item, cls in zip(parsed, (Device, Observation, Observation, DiagnosticReport)):
        cls.model_validate(item)
    path = save_ndjson(bundle, tmp_path / "results.ndjson")
    assert path.read_text(encoding="utf-8") == text


# --- FHIR R4B models against the R4 definitions -----------------------------------------------


@functools.cache
def _r4_resource_definitions() -> dict[str, dict[str, Any]]:
    """The R4 (4.0.1) StructureDefinitions of resources shipped with the test engine, by id."""
    bundle = json.loads((R4_DEFINITIONS / "profiles-resources.json").read_text(encoding="utf-8"))
    return {e["resource"]["id"]: e["resource"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == "StructureDefinition"}


def _r4_children(resource_type: str) -> dict[str, set[str]]:
    """R4 StructureDefinition: element path -> child element names (choice types expanded)."""
    sd = _r4_resource_definitions()[resource_type]
    assert sd["fhirVersion"] == "4.0.1"
    out: dict[str, set[str]] = {}
    for element in sd["snapshot"]["element"]:
        if "." not in element["path"]:
            continue
        parent, name = element["path"].rsplit(".", 1)
        if name.endswith("[x]"):
            names = {name[:-3] + t["code"][0].upper() + t["code"][1:] for t in element["type"]}
        else:
            names = {name}
        out.setdefault(parent, set()).update(names)
    return out


@pytest.mark.parametrize("resource_type, module", [
    ("Observation", "observation"), ("DiagnosticReport", "diagnosticreport"),
    ("Device", "device"), ("Bundle", "bundle"),
])
def test_r4b_models_have_exactly_the_r4_elements(resource_type, module, fhir_engine_installed):
    mod = importlib.import_module(f"fhir.resources.R4B.{module}")
    children = _r4_children(resource_type)
    assert children
    for parent, names in children.items():
        cls = getattr(mod, "".join(s[0].upper() + s[1:] for s in parent.split(".")))
        assert set(cls.elements_sequence()) == names, parent


# --- the real FHIR engine ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def fhir_engine_installed() -> Path:
    if shutil.which("node") is None:
        pytest.fail("node is not installed; the FHIR tests need Node.js >= 20.19 (Debian nodejs)")
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        pytest.fail(f"the test FHIR engine is not installed: run `npm ci` in {SERVER_DIR} (make setup)")
    return SERVER_DIR


class FhirServer:
    """Client of the test engine."""

    def __init__(self, base: str) -> None:
        self.base = base

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/fhir+json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def search(self, path: str) -> list[dict[str, Any]]:
        status, bundle = self.request("GET", path)
        assert status == 200, bundle
        return [e["resource"] for e in bundle.get("entry", [])]


@pytest.fixture(scope="module")
def fhir_server(fhir_engine_installed: Path) -> Iterator[FhirServer]:
    """The Medplum engine on 127.0.0.1 (a free port chosen by the OS), stopped by PID."""
    proc = subprocess.Popen(
        ["node", "--experimental-websocket", "server.mjs", "0"],
        cwd=fhir_engine_installed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=90)
            except queue.Empty:
                pytest.fail(f"FHIR server did not start within 90 s; output: {''.join(seen)}")
            seen.append(line)
            match = re.search(r"ready on (http://127\.0\.0\.1:\d+)/", line)
            if match:
                break
            if proc.poll() is not None:
                pytest.fail(f"FHIR server exited with {proc.returncode}: {''.join(seen)}")
        yield FhirServer(match.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_engine_accepts_the_transaction_and_links_everything(fhir_server, rg1):
    source = _with(rg1, SOPInstanceUID="1.2.826.0.1.3680043.10.543.1", IssuerOfPatientID="2.16.840.1.113883.19.5")
    bundle = build_bundle(source, DEMO, FINDINGS, issued=ISSUED)
    status, response = fhir_server.request("POST", "/", bundle.model_dump_json())
    assert status == 200, response
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201", "201", "201", "201"]
    device_id = response["entry"][0]["response"]["location"].split("/")[1]

    tracking = tracking_uid(source, DEMO.device_uid, "cardiomegaly")
    found = fhir_server.search(f"/Observation?identifier={urllib.parse.quote(f'{DICOM_UID_SYSTEM}|urn:oid:{tracking}')}")
    assert len(found) == 1
    obs = found[0]
    assert obs["status"] == "preliminary"
    assert obs["code"]["coding"][0]["code"] == codes.CARDIOMEGALY.value
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == codes.PRESENT.value
    assert obs["component"][0]["valueQuantity"]["value"] == pytest.approx(0.8312)
    assert obs["device"]["reference"] == f"Device/{device_id}"  # urn:uuid resolved by the server
    assert obs["subject"]["identifier"]["system"] == "urn:oid:2.16.840.1.113883.19.5"

    reports = fhir_server.search(
        f"/DiagnosticReport?identifier={urllib.parse.quote(f'{DICOM_UID_SYSTEM}|urn:oid:{report_uid(source, DEMO.device_uid)}')}")
    assert len(reports) == 1
    for reference in reports[0]["result"]:
        kind, rid = reference["reference"].split("/")
        status, resource = fhir_server.request("GET", f"/{kind}/{rid}")
        assert status == 200 and resource["resourceType"] == "Observation"

    # Sent again (a retry): the Device is found, the results are updated in place; nothing is
    # duplicated.
    status, response = fhir_server.request("POST", "/", bundle.model_dump_json())
    assert status == 200 and [e["response"]["status"] for e in response["entry"]] == ["200"] * 4, response
    assert len(fhir_server.search(f"/Observation?identifier={urllib.parse.quote(f'{DICOM_UID_SYSTEM}|urn:oid:{tracking}')}")) == 1
    assert len(fhir_server.search(f"/Device?identifier={urllib.parse.quote(f'{DICOM_UID_SYSTEM}|urn:oid:{DEMO.device_uid}')}")) == 1


def _one(fhir_server: FhirServer, kind: str, uid: str) -> dict[str, Any]:
    found = fhir_server.search(f"/{kind}?identifier={urllib.parse.quote(f'{DICOM_UID_SYSTEM}|urn:oid:{uid}')}")
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_engine_resend_replaces_the_result_and_keep_keeps_it(fhir_server, rg1):
    """A re-run with a newer ``issued`` and another probability replaces the Observations and
    the DiagnosticReport in place (same ids, new versions); another image's result is
    untouched; with ``resend = "keep"`` the first result stays."""
    source = _with(rg1, SOPInstanceUID="1.2.826.0.1.3680043.10.543.77")
    other = _with(rg1, SOPInstanceUID="1.2.826.0.1.3680043.10.543.78", PatientID="OTHER-PATIENT")
    options = FhirOptions(default_patient_identifier_system="urn:oid:2.16.840.1.113883.19.5")
    first = build_bundle(source, DEMO, FINDINGS, issued=ISSUED, options=options)
    status, response = fhir_server.request("POST", "/", first.model_dump_json())
    assert status == 200 and [e["response"]["status"] for e in response["entry"]][1:] == ["201"] * 3, response
    status, _ = fhir_server.request("POST", "/", build_bundle(other, DEMO, FINDINGS, issued=ISSUED,
                                                              options=options).model_dump_json())
    assert status == 200
    tracking = tracking_uid(source, DEMO.device_uid, "cardiomegaly")
    report = report_uid(source, DEMO.device_uid)
    before = _one(fhir_server, "Observation", tracking)
    report_before = _one(fhir_server, "DiagnosticReport", report)

    later = ISSUED + dt.timedelta(days=1)
    rerun = [FindingResult("cardiomegaly", "Cardiomegaly", 0.4101, 0.5), FINDINGS[1]]
    status, response = fhir_server.request("POST", "/", build_bundle(source, DEMO, rerun, issued=later,
                                                                     options=options).model_dump_json())
    assert status == 200 and [e["response"]["status"] for e in response["entry"]] == ["200"] * 4, response
    after = _one(fhir_server, "Observation", tracking)
    assert after["id"] == before["id"] and after["meta"]["versionId"] != before["meta"]["versionId"]
    assert after["component"][0]["valueQuantity"]["value"] == pytest.approx(0.4101)
    assert after["valueCodeableConcept"]["coding"][0]["code"] == codes.ABSENT.value
    assert after["issued"].startswith("2024-05-18")
    report_after = _one(fhir_server, "DiagnosticReport", report)
    assert report_after["id"] == report_before["id"] and "absent (probability 0.41" in report_after["conclusion"]
    assert f"Observation/{after['id']}" in {r["reference"] for r in report_after["result"]}
    # the other patient's result is untouched
    untouched = _one(fhir_server, "Observation", tracking_uid(other, DEMO.device_uid, "cardiomegaly"))
    assert untouched["component"][0]["valueQuantity"]["value"] == pytest.approx(0.8312)
    assert untouched["subject"]["identifier"]["value"] == "OTHER-PATIENT"

    keep = FhirOptions(default_patient_identifier_system="urn:oid:2.16.840.1.113883.19.5", resend="keep")
    again = [FindingResult("cardiomegaly", "Cardiomegaly", 0.9, 0.5), FINDINGS[1]]
    status, response = fhir_server.request("POST", "/", build_bundle(source, DEMO, again, issued=later,
                                                                     options=keep).model_dump_json())
    assert status == 200 and [e["response"]["status"] for e in response["entry"]] == ["200"] * 4
    assert _one(fhir_server, "Observation", tracking)["component"][0]["valueQuantity"]["value"] == pytest.approx(0.4101)


@pytest.mark.slow
def test_engine_accepts_the_phantom_and_ndjson_resources(fhir_server):
    ds = make_phantom_dataset(modality="DX", photometric="MONOCHROME2", size=256, random_state=5)
    bundle = build_bundle(ds, DEMO, FINDINGS, issued=ISSUED, options=FhirOptions(default_timezone="Europe/Berlin"))
    status, response = fhir_server.request("POST", "/", bundle.model_dump_json())
    assert status == 200, response
    # NDJSON resources, written one by one with their own ids (update-as-create). Another
    # model, so that its Device does not duplicate the identifier of the Device posted above.
    other = ModelInfo(name="cxr-ai-other", version="1.0.0", device_uid="2.25.1618033988749894848204586834365638117")
    for resource in ndjson_resources(build_bundle(ds, other, FINDINGS[:1], options=FhirOptions(conditional_create=False))):
        status, stored = fhir_server.request("PUT", f"/{resource['resourceType']}/{resource['id']}", resource)
        assert status in (200, 201), stored


@pytest.mark.slow
@pytest.mark.parametrize("change, expression", [
    (lambda o: o.update(status="final-ish"), "Observation.status"),          # not in the value set
    (lambda o: o.pop("code"), "Observation.code"),                           # missing 1..1 element
    (lambda o: o.update(dataAbsentReason={"text": "x"}), "Observation"),    # invariant obs-6
    (lambda o: o["component"][0]["valueQuantity"].update(value="0.8"), "Observation.component"),  # wrong type
    (lambda o: o.update(probability=0.8), "Observation.probability"),        # unknown element
])
def test_engine_rejects_invalid_resources(fhir_server, bundle, change, expression):
    obs = json.loads(_resources(bundle, "Observation")[0].model_dump_json())
    obs["device"] = {"display": DEMO.label}  # standalone: no urn:uuid to resolve
    status, _ = fhir_server.request("POST", "/Observation", obs)
    assert status == 201  # the valid original is accepted ...
    change(obs)
    status, outcome = fhir_server.request("POST", "/Observation", obs)
    assert status == 400, outcome  # ... and the broken one is refused, saying where
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(expression in " ".join(i.get("expression", [])) for i in outcome["issue"]), outcome


@pytest.mark.slow
def test_engine_refuses_a_transaction_with_an_invalid_entry(fhir_server, rg1):
    source = _with(rg1, SOPInstanceUID="1.2.826.0.1.3680043.10.543.2")
    data = json.loads(build_bundle(source, DEMO, FINDINGS, issued=ISSUED).model_dump_json())
    data["entry"][3]["resource"]["status"] = "provisional"  # not a DiagnosticReport status
    status, outcome = fhir_server.request("POST", "/", data)
    assert status == 400 and outcome["resourceType"] == "OperationOutcome", outcome
    assert "DiagnosticReport.status" in json.dumps(outcome)
    # All or nothing: the valid Observations of the refused transaction were not kept either.
    tracking = tracking_uid(source, DEMO.device_uid, "cardiomegaly")
    assert fhir_server.search(f"/Observation?identifier={urllib.parse.quote(f'{DICOM_UID_SYSTEM}|urn:oid:{tracking}')}") == []
