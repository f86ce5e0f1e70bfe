"""Honest fairness flags and the `cxr-ai evaluate` command as its user meets it.

Label files are written in the exact public layouts (NIH ChestX-ray14 ``Data_Entry_2017.csv``,
CheXpert ``train.csv``) from fixed seeds; scores are random (independent of the labels) or
drawn from a model that is equally good for every group. A flag decision is only asserted
where it holds with a margin that a last-bit float difference on another CPU cannot flip
(:func:`assert_robust`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_ai.evaluation.cli import evaluate_main
from cxr_ai.evaluation.metrics import DEFAULT_FLAG_METRICS

EPS = 1e-9
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
CHEXPERT_FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                     "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                     "Pleural Other", "Fracture", "Support Devices")
OTHER_NIH = ("Atelectasis", "Effusion", "Infiltration", "Mass", "Nodule", "Emphysema", "Hernia")


def write_nih(path: Path, *, n: int, seed: int, prevalence_by_sex: dict[str, float]) -> pd.DataFrame:
    """A ``Data_Entry_2017.csv`` in the released layout (trailing comma included)."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["M", "F"], n, p=[0.56, 0.44])
    age = rng.integers(1, 95, n)
    cardio = rng.random(n) < np.vectorize(prevalence_by_sex.get)(sex)
    lines = [NIH_HEADER]
    for i in range(n):
        labels = []
        if cardio[i]:
            labels.append("Cardiomegaly")
        if rng.random() < 0.3:
            labels.append(str(rng.choice(OTHER_NIH)))
        finding = "|".join(labels) or "No Finding"
        lines.append(f"{i // 3 + 1:08d}_{i % 3:03d}.png,{finding},{i % 3},{i // 3 + 1},{age[i]},{sex[i]},"
                     f"{'PA' if i % 4 else 'AP'},2500,2048,0.143,0.143")
    path.write_text("\n".join(lines) + "\n")
    return pd.DataFrame({"id": [ln.split(",")[0] for ln in lines[1:]], "y": cardio.astype(int), "sex": sex})


def write_chexpert(path: Path, *, n: int, seed: int) -> pd.DataFrame:
    """A CheXpert ``train.csv``: 1.0 / 0.0 / -1.0 / blank per finding, ~80 % blank."""
    rng = np.random.default_rng(seed)
    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_FINDINGS)]
    ids = []
    for i in range(n):
        p = f"CheXpert-v1.0-small/train/patient{i // 2 + 1:05d}/study{i % 2 + 1}/view1_frontal.jpg"
        ids.append(p)
        sex = rng.choice(["Male", "Female"], p=[0.59, 0.41])
        vals = []
        for f in CHEXPERT_FINDINGS:
            r = rng.random()
            if f == "Cardiomegaly":
                vals.append("1.0" if r < 0.12 else "-1.0" if r < 0.16 else "0.0" if r < 0.22 else "")
            else:
                vals.append("1.0" if r < 0.1 else "-1.0" if r < 0.13 else "0.0" if r < 0.2 else "")
        rows.append(f"{p},{sex},{rng.integers(18, 91)},Frontal,{rng.choice(['AP', 'PA'])}," + ",".join(vals))
    path.write_text("\n".join(rows) + "\n")
    return pd.DataFrame({"id": ids})


def predictions(ids: pd.Series, scores: np.ndarray, *, threshold: float = 0.5) -> pd.DataFrame:
    return pd.DataFrame({"sop_uid": ids, "p_cardiomegaly": scores, "thr_cardiomegaly": threshold,
                         "gate_accepted": True})


def flag_decisions(report: dict, metrics: tuple[str, ...]) -> list[tuple[str, str, str, bool, float]]:
    """(attribute, group, metric, flagged, margin) for every non-small group and metric; the
    margin is how far the decision is from flipping (distance to the gap bound, to 0 for the
    CI, or to 0 for the direction)."""
    bound = report["settings"]["gap_bound"]
    out = []
    for ts in report["test_sets"]:
        for res in ts["findings"].values():
            for attr, r in res.get("attributes", {}).items():
                flagged = {(f["group"], f["metric"]) for f in r["flagged"]}
                for gr in r["groups"]:
                    if gr["small"]:
                        continue
                    for m in metrics:
                        if m == "ece" and not gr["ece_flaggable"]:
                            continue  # never flagged: too few images per calibration bin
                        gap = gr["gap_to_overall"][m]
                        d, ci = gap["difference"]["value"], gap["difference"]["ci"]
                        if d is None or ci is None:
                            continue
                        is_flag = (gr["group"], m) in flagged
                        size = abs(abs(d) - bound)
                        excl = max(ci[0], -ci[1])  # > 0: the CI excludes 0
                        direction = abs(d)
                        if is_flag:
                            margin = min(size, excl, direction)
                        else:  # one robustly-failed condition is enough
                            worse = gap["worse"]
                            margin = max(size if abs(d) < bound else 0.0, -excl if excl < 0 else 0.0,
                                         direction if not worse else 0.0)
                        out.append((attr, gr["group"], m, is_flag, margin))
    return out


def assert_robust(decisions: list[tuple[str, str, str, bool, float]]) -> None:
    fragile = [d for d in decisions if d[4] <= EPS]
    assert not fragile, f"flag decisions a last-bit difference could flip: {fragile}"


def run_cli(tmp_path: Path, pred: pd.DataFrame, labels: Path, fmt: str, *extra: str) -> dict:
    pred_path = tmp_path / f"pred_{fmt}.csv"
    pred.to_csv(pred_path, index=False)
    out = tmp_path / f"rep_{fmt}_{abs(hash(extra)) % 10**6}"
    rc = evaluate_main(["--predictions", str(pred_path), "--labels", str(labels), "--labels-format", fmt,
                        "--findings", "cardiomegaly", "--attributes", "sex,age_band", "--intersections", "",
                        "--n-boot", "200", "--out", str(out), *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


def test_random_scores_on_nih_labels_flag_nothing_beyond_the_nominal_rate(tmp_path):
    truth = write_nih(tmp_path / "Data_Entry_2017.csv", n=8000, seed=20170901,
                      prevalence_by_sex={"M": 0.026, "F": 0.034})
    scores = np.random.default_rng(11).random(len(truth))
    report = run_cli(tmp_path, predictions(truth["id"], scores), tmp_path / "Data_Entry_2017.csv", "nih")
    res = report["test_sets"][0]["findings"]["cardiomegaly"]
    assert res["n"] == 8000 and res["n_unlabelled"] == 0
    assert res["overall"]["auroc"]["ci"][0] < 0.5 < res["overall"]["auroc"]["ci"][1]  # it is random
    decisions = flag_decisions(report, DEFAULT_FLAG_METRICS)
    assert_robust(decisions)
    n_tests = len(decisions)
    n_flags = sum(d[3] for d in decisions)
    alpha = 1 - report["settings"]["metrics"]["ci_level"]
    assert n_tests >= 20
    assert n_flags <= alpha * n_tests, [d for d in decisions if d[3]]
    # prevalence is reported per group, beside PPV and NPV
    sex = res["attributes"]["sex"]
    for gr in sex["groups"]:
        assert gr["prevalence"] == pytest.approx(gr["n_pos"] / gr["n"])
        assert gr["metrics"]["ppv"]["value"] is not None and gr["metrics"]["npv"]["value"] is not None


def test_random_scores_on_chexpert_labels_flag_nothing_and_report_the_policies(tmp_path):
    truth = write_chexpert(tmp_path / "train.csv", n=6000, seed=20190121)
    scores = np.random.default_rng(12).random(len(truth))
    report = run_cli(tmp_path, predictions(truth["id"], scores), tmp_path / "train.csv", "chexpert",
                     "--uncertain", "u_zeros")
    ts = report["test_sets"][0]
    policy = ts["label_policy"]
    assert policy["uncertain_policy"] == "u_zeros" and policy["blank_policy"] == "negative"
    raw = pd.read_csv(tmp_path / "train.csv")["Cardiomegaly"]
    assert policy["columns"]["Cardiomegaly"]["n_blank"] == int(raw.isna().sum()) > 0.7 * len(raw)
    assert policy["columns"]["Cardiomegaly"]["n_uncertain"] == int((raw == -1).sum())
    assert ts["findings"]["cardiomegaly"]["n"] == 6000  # blanks are negatives, nothing dropped
    decisions = flag_decisions(report, DEFAULT_FLAG_METRICS)
    assert_robust(decisions)
    n_flags = sum(d[3] for d in decisions)
    assert n_flags <= (1 - report["settings"]["metrics"]["ci_level"]) * len(decisions)
    html = (Path(next(iter(tmp_path.glob("rep_chexpert_*")))) / "report.html").read_text()
    assert "Blank (unmentioned) labels: <b>negative</b>" in html and "<b>u_zeros</b>" in html

    ignored = run_cli(tmp_path, predictions(truth["id"], scores), tmp_path / "train.csv", "chexpert",
                      "--uncertain", "u_zeros", "--blank", "ignore")
    kept = ignored["test_sets"][0]["findings"]["cardiomegaly"]
    assert kept["n"] == 6000 - int(raw.isna().sum())


def test_equally_good_model_is_not_flagged_on_ppv_unless_asked(tmp_path):
    """Men have the higher prevalence here; a model equally good for both sexes (same score
    distributions given the truth) gives women a lower PPV. That follows prevalence: it is
    reported, not flagged, unless --flag-metrics asks for it."""
    truth = write_nih(tmp_path / "Data_Entry_2017.csv", n=8000, seed=7, prevalence_by_sex={"M": 0.20, "F": 0.05})
    rng = np.random.default_rng(13)
    scores = np.clip(np.where(truth["y"] == 1, rng.normal(0.7, 0.15, len(truth)),
                              rng.normal(0.35, 0.15, len(truth))), 0, 1)
    default = run_cli(tmp_path, predictions(truth["id"], scores), tmp_path / "Data_Entry_2017.csv", "nih",
                      "--attributes", "sex", "--calibration-bins", "10")
    sex = default["test_sets"][0]["findings"]["cardiomegaly"]["attributes"]["sex"]
    women = next(g for g in sex["groups"] if g["group"] == "F")
    ppv_gap = women["gap_to_overall"]["ppv"]
    assert ppv_gap["worse"] and ppv_gap["difference"]["ci"][1] < -default["settings"]["gap_bound"]
    assert not [f for f in sex["flagged"] if f["metric"] in ("ppv", "npv")]
    assert_robust(flag_decisions(default, ("auroc", "fnr", "fpr")))
    assert not [f for f in sex["flagged"] if f["metric"] in ("auroc", "fnr", "fpr")]

    asked = run_cli(tmp_path, predictions(truth["id"], scores), tmp_path / "Data_Entry_2017.csv", "nih",
                    "--attributes", "sex", "--flag-metrics", "auroc,underdiagnosis,fpr,ppv")
    assert asked["settings"]["flag_metrics"] == ["auroc", "fnr", "fpr", "ppv"]
    flags = asked["test_sets"][0]["findings"]["cardiomegaly"]["attributes"]["sex"]["flagged"]
    assert ("F", "ppv") in {(f["group"], f["metric"]) for f in flags}


# --- the command as its user meets it -------------------------------------------------------

def test_success_prints_where_the_report_is_and_a_summary(tmp_path, capsys):
    truth = write_nih(tmp_path / "Data_Entry_2017.csv", n=400, seed=3, prevalence_by_sex={"M": 0.2, "F": 0.2})
    pred = predictions(truth["id"], np.random.default_rng(1).random(len(truth)))
    pred.to_csv(tmp_path / "p.csv", index=False)
    rc = evaluate_main(["--predictions", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "Data_Entry_2017.csv"),
                        "--labels-format", "nih", "--findings", "cardiomegaly", "--n-boot", "20",
                        "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'out' / 'report.html'}" in out
    assert "test set / cardiomegaly: n=400, AUROC" in out and "flagged gap(s)" in out
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.index("<h2>Answer</h2>") < html.index("Settings")  # the answer leads
    assert "prevalence" in html and "underdiagnosis" in html
    assert html.count("<th>FNR (under&shy;diagnosis)</th>") >= 1 and "<th>underdiagnosis</th>" not in html


@pytest.mark.parametrize("case,needle", [
    ("missing_predictions", "--predictions {tmp}/nope.csv: predictions file"),
    ("missing_labels", "--labels (nih) {tmp}/nope.csv: labels (nih) not found"),
    ("no_uncertain", "chexpert labels need an explicit uncertainty policy: pass --uncertain u_ones"),
    ("wrong_format", "lacks the column(s) ['Path'"),
    ("bad_key", "lack the join key column 'image'"),
    ("bad_metric", "--flag-metrics: metric 'accuracy' is not known"),
])
def test_input_errors_are_one_line_naming_the_input(tmp_path, capsys, case, needle):
    truth = write_nih(tmp_path / "Data_Entry_2017.csv", n=50, seed=3, prevalence_by_sex={"M": 0.2, "F": 0.2})
    predictions(truth["id"], np.full(len(truth), 0.5)).to_csv(tmp_path / "p.csv", index=False)
    args = {"--predictions": str(tmp_path / "p.csv"), "--labels": str(tmp_path / "Data_Entry_2017.csv"),
            "--labels-format": "nih", "--out": str(tmp_path / "out"), "--n-boot": "5",
            "--findings": "cardiomegaly"}
    if case == "missing_predictions":
        args["--predictions"] = str(tmp_path / "nope.csv")
    elif case == "missing_labels":
        args["--labels"] = str(tmp_path / "nope.csv")
    elif case == "no_uncertain":
        args["--labels-format"] = "chexpert"
    elif case == "wrong_format":
        args["--labels-format"] = "chexpert"
        args["--uncertain"] = "ignore"
    elif case == "bad_key":
        args["--pred-key"] = "image"
    elif case == "bad_metric":
        args["--flag-metrics"] = "auroc,accuracy"
    rc = evaluate_main([x for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("cxr-ai evaluate: ") and err.count("cxr-ai evaluate:") == 1, err
    assert needle.format(tmp=tmp_path) in err, err


def test_verbose_after_the_subcommand_and_help_on_every_option(tmp_path, capsys):
    from cxr_ai import cli

    parser = cli.build_parser()
    args = parser.parse_args(["evaluate", "-v", "-v", "--predictions", "p", "--labels", "l", "--out", "o"])
    assert args.verbose == 2
    assert parser.parse_args(["-v", "evaluate", "--predictions", "p", "--labels", "l", "--out", "o"]).verbose == 1
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["evaluate"]
    no_help = [a.dest for a in sub._actions if not a.help]
    assert no_help == [], no_help
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert 'id = "Image Index" of Data_Entry_2017.csv' in text
    assert 'id = "Path" of train.csv/valid.csv' in text
    assert "p_F (probability) and thr_F (operating threshold) or pred_F" in text


def test_calibration_error_is_flagged_for_a_miscalibrated_group_not_for_a_small_calibrated_one():
    from cxr_ai.evaluation.metrics import MetricSettings, flagged_gaps, group_metrics

    rng = np.random.default_rng(5)
    n = 6000
    g = rng.choice(["A", "B", "tiny"], n, p=[0.6, 0.39, 0.01])
    s = rng.random(n)
    y = (rng.random(n) < s).astype(int)  # calibrated for everyone...
    b = g == "B"
    s_out = s.copy()
    s_out[b] = np.clip(s[b] * 0.5 + 0.45, 0, 1)  # ...but B's scores are pushed upwards: same ranking
    r = group_metrics(y, s_out, s_out >= 0.5, g, settings=MetricSettings(n_boot=200, random_state=0))
    flags = {(f["group"], f["metric"]) for f in flagged_gaps(r, min_abs_gap=0.05)}
    assert ("B", "ece") in flags and ("B", "auroc") not in flags
    tiny = next(x for x in r["groups"] if x["group"] == "tiny")
    assert tiny["n"] < 100 and not tiny["ece_flaggable"] and "biased upwards" in tiny["ece_status"]
    assert not any(grp == "tiny" for grp, _ in flags), flags
    assert ("A", "ece") not in flags, flags
