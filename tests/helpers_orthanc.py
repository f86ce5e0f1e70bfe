"""Real peers for listener integration tests: Debian's Orthanc with the deploy/ routing recipe,
the Medplum FHIR engine (tests/fhir_server), and a private network namespace to run them in.

Orthanc has no bind-address option, so a test that starts one should run in a network
namespace of its own (``unshare -rn`` + ``ip link set lo up``): nothing outside can reach it.
:func:`rerun_in_private_netns` re-runs a test inside such a namespace when the kernel allows
it. Inside or not, Orthanc is configured with remote HTTP access off, DICOM storage allowed
only from declared modalities checked by host, and we only ever connect to 127.0.0.1.
Every process is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY_ORTHANC = REPO / "deploy" / "orthanc"
ORTHANC_BIN = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
FHIR_SERVER = REPO / "tests" / "fhir_server" / "server.mjs"
NETNS_ENV = "CXR_AI_TEST_IN_NETNS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


# -- network namespace ------------------------------------------------------------------------
def private_netns_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    r = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30, check=False)
    return r.returncode == 0


def in_private_netns() -> bool:
    return os.environ.get(NETNS_ENV) == "1"


def rerun_in_private_netns(nodeid: str, *, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one pytest node id again inside a new user + network namespace with only loopback."""
    env = dict(os.environ, **{NETNS_ENV: "1"})
    script = 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider -x "$1"'
    return subprocess.run(["unshare", "-rn", "sh", "-c", script, sys.executable, nodeid], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# -- Orthanc ----------------------------------------------------------------------------------
@dataclass
class Orthanc:
    process: subprocess.Popen
    dicom_port: int
    http_port: int
    aet: str
    root: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=20) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes | str):
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.loads(r.read())

    def log(self) -> str:
        p = self.root / "orthanc.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        _stop(self.process)


def orthanc_config(root: Path, *, dicom_port: int, http_port: int, cxr_ai_port: int | None,
                   senders: dict[str, str], aet: str = "ORTHANC",
                   query_retrieve: tuple[str, int] | None = None) -> dict:
    """deploy/orthanc/orthanc.json, pointed at temp folders and loopback ports.

    ``senders`` maps modality names to AE titles allowed to store (besides cxr-ai).
    ``cxr_ai_port`` None: no auto-routing (Orthanc as a plain PACS). ``query_retrieve``:
    (AE title, C-MOVE destination port) of a client allowed C-FIND/C-GET/C-MOVE.
    """
    cfg = json.loads((DEPLOY_ORTHANC / "orthanc.json").read_text())
    storage = root / "db"
    storage.mkdir(parents=True, exist_ok=True)
    cfg.update(
        Name=f"cxr-ai test {aet}", StorageDirectory=str(storage), IndexDirectory=str(storage),
        DicomAet=aet, DicomPort=dicom_port, HttpPort=http_port, RemoteAccessAllowed=False,
        AuthenticationEnabled=False, RegisteredUsers={}, DicomAlwaysAllowStore=False,
        DicomCheckModalityHost=True, StableAge=1,
        LuaScripts=[str(DEPLOY_ORTHANC / "route-to-cxr-ai.lua")] if cxr_ai_port else [],
        Plugins=[str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
    )
    cfg["DicomModalities"] = {}
    if cxr_ai_port:
        cfg["DicomModalities"]["cxr-ai"] = {"AET": "CXR_AI", "Host": "127.0.0.1", "Port": cxr_ai_port,
                                            "AllowStore": True, "AllowEcho": True}
    if query_retrieve:
        ae, move_port = query_retrieve
        cfg["DicomModalities"]["qr-client"] = {
            "AET": ae, "Host": "127.0.0.1", "Port": move_port, "AllowStore": True, "AllowEcho": True,
            "AllowFind": True, "AllowGet": True, "AllowMove": True}
        cfg.update(DicomWeb={"Enable": True, "Root": "/dicom-web/"})
    for name, ae in senders.items():
        cfg["DicomModalities"][name] = {"AET": ae, "Host": "127.0.0.1", "Port": free_port(), "AllowStore": True}
    return cfg


def start_orthanc(root: Path, *, cxr_ai_port: int | None, senders: dict[str, str] | None = None,
                  aet: str = "ORTHANC", query_retrieve: tuple[str, int] | None = None) -> Orthanc:
    """Start Debian's Orthanc from a generated config; returns once its REST API answers."""
    assert ORTHANC_BIN, "Debian's orthanc package is required (apt-get install orthanc orthanc-dicomweb)"
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    cfg = orthanc_config(root, dicom_port=dicom_port, http_port=http_port, cxr_ai_port=cxr_ai_port,
                         senders=senders or {}, aet=aet, query_retrieve=query_retrieve)
    cfg_path = root / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - handed to the Orthanc process
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen([ORTHANC_BIN, "--verbose", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=root, env=env)
    server = Orthanc(proc, dicom_port, http_port, aet, root)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            server.get("/system")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer on {server.url} within 60 s:\n{server.log()[-3000:]}")


# -- FHIR -------------------------------------------------------------------------------------
@dataclass
class FhirServer:
    process: subprocess.Popen
    base_url: str

    def get(self, path: str):
        with urllib.request.urlopen(self.base_url.rstrip("/") + "/" + path.lstrip("/"), timeout=20) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        _stop(self.process)


def start_fhir_server() -> FhirServer:
    """The Medplum FHIR R4 engine from tests/fhir_server, on a free loopback port."""
    node = shutil.which("node")
    assert node and (FHIR_SERVER.parent / "node_modules").is_dir(), (
        "node and tests/fhir_server/node_modules are required (cd tests/fhir_server && npm ci)")
    proc = subprocess.Popen([node, "--experimental-websocket", str(FHIR_SERVER), "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=FHIR_SERVER.parent)
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"FHIR server exited with {proc.returncode}")
            continue
        if "FHIR server ready on" in line:
            url = line.strip().rsplit(" ", 1)[-1]
            # keep draining its output so it never blocks on a full pipe
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return FhirServer(proc, url)
    _stop(proc)
    raise RuntimeError("FHIR server did not start within 60 s")
