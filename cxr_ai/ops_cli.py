"""The ``retract``, ``backup`` and ``restore`` commands (operations on the listener's state).

Thin: arguments are resolved here, once; the work lives in :mod:`cxr_ai.retract` and
:mod:`cxr_ai.store.backup`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cxr_ai.config import load_settings
from cxr_ai.errors import ConfigError
from cxr_ai.service import ServiceSettings, validate_config
from cxr_ai.store.backup import StatePaths, backup, restore

logger = logging.getLogger(__name__)


def state_paths(config: Mapping[str, Any], settings: ServiceSettings) -> StatePaths:
    """Where the service keeps its job store, worklist and pseudonym key (as the service resolves them)."""
    from cxr_ai.monitoring.log import pseudonym_key_path

    cfg = copy.deepcopy(dict(config))
    cfg.setdefault("store", {})["root"] = str(settings.store_root)
    return StatePaths(jobs=settings.db_path, worklist=settings.worklist_path, pseudonym_key=pseudonym_key_path(cfg))


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], ServiceSettings]:
    loaded = load_settings(args.config)
    config = loaded.config
    return config, validate_config(config, base_dir=loaded.base_dir, secrets=loaded.secrets)


def _cmd_backup(args: argparse.Namespace) -> int:
    config, settings = _settings(args)
    try:
        manifest = backup(state_paths(config, settings), args.out)
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"cxr-ai backup: {exc}", file=sys.stderr)
        return 2
    print(f"backup written to {args.out}: " + ", ".join(manifest["files"]))
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from cxr_ai.store.jobs import JobStore

    config, settings = _settings(args)
    paths = state_paths(config, settings)
    try:
        manifest = restore(args.source, paths, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"cxr-ai restore: {exc}", file=sys.stderr)
        return 2
    store = JobStore(paths.jobs)  # migrates a store of an older release now, not at the next start
    try:
        version = store.schema_version()
    finally:
        store.close()
    print(f"restored {', '.join(manifest['files'])} from {args.source} "
          f"(made by cxr-ai {manifest.get('cxr_ai_version', '?')}); job store schema version {version}")
    return 0


def _cmd_retract(args: argparse.Namespace) -> int:
    from cxr_ai.retract import MSG_NO_STUDY, MSG_STUDY_SHARED, find_studies, retract_study
    from cxr_ai.service.web.settings import WebSettings
    from cxr_ai.store.jobs import JobStore
    from cxr_ai.store.spool import Spool
    from cxr_ai.worklist import Worklist

    config, settings = _settings(args)
    paths = state_paths(config, settings)
    store = JobStore(paths.jobs)
    spool = Spool(settings.spool_dir)
    worklist = Worklist(paths.worklist)
    what = (f"study {args.study}" if args.study else f"job {args.job}" if args.job else f"accession {args.accession}")
    try:
        studies = find_studies(store, study_uid=args.study, job_id=args.job, accession=args.accession,
                               worklist=worklist, spool=spool)
        if not studies:
            print(f"cxr-ai retract: {MSG_NO_STUDY.format(what=what)}", file=sys.stderr)
            return 2
        by_uid: dict[str, list[str]] = {}
        for s in studies:
            by_uid.setdefault(s.study_uid, []).append(s.job_id)
        for uid, jobs in by_uid.items():  # one Study UID, several patients: never withdraw them all
            if len(jobs) > 1 and not args.job:
                print(f"cxr-ai retract: {MSG_STUDY_SHARED.format(uid=uid, n=len(jobs), jobs=', '.join(jobs))}",
                      file=sys.stderr)
                return 2
        names = {d.name for d in settings.destinations}
        unknown = set(args.destination or []) - names
        if unknown:
            raise ConfigError(f"--destination {sorted(unknown)} not among [routing] destinations {sorted(names)}")
        dests = [d for d in settings.destinations if not args.destination or d.name in args.destination]
        rc = 0
        for study in studies:
            try:
                result = retract_study(study, store=store, spool=spool, destinations=dests, worklist=worklist,
                                       audit_log=WebSettings.for_service(config, settings).audit_log,
                                       reason=args.reason)
            except FileNotFoundError as exc:
                print(f"cxr-ai retract: {exc}", file=sys.stderr)
                rc = 2
                continue
            print(json.dumps({"job_id": result.job_id, "rejected_objects": len(result.rejected),
                              "rejection_note_uid": result.note_uid, "pacs": result.pacs, "fhir": result.fhir,
                              "worklist_removed": result.worklist_removed}))
            if not result.ok:
                rc = 1
        return rc
    finally:
        worklist.close()
        store.close()


def add_ops_parsers(subparsers: Any) -> None:
    """Add ``retract``, ``backup`` and ``restore`` to the ``cxr-ai`` sub-parsers (``cxr_ai.cli``)."""
    p = subparsers.add_parser(
        "retract", help="withdraw a study's results for patient safety (IOCM rejection note, FHIR entered-in-error)",
        description="Withdraw cxr-ai's results of a study: send the PACS an IHE IOCM rejection note (KOS, "
        "'Rejected for Patient Safety Reasons') referencing the SR, SCs and PMs; mark the FHIR Observations and "
        "DiagnosticReports entered-in-error; take the study off the worklist; record it in the audit log.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Study Instance UID")
    which.add_argument("--accession", help="Accession Number")
    which.add_argument("--job", help="job id (as cxr-ai jobs lists it)")
    p.add_argument("--reason", required=True, help="why (recorded in the audit log and the note's description)")
    p.add_argument("--destination", action="append", default=None,
                   help="only this [routing] destination (repeatable; default: all)")
    p.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    p.set_defaults(func=_cmd_retract)

    p = subparsers.add_parser("backup", help="copy the job store, worklist and pseudonym key (safe while running)",
                              description="Copy the job store, the worklist and the pseudonym key into a new "
                              "folder, consistently, while the service runs (SQLite online backup).")
    p.add_argument("out", help="new folder for the backup")
    p.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    p.set_defaults(func=_cmd_backup)

    p = subparsers.add_parser("restore", help="restore a backup made by cxr-ai backup (stop the service first)",
                              description="Restore the job store, worklist and pseudonym key from a backup; "
                              "a job store of an older release is migrated.")
    p.add_argument("source", help="backup folder")
    p.add_argument("--force", action="store_true", help="replace existing state")
    p.add_argument("--config", default=None, help="site TOML file (default: embedded defaults)")
    p.set_defaults(func=_cmd_restore)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxr_ai.ops_cli COMMAND ...`` (the same commands as ``cxr-ai``)."""
    parser = argparse.ArgumentParser(prog="cxr-ai")
    add_ops_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
