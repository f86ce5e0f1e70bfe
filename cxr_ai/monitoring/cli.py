"""``cxr-ai truth`` and ``cxr-ai monitor``: ground truth in, one monitor update out.

Thin: arguments and console output; the work is in :mod:`cxr_ai.monitoring`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MSG_NO_FILE = "{path}: no such file; give the ground-truth CSV (or FHIR JSON) to load."
MSG_NO_URL = ("no FHIR server to poll: pass --url or set [monitoring] fhir_truth_url in the site config.")


def add_monitoring_parsers(subparsers: Any) -> None:
    """Add ``truth`` and ``monitor`` to the ``cxr-ai`` sub-parsers."""
    p = subparsers.add_parser("truth", help="load ground truth for the performance monitor",
                              description="Append ground truth to the monitor's truth log. A running "
                              "service notices it and updates the monitor within [monitoring] "
                              "truth_check_seconds.")
    tsub = p.add_subparsers(dest="truth_command", metavar="ACTION")
    t = tsub.add_parser("load", help="load a CSV (study_uid or patient_id/patient_key; cardiomegaly, "
                                     "low_ef and/or lvef) or a FHIR Observation / Bundle JSON file")
    t.add_argument("file", help="CSV, or .json FHIR Observation/Bundle, or .ndjson of Observations")
    t.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    t.add_argument("--source", default="csv", help="source name recorded with CSV rows (default csv)")
    t.set_defaults(func=_cmd_truth_load)
    t = tsub.add_parser("poll-fhir", help="search the FHIR server once for confirmed LVEF / cardiomegaly "
                                          "Observations")
    t.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    t.add_argument("--url", default=None, help="FHIR base URL (default: [monitoring] fhir_truth_url)")
    t.set_defaults(func=_cmd_truth_poll)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    p = subparsers.add_parser("monitor", help="run one performance monitor update; print flagged gaps and drift",
                              description="Join the prediction log with the ground truth over the rolling "
                              "window, evaluate per subgroup, append to the performance log and print the "
                              "window's flagged gaps and drift alerts. Exit status 0 either way.")
    p.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    p.add_argument("--json", action="store_true", help="print the whole performance record as JSON")
    p.set_defaults(func=_cmd_monitor)


def _truth_store(config: dict[str, Any]) -> Any:
    from cxr_ai.monitoring.log import monitoring_dir
    from cxr_ai.monitoring.truth import TruthStore

    return TruthStore(monitoring_dir(config) / config.get("monitoring", {}).get("truth_log", "truth.jsonl"))


def _cmd_truth_load(args: argparse.Namespace) -> int:
    from cxr_ai.config import load_settings
    from cxr_ai.monitoring.log import resolve_pseudonym_key
    from cxr_ai.monitoring.truth import truth_from_csv, truth_from_fhir

    path = Path(args.file)
    if not path.is_file():
        print(MSG_NO_FILE.format(path=path), file=sys.stderr)
        return 2
    config = load_settings(args.config).config
    mon = config.get("monitoring", {})
    key = resolve_pseudonym_key(config)
    cutoff = float(mon.get("lvef_cutoff", 40.0))
    try:
        if path.suffix.lower() == ".json":
            records = truth_from_fhir(path.read_text(encoding="utf-8"), key=key, lvef_cutoff=cutoff)
        elif path.suffix.lower() == ".ndjson":
            records = [r for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
                       for r in truth_from_fhir(line, key=key, lvef_cutoff=cutoff)]
        else:
            records = truth_from_csv(path, key=key, lvef_cutoff=cutoff, source=args.source)
    except ValueError as exc:  # a bad CSV (columns) or an invalid FHIR resource (pydantic)
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    store = _truth_store(config)
    n = store.add(records)
    by: dict[str, int] = {}
    for r in records:
        by[r["finding"]] = by.get(r["finding"], 0) + 1
    detail = ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none"
    print(f"loaded {n} truth records ({detail}) into {store.path}")
    return 0


def _cmd_truth_poll(args: argparse.Namespace) -> int:
    from cxr_ai.config import load_settings
    from cxr_ai.monitoring.runner import poller_from_config

    settings = load_settings(args.config)
    config = settings.config
    mon = config.get("monitoring", {})
    url = args.url or mon.get("fhir_truth_url")
    if not url:
        print(MSG_NO_URL, file=sys.stderr)
        return 2
    token = settings.secrets.get(str(mon["fhir_truth_token_env"]), "") if mon.get("fhir_truth_token_env") else ""
    poller = poller_from_config(config, url=url, store=_truth_store(config), token=token)
    import requests

    try:
        n = poller.poll()
    except requests.RequestException as exc:
        print(f"polling {url} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{n} new truth records from {url}")
    return 0


def format_alerts(record: dict[str, Any]) -> list[str]:
    """Console lines for a performance record: the window, flagged gaps, drift."""
    lines = [f"window: {record['window_days']:g} days to {record['computed_at']}; "
             f"{record['n_predictions']} predictions"]
    for f, m in sorted(record.get("truth_match", {}).items()):
        lines.append(f"  truth {f}: {m['by_study'] + m['by_patient_window']} matched "
                     f"({m['by_study']} by study, {m['by_patient_window']} by patient within the window), "
                     f"{m['unmatched_truth']} unmatched"
                     + (f", {m['ambiguous_truth']} left out (a Study UID of several patients, no patient key)"
                        if m.get("ambiguous_truth") else ""))
    gaps = [a for a in record.get("alerts", []) if a["kind"] == "gap"]
    drift = [a for a in record.get("alerts", []) if a["kind"] == "drift"]
    lines.append(f"flagged gaps: {len(gaps)}")
    for a in gaps:
        lo, hi = a["ci"]
        lines.append(f"  GAP {a['finding']} {a['attribute']}={a['group']} {a['metric']}: "
                     f"{a['difference']:+.3f} vs overall (CI {lo:+.3f} to {hi:+.3f})")
    lines.append(f"drift alerts: {len(drift)}")
    for a in drift:
        lines.append(f"  DRIFT {a['finding']} {a['attribute']}={a['group']}: KS {a['ks_statistic']:.3f}, "
                     f"p = {a['p_value']:.2g} (n {a['n_current']} now, {a['n_reference']} before)")
    return lines


def _cmd_monitor(args: argparse.Namespace) -> int:
    from cxr_ai.config import load_settings
    from cxr_ai.monitoring.performance import PerformanceMonitor

    config = load_settings(args.config).config
    record = PerformanceMonitor.from_config(config).update()
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        print("\n".join(format_alerts(record)))
    return 0
