"""Routing: deliver result files from the outbox to configured destinations.

Destinations (``[[routing.destinations]]`` in the configuration):

``dicom``  C-STORE to a PACS (pynetdicom SCU, one association per delivery batch)
``stow``   DICOMweb STOW-RS (PS3.18 §10.5) through ``dicomweb-client``
``fhir``   FHIR transaction Bundle POSTed to the server base URL, bearer token from config
``folder`` files copied (atomically) into ``<path>/<job_id>/``

Each destination has its own thread, so a destination that is down delays only its own
deliveries; receiving never waits on routing. Failures are retried with exponential
backoff (the job store keeps the schedule), then dead-lettered.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom

from cxr_ai.errors import ConfigError
from cxr_ai.service.metrics import ServiceMetrics
from cxr_ai.net.scu import Peer, SendError, send_files
from cxr_ai.net.tls import client_context
from cxr_ai.store.jobs import DeliveryState, JobStore
from cxr_ai.store.spool import fsync_dir

logger = logging.getLogger(__name__)

KINDS = ("dicom", "stow", "fhir", "folder")
MSG_UNKNOWN_KIND = "[[routing.destinations]] {name!r}: kind {kind!r} is not one of " + ", ".join(KINDS)
MSG_MISSING_KEY = "[[routing.destinations]] {name!r} (kind {kind}) needs the key {key!r}"


class DeliveryError(Exception):
    """A delivery attempt failed; the outbox will retry it."""


class Destination(Protocol):
    name: str
    kind: str

    def accepts(self, path: Path) -> bool: ...

    def deliver(self, items: Sequence[Path], *, job_id: str) -> None: ...


def _is_dicom(p: Path) -> bool:
    return p.suffix == ".dcm"


def _is_fhir(p: Path) -> bool:
    return p.suffix == ".json" and p.name.startswith("fhir")


@dataclass
class DicomDestination:
    name: str
    peer: Peer
    kind: str = "dicom"

    def accepts(self, path: Path) -> bool:
        return _is_dicom(path)

    def deliver(self, items: Sequence[Path], *, job_id: str) -> None:
        try:
            send_files(items, self.peer)
        except SendError as exc:
            raise DeliveryError(str(exc)) from exc


@dataclass
class StowDestination:
    name: str
    url: str
    token: str = field(default="", repr=False)
    timeout: float = 60.0
    kind: str = "stow"

    def accepts(self, path: Path) -> bool:
        return _is_dicom(path)

    def deliver(self, items: Sequence[Path], *, job_id: str) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        # The destination's timeout for connecting and for each read (the client's own default
        # is 20 s), and one request per attempt: the outbox retries with its own backoff and
        # max_attempts, where the client would otherwise try up to 5 times with backoff itself.
        client = DICOMwebClient(url=self.url, headers=headers, timeout=self.timeout)
        client.set_http_retry_params(retry=False)
        datasets = [pydicom.dcmread(p) for p in items]
        try:
            response = client.store_instances(datasets=datasets)
        except (requests.RequestException, OSError) as exc:
            raise DeliveryError(f"STOW-RS to {self.url} failed: {type(exc).__name__}: {_no_token(exc, self.token)}") from exc
        failed = getattr(response, "FailedSOPSequence", None)
        if failed:  # Failed SOP Sequence (PS3.18 Table 10.5.3-1)
            raise DeliveryError(f"STOW-RS to {self.url}: {len(failed)} instance(s) refused")


@dataclass
class FhirDestination:
    name: str
    url: str
    token: str = field(default="", repr=False)
    timeout: float = 30.0
    kind: str = "fhir"

    def accepts(self, path: Path) -> bool:
        return _is_fhir(path)

    def headers(self) -> dict[str, str]:
        """FHIR JSON in and out, with the bearer token when there is one."""
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def deliver(self, items: Sequence[Path], *, job_id: str) -> None:
        import requests

        headers = self.headers()
        for p in items:
            body = p.read_bytes()
            try:
                r = requests.post(self.url, data=body, headers=headers,
                                  timeout=self.timeout)
            except requests.RequestException as exc:
                raise DeliveryError(f"FHIR POST to {self.url} failed: {type(exc).__name__}: {_no_token(exc, self.token)}") from exc
            if r.status_code // 100 != 2:
                raise DeliveryError(f"FHIR server {self.url} answered HTTP {r.status_code}{_issue_codes(r)}")
            try:
                reply = r.json()
            except ValueError as exc:
                raise DeliveryError(f"FHIR server {self.url} answered HTTP {r.status_code} without JSON") from exc
            if reply.get("resourceType") != "Bundle" or not reply.get("type", "").endswith("-response"):
                raise DeliveryError(f"FHIR server {self.url} did not answer with a response Bundle "
                                    f"(got {reply.get('resourceType')}/{reply.get('type')})")
            bad = [e.get("response", {}).get("status", "") for e in reply.get("entry", [])
                   if not str(e.get("response", {}).get("status", "")).startswith("2")]
            if bad:
                raise DeliveryError(f"FHIR server {self.url} refused {len(bad)} entries: {bad[:3]}")


@dataclass
class FolderDestination:
    name: str
    path: Path
    kind: str = "folder"

    def accepts(self, path: Path) -> bool:
        return True

    def deliver(self, items: Sequence[Path], *, job_id: str) -> None:
        out = self.path / job_id
        try:
            out.mkdir(parents=True, exist_ok=True)
            for p in items:
                fd, tmp = tempfile.mkstemp(dir=out, suffix=".part")
                with os.fdopen(fd, "wb") as dst, open(p, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(tmp, out / p.name)
            fsync_dir(out)
        except OSError as exc:
            raise DeliveryError(f"could not write results to {out}: {exc}") from exc


def _issue_codes(response) -> str:
    """The issue codes of an OperationOutcome reply (never its free text: it may echo PHI)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    codes = [f"{i.get('severity', '?')}/{i.get('code', '?')}" for i in body.get("issue", [])][:5]
    return f" (OperationOutcome: {', '.join(codes)})" if codes else ""


def _no_token(exc: BaseException, token: str) -> str:
    text = str(exc)
    return text.replace(token, "***") if token else text


def _token(spec: Mapping[str, Any], name: str, secrets: Mapping[str, str]) -> str:
    if spec.get("token_env"):
        value = secrets.get(str(spec["token_env"]), "")
        if not value:
            raise ConfigError(f"[[routing.destinations]] {name!r}: environment variable "
                              f"{spec['token_env']} (token_env) is not set")
        return value
    return str(spec.get("token", ""))


def build_destination(spec: Mapping[str, Any], *, calling_ae: str, base_dir: Path,
                      secrets: Mapping[str, str] | None = None) -> Destination:
    """Build one destination from its configuration table (validated here, with clear errors).

    ``secrets`` maps environment variable names to their values, read at the edge
    (:func:`cxr_ai.config.load_settings`); a ``token_env`` it does not hold is an error.
    """
    secrets = secrets or {}
    name = str(spec.get("name", "")).strip()
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"[[routing.destinations]] entry {dict(spec)!r} needs a 'name' of letters, digits, '-' or '_'")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(MSG_UNKNOWN_KIND.format(name=name, kind=kind))

    def need(key: str) -> Any:
        if spec.get(key) in (None, ""):
            raise ConfigError(MSG_MISSING_KEY.format(name=name, kind=kind, key=key))
        return spec[key]

    if kind == "dicom":
        ctx = None
        if spec.get("tls"):
            ctx = client_context(ca_file=spec.get("tls_ca") or None, cert_file=spec.get("tls_cert") or None,
                                 key_file=spec.get("tls_key") or None,
                                 check_hostname=bool(spec.get("tls_check_hostname", True)))
        port = int(need("port"))
        if not 0 < port < 65536:
            raise ConfigError(f"[[routing.destinations]] {name!r}: port {port} is not a TCP port")
        return DicomDestination(name, Peer(host=str(need("host")), port=port, ae_title=str(need("ae_title")),
                                           calling_ae=str(spec.get("calling_ae") or calling_ae),
                                           max_pdu=int(spec.get("max_pdu", 131072)), ssl_context=ctx,
                                           timeout=float(spec.get("timeout", 60.0))))
    if kind == "stow":
        return StowDestination(name, str(need("url")), token=_token(spec, name, secrets),
                               timeout=float(spec.get("timeout", 60.0)))
    if kind == "fhir":
        return FhirDestination(name, str(need("url")), token=_token(spec, name, secrets),
                               timeout=float(spec.get("timeout", 30.0)))
    path = Path(str(need("path")))
    return FolderDestination(name, path if path.is_absolute() else (base_dir / path))


@dataclass
class RetryPolicy:
    max_attempts: int = 8
    backoff_initial: float = 2.0
    backoff_max: float = 300.0


class Router:
    """One delivery thread per destination, draining the outbox."""

    def __init__(self, *, store: JobStore, destinations: Sequence[Destination], policy: RetryPolicy,
                 poll_seconds: float = 0.5, metrics: ServiceMetrics | None = None) -> None:
        self.store = store
        self.destinations = {d.name: d for d in destinations}
        self.policy = policy
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self.destinations}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for name in self.destinations:
            t = threading.Thread(target=self._run, args=(name,), name=f"cxr-ai-route-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        """New deliveries were queued: look now instead of at the next poll."""
        for e in self._wake.values():
            e.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def items_for(self, name: str, files: Sequence[Path]) -> list[str]:
        dest = self.destinations[name]
        return [str(p) for p in files if dest.accepts(p)]

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                n = self.run_once(name)
            except Exception:  # broad on purpose: keep the delivery thread alive
                logger.exception("delivery loop for %s failed; retrying", name)
                n = 0
            if n == 0:
                self._wake[name].wait(self.poll_seconds)
                self._wake[name].clear()

    def run_once(self, name: str) -> int:
        """Attempt every due delivery for destination ``name`` once; returns how many."""
        dest = self.destinations[name]
        due = self.store.due_deliveries(name, limit=16)
        for d in due:
            if self._stop.is_set():
                break
            t0 = time.perf_counter()
            try:
                dest.deliver([Path(p) for p in d.items], job_id=d.job_id)
            except (DeliveryError, OSError) as exc:
                dstate, sstate = self.store.delivery_failed(
                    d.id, error=str(exc), max_attempts=self.policy.max_attempts,
                    backoff_initial=self.policy.backoff_initial, backoff_max=self.policy.backoff_max)
                if dstate is DeliveryState.DEAD:
                    logger.error("job %s: delivery to %s dead-lettered after %d attempts: %s", d.job_id, name,
                                 d.attempts + 1, exc)
                else:
                    logger.warning("job %s: delivery to %s failed (attempt %d), will retry: %s", d.job_id, name,
                                   d.attempts + 1, exc)
                if self.metrics is not None:
                    self.metrics.deliveries.labels(name, "dead" if dstate is DeliveryState.DEAD else "retry").inc()
                    if sstate.value == "failed":
                        self.metrics.studies_finished.labels("failed").inc()
                continue
            sstate = self.store.delivery_succeeded(d.id)
            logger.info("job %s: %d files delivered to %s", d.job_id, len(d.items), name)
            if self.metrics is not None:
                self.metrics.deliveries.labels(name, "sent").inc()
                self.metrics.stage_seconds.labels(f"deliver_{dest.kind}").observe(time.perf_counter() - t0)
        return len(due)
