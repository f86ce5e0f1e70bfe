"""Web page latency with a large worklist: p50 / p95 of the worklist page, the live-update check
(``/api/worklist/version``, every 3 s per open page) and the rows fetch that follows a change
(the rows are ranked once per change and shared by every open page; ``*_after_change`` times
the request that pays for that re-ranking).

    python benchmarks/bench_web.py                  # 10,000 studies
    python benchmarks/bench_web.py --studies 1000   # quick

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
    from cxr_ai.web.app import WebContext
    from cxr_ai.web.settings import WebSettings
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
    for i in range(n):
        t = now - rng.uniform(0, 6 * 3600)
        wl.upsert_study(f"2.25.{i}", [{"key": "cardiomegaly", "probability": rng.random(), "threshold": 0.5},
                                      {"key": "low_ef", "probability": rng.random() * 0.8, "threshold": 0.6}],
                        received_at=t, accession=f"A{i:08d}", job_id=f"J{i:012x}",
                        demographics={"name": f"PATIENT^{i}", "id": f"P{i:07d}", "age": 60.0, "sex": "F"})
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/web.json")
    args = p.parse_args(argv)
    from starlette.testclient import TestClient

    from cxr_ai.web.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        ctx = build(Path(tmp), args.studies)
        client = TestClient(create_app(ctx))
        assert client.get("/").status_code == 200
        ranking = timed(lambda: ctx.worklist.ranked(include_not_applicable=True), args.reps)
        page = timed(lambda: client.get("/", params={"page": 3}), args.reps)
        version = timed(lambda: client.get("/api/worklist/version"), args.reps)
        rows = timed(lambda: client.get("/worklist/rows", params={"page": 3}), args.reps)
        flip = iter(range(10**9))

        def change() -> None:
            i = next(flip)
            ctx.worklist.mark_read(f"2.25.{i % args.studies}", read=i % 2 == 0)

        rows_changed = timed(lambda: client.get("/worklist/rows", params={"page": 3}), args.reps, before=change)
        page_changed = timed(lambda: client.get("/", params={"page": 3}), args.reps, before=change)
        ctx.close()
    result = {"studies": args.studies, "reps": args.reps, "machine": machine_info(),
              "ranking_only": ranking, "worklist_page": page, "update_check": version, "rows_fetch": rows,
              "rows_fetch_after_change": rows_changed, "worklist_page_after_change": page_changed,
              "note": "worklist_page / rows_fetch: no change since the last request (rows cached); *_after_change: "
                      "a study changed just before (full re-rank)",
              "page_over_ranking_p50": page["p50_ms"] / ranking["p50_ms"]}
    for k in ("ranking_only", "worklist_page", "update_check", "rows_fetch", "rows_fetch_after_change",
              "worklist_page_after_change"):
        print(f"{k:27s} p50 {result[k]['p50_ms']:8.1f} ms   p95 {result[k]['p95_ms']:8.1f} ms")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
