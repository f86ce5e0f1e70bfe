"""Delivery destinations against a real HTTP server on loopback that answers late.

A destination's configured ``timeout`` must bound how long one delivery attempt waits for a
peer: a STOW-RS or FHIR server that accepts the request and then stalls must fail the attempt
(the outbox retries it later), not hold the destination's thread. One attempt is one request:
retrying is the outbox's (backoff, ``max_attempts``), never repeated inside the client.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cxr_ai.service.routing import DeliveryError, FhirDestination, StowDestination


class _LateServer:
    """Answers every POST with ``status`` and ``body`` (``content_type``) after ``delay`` seconds."""

    def __init__(self, *, delay: float, body: bytes, content_type: str, status: int = 200) -> None:
        self.delay, self.body, self.content_type, self.status = delay, body, content_type, status
        self.release = threading.Event()
        self.requests = 0
        late = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                late.requests += 1
                late.release.wait(late.delay)
                self.send_response(late.status)
                self.send_header("Content-Type", late.content_type)
                self.send_header("Content-Length", str(len(late.body)))
                self.end_headers()
                self.wfile.write(late.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _LateServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture()
def sr_file(tmp_path: Path, rg1_paths) -> Path:
    import pydicom

    from cxr_ai.dicom.sr import build_sr
    from cxr_ai.results import FindingResult, ModelInfo

    ds = pydicom.dcmread(rg1_paths["RG1_UNCR"], stop_before_pixels=True)
    sr = build_sr(ds, ModelInfo(name="routing-test", version="1", device_uid="2.25.1"),
                  [FindingResult("cardiomegaly", "Cardiomegaly", 0.8, 0.5)])
    path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def fhir_file(tmp_path: Path) -> Path:
    path = tmp_path / "fhir-bundle.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}), encoding="utf-8")
    return path


STOW_REPLY = (b"{}", "application/dicom+json")
FHIR_REPLY = (json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": []}).encode(),
              "application/fhir+json")


@pytest.mark.parametrize("kind", ["stow", "fhir"])
def test_a_peer_answering_within_the_timeout_is_delivered(kind: str, sr_file: Path, fhir_file: Path) -> None:
    body, ctype = STOW_REPLY if kind == "stow" else FHIR_REPLY
    with _LateServer(delay=0.2, body=body, content_type=ctype) as server:
        if kind == "stow":
            StowDestination(name="web", url=server.url, timeout=30).deliver([sr_file], job_id="j1")
        else:
            FhirDestination(name="ehr", url=server.url, timeout=30).deliver([fhir_file], job_id="j1")
        assert server.requests == 1


@pytest.mark.parametrize("kind", ["stow", "fhir"])
def test_a_peer_that_stalls_past_the_configured_timeout_fails_the_attempt(
        kind: str, sr_file: Path, fhir_file: Path) -> None:
    # The server would answer, successfully, after 5 s; the destination allows 0.5 s. The
    # STOW-RS client's own default (20 s) would have waited and delivered, and on a failure it
    # would have tried 5 times with its own backoff.
    body, ctype = STOW_REPLY if kind == "stow" else FHIR_REPLY
    with _LateServer(delay=5.0, body=body, content_type=ctype) as server:
        if kind == "stow":
            dest = StowDestination(name="web", url=server.url, timeout=0.5)
            with pytest.raises(DeliveryError, match="STOW-RS to .* failed: .*Timeout"):
                dest.deliver([sr_file], job_id="j1")
        else:
            dest = FhirDestination(name="ehr", url=server.url, timeout=0.5)
            with pytest.raises(DeliveryError, match="FHIR POST to .* failed: .*Timeout"):
                dest.deliver([fhir_file], job_id="j1")
        assert server.requests == 1


def test_a_busy_stow_server_is_one_failed_attempt_for_the_outbox_to_retry(sr_file: Path) -> None:
    with _LateServer(delay=0.0, body=b"busy", content_type="text/plain", status=503) as server:
        with pytest.raises(DeliveryError, match="STOW-RS to .* failed: HTTPError"):
            StowDestination(name="web", url=server.url, timeout=5).deliver([sr_file], job_id="j1")
        assert server.requests == 1
