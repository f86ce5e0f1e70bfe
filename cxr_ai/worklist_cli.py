"""``cxr-ai worklist``: show, load and export the triage worklist (:mod:`cxr_ai.worklist`).

The console output of the command lives here; the worklist module itself only logs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from cxr_ai.errors import ConfigError
from cxr_ai.worklist import MSG_NO_DB, TriagePolicy, Worklist, load_results_table


def add_worklist_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``worklist`` sub-command to a ``cxr-ai`` sub-parser set."""
    p = subparsers.add_parser("worklist", help="show / export the triage worklist (CSV, JSON, FHIR Tasks)")
    _fill_parser(p)
    p.set_defaults(func=_cmd_worklist)
    return p


def _fill_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="", help="worklist database (default: [worklist] path)")
    p.add_argument("--config", default=None, help="site config TOML")
    p.add_argument("--load", default=None, help="add the processed studies of a batch results.csv/.parquet")
    p.add_argument("--csv", default=None, help="write the ranked list as CSV")
    p.add_argument("--json", default=None, help="write the ranked list as JSON")
    p.add_argument("--fhir", default=None, help="write a FHIR R4 Bundle of Tasks (one per study and patient)")
    p.add_argument("--mark-read", action="append", default=[],
                   help="Study Instance UID read (repeatable): every entry of that UID, one per patient")
    p.add_argument("--limit", type=int, default=20, help="rows to print (default 20)")


def _cmd_worklist(args: argparse.Namespace) -> int:
    from cxr_ai.config import load_settings

    cfg = load_settings(args.config).config
    path = args.db or str(cfg.get("worklist", {}).get("path", "") or "")
    if not path:
        raise ConfigError(MSG_NO_DB)
    with Worklist(path, policy=TriagePolicy.from_config(cfg)) as wl:
        if args.load:
            n = load_results_table(wl, args.load)
            print(f"loaded {n} studies from {args.load}")
        for uid in args.mark_read:
            n = wl.mark_read(uid)
            if n == 0:
                print(f"note: no worklist entry has Study Instance UID {uid}; nothing marked read", file=sys.stderr)
            elif n > 1:
                print(f"note: Study Instance UID {uid} is shared by {n} patients' entries; all {n} marked read")
        if args.csv:
            wl.export_csv(args.csv)
        if args.json:
            wl.export_json(args.json)
        if args.fhir:
            wl.export_fhir(args.fhir)
        for r in wl.ranked()[: args.limit]:
            pos = ",".join(k for k, f in sorted(r.findings.items()) if f["positive"]) or "-"
            print(f"{r.rank:4d} {r.priority.value:8s} score={r.score:.3f} wait={r.wait_minutes:7.1f} min "
                  f"{pos:20s} {r.study_uid}")
    return 0


def worklist_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxr-ai worklist", description="The triage worklist.")
    _fill_parser(parser)
    args = parser.parse_args(argv)
    try:
        return _cmd_worklist(args)
    except ConfigError as exc:
        print(f"cxr-ai worklist: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(worklist_main())
