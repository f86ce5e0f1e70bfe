"""The hardening report: runs the hardening tests (recording their per-case results) and the
load benchmark, then writes ``benchmarks/results/hardening.json`` and ``hardening.md``.

    .venv/bin/python benchmarks/hardening_report.py            # tests + full 20 x 50 load
    .venv/bin/python benchmarks/hardening_report.py --load 8x25  # smaller load run
    .venv/bin/python benchmarks/hardening_report.py --from DIR  # only assemble recorded results
    .venv/bin/python benchmarks/hardening_report.py --network-only  # rerun the network attacks only,
                                                                    # keeping the rest of the last report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TESTS = ["tests/test_hardening_inputs.py", "tests/test_hardening_fuzz.py", "tests/test_hardening_faults.py",
         "tests/test_hardening_security.py", "tests/test_hardening_network.py"]
#: The network attacks of tests/test_hardening_network.py, by the name each records under.
NETWORK = {
    "net_slow_idle": "40 slow and idle connections from one address",
    "net_share_recovery": "one address fills its share; a sender on that address",
    "net_pdu_claims": "PDU headers claiming 1 GiB / 4 GiB",
    "net_deflate_bomb": "deflate bomb (2 MB -> 2 GiB)",
    "net_deflate_damage": "damaged deflate streams",
    "net_deep_sequences": "sequences nested 250 deep",
    "net_cut_transfers": "5 transfers of 40 MB cut short",
    "net_disk_full": "spool below the watermark mid-transfer",
    "net_disk_enospc": "disk full (ENOSPC) mid-transfer",
    "net_sigterm": "SIGTERM with hostile peers",
}


def network_rows(rec: Path) -> list[dict]:
    """One row per network attack: what it was, whether it held, peak memory growth of the
    service and seconds until it served again (where the test measured them)."""
    rows = []
    for name, title in NETWORK.items():
        p = rec / f"{name}.json"
        data = json.loads(p.read_text()) if p.exists() else None
        rows.append({"attack": title, "recorded": data is not None,
                     "peak_rss_growth_mib": (data or {}).get("peak_rss_growth_mib"),
                     "time_to_recover_s": (data or {}).get("time_to_recover_s",
                                                           (data or {}).get("exited_after_s")),
                     "detail": data})
    return rows


def assemble(rec: Path) -> dict:
    def load(name: str) -> dict | None:
        p = rec / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    cstore, batch = load("cstore_corpus"), load("batch_corpus")
    faults = [x for x in (load(n) for n in ("fault_fhir", "fault_disk", "fault_jobstore", "fault_model")) if x]
    out = {
        "bad_inputs": {
            "cases": cstore["cases"] if cstore else None,
            "sent_over_cstore": cstore["sendable"] if cstore else None,
            "crashes": 0 if cstore and batch else None,
            "cstore_mismatches": sum(not r["ok"] for r in cstore["rows"]) if cstore else None,
            "batch_mismatches": sum(not r["ok"] for r in batch["rows"]) if batch else None,
            "per_case": [{"case": r["case"], "expected": r["expected"], "cstore": r.get("cstore", ""),
                          "listener": r["outcome"],
                          "batch": next((b["outcome"] for b in batch["rows"] if b["case"] == r["case"]), None)
                          if batch else None} for r in (cstore["rows"] if cstore else [])],
        },
        "faults": {"injected": faults, "studies_lost": sum(f.get("lost", 0) for f in faults),
                   "covered_elsewhere": ["SIGKILL during receive and processing + restart, SIGTERM re-queue, "
                                         "PACS down -> outbox drains, dead letters: tests/test_service.py"]},
        "load": load("load"),
        "security": {k: load(k) for k in ("security_paths", "security_phi")}
        | {"unknown_ae_and_tls": "tests/test_net.py (refused at association; TLS with a throwaway CA)"},
        "network": network_rows(rec),
    }
    return out


def markdown(r: dict) -> str:
    b, f, ld, s = r["bad_inputs"], r["faults"], r["load"], r["security"]
    lines = ["# Hardening report", "",
             f"- Bad inputs tried: {b['cases']} ({b['sent_over_cstore']} over C-STORE, all through batch); "
             f"crashes: {b['crashes']}; outcome mismatches: listener {b['cstore_mismatches']}, batch "
             f"{b['batch_mismatches']}",
             f"- Faults injected: {sum(len(x.get('faults', [x.get('fault')])) for x in f['injected'])}; "
             f"studies lost: {f['studies_lost']}"]
    if ld:
        lines.append(f"- Load: {ld['associations']} associations x {ld['instances_per_association']} instances "
                     f"({ld['image_size']} px): stored {ld['stored_pct']:.0f}%, processed {ld['processed_pct']:.0f}%, "
                     f"peak RSS {ld['peak_rss_mib']} MiB; C-ECHO answered {ld['echo_while_queue_deep']['answered']}/"
                     f"{ld['echo_while_queue_deep']['probes']} while the queue was deep "
                     f"(max depth {ld['echo_while_queue_deep']['max_queue_depth']} studies)")
    lines.append(f"- Security: PHI/token leaks {s['security_phi']['leaks'] if s.get('security_phi') else 'n/a'}; "
                 f"files outside the spool from hostile UIDs "
                 f"{s['security_paths']['files_outside_spool'] if s.get('security_paths') else 'n/a'}")
    net = r.get("network") or []
    held = [n for n in net if n["recorded"]]
    lines.append(f"- Network attacks held: {len(held)} of {len(net)} (a missing one failed or was skipped)")
    lines += ["", "| network attack | held | peak memory growth (MiB) | served again after (s) |", "|---|---|---|---|"]
    lines += [f"| {n['attack']} | {'yes' if n['recorded'] else 'NO'} | "
              f"{'' if n['peak_rss_growth_mib'] is None else n['peak_rss_growth_mib']} | "
              f"{'' if n['time_to_recover_s'] is None else n['time_to_recover_s']} |" for n in net]
    lines += ["", "| case | expected | C-STORE | listener | batch |", "|---|---|---|---|---|"]
    lines += [f"| {c['case']} | {c['expected']} | {c['cstore']} | {c['listener']} | {c['batch']} |"
              for c in b["per_case"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the hardening tests and load benchmark; write the report.")
    p.add_argument("--load", default="20x50", help="associations x instances (default 20x50; 'none' to skip)")
    p.add_argument("--from", dest="src", default=None, help="assemble from an existing results folder only")
    p.add_argument("--network-only", action="store_true",
                   help="run tests/test_hardening_network.py only and replace the network part of the last report")
    args = p.parse_args(argv)
    rec = Path(args.src) if args.src else Path(tempfile.mkdtemp(prefix="cxr-ai-hardening-"))
    rc = 0
    if args.network_only:
        import os

        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_hardening_network.py"], cwd=REPO,
                            env={**os.environ, "CXR_AI_HARDENING_OUT": str(rec)}).returncode
        report = json.loads((RESULTS / "hardening.json").read_text())
        report["network"] = network_rows(rec)
        (RESULTS / "hardening.json").write_text(json.dumps(report, indent=1))
        (RESULTS / "hardening.md").write_text(markdown(report))
        print(markdown(report).split("\n| case")[0])
        return rc
    if not args.src:
        env = {"CXR_AI_HARDENING_OUT": str(rec)}
        import os

        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                            cwd=REPO, env={**os.environ, **env}).returncode
        if args.load != "none":
            n, m = (int(x) for x in args.load.split("x"))
            rc |= subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_load.py"), "--assocs", str(n),
                                  "--instances", str(m), "--json", str(rec / "load.json")], cwd=REPO).returncode
    report = assemble(rec)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hardening.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "hardening.md").write_text(markdown(report))
    print(markdown(report).split("\n| case")[0])
    return rc


if __name__ == "__main__":
    sys.exit(main())
