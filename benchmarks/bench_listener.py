"""Listener benchmarks, each a ratio or a latency measured against a reference in the same run.

1. Receive throughput: 50 x RG1_UNCR (7.2 MB CR, distinct SOP Instance UIDs) sent by dcmtk
   ``storescu`` over one association to (a) cxr-ai's SCP (durable spool + SQLite job store,
   no workers) and (b) dcmtk ``storescp`` with its defaults, both with TCP_NODELAY
   (``TCP_NODELAY=1`` for dcmtk). After one untimed warm-up round, rounds alternate, each
   after ``sync`` (so that neither pays for the other's write-back); medians are compared,
   and each round's own ratio is kept to show the machine's spread. Goal: ratio >= 0.8.
2. Association set-up: 20 dcmtk ``echoscu`` runs (one association each, as a PACS that routes
   instance by instance opens them) against cxr-ai and against ``storescp``; ms per association.
3. End-to-end latency: a real Orthanc with deploy/'s routing script receives RG1 by C-STORE,
   routes it to the cxr-ai service (real pipeline), and the time from the C-STORE response
   to the SR being in Orthanc is measured per study (p50, p95). Goal: p50 <= 1.0 s on CPU.
   Once with the defaults, once with ``[workers] idle_start = false`` (the worker always waits
   out the quiet period). Each study's heatmap objects reach Orthanc before the next study.
   Needs the real pipeline (its demo bundle); skipped with a note otherwise.

Usage: python benchmarks/bench_listener.py [--n 50] [--rounds 9] [--trials 10] [--skip-latency]
       [--skip-receive] [--bundle DIR] [--quiet SECONDS ...]
Writes benchmarks/results/listener.json. Runs inside a private network namespace when the
kernel allows it (Orthanc cannot bind to loopback only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "benchmarks" / "results" / "listener.json"
NETNS_ENV = "CXR_AI_BENCH_IN_NETNS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def make_copies(src: Path, out: Path, n: int) -> list[Path]:
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(src)
    files = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        p = out / f"rg1_{i:03d}.dcm"
        ds.save_as(p)
        files.append(p)
    return files


def storescu(port: int, files: list[Path], called: str) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return dt


def run_ours(files: list[Path], root: Path, handler_seconds: list[float]) -> float:
    from cxr_ai.config import load_config
    from cxr_ai.service.metrics import ServiceMetrics
    from cxr_ai.net.scp import ListenerSettings, StorageSCP
    from cxr_ai.store import JobStore, Spool

    shutil.rmtree(root, ignore_errors=True)
    spool = Spool(root / "spool")
    tempfile.tempdir = str(spool.tmp)      # as serve_main does: commit = rename on the same disk
    try:
        metrics = ServiceMetrics()
        scp = StorageSCP(settings=ListenerSettings(port=0, allowed_calling_aes=["STORESCU"], min_free_bytes=0),
                         spool=spool, quiet_seconds=60, metrics=metrics,
                         store=JobStore(root / "jobs.sqlite3",
                                        synchronous=load_config(env={})["store"]["sqlite_synchronous"]))
        scp.start()
        try:
            dt = storescu(scp.port, files, "CXR_AI")
            assert len(scp.store.instances()) == len(files)
            handler_seconds.append(metrics.registry.get_sample_value("cxr_ai_stage_seconds_sum", {"stage": "receive"})
                                   / len(files))
        finally:
            scp.stop()
            scp.store.close()
    finally:
        tempfile.tempdir = None
    return dt


@contextlib.contextmanager
def storescp(root: Path):
    """dcmtk ``storescp`` with its defaults (and TCP_NODELAY) on a free port; yields the port."""
    port = free_port()
    proc = subprocess.Popen(["storescp", "--output-directory", str(root), str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield port
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def run_dcmtk(files: list[Path], root: Path) -> float:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with storescp(root) as port:
        dt = storescu(port, files, "ANY-SCP")
    assert len(list(root.iterdir())) == len(files)
    return dt


def bench_receive(n: int, rounds: int, work: Path) -> dict:
    import data_store

    src = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    files = make_copies(src, work / "send", n)
    total = sum(p.stat().st_size for p in files)
    ours, dcmtk, handler = [], [], []
    # one untimed round first: the first run of each receiver in a process is slower for both
    # (here 32-35 ms per instance against 15-25 after) and would flatter whichever is slower
    os.sync()
    run_dcmtk(files, work / "dcmtk")
    os.sync()
    run_ours(files, work / "ours", [])
    for _ in range(rounds):
        # Each timed run starts with no dirty pages left by the previous one: storescp does not
        # fsync, so the kernel would otherwise write its 360 MB back while the next run (ours,
        # which fsyncs every instance before answering) competes for the same disk.
        os.sync()
        dcmtk.append(run_dcmtk(files, work / "dcmtk"))
        os.sync()
        ours.append(run_ours(files, work / "ours", handler))
    mb = total / 1e6
    res = {
        "instances": n, "bytes": total, "rounds": rounds,
        "cxr_ai_seconds": ours, "dcmtk_storescp_seconds": dcmtk,
        "cxr_ai_mb_s": mb / statistics.median(ours), "dcmtk_storescp_mb_s": mb / statistics.median(dcmtk),
        # time our C-STORE handler spends per instance (header check, fsync, rename, SQLite)
        "cxr_ai_handler_ms_per_instance": 1000 * statistics.median(handler),
        "cxr_ai_ms_per_instance": 1000 * statistics.median(ours) / n,
        "dcmtk_ms_per_instance": 1000 * statistics.median(dcmtk) / n,
    }
    res["ratio_cxr_ai_vs_dcmtk"] = res["cxr_ai_mb_s"] / res["dcmtk_storescp_mb_s"]
    # each round's own ratio (dcmtk run, then ours, back to back): shows how much of the spread
    # is the machine rather than either receiver
    res["round_ratios"] = [d / o for d, o in zip(dcmtk, ours, strict=True)]
    res["goal_ratio"] = 0.8
    return res


def _echoscu_loop(port: int, called: str, n: int) -> float:
    """Seconds for ``n`` dcmtk ``echoscu`` runs, each one association (open, C-ECHO, release)."""
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["echoscu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port)], env=env,
                       check=True, capture_output=True, timeout=60)
    return time.perf_counter() - t0


def bench_associations(n: int, rounds: int, work: Path) -> dict:
    """Association set-up: ``n`` echoscu associations against cxr-ai and against storescp."""
    from cxr_ai.net.scp import ListenerSettings, StorageSCP
    from cxr_ai.store import JobStore, Spool

    root = work / "assoc"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    scp = StorageSCP(settings=ListenerSettings(port=0, allowed_calling_aes=["STORESCU"], min_free_bytes=0),
                     spool=Spool(root / "spool"), quiet_seconds=60, store=JobStore(root / "jobs.sqlite3"))
    ours, dcmtk = [], []
    scp.start()
    try:
        with storescp(root) as port:
            _echoscu_loop(scp.port, "CXR_AI", 2)                # warm-up
            _echoscu_loop(port, "ANY-SCP", 2)
            for _ in range(rounds):
                dcmtk.append(_echoscu_loop(port, "ANY-SCP", n))
                ours.append(_echoscu_loop(scp.port, "CXR_AI", n))
    finally:
        scp.stop()
        scp.store.close()
    res = {"associations": n, "rounds": rounds, "cxr_ai_seconds": ours, "dcmtk_storescp_seconds": dcmtk,
           "cxr_ai_ms_per_association": 1000 * statistics.median(ours) / n,
           "dcmtk_ms_per_association": 1000 * statistics.median(dcmtk) / n,
           "note": "dcmtk echoscu as the client (a process per association, the same for both)"}
    res["ratio_cxr_ai_vs_dcmtk"] = res["dcmtk_ms_per_association"] / res["cxr_ai_ms_per_association"]
    return res


def _pipeline_totals(svc) -> tuple[float, float]:
    reg = svc.metrics.registry
    labels = {"stage": "process_per_instance"}
    return (reg.get_sample_value("cxr_ai_stage_seconds_sum", labels) or 0.0,
            reg.get_sample_value("cxr_ai_stage_seconds_count", labels) or 0.0)


def _latency_run(svc_factory, orthanc, src: Path, trials: int, work: Path, tag: str, *,
                 expected_in_orthanc: int = 0):
    """SR latencies, stages and (``expected_in_orthanc``: the source + every result object of the
    study) the time from the last C-STORE to all heatmap objects in Orthanc."""
    import pydicom
    from pydicom.uid import generate_uid

    from cxr_ai.net.scu import Peer, send_files

    svc = svc_factory()
    svc.start()
    latencies: list[float] = []
    heatmap_latencies: list[float] = []
    stages: list[dict] = []
    try:
        ds = pydicom.dcmread(src)
        peer = Peer(host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC", calling_ae="TESTSCU")
        for i in range(trials + 1):             # the first study warms up the model
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            f = work / f"lat_{tag}_{i}.dcm"
            ds.save_as(f)
            send_files([f], peer)
            t0 = time.time()
            deadline = t0 + 120
            while time.time() < deadline:
                found = orthanc.post("/tools/find", json.dumps({"Level": "Instance", "Query": {
                    "StudyInstanceUID": str(ds.StudyInstanceUID), "Modality": "SR"}}))
                if found:
                    break
                time.sleep(0.01)
            else:
                raise RuntimeError("SR did not reach Orthanc within 120 s")
            t1 = time.time()
            # the heatmap objects follow the SR: let them reach Orthanc before the next study
            t2 = None
            while True:
                study = next(s for s in svc.store.studies() if s.study_uid == str(ds.StudyInstanceUID))
                if t2 is None and expected_in_orthanc:
                    found = orthanc.post("/tools/find", json.dumps({"Level": "Instance", "Query": {
                        "StudyInstanceUID": str(ds.StudyInstanceUID)}}))
                    if len(found) >= expected_in_orthanc:
                        t2 = time.time()
                if (study.state.value in ("results_sent", "done") and (t2 is not None or not expected_in_orthanc)) \
                        or time.time() > deadline:
                    break
                time.sleep(0.01)
            if i == 0:
                warm = _pipeline_totals(svc)
            if i > 0:
                latencies.append(t1 - t0)
                heatmap_latencies.append(t2 - t0 if t2 is not None else float("nan"))
                [inst] = svc.store.instances(study.study_key)
                sr_row = next(d for d in svc.store.deliveries(study_key=study.study_key)
                              if d.destination == "pacs" and any(Path(item).name.startswith("SR-") for item in d.items))
                stages.append({"orthanc_routing_s": inst.received_at - t0,
                               "received_to_sr_queued_s": sr_row.created_at - inst.received_at,
                               "sr_queued_to_sr_in_orthanc_s": t1 - sr_row.created_at,
                               "received_to_all_processed_s": study.processed_at - inst.received_at
                               if study.processed_at else None})
        total, n = _pipeline_totals(svc)
        if n > warm[1]:
            stages.append({"pipeline_mean_s": (total - warm[0]) / (n - warm[1])})
    finally:
        svc.stop(grace=5)
    if heatmap_latencies:
        stages.insert(0, {"heatmap_latencies": heatmap_latencies})
    return latencies, stages


#: The latency runs: the defaults, then a worker that always waits out the quiet period.
LATENCY_SETTINGS = [("defaults", {}), ("idle_start = false", {"workers": {"idle_start": False}})]


def bench_latency(trials: int, work: Path, *, bundle: str | None, quiet_values: list[float | None],
                  heatmaps_for: str = "positive") -> dict:
    from helpers_orthanc import start_orthanc

    from cxr_ai.config import load_config
    from cxr_ai.errors import BundleError
    from cxr_ai.service import Service

    base = load_config(env={})
    if bundle:
        base["models"]["bundle"] = bundle
    base["outputs"]["heatmaps_for"] = heatmaps_for
    try:
        from cxr_ai.pipeline import Pipeline

        pipeline = Pipeline(config=base)
    except (BundleError, ImportError) as exc:
        return {"skipped": f"real pipeline unavailable: {exc}"}
    import data_store

    src = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    objects = pipeline.process_instance(src).datasets  # what each study sends back (SR, SCs, PMs)
    cxr_port = free_port()
    orthanc = start_orthanc(work / "orthanc", cxr_ai_port=cxr_port, senders={"modality": "TESTSCU"})
    runs = []
    try:
        for quiet in quiet_values:
            for label, overrides in LATENCY_SETTINGS:
                cfg = load_config(env={})
                cfg["models"] = base["models"]
                cfg["listener"].update(port=cxr_port, allowed_calling_aes=["ORTHANC"], min_free_mb=0.0)
                tag = f"{quiet}-{len(runs)}"
                cfg["store"].update(root=str(work / f"var-{tag}"))
                if quiet is not None:
                    cfg["store"]["quiet_seconds"] = quiet
                for section, values in overrides.items():
                    cfg[section].update(values)
                cfg["http"].update(port=0)
                cfg["routing"]["destinations"] = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1",
                                                   "port": orthanc.dicom_port, "ae_title": "ORTHANC"}]
                # the source + every result object the pipeline makes of it (heatmaps for the
                # findings the model calls present, [outputs] heatmaps_for)
                expected = 1 + len(objects) if cfg["models"].get("explain", True) else 0
                lat, stages = _latency_run(lambda cfg=cfg: Service(cfg, pipeline_factory=lambda config=None: pipeline,
                                                           base_dir=work), orthanc, src, trials, work, tag,
                                           expected_in_orthanc=expected)
                heat = stages.pop(0)["heatmap_latencies"] if stages and "heatmap_latencies" in stages[0] else []
                q = statistics.quantiles(lat, n=20, method="inclusive")
                pipeline_mean = stages.pop()["pipeline_mean_s"] if stages and "pipeline_mean_s" in stages[-1] else None
                med = {k: statistics.median(st[k] for st in stages if st[k] is not None) for k in stages[0]}
                med["pipeline_mean_s"] = pipeline_mean
                runs.append({"quiet_seconds": cfg["store"]["quiet_seconds"], "settings": label,
                             "idle_start": cfg["workers"]["idle_start"], "seconds": lat,
                             "p50_s": statistics.median(lat), "p95_s": q[18], "median_stages_s": med,
                             "heatmaps_in_orthanc_seconds": heat,
                             "heatmaps_in_orthanc_p50_s": statistics.median(heat) if heat else None})
    finally:
        orthanc.stop()
    return {"trials": trials, "runs": runs, "goal_p50_s": 1.0, "bundle": bundle or "(default demo bundle)",
            "model": pipeline.model_info.label, "heatmaps_for": heatmaps_for,
            "result_objects_per_study": len(objects),
            "note": "C-STORE response from Orthanc -> Orthanc Lua routing job -> cxr-ai (quiet period, pipeline: "
                    "read, model, SR + FHIR built and queued = received_to_sr_queued_s; then Grad-CAM, SC, PM) -> "
                    "C-STORE of the SR back -> SR found by /tools/find (10 ms polls)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-receive", action="store_true", help="latency only (keeps the receive numbers on file)")
    p.add_argument("--bundle", default=None, help="model bundle directory (default: the demo bundle)")
    p.add_argument("--heatmaps-for", choices=("positive", "all"), default="positive",
                   help="[outputs] heatmaps_for of the latency runs (all: an SC and a PM for every finding)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"result file (default {RESULTS.relative_to(REPO)})")
    p.add_argument("--quiet", type=float, action="append", default=None,
                   help="quiet period(s) to measure latency with (default: the configured one)")
    args = p.parse_args(argv)
    if os.environ.get(NETNS_ENV) != "1" and shutil.which("unshare") and subprocess.run(
            ["unshare", "-rn", "true"], capture_output=True, check=False).returncode == 0:
        env = dict(os.environ, **{NETNS_ENV: "1"})
        script = 'ip link set lo up && exec "$0" "$@"'
        return subprocess.run(["unshare", "-rn", "sh", "-c", script, sys.executable, __file__,
                               *(argv if argv is not None else sys.argv[1:])], env=env, check=False).returncode
    with tempfile.TemporaryDirectory(prefix="bench-listener-", dir=REPO / "benchmarks") as tmp:
        work = Path(tmp)
        out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "private_netns": os.environ.get(NETNS_ENV) == "1"}}
        if args.skip_receive and RESULTS.is_file():
            out["receive"] = json.loads(RESULTS.read_text())["receive"]
        else:
            out["receive"] = bench_receive(args.n, args.rounds, work)
        if not args.skip_receive:
            out["associations"] = bench_associations(20, 3, work)
            a = out["associations"]
            print(f"association set-up (echoscu, one association each): cxr-ai {a['cxr_ai_ms_per_association']:.1f} "
                  f"ms vs dcmtk storescp {a['dcmtk_ms_per_association']:.1f} ms, ratio {a['ratio_cxr_ai_vs_dcmtk']:.2f}")
        elif RESULTS.is_file() and "associations" in json.loads(RESULTS.read_text()):
            out["associations"] = json.loads(RESULTS.read_text())["associations"]
        r = out["receive"]
        print(f"receive {args.n} x RG1_UNCR: cxr-ai {r['cxr_ai_mb_s']:.0f} MB/s, dcmtk storescp "
              f"{r['dcmtk_storescp_mb_s']:.0f} MB/s, ratio {r['ratio_cxr_ai_vs_dcmtk']:.2f} (goal >= 0.8); "
              f"per instance {r['cxr_ai_ms_per_instance']:.0f} ms (handler {r['cxr_ai_handler_ms_per_instance']:.0f} ms) "
              f"vs {r['dcmtk_ms_per_instance']:.0f} ms; round ratios "
              + " ".join(f"{x:.2f}" for x in r.get("round_ratios", [])))
        if not args.skip_latency:
            quiet_values = args.quiet or [None]
            out["latency"] = bench_latency(args.trials, work, bundle=args.bundle, quiet_values=quiet_values,
                                           heatmaps_for=args.heatmaps_for)
            lat = out["latency"]
            if "skipped" in lat:
                print(f"latency: skipped ({lat['skipped']})")
            for run in lat.get("runs", []):
                print(f"latency last C-STORE -> SR in Orthanc ({run['settings']}, quiet period "
                      f"{run['quiet_seconds']} s): "
                      f"p50 {run['p50_s']:.2f} s, p95 {run['p95_s']:.2f} s over {lat['trials']} studies "
                      f"(goal p50 <= 1.0 s); median stages: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in run["median_stages_s"].items() if v is not None))
                if run.get("heatmaps_in_orthanc_p50_s") is not None:
                    print(f"  last C-STORE -> every heatmap object in Orthanc: p50 {run['heatmaps_in_orthanc_p50_s']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
