"""``cxr-ai batch`` and ``python -m cxr_ai.batch``: the command line of the batch processor."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_ai.batch.inputs import (
    MSG_NEED_PACS,
    MSG_NO_INPUT,
    BatchInputs,
    parse_peer,
    read_study_csv,
    retrieve_studies,
    scan_inputs,
)
from cxr_ai.batch.pools import POOL_KINDS, usable_cores
from cxr_ai.batch.run import (
    MSG_WORKERS_AND_SCHEDULER,
    BatchOptions,
    _model_info_of,
    plan,
    run_batch,
)
from cxr_ai.batch.state import STATE_DB_NAME, BatchState
from cxr_ai.errors import ConfigError, CxrAiError


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``batch`` sub-command to a ``cxr-ai`` sub-parser set."""
    p = subparsers.add_parser(
        "batch", help="run the models over a folder, a DICOMDIR or studies pulled from PACS",
        description="Run the pipeline over a worklist; resumable (re-running skips what this "
        "model version finished), with a results table (CSV + Parquet) and the same result objects "
        "as the listener.")
    _fill_parser(p)
    p.set_defaults(func=_cmd_batch)
    return p


def _fill_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="folders (recursive) and/or DICOMDIR files")
    p.add_argument("--out", required=True, help="output folder (results table, state, result objects)")
    p.add_argument("--config", default=None, help="site config TOML")
    src = p.add_argument_group("PACS / DICOMweb sources")
    src.add_argument("--studies", default=None, help="CSV with a StudyInstanceUID or AccessionNumber column")
    src.add_argument("--pacs", default=None, help="HOST:PORT:AET of the PACS to query and retrieve from")
    src.add_argument("--calling-ae", default="CXR_AI", help="our AE title (default CXR_AI)")
    src.add_argument("--retrieve", choices=("get", "move"), default="get", help="C-GET (default) or C-MOVE")
    src.add_argument("--move-port", type=int, default=0, help="port of our C-MOVE destination SCP (0 = free port)")
    src.add_argument("--dicomweb", default="", help="DICOMweb base URL (QIDO-RS/WADO-RS) instead of --pacs")
    src.add_argument("--date-from", default="", help="query studies from this StudyDate (YYYYMMDD)")
    src.add_argument("--date-to", default="", help="query studies up to this StudyDate (YYYYMMDD)")
    src.add_argument("--modality", action="append", default=[], help="modality to query (repeatable; e.g. CR, DX)")
    run = p.add_argument_group("running")
    run.add_argument("--force", action="store_true", help="reprocess instances this model version already finished")
    run.add_argument("--dry-run", action="store_true", help="list what would run, process nothing")
    run.add_argument("--no-explain", action="store_true", help="no heatmaps (no SC / Parametric Map), faster")
    run.add_argument("--no-outputs", action="store_true", help="results table only, no result objects written")
    run.add_argument("--threads", type=int, default=0,
                     help="size of the pool that decodes and builds result objects beside the model "
                     "(worker processes or threads; default: [batch] threads, or the cores)")
    run.add_argument("--pool", choices=POOL_KINDS, default="",
                     help="where decoding and result objects run beside the model: worker processes or "
                     "threads of the driving process (default: [batch] pool, auto = processes unless "
                     "--no-outputs)")
    run.add_argument("--batch-size", type=int, default=0, help="images per model batch (default: [models] batch_size)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--send-to", default=None, help="HOST:PORT:AET to C-STORE the result objects to")
    dask = p.add_argument_group("Dask")
    dask.add_argument("--workers", type=int, default=0, help="start a local Dask cluster with N worker processes")
    dask.add_argument("--scheduler", default="", help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786")


def _cmd_batch(args: argparse.Namespace) -> int:
    from cxr_ai.config import load_settings

    cfg = load_settings(args.config).config
    out_dir = Path(args.out)
    options = BatchOptions(
        out_dir=out_dir, force=args.force, dry_run=args.dry_run, explain=not args.no_explain,
        threads=args.threads, pool=args.pool, batch_size=args.batch_size, progress=not args.no_progress,
        workers=args.workers, scheduler=args.scheduler, write_outputs=not args.no_outputs,
        send_to=parse_peer(args.send_to, calling_ae=args.calling_ae) if args.send_to else None,
    )
    if args.workers and args.scheduler:
        raise ConfigError(MSG_WORKERS_AND_SCHEDULER)
    worklist = scan_inputs(args.inputs, threads=max(2, usable_cores())) if args.inputs else BatchInputs()
    wants_pacs = bool(args.studies or args.date_from or args.date_to or args.modality)
    if wants_pacs:
        pacs = parse_peer(args.pacs, calling_ae=args.calling_ae) if args.pacs else None
        if pacs is None and not args.dicomweb:
            raise ConfigError(MSG_NEED_PACS)
        skip: set[str] = set()
        if not args.force and (out_dir / STATE_DB_NAME).exists():
            state = BatchState(out_dir / STATE_DB_NAME)
            try:
                model = _model_info_of(cfg)
                skip = state.finished(model.name, model.version)
            finally:
                state.close()
        if args.dry_run:
            from cxr_ai.net import query

            source = query.DicomWebSource(args.dicomweb) if args.dicomweb else query.DimseSource(pacs)
            rows = read_study_csv(args.studies) if args.studies else []
            for r in rows:
                for uid in source.find_study_uids(study_uid=r.get("StudyInstanceUID", ""), accession=r.get("AccessionNumber", "")):
                    print(f"would retrieve study {uid}")
            if args.date_from or args.date_to or args.modality:
                for uid in source.find_study_uids(date_from=args.date_from, date_to=args.date_to, modalities=tuple(args.modality)):
                    print(f"would retrieve study {uid}")
        else:
            fetched = retrieve_studies(
                out_dir=out_dir, pacs=pacs, dicomweb=args.dicomweb,
                studies=read_study_csv(args.studies) if args.studies else (),
                date_from=args.date_from, date_to=args.date_to, modalities=args.modality,
                method=args.retrieve, move_port=args.move_port, skip_sops=skip,
            )
            worklist.items.extend(fetched.items)
            worklist.ignored.extend(fetched.ignored)
    if not worklist.items and not wants_pacs:
        raise ConfigError(MSG_NO_INPUT)
    if args.dry_run:
        todo = plan(worklist, out_dir=out_dir, config=cfg, force=args.force)
        for it in todo:
            print(f"would process {it.path} (study {it.study_uid or '?'}, instance {it.sop_uid or '?'})")
        for name in worklist.ignored:
            print(f"would ignore {name} (not DICOM)")
        for kept, dup, *_ in worklist.duplicates:
            print(f"would skip {dup} (same instance as {kept})")
        print(f"{len(todo)} of {len(worklist.items)} instances would run "
              f"({len(worklist.items) - len(todo)} already done); {len(worklist.ignored)} non-DICOM files ignored")
        return 0
    summary = run_batch(worklist, options=options, config=cfg)
    print(summary.text())
    return 0 if not summary.failed else 1


def _package_doc() -> str:
    """The overview in :mod:`cxr_ai.batch`'s docstring (its first line describes the command)."""
    import cxr_ai.batch

    return cxr_ai.batch.__doc__ or ""


def batch_main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxr_ai.batch`` / ``cxr-ai batch``: see :func:`add_batch_parser`."""
    parser = argparse.ArgumentParser(prog="cxr-ai batch", description=_package_doc().splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    _fill_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _cmd_batch(args)
    except CxrAiError as exc:
        print(f"cxr-ai batch: error: {exc}", file=sys.stderr)
        return 2
