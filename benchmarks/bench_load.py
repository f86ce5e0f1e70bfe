"""Load: N concurrent associations x M instances to the listener (a subprocess), loopback only.

The service runs as ``python -m cxr_ai.service`` with the real pipeline on a given bundle
(default: a tiny 64 px real bundle made for the run) and one worker; N SCU threads each open
one association and C-STORE M phantom CR images (512 x 512, unique SOP Instance UIDs). While
the workers are saturated, a prober thread sends C-ECHO every 0.2 s and records each answer
and the queue depth from /status: receiving must go on (back-pressure, not collapse).

Reports stored %, processed %, peak RSS of the service (VmHWM from /proc/<pid>/status), the
number of C-ECHOs answered while the queue was deep, and timings. Usage::

    .venv/bin/python benchmarks/bench_load.py [--assocs 20] [--instances 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from cxr_ai.config import config_to_toml
from cxr_ai.net.scu import SCU_HANDLERS

REPO = Path(__file__).resolve().parents[1]
_STUDY, _SERIES, _SOP = Tag(0x0020, 0x000D), Tag(0x0020, 0x000E), Tag(0x0008, 0x0018)
sys.path.insert(0, str(REPO / "tests"))


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_load(*, assocs: int, instances: int, workdir: Path, bundle: Path | None = None, size: int = 512,
             timeout: float = 540.0, seed: int = 0) -> dict[str, Any]:
    """Run one load test; returns the measured figures (see the module docstring)."""
    from cxr_ai.phantoms import make_phantom_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    if bundle is None:
        from test_batch import make_tiny_bundle

        bundle = make_tiny_bundle(workdir / "bundle")
    cfg = workdir / "cxr-ai.toml"
    cfg.write_text(config_to_toml({
        # max_associations: the shipped default (the senders plus the C-ECHO prober must fit).
        "listener": {"port": 0, "allowed_calling_aes": ["LOADSCU"], "min_free_mb": 0.0},
        "store": {"root": "var", "quiet_seconds": 0.2, "keep_hours": -1.0},
        "workers": {"pipeline": "cxr_ai.pipeline:Pipeline", "poll_seconds": 0.05, "count": 1},
        "models": {"bundle": str(bundle), "num_threads": 1, "batch_size": 8, "explain": False},
        "routing": {"destinations": [{"name": "files", "kind": "folder", "path": "out"}]},
        "http": {"port": 0},
    }))
    ready = workdir / "ready.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_AI__")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    log = open(workdir / "service.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_ai.service", "--config", str(cfg), "--ready-file", str(ready)],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start; see {workdir / 'service.log'}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        port, http = info["dicom_port"], info["http_port"]
        base = make_phantom_dataset(size=size, random_state=seed)
        rss_idle = _vm(proc.pid, "VmRSS")
        statuses: list[list[int]] = [[] for _ in range(assocs)]
        errors: list[str] = []
        acked: list[str] = []  # SOP Instance UIDs answered 0x0000
        outcomes: dict[str, int] = {}  # "0xNNNN" / "no response" / "not sent: <exception>" -> count
        out_lock = threading.Lock()

        def note(key: str, uid: str | None = None) -> None:
            with out_lock:
                outcomes[key] = outcomes.get(key, 0) + 1
                if uid is not None:
                    acked.append(uid)

        def sender(i: int) -> None:
            ae = AE(ae_title="LOADSCU")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
            ae.requested_contexts = [build_context(str(base.SOPClassUID), [str(base.file_meta.TransferSyntaxUID)])]
            assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI", evt_handlers=SCU_HANDLERS)
            if not assoc.is_established:
                why = ("rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established")
                errors.append(f"association {i} {why}")
                with out_lock:
                    key = f"association {why}"
                    outcomes[key] = outcomes.get(key, 0) + instances
                return
            study = generate_uid()
            attempted = 0
            try:
                for j in range(instances):
                    # A data set of its own per instance: Dataset.copy() is shallow (the copy shares
                    # its element dict with base), so 20 threads setting UIDs on copies raced on
                    # one dict and sent data sets whose UIDs differed from the request (0xA900)
                    # or from the UID this sender recorded as acknowledged.
                    ds = Dataset()
                    ds.file_meta = base.file_meta
                    for el in base:
                        if el.tag not in (_STUDY, _SERIES, _SOP):
                            ds.add(el)  # shared, never modified
                    sop = generate_uid()
                    ds.StudyInstanceUID = f"{study[:50]}.{j // 10}"
                    ds.SeriesInstanceUID = f"{study[:50]}.{j // 10}.1"
                    ds.SOPInstanceUID = sop
                    attempted += 1
                    rsp = assoc.send_c_store(ds)
                    st = int(rsp.Status) if rsp and "Status" in rsp else -1
                    statuses[i].append(st)
                    if st == 0:
                        note("0x0000", sop)
                    else:
                        note(f"0x{st:04X}" if st >= 0 else
                             "no response (association aborted or DIMSE timeout)")
                        if not assoc.is_established:
                            errors.append(f"association {i}: ended after {j + 1} of {instances} instances "
                                          f"(aborted={assoc.is_aborted})")
                            break
            except Exception as exc:  # noqa: BLE001 - recorded: the association died
                errors.append(f"association {i}: {type(exc).__name__}: {exc}"[:300])
                note(f"exception {type(exc).__name__}")
            finally:
                if assoc.is_established:
                    assoc.release()
            unsent = instances - attempted
            if unsent > 0:
                with out_lock:
                    outcomes["not sent (association gone)"] = outcomes.get("not sent (association gone)", 0) + unsent

        probes: list[dict[str, Any]] = []
        stop_probe = threading.Event()

        def prober() -> None:
            ae = AE(ae_title="LOADSCU")
            ae.add_requested_context(Verification)
            while not stop_probe.wait(0.2):
                t0 = time.perf_counter()
                assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI", evt_handlers=SCU_HANDLERS)
                ok = assoc.is_established and bool(assoc.send_c_echo())
                if assoc.is_established:
                    assoc.release()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/status", timeout=10) as r:
                        depth = json.loads(r.read())["counts"]["studies"]["received"]
                except OSError:
                    depth = None
                probes.append({"echo_ok": ok, "echo_s": time.perf_counter() - t0, "queue_depth": depth})

        t0 = time.perf_counter()
        probe = threading.Thread(target=prober, daemon=True)
        probe.start()
        threads = [threading.Thread(target=sender, args=(i,)) for i in range(assocs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_received = time.perf_counter() - t0
        total = assocs * instances

        def counts() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/status", timeout=10) as r:
                return json.loads(r.read())["counts"]

        while time.perf_counter() - t0 < timeout:
            c = counts()
            busy = sum(c["studies"].get(s, 0) for s in ("received", "processing", "sending", "results_sent"))
            if busy == 0 and sum(c["instances"].values()) >= len(acked):
                break
            time.sleep(0.5)
        t_done = time.perf_counter() - t0
        stop_probe.set()
        probe.join(5)
        c = counts()
        stored = sum(1 for s in statuses for x in s if x == 0)
        finished = sum(c["instances"].get(k, 0) for k in ("processed", "not_applicable", "failed"))
        peak = _vm(proc.pid, "VmHWM")
        # Every acknowledged SOP Instance UID must be in the job store (never ack-then-lose).
        import sqlite3

        db = sqlite3.connect(f"file:{workdir / 'var' / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=30)
        try:
            recorded = dict(db.execute("SELECT sop_uid, state FROM instances").fetchall())
        finally:
            db.close()
        acked_states: dict[str, int] = {}
        for uid in acked:
            k = recorded.get(uid, "NOT RECORDED")
            acked_states[k] = acked_states.get(k, 0) + 1
        deep = [p for p in probes if (p["queue_depth"] or 0) >= 2]
        return {
            "associations": assocs, "instances_per_association": instances, "instances": total,
            "image_size": size, "stored": stored, "stored_pct": 100.0 * stored / total,
            "processed": c["instances"].get("processed", 0),
            "processed_pct": 100.0 * c["instances"].get("processed", 0) / total,
            "finished_pct": 100.0 * finished / total, "instance_states": c["instances"],
            "study_states": {k: v for k, v in c["studies"].items() if v},
            "peak_rss_mib": round(peak / 2**20, 1), "idle_rss_mib": round(rss_idle / 2**20, 1),
            "receive_s": round(t_received, 2), "all_done_s": round(t_done, 2),
            "receive_rate_img_s": round(total / t_received, 1),
            "echo_probes": len(probes), "echo_ok": sum(p["echo_ok"] for p in probes),
            "echo_while_queue_deep": {"probes": len(deep), "answered": sum(p["echo_ok"] for p in deep),
                                      "max_queue_depth": max((p["queue_depth"] or 0 for p in probes), default=0),
                                      "max_echo_s": round(max((p["echo_s"] for p in deep), default=0.0), 3)},
            "errors": errors,
            "outcomes": dict(sorted(outcomes.items())),
            "acked": len(acked), "acked_in_job_store": len(acked) - acked_states.get("NOT RECORDED", 0),
            "acked_lost": acked_states.get("NOT RECORDED", 0), "acked_by_job_state": acked_states,
            "processing_timed_out": t_done >= timeout,
            "status_counts": {f"0x{k:04X}" if k >= 0 else "none": sum(x == k for st in statuses for x in st)
                              for k in sorted({x for st in statuses for x in st})},
            "responses_per_association": [len(st) for st in statuses],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assocs", type=int, default=20)
    p.add_argument("--instances", type=int, default=50)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "load.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxr-ai-load-") as tmp:
        res = run_load(assocs=args.assocs, instances=args.instances, workdir=Path(tmp), size=args.size)
    print(json.dumps(res, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["stored_pct"] == 100.0 and res["finished_pct"] == 100.0 else 1


if __name__ == "__main__":
    sys.exit(main())
