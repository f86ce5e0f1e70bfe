"""``cxr-ai evaluate``: predictions + ground truth (+ embeddings) → report.html + report.json.

Thin: :func:`add_evaluate_parser` adds the subcommand to the ``cxr-ai`` parser,
:func:`evaluate_main` runs it; the work lives in the package.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

# The heavy parts (pandas, fairlearn, matplotlib) are imported when the command runs, so that
# `cxr-ai --help` stays fast.
if TYPE_CHECKING:
    import pandas as pd

#: Kept in sync with cxr_ai.evaluation.labels (a test checks it).
LABEL_FORMATS = ("ours", "nih", "chexpert", "mimic", "dicom")
UNCERTAINTY_POLICIES = ("u_ones", "u_zeros", "ignore")

logger = logging.getLogger(__name__)

MSG_PAIRING = (
    "--predictions was given {n_pred} time(s) and --labels {n_lab} time(s); give one --labels per "
    "--predictions (and optionally one --name / --labels-format each, or a single one for all)."
)


def read_predictions(path: str | Path) -> "pd.DataFrame":
    """A ``cxr-ai batch`` predictions table (CSV or Parquet)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"predictions file {p} does not exist; pass the CSV/Parquet `cxr-ai batch` wrote")
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    return pd.read_csv(p, dtype={"sop_uid": str, "study_uid": str})


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``evaluate`` to a ``cxr-ai`` subparsers object; sets ``func`` to :func:`run`."""
    p = subparsers.add_parser("evaluate", help="demographic-stratified evaluation report")
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", action="append", required=True,
                   help="predictions CSV/Parquet (repeat for several test sets)")
    p.add_argument("--labels", action="append", required=True,
                   help="ground truth: a file (ours, nih, chexpert) or a folder (mimic, dicom); one per --predictions")
    p.add_argument("--labels-format", action="append", choices=LABEL_FORMATS,
                   help="format of each --labels (default ours)")
    p.add_argument("--name", action="append", help="test-set name for each --predictions")
    p.add_argument("--uncertain", choices=UNCERTAINTY_POLICIES,
                   help="CheXpert/MIMIC uncertain-label policy (required for those formats)")
    p.add_argument("--dicom-dir", help="fill missing sex/age/ethnic group from the DICOM headers here")
    p.add_argument("--pred-key", default="sop_uid", help="predictions join column (default sop_uid)")
    p.add_argument("--truth-key", default="id", help="ground-truth join column (default id)")
    p.add_argument("--findings", default="cardiomegaly,low_ef")
    p.add_argument("--attributes", default="sex,age_band,race,insurance")
    p.add_argument("--intersections", default="race*sex", help="comma-separated, e.g. race*sex,race*insurance")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--ci-level", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="random_state of the bootstrap and PCA")
    p.add_argument("--min-group-size", type=int, default=30)
    p.add_argument("--gap-bound", type=float, default=0.05,
                   help="flag harmful gaps at least this large whose CI excludes 0 (default 0.05)")
    p.add_argument("--calibration-bins", type=int, default=10)
    p.add_argument("--embeddings", help="embeddings (.npz ids+embeddings, .parquet/.csv with an id column)")
    p.add_argument("--embedding-id-column", default="id")
    p.add_argument("--out", required=True, help="output folder (report.html, report.json)")


def _pick(values: list[str] | None, i: int, n: int, default: str) -> str:
    if not values:
        return default
    if len(values) == 1:
        return values[0]
    if len(values) != n:
        raise SystemExit(f"give one value per --predictions ({n}) or a single one; got {values}")
    return values[i]


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from cxr_ai.evaluation.embeddings import embedding_analysis, load_embeddings
    from cxr_ai.evaluation.evaluate import EvaluationSettings, evaluate_frames
    from cxr_ai.evaluation.labels import fill_demographics, load_dicom_demographics, load_labels
    from cxr_ai.evaluation.metrics import MetricSettings
    from cxr_ai.evaluation.report import write_report

    n = len(args.predictions)
    if len(args.labels) != n:
        raise SystemExit(MSG_PAIRING.format(n_pred=n, n_lab=len(args.labels)))
    intersections = tuple(tuple(x.split("*")) for x in args.intersections.split(",") if x.strip())
    settings = EvaluationSettings(
        findings=tuple(x for x in args.findings.split(",") if x),
        attributes=tuple(x for x in args.attributes.split(",") if x),
        intersections=intersections,
        metrics=MetricSettings(n_boot=args.n_boot, ci_level=args.ci_level, random_state=args.seed,
                               min_group_size=args.min_group_size, calibration_bins=args.calibration_bins),
        gap_bound=args.gap_bound,
    )
    header_demo = load_dicom_demographics(args.dicom_dir) if args.dicom_dir else None
    results = []
    truths = []
    for i, pred_path in enumerate(args.predictions):
        fmt = _pick(args.labels_format, i, n, "ours")
        name = _pick(args.name, i, n, Path(pred_path).stem if n > 1 else "test set")
        truth, joins = load_labels(args.labels[i], fmt=fmt, uncertainty=args.uncertain)
        if header_demo is not None:
            truth = fill_demographics(truth, header_demo)
        truths.append(truth)
        results.append(evaluate_frames(read_predictions(pred_path), truth, settings=settings, name=name,
                                       pred_key=args.pred_key, truth_key=args.truth_key, join_reports=joins))
    emb = None
    if args.embeddings:
        emb = embedding_analysis(load_embeddings(args.embeddings, id_column=args.embedding_id_column),
                                 pd.concat(truths, ignore_index=True), random_state=args.seed,
                                 min_group_size=args.min_group_size)
    html_path, _ = write_report(args.out, results, settings=settings.to_dict(), embeddings=emb)
    logger.info("report: %s", html_path)
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``cxr-ai evaluate ...`` as a function (tests call it directly)."""
    parser = argparse.ArgumentParser(prog="cxr-ai evaluate", description=__doc__)
    configure_parser(parser)
    return run(parser.parse_args(argv))


main = evaluate_main
