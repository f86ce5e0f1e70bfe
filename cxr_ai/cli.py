"""The ``cxr-ai`` command. Thin: parses arguments, configures logging, calls the package."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cxr_ai import __version__

logger = logging.getLogger(__name__)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    shift = None
    if args.shift_group:
        key, _, value = args.shift_group.partition("=")
        if not value:
            raise SystemExit("--shift-group must look like race=Black")
        shift = {key: value}
    config = PhantomConfig(n_studies=args.n, seed=args.seed, shift_group=shift,
                           **({"size": args.size} if args.size else {}))
    table = generate_studies(args.out, config)
    print(f"wrote {len(table)} instances in {table['study_uid'].nunique()} studies to {args.out} "
          f"(labels: {Path(args.out) / 'labels.csv'})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Read each file and print the applicability decision as JSON lines."""
    from cxr_ai.config import load_config
    from cxr_ai.dicom.gate import GateRules, check_applicability
    from cxr_ai.dicom.reader import iter_dicom_files

    rules = GateRules.from_config(load_config(args.config))
    n_accepted = n_total = 0
    for root in args.paths:
        for path in iter_dicom_files(root):
            decision, rg = check_applicability(path, rules)
            n_total += 1
            n_accepted += decision.accepted
            record = {"file": str(path), **decision.to_dict()}
            if rg is not None and args.details:
                record.update(modality=rg.modality, body_part=rg.body_part, view=rg.view_position,
                              rows=rg.rows, columns=rg.columns, sex=rg.sex, age_years=rg.age_years)
            print(json.dumps(record))
    print(f"{n_accepted} of {n_total} files accepted", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-ai",
        description="DICOM-native chest X-ray AI: cardiomegaly and low-EF triage with SR, "
        "heatmap and FHIR outputs. NOT FOR CLINICAL USE with the bundled demo model.",
    )
    parser.add_argument("--version", action="version", version=f"cxr-ai {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v, -vv)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("phantoms", help="write synthetic chest radiograph studies with known truth")
    p.add_argument("--out", required=True, help="output folder (studies + labels.csv)")
    p.add_argument("--n", type=int, default=20, help="number of studies (default 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--size", type=int, default=None, help="long side in pixels (default: realistic 1.5-2.5k)")
    p.add_argument("--shift-group", default=None, help="subgroup with degraded images, e.g. race=Black")
    p.set_defaults(func=_cmd_phantoms)

    p = sub.add_parser("check", help="read DICOM files and print the applicability decision")
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--config", default=None, help="site config TOML")
    p.add_argument("--details", action="store_true", help="also print the metadata read")
    p.set_defaults(func=_cmd_check)

    from cxr_ai.batch import add_batch_parser
    from cxr_ai.evaluation.cli import add_evaluate_parser
    from cxr_ai.service_cli import add_service_parsers
    from cxr_ai.web.users_cli import add_users_parser
    from cxr_ai.worklist_cli import add_worklist_parser

    add_service_parsers(sub)
    add_users_parser(sub)
    add_batch_parser(sub)
    add_worklist_parser(sub)
    add_evaluate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
