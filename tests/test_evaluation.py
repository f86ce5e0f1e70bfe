"""Offline evaluation: loaders on tiny files in the public formats, metrics against
scikit-learn/fairlearn, bootstrap CIs, not-estimable groups, and the injected-shift check.

Scores in the shift tests are SIMULATED deterministically from the phantom truth
(:func:`cxr_ai.evaluation.simulate.simulate_predictions`: the shifted group's scores are
noisier); no trained bundle ships yet to run predictions from the phantom pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    false_negative_rate,
    false_positive_rate,
    true_negative_rate,
    true_positive_rate,
)
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_score, roc_auc_score

from cxr_ai.evaluation import labels as L
from cxr_ai.evaluation.embeddings import embedding_analysis, load_embeddings
from cxr_ai.evaluation.evaluate import (
    EvaluationSettings,
    evaluate_frames,
    join_predictions,
)
from cxr_ai.evaluation.metrics import (
    STATUS_NO_BOTH_CLASSES,
    STATUS_NO_POSITIVES,
    MetricSettings,
    calibration,
    expected_calibration_error,
    group_metrics,
    stratified_bootstrap_weights,
    weighted_auroc,
)
from cxr_ai.evaluation.simulate import simulate_predictions


def _synthetic(n: int, *, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, n), 0, 1)
    g = rng.choice(["A", "B", "C"], n, p=[0.5, 0.3, 0.2])
    return y, s, s >= 0.5, g


# --- metrics ---------------------------------------------------------------------------------

def test_every_metric_equals_sklearn_and_fairlearn():
    y, s, p, g = _synthetic(600)
    r = group_metrics(y, s, p, g, settings=MetricSettings(n_boot=0), attribute="g")
    ref = {
        "sensitivity": true_positive_rate, "specificity": true_negative_rate,
        "fpr": false_positive_rate, "fnr": false_negative_rate,
    }
    for gr in r["groups"]:
        m = g == gr["group"]
        assert gr["n"] == m.sum()
        assert gr["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y[m], s[m]), abs=1e-12)
        assert gr["metrics"]["ppv"]["value"] == pytest.approx(precision_score(y[m], p[m]), abs=1e-12)
        assert gr["metrics"]["npv"]["value"] == pytest.approx(precision_score(y[m], p[m], pos_label=0), abs=1e-12)
        assert gr["metrics"]["ece"]["value"] == pytest.approx(expected_calibration_error(y[m], s[m]), abs=1e-12)
        assert gr["prevalence"] == pytest.approx(y[m].mean())
        for name, fn in ref.items():
            assert gr["metrics"][name]["value"] == pytest.approx(fn(y[m], p[m], pos_label=1), abs=1e-12)
    assert r["overall"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # gaps are fairlearn's MetricFrame differences / ratios to overall
    mf = MetricFrame(metrics={"tpr": true_positive_rate}, y_true=y, y_pred=p, sensitive_features=g)
    diff = mf.by_group["tpr"] - mf.overall["tpr"]
    for gr in r["groups"]:
        assert gr["gap_to_overall"]["sensitivity"]["difference"]["value"] == pytest.approx(diff[gr["group"]])
        assert gr["gap_to_overall"]["sensitivity"]["ratio"]["value"] == pytest.approx(
            mf.by_group["tpr"][gr["group"]] / mf.overall["tpr"])
    # best group for a lower-is-better metric is the minimum
    fnr = {gr["group"]: gr["metrics"]["fnr"]["value"] for gr in r["groups"]}
    assert r["best_group"]["fnr"] == min(fnr, key=fnr.get)


def test_bootstrap_replicates_equal_sklearn_with_sample_weight():
    y, s, _, _ = _synthetic(300, seed=1)
    s = np.round(s, 1)  # many ties
    w = stratified_bootstrap_weights(y, n_boot=8, random_state=3)
    assert (w[:, y == 1].sum(axis=1) == (y == 1).sum()).all()  # class counts kept
    got = weighted_auroc(y, s, w)
    want = [roc_auc_score(y, s, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_bootstrap_is_reproducible_with_random_state():
    y, s, p, g = _synthetic(300)
    a = group_metrics(y, s, p, g, settings=MetricSettings(n_boot=50, random_state=7))
    b = group_metrics(y, s, p, g, settings=MetricSettings(n_boot=50, random_state=7))
    c = group_metrics(y, s, p, g, settings=MetricSettings(n_boot=50, random_state=8))
    assert a["overall"]["auroc"]["ci"] == b["overall"]["auroc"]["ci"] != c["overall"]["auroc"]["ci"]


def test_ci_width_shrinks_as_n_grows():
    widths = []
    for n in (200, 800, 3200):
        y, s, p, g = _synthetic(n, seed=5)
        r = group_metrics(y, s, p, g, settings=MetricSettings(n_boot=200, random_state=0))
        widths.append({m: r["overall"][m]["ci"][1] - r["overall"][m]["ci"][0] for m in ("auroc", "sensitivity")}
                      | {"gap": np.subtract(*r["groups"][0]["gap_to_overall"]["auroc"]["difference"]["ci"][::-1])})
    for key in widths[0]:
        assert widths[0][key] > widths[1][key] > widths[2][key], (key, widths)


def test_one_class_group_is_not_estimable_and_json_has_no_nan():
    y, s, p, g = _synthetic(400)
    g = g.astype(object)
    g[:12] = "OnlyNeg"
    y[:12] = 0
    r = group_metrics(y, s, p, g, settings=MetricSettings(n_boot=30, min_group_size=30))
    one = next(gr for gr in r["groups"] if gr["group"] == "OnlyNeg")
    assert one["metrics"]["auroc"] == {"value": None, "ci": None,
                                       "status": STATUS_NO_BOTH_CLASSES.format(n_pos=0, n_neg=12)}
    assert one["metrics"]["sensitivity"]["status"] == STATUS_NO_POSITIVES
    assert one["metrics"]["specificity"]["value"] is not None
    assert one["small"] and one["status"].startswith("small group (n=12 < 30)")
    assert one["calibration"]["ece"] is None and one["calibration"]["status"].startswith("not estimable")
    assert one["gap_to_overall"]["auroc"]["significant"] is False
    json.dumps(r, allow_nan=False)  # raises on any NaN


def test_calibration_matches_sklearn_and_ece_by_hand():
    y, s, _, _ = _synthetic(500, seed=2)
    c = calibration(y, s, n_bins=5)
    pt, pp = calibration_curve(y, s, n_bins=5, strategy="uniform")
    np.testing.assert_allclose(c["prob_true"], pt)
    np.testing.assert_allclose(c["prob_pred"], pp)
    bins = np.minimum((s * 5).astype(int), 4)
    ece = sum((bins == b).mean() * abs(s[bins == b].mean() - y[bins == b].mean()) for b in range(5) if (bins == b).any())
    assert expected_calibration_error(y, s, n_bins=5) == pytest.approx(ece)


# --- loaders (tiny files in the exact public formats) ----------------------------------------

NIH_CSV = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.168,0.168
00000003_000.png,Hernia,0,3,17,F,PA,2582,2905,0.143,0.143
"""

CHEXPERT_CSV = """Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,,1.0,1.0,,,-1.0,,,,,,1.0,
CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,AP,,,0.0,,,1.0,,,,0.0,,,,
"""


def test_load_nih(tmp_path):
    f = tmp_path / "Data_Entry_2017.csv"
    f.write_text(NIH_CSV)
    t = L.load_nih(f)
    assert list(t.columns) == list(L.TRUTH_COLUMNS)
    assert t["cardiomegaly"].tolist() == [1, 1, 0, 0]
    assert t["no_finding"].tolist() == [0, 0, 1, 0]
    assert t["low_ef"].isna().all()
    assert t["age_band"].tolist() == ["40-59", "40-59", "80+", "0-19"]
    assert set(t["race"]) == {"Unknown"} and t["sex"].tolist() == ["M", "M", "M", "F"]


@pytest.mark.parametrize("policy,blank,expected", [
    ("u_ones", "ignore", [np.nan, 1, 1, 0]), ("u_zeros", "ignore", [np.nan, 0, 1, 0]),
    ("ignore", "ignore", [np.nan, np.nan, 1, 0]), ("u_ones", "negative", [0, 1, 1, 0]),
    ("ignore", "negative", [0, np.nan, 1, 0])])
def test_load_chexpert_uncertainty_and_blank_policies(tmp_path, policy, blank, expected):
    f = tmp_path / "train.csv"
    f.write_text(CHEXPERT_CSV)
    t = L.load_chexpert(f, uncertainty=policy, blank=blank)
    np.testing.assert_array_equal(t["cardiomegaly"].to_numpy(), np.array(expected, dtype=float))
    summary = t.attrs[L.POLICY_ATTR]
    assert summary["uncertain_policy"] == policy and summary["blank_policy"] == blank
    assert summary["columns"]["Cardiomegaly"] == {"n_rows": 4, "n_uncertain": 1, "n_blank": 1,
                                                  "n_positive": 1, "n_negative": 1}
    assert t["patient_id"].tolist() == ["patient00001", "patient00002", "patient00002", "patient00003"]
    assert t["sex"].tolist() == ["F", "F", "F", "M"]


def test_chexpert_policy_is_required_and_checked(tmp_path):
    f = tmp_path / "valid.csv"
    f.write_text(CHEXPERT_CSV)
    with pytest.raises(ValueError, match="uncertainty policy 'maybe' is not known"):
        L.load_chexpert(f, uncertainty="maybe")
    with pytest.raises(ValueError, match="need an explicit uncertainty policy: pass --uncertain"):
        L.load_labels(f, fmt="chexpert")
    with pytest.raises(ValueError, match="blank-label policy 'zero' is not known"):
        L.load_labels(f, fmt="chexpert", uncertainty="ignore", blank="zero")


def test_wrong_format_names_the_missing_columns(tmp_path):
    f = tmp_path / "Data_Entry_2017.csv"
    f.write_text(NIH_CSV)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['Path'"):
        L.load_chexpert(f, uncertainty="ignore")


def test_load_mimic_joins_and_reports_unmatched(tmp_path):
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
        "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
        "10000032,50414267,,,,,,,,,1.0,,,,,\n"
        "10000032,53189527,,-1.0,,,,,,,,,,,,\n"
        "10000764,57375967,,1.0,,,,,,,,,,,,\n"
        "10009999,59999999,,0.0,,,,,,,,,,,,\n")
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,"
        "ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning\n"
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect\n"
        "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PA AND LAT),PA,3056,2544,21800626,165500.312,CHEST (PA AND LAT),postero-anterior,Erect\n"
        "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4,10000764,57375967,CHEST (PORTABLE AP),AP,2544,3056,21321015,111300.0,CHEST (PORTABLE AP),antero-posterior,\n"
        "ffffffff-00000000-00000000-00000000-00000000,10008888,58888888,CHEST (PA AND LAT),PA,3056,2544,21500101,1.0,,,\n")
    hosp = tmp_path / "hosp"
    hosp.mkdir()
    (hosp / "patients.csv").write_text(
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n"
        "10000032,F,52,2180,2014 - 2016,2180-09-09\n10000764,M,86,2132,2014 - 2016,\n")
    (hosp / "admissions.csv").write_text(
        "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,admission_location,"
        "discharge_location,insurance,language,marital_status,race,edregtime,edouttime,hospital_expire_flag\n"
        "10000032,22595853,2180-05-06 22:23:00,2180-05-07 17:15:00,,URGENT,P874LG,TRANSFER FROM HOSPITAL,HOME,Other,ENGLISH,WIDOWED,WHITE,,,0\n"
        "10000032,22841357,2180-06-26 18:27:00,2180-06-27 18:49:00,,EW EMER.,P09Q6Y,EMERGENCY ROOM,HOME,Medicaid,ENGLISH,WIDOWED,WHITE,,,0\n"
        "10000764,27897940,2132-10-14 23:31:00,2132-10-19 16:30:00,,EW EMER.,P91MBW,EMERGENCY ROOM,HOME,Medicare,ENGLISH,,BLACK/AFRICAN AMERICAN,,,0\n")
    truth, reports = L.load_labels(tmp_path, fmt="mimic", uncertainty="u_zeros")
    assert truth["id"].str.len().eq(44).all() and len(truth) == 3
    by = truth.set_index("patient_id")
    assert by.loc["10000764", "race"] == "Black" and by.loc["10000764", "insurance"] == "Medicare"
    assert by.loc["10000764", "age"] == 86 and by.loc["10000764", "sex"] == "M"
    assert set(by.loc["10000032", "insurance"]) == {"Medicaid"}  # the most recent admission
    np.testing.assert_array_equal(truth["cardiomegaly"].to_numpy(), [0.0, 0.0, 1.0])  # blank (negative), -1 (u_zeros), 1
    assert truth.attrs[L.POLICY_ATTR]["columns"]["Cardiomegaly"]["n_blank"] == 1
    ignored, _ = L.load_labels(tmp_path, fmt="mimic", uncertainty="u_zeros", blank="ignore")
    np.testing.assert_array_equal(ignored["cardiomegaly"].to_numpy(), [np.nan, 0.0, 1.0])
    img_lab = reports[0]
    assert (img_lab.n_left_unmatched, img_lab.n_right_unmatched) == (1, 1)
    assert img_lab.examples_left_unmatched == ["10008888/58888888"]
    assert img_lab.examples_right_unmatched == ["10009999/59999999"]


def test_join_predictions_reports_unmatched_and_fills_header_demographics():
    truth = pd.DataFrame({"id": ["a", "b", "c"], "patient_id": "", "study_id": "", "cardiomegaly": [1.0, 0.0, 1.0],
                          "low_ef": np.nan, "no_finding": np.nan, "sex": ["Unknown", "F", "M"], "age": np.nan,
                          "age_band": "Unknown", "race": "Unknown", "insurance": "Unknown", "source": "x"})
    pred = pd.DataFrame({"sop_uid": ["a", "b", "z"], "p_cardiomegaly": [0.9, 0.1, 0.5], "sex": ["F", "M", "F"],
                         "age": [45, 50, 60], "ethnic_group": ["Asian", "", ""]})
    joined, rep = join_predictions(pred, truth)
    assert rep.n_matched == 2 and rep.examples_left_unmatched == ["z"] and rep.examples_right_unmatched == ["c"]
    row = joined.set_index("sop_uid")
    assert row.loc["a", "sex"] == "F" and row.loc["b", "sex"] == "F"  # known truth value kept
    assert row.loc["a", "race"] == "Asian" and row.loc["a", "age_band"] == "40-59"
    with pytest.raises(ValueError, match="no prediction matched any ground-truth row"):
        join_predictions(pred.assign(sop_uid=["x", "y", "w"]), truth)


def test_load_dicom_demographics_from_phantom_headers(tmp_path):
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    table = generate_studies(tmp_path / "ph", PhantomConfig(n_studies=4, seed=11, size=64))
    (tmp_path / "ph" / "notes.txt").write_text("not dicom")
    d = L.load_dicom_demographics(tmp_path / "ph")
    assert len(d) == len(table)
    merged = d.merge(table.astype({"sop_uid": str}), left_on="id", right_on="sop_uid")
    assert (merged["sex_x"] == merged["sex_y"]).all()
    assert (merged["race_x"] == merged["race_y"].map(L.normalise_race)).all()
    assert (merged["age_x"] == merged["age_y"]).all()


def test_normalise_race_of_mimic_values():
    assert [L.normalise_race(v) for v in ("WHITE", "BLACK/CAPE VERDEAN", "HISPANIC/LATINO - PUERTO RICAN",
                                          "ASIAN - CHINESE", "UNABLE TO OBTAIN", "AMERICAN INDIAN/ALASKA NATIVE",
                                          None)] == ["White", "Black", "Hispanic", "Asian", "Unknown", "Other", "Unknown"]


# --- embeddings ------------------------------------------------------------------------------

def test_embedding_pca_and_ks_find_the_encoded_group(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    sex = rng.choice(["M", "F"], n)
    race = rng.choice(["White", "Black", "Asian"], n)
    x = rng.normal(size=(n, 20))
    x[:, 3] += 2.5 * (sex == "F")  # sex is encoded; race is not
    ids = np.array([f"i{k}" for k in range(n)])
    np.savez(tmp_path / "emb.npz", ids=ids, embeddings=x)
    truth = pd.DataFrame({"id": ids, "sex": sex, "race": race, "age_band": "40-59",
                          "cardiomegaly": rng.integers(0, 2, n).astype(float)})
    res = embedding_analysis(load_embeddings(tmp_path / "emb.npz"), truth, attributes=("sex", "race"), random_state=0)
    sig = {(t["attribute"], t["group"]) for t in res["tests"] if t["significant"]}
    assert ("sex", "F") in sig and ("sex", "M") in sig
    assert not any(a == "race" for a, _ in sig)
    pq = tmp_path / "emb.parquet"
    pd.DataFrame(x, columns=[f"d{i}" for i in range(20)]).assign(id=ids).to_parquet(pq)
    np.testing.assert_allclose(load_embeddings(pq).loc[ids].to_numpy(), x)


# --- the injected shift (phantoms) -----------------------------------------------------------

SHIFT_SETTINGS = EvaluationSettings(attributes=("sex", "race", "insurance"), intersections=(),
                                    metrics=MetricSettings(n_boot=300, random_state=0, min_group_size=30))


@pytest.fixture(scope="module")
def shifted_phantoms(tmp_path_factory):
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    d = tmp_path_factory.mktemp("shifted")
    generate_studies(d, PhantomConfig(n_studies=500, seed=21, size=64, shift_group={"race": "Black"},
                                      shift_strength=1.0))
    return d


@pytest.fixture(scope="module")
def unshifted_phantoms(tmp_path_factory):
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    d = tmp_path_factory.mktemp("unshifted")
    generate_studies(d, PhantomConfig(n_studies=500, seed=22, size=64))
    return d


def _auroc_flags(result, finding="cardiomegaly"):
    r = result["findings"][finding]["attributes"]
    return {(f["attribute"], f["group"]) for a in r.values() for f in a["flagged"] if f["metric"] == "auroc"}


@pytest.mark.slow
def test_shift_gap_found_for_shifted_group_only(shifted_phantoms):
    labels = pd.read_csv(shifted_phantoms / "labels.csv")
    assert labels.loc[labels["race"] == "Black", "shifted"].all() and not labels.loc[labels["race"] != "Black", "shifted"].any()
    pred = simulate_predictions(labels, random_state=0)
    res = evaluate_frames(pred, L.load_ours(shifted_phantoms / "labels.csv"), settings=SHIFT_SETTINGS, name="shifted")
    for finding in ("cardiomegaly", "low_ef"):
        race = res["findings"][finding]["attributes"]["race"]
        black = next(g for g in race["groups"] if g["group"] == "Black")
        gap = black["gap_to_overall"]["auroc"]
        assert gap["significant"] and gap["worse"] and gap["difference"]["ci"][1] < 0, gap
        assert gap["difference"]["value"] < -SHIFT_SETTINGS.gap_bound
        assert _auroc_flags(res, finding) == {("race", "Black")}
    assert res["gate"]["n_rejected"] > 0 and res["joins"][0]["n_left_unmatched"] == 0


@pytest.mark.slow
def test_no_shift_no_gap(unshifted_phantoms):
    labels = pd.read_csv(unshifted_phantoms / "labels.csv")
    assert not labels["shifted"].any()
    pred = simulate_predictions(labels, random_state=0)
    res = evaluate_frames(pred, L.load_ours(unshifted_phantoms / "labels.csv"), settings=SHIFT_SETTINGS, name="clean")
    for finding in ("cardiomegaly", "low_ef"):
        assert _auroc_flags(res, finding) == set()
        flags = [f for a in res["findings"][finding]["attributes"].values() for f in a["flagged"]]
        assert flags == [] or all(abs(f["difference"]) >= SHIFT_SETTINGS.gap_bound for f in flags)


@pytest.mark.slow
def test_cli_report_side_by_side_renders_in_headless_chromium(shifted_phantoms, unshifted_phantoms, tmp_path):
    import shutil
    import subprocess

    from cxr_ai.evaluation.cli import evaluate_main

    for name, d in (("in", unshifted_phantoms), ("out", shifted_phantoms)):
        simulate_predictions(pd.read_csv(d / "labels.csv"), random_state=1).to_csv(tmp_path / f"{name}.csv", index=False)
    rc = evaluate_main(["--predictions", str(tmp_path / "in.csv"), "--labels", str(unshifted_phantoms / "labels.csv"),
                        "--predictions", str(tmp_path / "out.csv"), "--labels", str(shifted_phantoms / "labels.csv"),
                        "--name", "in-domain", "--name", "out-of-domain", "--attributes", "race",
                        "--findings", "cardiomegaly", "--intersections", "", "--n-boot", "50",
                        "--out", str(tmp_path / "rep")])
    assert rc == 0
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [t["name"] for t in data["test_sets"]] == ["in-domain", "out-of-domain"]
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Test sets side by side" in html
    n_img = html.count("<img ")
    assert n_img >= 2 * 4  # per test set: ROC, calibration, gaps, confusion matrices
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("headless Chromium is required for this test: apt-get install -y chromium")
    # Same page plus a check that counts the images the browser actually decoded.
    probe = tmp_path / "rep" / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.addEventListener('load',()=>{const ok=[...document"
                                  ".images].filter(i=>i.complete&&i.naturalWidth>0&&i.naturalHeight>0).length;"
                                  "const d=document.createElement('div');d.id='decoded';d.textContent='decoded='+ok;"
                                  "document.body.appendChild(d);});</script></body>"))
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout
    assert f"decoded={n_img}<" in dom, dom[-300:]
    png = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={png}", "--window-size=1200,2000", (tmp_path / "rep" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not blank: text, tables and plots


def test_every_bootstrap_replicate_equals_the_libraries_on_the_resampled_rows():
    from cxr_ai.evaluation.metrics import weighted_metrics

    y, s, p, _ = _synthetic(200, seed=9)
    w = stratified_bootstrap_weights(y, n_boot=4, random_state=0)
    got = weighted_metrics(y, p, s, w)
    for b in range(4):
        idx = np.repeat(np.arange(len(y)), w[b].astype(int))
        yy, pp, ss = y[idx], p[idx], s[idx]
        assert got["auroc"][b] == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)
        assert got["sensitivity"][b] == pytest.approx(true_positive_rate(yy, pp, pos_label=1), abs=1e-12)
        assert got["specificity"][b] == pytest.approx(true_negative_rate(yy, pp, pos_label=1), abs=1e-12)
        assert got["fpr"][b] == pytest.approx(false_positive_rate(yy, pp, pos_label=1), abs=1e-12)
        assert got["fnr"][b] == pytest.approx(false_negative_rate(yy, pp, pos_label=1), abs=1e-12)
        assert got["ppv"][b] == pytest.approx(precision_score(yy, pp), abs=1e-12)
        assert got["npv"][b] == pytest.approx(precision_score(yy, pp, pos_label=0), abs=1e-12)
        assert got["ece"][b] == pytest.approx(expected_calibration_error(yy, ss), abs=1e-12)


def test_cli_choices_match_the_loaders() -> None:
    from cxr_ai.evaluation import cli, labels

    from cxr_ai.evaluation import metrics

    assert cli.LABEL_FORMATS == labels.LABEL_FORMATS
    assert cli.UNCERTAINTY_POLICIES == labels.UNCERTAINTY_POLICIES
    assert cli.BLANK_POLICIES == labels.BLANK_POLICIES
    assert cli.DEFAULT_BLANK_POLICY == labels.DEFAULT_BLANK_POLICY
    assert cli.DEFAULT_FLAG_METRICS == metrics.DEFAULT_FLAG_METRICS
