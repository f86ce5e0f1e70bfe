"""``cxr-ai evaluate``: predictions + ground truth (+ embeddings) → report.html + report.json.

Thin: :func:`add_evaluate_parser` adds the subcommand to the ``cxr-ai`` parser,
:func:`evaluate_main` runs it; the work lives in the package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

# The heavy parts (pandas, fairlearn, matplotlib) are imported when the command runs, so that
# `cxr-ai --help` stays fast.
if TYPE_CHECKING:
    import pandas as pd

#: Kept in sync with cxr_ai.evaluation.labels (a test checks it).
LABEL_FORMATS = ("ours", "nih", "chexpert", "mimic", "dicom")
UNCERTAINTY_POLICIES = ("u_ones", "u_zeros", "ignore")
BLANK_POLICIES = ("negative", "ignore")
DEFAULT_BLANK_POLICY = "negative"
#: Kept in sync with cxr_ai.evaluation.metrics (a test checks it).
DEFAULT_FLAG_METRICS = ("auroc", "fnr", "fpr", "ece")

logger = logging.getLogger(__name__)
T = TypeVar("T")

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


EPILOG = """\
Joining predictions to ground truth:
  predictions   a `cxr-ai batch` table (CSV/Parquet) with the join column (--pred-key,
                default sop_uid) and, for each finding F of --findings, p_F (probability) and
                thr_F (operating threshold) or pred_F (decision). Optional: gate_accepted,
                gate_reason, sex, age, ethnic_group (fill demographics missing from the truth).
  ground truth  every --labels-format is loaded into one table whose key column is `id`
                (so --truth-key stays `id`):
                  nih       id = "Image Index" of Data_Entry_2017.csv (e.g. 00000001_000.png)
                  chexpert  id = "Path" of train.csv/valid.csv
                            (e.g. CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg)
                  mimic     id = dicom_id;  ours / dicom: id = SOP Instance UID
                so the predictions' --pred-key column must hold those same strings.

Fairness flags: a gap is flagged when a group is worse than overall by at least --gap-bound
with a bootstrap CI excluding 0, on the prevalence-independent metrics only (AUROC, FNR =
underdiagnosis, FPR, calibration error) unless --flag-metrics says otherwise. PPV and NPV
follow each group's prevalence; they are reported beside it, not flagged.
"""

MSG_INPUT = "{what} {path}: {error}"


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``evaluate`` to a ``cxr-ai`` subparsers object; sets ``func`` to :func:`run`."""
    p = subparsers.add_parser("evaluate", help="demographic-stratified evaluation report",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", action="append", required=True,
                   help="predictions CSV/Parquet written by `cxr-ai batch` (repeat for several test sets)")
    p.add_argument("--labels", action="append", required=True,
                   help="ground truth: a file (ours, nih, chexpert) or a folder (mimic, dicom); one per --predictions")
    p.add_argument("--labels-format", action="append", choices=LABEL_FORMATS,
                   help="format of each --labels (default ours); nih = Data_Entry_2017.csv, chexpert = "
                        "train.csv/valid.csv, mimic = the folder of MIMIC-CXR-JPG + MIMIC-IV CSVs")
    p.add_argument("--name", action="append", help="test-set name for each --predictions")
    p.add_argument("--uncertain", choices=UNCERTAINTY_POLICIES,
                   help="CheXpert/MIMIC uncertain (-1) label policy, required for those formats: u_ones = "
                        "positive, u_zeros = negative, ignore = left out")
    p.add_argument("--blank", choices=BLANK_POLICIES, default=DEFAULT_BLANK_POLICY,
                   help="CheXpert/MIMIC blank (unmentioned) label policy: negative (the CheXpert "
                        f"convention) or ignore = left out (default {DEFAULT_BLANK_POLICY})")
    p.add_argument("--dicom-dir", help="fill missing sex/age/ethnic group from the DICOM headers here")
    p.add_argument("--pred-key", default="sop_uid",
                   help="predictions column joined to the truth key (default sop_uid); it must hold NIH "
                        "Image Index / CheXpert Path / MIMIC dicom_id values for those formats")
    p.add_argument("--truth-key", default="id",
                   help="ground-truth join column after loading (default id: NIH Image Index, CheXpert Path, "
                        "MIMIC dicom_id, ours/dicom SOP Instance UID)")
    p.add_argument("--findings", default="cardiomegaly,low_ef",
                   help="comma-separated findings; each needs p_<finding> and thr_<finding> (or pred_<finding>) "
                        "in the predictions (default cardiomegaly,low_ef)")
    p.add_argument("--attributes", default="sex,age_band,race,insurance",
                   help="comma-separated demographic attributes to stratify by (default sex,age_band,race,insurance)")
    p.add_argument("--intersections", default="race*sex",
                   help="comma-separated intersections, e.g. race*sex,race*insurance; empty for none "
                        "(default race*sex)")
    p.add_argument("--n-boot", type=int, default=200,
                   help="bootstrap replicates for the confidence intervals (default 200; 0 = no CIs, no flags)")
    p.add_argument("--ci-level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random_state of the bootstrap and PCA (default 0)")
    p.add_argument("--min-group-size", type=int, default=30,
                   help="groups smaller than this are reported but never flagged (default 30)")
    p.add_argument("--gap-bound", type=float, default=0.05,
                   help="flag harmful gaps at least this large whose CI excludes 0 (default 0.05)")
    p.add_argument("--flag-metrics", default=",".join(DEFAULT_FLAG_METRICS),
                   help="comma-separated metrics on which harm is flagged (default: the prevalence-independent "
                        f"{','.join(DEFAULT_FLAG_METRICS)}; add ppv,npv to flag those too)")
    p.add_argument("--calibration-bins", type=int, default=10,
                   help="equal-width bins of the calibration curve and ECE (default 10)")
    p.add_argument("--embeddings", help="embeddings (.npz ids+embeddings, .parquet/.csv with an id column)")
    p.add_argument("--embedding-id-column", default="id",
                   help="id column of a .parquet/.csv --embeddings, joined to the truth id (default id)")
    p.add_argument("--out", required=True, help="output folder (report.html, report.json)")


class InputError(Exception):
    """A user input the evaluation cannot use; the message names it and what to do."""


def _pick(values: list[str] | None, i: int, n: int, default: str) -> str:
    if not values:
        return default
    if len(values) == 1:
        return values[0]
    if len(values) != n:
        raise InputError(f"give one value per --predictions ({n}) or a single one; got {values}")
    return values[i]


def summary_lines(results: Sequence[dict], html_path: Path) -> list[str]:
    """What the command prints on success: where the report is and the flags, in a few lines."""
    lines = [f"report: {html_path} (and {html_path.with_suffix('.json').name})"]
    for ts in results:
        for finding, res in ts["findings"].items():
            if "attributes" not in res:
                lines.append(f"{ts['name']} / {finding}: {res.get('status', 'not evaluated')}")
                continue
            auroc = res.get("overall", {}).get("auroc", {}).get("value")
            flags = [f for r in res["attributes"].values() for f in r["flagged"]]
            head = (f"{ts['name']} / {finding}: n={res['n']}"
                    + (f", AUROC {auroc:.3f}" if auroc is not None else "")
                    + f", {len(flags)} flagged gap(s)")
            lines.append(head)
            for f in flags[:10]:
                lines.append(f"  {f['attribute']} = {f['group']}: {f['metric']} {f['difference']:+.3f} "
                             f"[{f['ci'][0]:+.3f}, {f['ci'][1]:+.3f}]")
            if len(flags) > 10:
                lines.append(f"  ... {len(flags) - 10} more in the report")
    return lines


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; input errors become one line on stderr and exit status 2."""
    try:
        return _run(args)
    except InputError as exc:
        print(f"cxr-ai evaluate: {exc}", file=sys.stderr)
        return 2


def _load(what: str, path: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except InputError:
        raise
    except (ValueError, KeyError, OSError) as exc:  # a missing file is an OSError, bad text a ValueError
        raise InputError(MSG_INPUT.format(what=what, path=path, error=_one_line(exc))) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _run(args: argparse.Namespace) -> int:
    import pandas as pd

    from cxr_ai.evaluation.embeddings import embedding_analysis, load_embeddings
    from cxr_ai.evaluation.evaluate import EvaluationSettings, evaluate_frames
    from cxr_ai.evaluation.labels import POLICY_ATTR, fill_demographics, load_dicom_demographics, load_labels
    from cxr_ai.evaluation.metrics import MetricSettings, resolve_metrics
    from cxr_ai.evaluation.report import write_report

    n = len(args.predictions)
    if len(args.labels) != n:
        raise InputError(MSG_PAIRING.format(n_pred=n, n_lab=len(args.labels)))
    intersections = tuple(tuple(x.split("*")) for x in args.intersections.split(",") if x.strip())
    try:
        flag_metrics = resolve_metrics([m for m in args.flag_metrics.split(",") if m.strip()])
    except ValueError as exc:
        raise InputError(f"--flag-metrics: {exc}") from exc
    settings = EvaluationSettings(
        findings=tuple(x for x in args.findings.split(",") if x),
        attributes=tuple(x for x in args.attributes.split(",") if x),
        intersections=intersections,
        metrics=MetricSettings(n_boot=args.n_boot, ci_level=args.ci_level, random_state=args.seed,
                               min_group_size=args.min_group_size, calibration_bins=args.calibration_bins),
        gap_bound=args.gap_bound,
        flag_metrics=flag_metrics,
    )
    header_demo = (_load("--dicom-dir", args.dicom_dir, lambda: load_dicom_demographics(args.dicom_dir))
                   if args.dicom_dir else None)
    results = []
    truths = []
    for i, pred_path in enumerate(args.predictions):
        fmt = _pick(args.labels_format, i, n, "ours")
        name = _pick(args.name, i, n, Path(pred_path).stem if n > 1 else "test set")
        truth, joins = _load(f"--labels ({fmt})", args.labels[i],
                             lambda: load_labels(args.labels[i], fmt=fmt, uncertainty=args.uncertain,
                                                 blank=args.blank))
        policy = truth.attrs.get(POLICY_ATTR)
        if header_demo is not None:
            truth = fill_demographics(truth, header_demo)
        truths.append(truth)
        predictions = _load("--predictions", pred_path, lambda: read_predictions(pred_path))
        result = _load(f"--predictions {pred_path} with --labels", args.labels[i],
                       lambda: evaluate_frames(predictions, truth, settings=settings, name=name,
                                               pred_key=args.pred_key, truth_key=args.truth_key,
                                               join_reports=joins))
        if policy is not None:
            result["label_policy"] = policy
        results.append(result)
    emb = None
    if args.embeddings:
        emb = embedding_analysis(
            _load("--embeddings", args.embeddings,
                  lambda: load_embeddings(args.embeddings, id_column=args.embedding_id_column)),
            pd.concat(truths, ignore_index=True), random_state=args.seed, min_group_size=args.min_group_size)
    try:
        html_path, _ = write_report(args.out, results, settings=settings.to_dict(), embeddings=emb)
    except OSError as exc:
        raise InputError(MSG_INPUT.format(what="--out", path=args.out, error=_one_line(exc))) from exc
    for line in summary_lines(results, html_path):
        print(line)
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``cxr-ai evaluate ...`` as a function (tests call it directly)."""
    parser = argparse.ArgumentParser(prog="cxr-ai evaluate", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    return run(parser.parse_args(argv))


main = evaluate_main
