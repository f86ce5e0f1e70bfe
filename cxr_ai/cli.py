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


#: Strength of the ``--shift-group`` degradation when ``--shift-strength`` is not given: 1.0
#: (veil, blur and noise at full strength) is what the evaluator and the monitor are tested to
#: flag for the shifted group; 0 would mark no image as shifted.
DEFAULT_SHIFT_STRENGTH = 1.0


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from cxr_ai.errors import ConfigError
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    shift = None
    strength = 0.0
    if args.shift_group:
        key, _, value = args.shift_group.partition("=")
        if not value:
            raise SystemExit("--shift-group must look like race=Black")
        shift = {key: value}
        strength = DEFAULT_SHIFT_STRENGTH if args.shift_strength is None else args.shift_strength
        if strength <= 0:
            raise SystemExit(f"--shift-strength {strength} shifts nothing; give a value in (0, 1] "
                             "or leave --shift-group out")
    elif args.shift_strength is not None:
        raise SystemExit("--shift-strength needs --shift-group (e.g. --shift-group race=Black)")
    try:
        config = PhantomConfig(n_studies=args.n, seed=args.seed, shift_group=shift, shift_strength=strength,
                               **({"size": args.size} if args.size else {}))
    except ConfigError as exc:
        raise SystemExit(f"cxr-ai phantoms: {exc}") from exc
    table = generate_studies(args.out, config)
    n_shifted = int(table["shifted"].astype(bool).sum()) if "shifted" in table else 0
    print(f"wrote {len(table)} instances in {table['study_uid'].nunique()} studies to {args.out} "
          f"(labels: {Path(args.out) / 'labels.csv'})"
          + (f"; {n_shifted} instances of {args.shift_group} shifted at strength {strength:g}" if shift else ""))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Read each file and print the applicability decision as JSON lines."""
    from cxr_ai.config import load_settings
    from cxr_ai.dicom.gate import GateRules, check_applicability
    from cxr_ai.dicom.reader import iter_dicom_files

    rules = GateRules.from_config(load_settings(args.config).config)
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


def _cmd_conformance(args: argparse.Namespace) -> int:
    """Write (or check) the DICOM Conformance Statement generated from the code's tables."""
    from cxr_ai.conformance import render

    text = render()
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != text:
            print(f"{out} is out of date with the code: run `cxr-ai conformance --out {out}` "
                  "(make conformance-statement) and commit it", file=sys.stderr)
            return 1
        print(f"{out} matches the code")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
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
    p.add_argument("--shift-group", default=None,
                   help="subgroup with degraded images (acquisition-quality shift), e.g. race=Black; keys "
                        "race, sex, insurance")
    p.add_argument("--shift-strength", type=float, default=None,
                   help=f"0..1 strength of the --shift-group degradation (default {DEFAULT_SHIFT_STRENGTH:g} "
                        "when --shift-group is given)")
    p.set_defaults(func=_cmd_phantoms)

    p = sub.add_parser("check", help="read DICOM files and print the applicability decision")
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--config", default=None, help="site config TOML")
    p.add_argument("--details", action="store_true", help="also print the metadata read")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("conformance", help="write the DICOM Conformance Statement generated from the code")
    p.add_argument("--out", default="docs/dicom-conformance-statement.md",
                   help="output file (default docs/dicom-conformance-statement.md)")
    p.add_argument("--check", action="store_true",
                   help="do not write; exit 1 if the file differs from what the code generates")
    p.set_defaults(func=_cmd_conformance)

    from cxr_ai.batch.cli import add_batch_parser
    from cxr_ai.evaluation.cli import add_evaluate_parser
    from cxr_ai.monitoring.cli import add_monitoring_parsers
    from cxr_ai.ops_cli import add_ops_parsers
    from cxr_ai.service.cli import add_service_parsers
    from cxr_ai.service.web.users_cli import add_users_parser
    from cxr_ai.worklist_cli import add_worklist_parser

    add_service_parsers(sub)
    add_users_parser(sub)
    add_batch_parser(sub)
    add_worklist_parser(sub)
    add_evaluate_parser(sub)
    add_ops_parsers(sub)
    add_monitoring_parsers(sub)
    for sp in sub.choices.values():  # -v works after the subcommand too (`cxr-ai evaluate -v ...`)
        if "-v" not in sp._option_string_actions:
            sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                            help="more logging (-v, -vv); also accepted before the command")
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
