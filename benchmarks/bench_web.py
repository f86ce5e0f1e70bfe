"""Web page latency with a large worklist: p50 / p95 of the worklist page, the live-update check
(``/api/worklist/version``, every 3 s per open page) and the rows fetch that follows a change
(the rows are ranked once per change and shared by every open page; ``*_after_change`` times
the request that pays for that re-ranking).

    python benchmarks/bench_web.py                  # 10,000 studies
    python benchmarks/bench_web.py --studies 1000   # quick
    python benchmarks/bench_web.py --studies 0 --receive 20 --page ops --out benchmarks/results/web_ops.json
                                                    # receive cost of an open operations page

The requests go through the whole Starlette app (routing, session, templates) in process via
httpx; the socket and uvicorn are not timed. Each figure is also given relative to one plain
ranking of the same worklist (``Worklist.ranked``) measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_result  # noqa: E402


def build(root: Path, n: int, *, seed: int = 0):
    from cxr_ai.store.jobs import JobStore
    from cxr_ai.store.spool import Spool
    from cxr_ai.service.web.app import WebContext
    from cxr_ai.service.web.settings import WebSettings
    from cxr_ai.worklist import Worklist

    rng = random.Random(seed)
    store = JobStore(root / "jobs.sqlite3", synchronous="normal")
    wl = Worklist(root / "worklist.sqlite3")
    now = time.time()
    conn = store._conn()
    conn.execute("BEGIN")
    for i in range(n):
        t = now - rng.uniform(0, 6 * 3600)
        conn.execute("INSERT INTO studies (study_key, study_uid, job_id, state, created_at, updated_at, last_received_at)"
                     " VALUES (?,?,?,?,?,?,?)", (f"k{i}", f"2.25.{i}", f"J{i:012x}", "done", t, t, t))
    conn.execute("COMMIT")
    wl.close()
    _fill_worklist(root / "worklist.sqlite3", n)
    wl = Worklist(root / "worklist.sqlite3")
    settings = WebSettings(enabled=True, host="127.0.0.1", users_file=root / "users.toml",
                           secret_file=root / "secret", audit_log=root / "audit.jsonl", feedback_db=root / "fb.sqlite3")
    ctx = WebContext(settings=settings, store=store, spool=Spool(root / "spool"), worklist=wl, truth=None,
                     pseudonym_key=b"k" * 32, health=lambda: {"status": "ok"}, status=lambda: {}, metrics=lambda: b"")
    return ctx


def timed(fn, reps: int, *, before=None) -> dict[str, float]:
    fn()  # warm-up
    xs = []
    for _ in range(reps):
        if before is not None:
            before()  # untimed: e.g. a study changes, so the next request re-ranks
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    xs.sort()
    return {"p50_ms": 1000 * statistics.median(xs), "p95_ms": 1000 * xs[min(len(xs) - 1, int(0.95 * len(xs)))]}


class _NoPipeline:
    """Takes studies and returns no outcomes at once (the receive path is what is measured)."""

    def __init__(self, *, config=None) -> None:  # noqa: ANN001
        pass

    def process_study(self, paths, *, on_results=None):  # noqa: ANN001, ANN201
        return []


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


WORKLIST_FOR_RECEIVE = 10_000


def _fill_worklist(path: Path, n: int) -> None:
    """``n`` worklist entries written in one transaction (fast; same rows as the listener's)."""
    import json as _json

    from cxr_ai.worklist import Worklist

    rng = random.Random(1)
    now = time.time()
    with Worklist(path) as wl:
        rows = [(f"2.25.{i}", now - rng.uniform(0, 6 * 3600), f"A{i:08d}", "",
                 _json.dumps({"cardiomegaly": {"key": "cardiomegaly", "probability": p, "threshold": 0.5,
                                               "positive": p >= 0.5},
                              "low_ef": {"key": "low_ef", "probability": 0.8 * (1 - p), "threshold": 0.6,
                                         "positive": 0.8 * (1 - p) >= 0.6}}), "[]", now, f"J{i:012x}",
                 _json.dumps({"name": f"PATIENT^{i}", "id": f"P{i:07d}", "age": 60.0, "sex": "F"}))
                for i, p in ((i, rng.random()) for i in range(n))]
        wl._db.execute("BEGIN")
        wl._db.executemany("INSERT INTO studies (study_uid, received_at, accession, patient_key, findings_json,"
                           " reports_json, updated_at, job_id, demographics_json) VALUES (?,?,?,?,?,?,?,?,?)", rows)
        wl._db.execute("COMMIT")


#: What an open page polls: the worklist page (live-update check, page, rows) or the
#: operations page (its panel: health, queues, plots, fairness; the service renders it at
#: most once per 5 s, whoever polls).
POLLED = {"worklist": ("/api/worklist/version", "/", "/worklist/rows"), "ops": ("/ops/panel",)}


def receive_variant(web: bool, files: list[Path], root: Path, *, page: str = "worklist") -> dict:
    """One service (listener + workers + routing, and the pages when ``web``) receiving ``files``
    by dcmtk storescu; with the pages on, a client polls them as open pages do (faster)."""
    import shutil
    import threading
    import urllib.request

    from bench_listener import storescu

    from cxr_ai.config import load_config
    from cxr_ai.service import Service

    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(env={})
    cfg["listener"].update(port=0, allowed_calling_aes=["STORESCU"], min_free_mb=0.0)
    cfg["store"].update(root=str(root / "var"), quiet_seconds=60.0)
    cfg["routing"].update(destinations=[])
    cfg["http"].update(enabled=web, port=0)
    _fill_worklist(root / "var" / "worklist.sqlite3", WORKLIST_FOR_RECEIVE)
    rss0 = _rss_mib()
    svc = Service(cfg, pipeline_factory=_NoPipeline, base_dir=root)
    svc.start()
    stop = threading.Event()
    polls = [0]

    def poll() -> None:
        base = svc.http_url
        while not stop.is_set():
            for path in POLLED[page]:
                with urllib.request.urlopen(base + path.lstrip("/"), timeout=30) as r:
                    r.read()
                polls[0] += 1
            stop.wait(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        if web:  # the page is open before the studies come (its first view ranks the worklist)
            with urllib.request.urlopen(svc.http_url + POLLED[page][-1].lstrip("/"), timeout=60) as r:
                r.read()
            poller.start()
        seconds = storescu(svc.dicom_port, files, "CXR_AI")
        assert len(svc.store.instances()) == len(files)
        rss = _rss_mib()
    finally:
        stop.set()
        if web:
            poller.join(30)
        svc.stop(grace=2.0)
    return {"seconds": seconds, "rss_mib_after": rss, "rss_mib_added_by_service": rss - rss0, "page_requests": polls[0]}


def bench_receive(n: int, rounds: int, work: Path, *, page: str = "worklist") -> dict:
    """Receive with and without the pages, alternating, each variant in a fresh process."""
    import json as _json
    import subprocess

    from bench_listener import make_copies

    import data_store

    files = make_copies(Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm", work / "files", n)
    listing = work / "files.txt"
    listing.write_text("\n".join(map(str, files)))
    runs: dict[str, list[dict]] = {"without_pages": [], "with_pages": []}
    for r in range(rounds + 1):
        for variant in ("without_pages", "with_pages"):
            subprocess.run(["sync"], check=False)
            out = subprocess.run([sys.executable, __file__, "--receive-variant", variant, "--files", str(listing),
                                  "--work", str(work / variant), "--page", page], capture_output=True, text=True,
                                 check=True)
            if r:  # the first round warms the page cache and imports
                runs[variant].append(_json.loads(out.stdout.strip().splitlines()[-1]))
    med = {v: statistics.median(x["seconds"] for x in runs[v]) for v in runs}
    rss = {v: statistics.median(x["rss_mib_after"] for x in runs[v]) for v in runs}
    return {"page": page, "polled": list(POLLED[page]), "n": n, "rounds": rounds, "object_mb": round(files[0].stat().st_size / 1e6, 2), "runs": runs,
            "median_seconds": med, "median_rss_mib": rss,
            "receive_with_over_without_pages": med["without_pages"] / med["with_pages"],
            "rss_ratio_with_over_without": rss["with_pages"] / rss["without_pages"]}


def bench_pages(studies: int, reps: int) -> dict:
    from starlette.testclient import TestClient

    from cxr_ai.service.web.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        ctx = build(Path(tmp), studies)
        ctx.rows.min_interval = 0.0  # every change re-ranks (the service's 3 s floor would hide the cost)
        client = TestClient(create_app(ctx))
        assert client.get("/").status_code == 200
        ranking = timed(lambda: ctx.worklist.ranked(include_not_applicable=True), reps)
        page = timed(lambda: client.get("/", params={"page": 3}), reps)
        version = timed(lambda: client.get("/api/worklist/version"), reps)
        rows = timed(lambda: client.get("/worklist/rows", params={"page": 3}), reps)
        flip = iter(range(10**9))

        def change() -> None:
            i = next(flip)
            ctx.worklist.mark_read(f"2.25.{i % studies}", read=i % 2 == 0)

        rows_changed = timed(lambda: client.get("/worklist/rows", params={"page": 3}), reps, before=change)
        page_changed = timed(lambda: client.get("/", params={"page": 3}), reps, before=change)
        ctx.close()
    return {"ranking_only": ranking, "worklist_page": page, "update_check": version, "rows_fetch": rows,
            "rows_fetch_after_change": rows_changed, "worklist_page_after_change": page_changed,
            "note": "worklist_page / rows_fetch: no change since the last request (rows cached); *_after_change: "
                    "a study changed just before (full re-rank)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/web.json")
    p.add_argument("--receive", type=int, default=0, metavar="N",
                   help="also: N x RG1 (7.2 MB) received with and without the pages open (0 = skip)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--page", choices=tuple(POLLED), default="worklist",
                   help="which open page polls while receiving: the worklist, or the operations page")
    p.add_argument("--receive-variant", choices=("with_pages", "without_pages"), help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.receive_variant:
        import json as _json

        files = [Path(x) for x in Path(args.files).read_text().split("\n") if x]
        print(_json.dumps(receive_variant(args.receive_variant == "with_pages", files, Path(args.work),
                                          page=args.page)))
        return 0
    pages = bench_pages(args.studies, args.reps) if args.studies > 0 else None
    receive = None
    if args.receive:
        with tempfile.TemporaryDirectory() as tmp:
            receive = bench_receive(args.receive, args.rounds, Path(tmp), page=args.page)
        print(f"receive {args.receive} x RG1 ({args.page} page): without pages {receive['median_seconds']['without_pages']:.2f} s, "
              f"with pages polled {receive['median_seconds']['with_pages']:.2f} s "
              f"(throughput ratio {receive['receive_with_over_without_pages']:.2f}); RSS "
              f"{receive['median_rss_mib']['without_pages']:.0f} -> {receive['median_rss_mib']['with_pages']:.0f} MiB")
    result = {"studies": args.studies, "reps": args.reps, "machine": machine_info(), "pages": pages,
              "receive": receive}
    for k, v in (pages or {}).items():
        if isinstance(v, dict):
            print(f"{k:27s} p50 {v['p50_ms']:8.1f} ms   p95 {v['p95_ms']:8.1f} ms")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
