"""The ``serve``, ``jobs`` and ``demo`` commands: argument parsing and console output for the
listener. The service itself is :mod:`cxr_ai.service`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxr_ai.config import load_settings
from cxr_ai.errors import ConfigError
from cxr_ai.results import format_probability
from cxr_ai.service.wiring import JsonLogFormatter, Service, configure_logging, run_service, validate_config
from cxr_ai.store.jobs import DeliveryState, InstanceState, JobStore, StudyState
from cxr_ai.store.listing import reused_uid_counts, shared_study_jobs, study_listing

logger = logging.getLogger(__name__)

def _fill_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)  # tests: written once listening


def _fill_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    p.add_argument("--retry-dead", action="store_true", help="put dead-lettered deliveries back in the queue")
    p.add_argument("--destination", default=None, help="only this destination (with --retry-dead)")
    p.add_argument("--state", action="append", default=None, choices=[s.value for s in StudyState],
                   help="list the studies in this state, with their reasons (repeatable; e.g. failed)")
    p.add_argument("--since", default=None, type=_since,
                   help="only studies updated since then: an ISO date/time (UTC if no zone) or an age "
                   "such as 30m, 24h, 7d")
    p.add_argument("--json", action="store_true", help="print the listing as JSON lines")


def _fill_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=4, help="number of phantom studies (default 4)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--out", default=None, help="folder for everything (default: a new temp folder)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for results")
    p.add_argument("--serve", action="store_true",
                   help="keep the listener and the web pages running after the demo (Ctrl-C stops)")
    p.add_argument("--http-port", type=int, default=8780, help="web port with --serve (default 8780; 0 = any free)")


def add_service_parsers(subparsers: Any) -> None:
    """Add ``serve``, ``jobs`` and ``demo`` to a ``cxr-ai`` sub-parser set (``cxr_ai.cli``)."""
    p = subparsers.add_parser("serve", help="run the DICOM listener service (C-STORE in, results out)",
                              description="Run the DICOM listener: receive studies, process them, send "
                              "results. Starts with embedded defaults when no --config is given.")
    _fill_serve(p)
    p.set_defaults(func=_cmd_serve)
    p = subparsers.add_parser("jobs", help="show the listener's job store; retry dead-lettered deliveries")
    _fill_jobs(p)
    p.set_defaults(func=_cmd_jobs)
    p = subparsers.add_parser("demo", help="phantom studies -> listener -> results, with the triage order",
                              description="Generate phantom studies, send them to a listener started for "
                              "the purpose, wait for the results and print the triage order.")
    _fill_demo(p)
    p.set_defaults(func=_cmd_demo)


def _service_logging(args: argparse.Namespace) -> None:
    """Under ``cxr-ai``: the service logs at INFO by default; ``--log-json`` switches format."""
    root = logging.getLogger()
    if not root.handlers:
        configure_logging(verbosity=getattr(args, "verbose", 0), json_lines=args.log_json)
        return
    if args.log_json:
        for h in root.handlers:
            h.setFormatter(JsonLogFormatter())
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    if getattr(args, "verbose", 0) < 2:
        for name in ("pynetdicom", "highdicom"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _cmd_serve(args: argparse.Namespace) -> int:
    _service_logging(args)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2

    def ready(service: Service) -> None:
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(json.dumps({"dicom_port": service.dicom_port, "http_port": service.http_port,
                                       "pid": os.getpid()}))
            os.replace(tmp, args.ready_file)

    try:
        # A TMPDIR the environment sets is kept; otherwise temporary files go to the spool.
        return run_service(settings.config, secrets=settings.secrets, base_dir=settings.base_dir, ready=ready,
                           own_tempdir=not os.environ.get("TMPDIR"))
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2


MSG_BAD_SINCE = ("--since {value!r} is neither an ISO date/time (2026-12-06 or 2026-12-06T08:00) nor an age "
                 "(a number followed by s, m, h or d, e.g. 24h)")
_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _since(value: str) -> float:
    """``--since``: an ISO date/time (UTC when it has no zone) or an age like ``24h``; epoch seconds."""
    import datetime as dt
    import time

    text = value.strip()
    if text[:-1].replace(".", "", 1).isdigit() and text[-1:].lower() in _AGE_UNITS:
        return time.time() - float(text[:-1]) * _AGE_UNITS[text[-1].lower()]
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(MSG_BAD_SINCE.format(value=value)) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _cmd_jobs(args: argparse.Namespace) -> int:
    loaded = load_settings(args.config)
    settings = validate_config(loaded.config, base_dir=loaded.base_dir, secrets=loaded.secrets)
    store = JobStore(settings.db_path)
    try:
        if args.retry_dead:
            from cxr_ai.ops import requeue_dead
            from cxr_ai.service.web.settings import WebSettings

            n = requeue_dead(store, audit_path=WebSettings.for_service(loaded.config, settings).audit_log,
                             destination=args.destination)
            print(f"{n} dead-lettered deliveries queued again")
        print(json.dumps(store.counts(), indent=1))
        for d in store.deliveries(state=DeliveryState.DEAD):
            print(f"DEAD job {d.job_id} -> {d.destination}: {d.attempts} attempts; last error: {d.last_error}")
        reused = reused_uid_counts(store)
        shared = shared_study_jobs(store)
        if args.state or args.since is not None:
            states = [StudyState(s) for s in args.state] if args.state else None
            for study in store.studies(state=states, since=args.since):
                row = study_listing(study, reused=reused.get(study.study_key, 0), shared=study.job_id in shared)
                row["study_uid"] = study.study_uid
                if args.json:
                    print(json.dumps(row))
                else:
                    print(f"{row['state'].upper():<15} job {row['job_id']}  {row['updated']}  study {study.study_uid}"
                          + (f"  [{row['reason_code']}] {row['reason']}" if row["reason_code"] or row["reason"] else "")
                          + (f"  ({reused[study.study_key]} instance(s) with a reused SOP Instance UID)"
                             if study.study_key in reused else "")
                          + ("  (Study Instance UID also received for another patient)" if study.job_id in shared
                             else ""))
        else:
            if reused:
                jobs = {s.study_key: s.job_id for s in store.studies()}
                print(f"SOP Instance UID reused across studies or patients: {sum(reused.values())} instances in "
                      "jobs " + ", ".join(sorted(jobs.get(k, k) for k in reused)) + " (each kept and processed separately)")
            if shared:
                print(f"Study Instance UID received for several patients: {len(shared)} studies, jobs "
                      + ", ".join(sorted(shared)) + " (each patient's images a job of its own)")
    finally:
        store.close()
    return 0


def _standalone(prog: str, fill: Callable[[argparse.ArgumentParser], None], description: str,
                argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    fill(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v, -vv)")
    return p.parse_args(argv)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``cxr-ai serve [--config FILE] [--log-json]``: run the listener service."""
    args = _standalone("cxr-ai serve", _fill_serve, "Run the DICOM listener service.", argv)
    configure_logging(verbosity=args.verbose, json_lines=args.log_json)
    return _cmd_serve(args)


def jobs_main(argv: Sequence[str] | None = None) -> int:
    """``cxr-ai jobs [--config FILE] [--retry-dead [--destination NAME]]``."""
    return _cmd_jobs(_standalone("cxr-ai jobs", _fill_jobs, "Show the job store; retry dead letters.", argv))


# -- demo -------------------------------------------------------------------------------------
def _phantom_truth(labels_csv: Path) -> dict[str, str]:
    """Study UID -> "cardiomegaly=.. low_ef=.." from the phantoms' labels.csv (for the demo)."""
    import csv

    if not labels_csv.is_file():
        return {}
    out: dict[str, str] = {}
    with labels_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("study_uid") and "cardiomegaly" in row and "low_ef" in row:
                out.setdefault(row["study_uid"], f"cardiomegaly={row['cardiomegaly']} low_ef={row['low_ef']}")
    return out


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``cxr-ai demo``: phantom studies -> listener (C-STORE) -> results; prints the triage order."""
    args = _standalone("cxr-ai demo", _fill_demo, "Run the whole loop on phantom studies.", argv)
    configure_logging(verbosity=args.verbose - 1)
    return _cmd_demo(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from cxr_ai.net.scu import Peer, send_files
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    out = Path(args.out or tempfile.mkdtemp(prefix="cxr-ai-demo-")).resolve()
    studies_dir = out / "phantoms"
    generate_studies(studies_dir, PhantomConfig(n_studies=args.n, seed=args.seed, size=args.size))
    files = sorted(studies_dir.rglob("*.dcm"))
    loaded = load_settings()
    config = loaded.config
    config["listener"].update(port=0, allowed_calling_aes=["CXR_AI_DEMO"])
    config["store"].update(root=str(out / "var"), quiet_seconds=0.2)
    config["http"].update(port=args.http_port if getattr(args, "serve", False) else 0)
    config["routing"]["destinations"] = [{"name": "folder", "kind": "folder", "path": str(out / "results")}]
    # Phantom studies carry historical study dates: their wait starts when they are received.
    config["worklist"]["wait_from"] = "received"
    service = Service(config, secrets=loaded.secrets, base_dir=out)
    service.start()
    try:
        print(f"cxr-ai listening as {service.settings.listener.ae_title} on 127.0.0.1:{service.dicom_port}; "
              f"sending {len(files)} instances of {args.n} phantom studies by C-STORE ...")
        send_files(files, Peer(host="127.0.0.1", port=service.dicom_port,
                               ae_title=service.settings.listener.ae_title, calling_ae="CXR_AI_DEMO"))
        if not service.wait_idle(timeout=args.timeout, expected_instances=len(files)):
            print(f"results not complete after {args.timeout:.0f} s; see {out}/var", file=sys.stderr)
            return 1
        truth = _phantom_truth(studies_dir / "labels.csv")
        print("\nTriage order (the worklist's ranking: overdue, then AI-positive by weighted probability, "
              "then first in, first out; + = above the operating threshold):")
        for rank, (study, label) in enumerate(_demo_order(service), 1):
            known = truth.get(study.study_uid)
            print(f"{rank:>3}. job {study.job_id}  {study.state.value:<15} {label}"
                  + (f"   [phantom truth: {known}]" if known else ""))
            folder = out / "results" / study.job_id
            if folder.is_dir():
                kinds = sorted({f.name.split("-")[0].split(".")[0] for f in folder.iterdir()})
                print(f"     outputs: {folder}  ({', '.join(kinds)})")
        print(f"\nEverything is under {out}")
        if getattr(args, "serve", False):
            _serve_on(service)
        return 0
    finally:
        service.stop(grace=5.0)


def _demo_order(service: Service) -> list[tuple[Any, str]]:
    """The demo's studies in worklist order (those not on the worklist, e.g. failed, last)."""
    from cxr_ai.worklist import Worklist

    wl = service.workers.recorder.worklist
    with Worklist(wl.path, policy=wl.policy) as view:
        ranked = view.ranked(include_not_applicable=True)
    by_job = {s.job_id: s for s in service.store.studies()}
    order = [by_job[r.job_id] for r in ranked if r.job_id in by_job]
    order += [s for s in by_job.values() if s not in order]
    rows = []
    for study in order:
        parts, reasons = [], []
        for inst in service.store.instances(study.study_key):
            if inst.state is not InstanceState.PROCESSED:
                reasons.append(inst.reason or inst.state.value)
            for f in (inst.result or {}).get("findings", []):
                parts.append(f"{f['display']} {format_probability(f['probability'])}{'+' if f['positive'] else ''}")
        rows.append((study, "; ".join(parts) if parts else f"not applicable ({', '.join(sorted(set(reasons)))})"))
    return rows


def _serve_on(service: Service) -> None:
    """Keep the demo's service running until Ctrl-C / SIGTERM."""
    import signal
    import threading

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    url = service.http_url or "(web pages off)"
    print(f"\nWorklist: {url}\nListener: {service.settings.listener.ae_title} on 127.0.0.1:{service.dicom_port} "
          f"(send more studies with any C-STORE SCU, calling AE CXR_AI_DEMO). Ctrl-C stops.", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
