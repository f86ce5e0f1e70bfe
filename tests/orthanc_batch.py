"""A real Orthanc for batch tests: Debian's ``Orthanc`` as a plain process, stopped by PID.

Orthanc has no bind-address option. To keep it usable only from here: REST remote access is
off, C-STORE/C-FIND/C-GET/C-MOVE are served only to the modalities declared in its config
(our calling AE, checked against host 127.0.0.1), and we only ever connect to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ORTHANC_BIN = shutil.which("Orthanc")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class OrthancServer:
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

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:  # noqa: S310 - loopback
            return json.loads(r.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def start_orthanc(root: Path, *, scu_aet: str, scu_move_port: int, aet: str = "ORTHANC") -> OrthancServer:
    """Start Orthanc with storage under ``root``; ``scu_aet`` may query/retrieve and is the
    C-MOVE destination at 127.0.0.1:``scu_move_port``."""
    assert ORTHANC_BIN, "Orthanc is not installed (apt-get install orthanc)"
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "cxr-ai-batch-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"cxrai": [scu_aet, "127.0.0.1", scu_move_port]},
        "Plugins": [DICOMWEB_PLUGIN] if os.path.exists(DICOMWEB_PLUGIN) else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "StableAge": 1,
        "DicomScuTimeout": 30,
    }
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
    server = OrthancServer(proc, dicom_port, http_port, aet, root)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}; see {root / 'orthanc.log'}")
        try:
            server.get_json("/system")
            return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer on port {http_port} within 60 s; see {root / 'orthanc.log'}")
