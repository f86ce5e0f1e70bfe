"""Synthetic chest radiograph phantoms: DICOM validity, determinism, labels, ground truth."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from cxr_ai.errors import ConfigError
from cxr_ai.phantoms import (
    LABEL_COLUMNS,
    ChestParams,
    PhantomConfig,
    generate_studies,
    make_phantom_dataset,
    render_chest,
    sample_chest_params,
    sample_labels,
)

# A small mixed set: laterals, non-chest studies, repeat patients, a shifted subgroup.
MIXED = PhantomConfig(
    n_studies=10, seed=5, size=128, fraction_lateral=0.6, fraction_non_chest=0.3,
    fraction_repeat_patient=0.5, shift_group={"race": "White"}, shift_strength=0.5,
)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("phantoms")
    return out, generate_studies(out, MIXED)


# --- DICOM validity ---------------------------------------------------------------------------

CASES = {
    "cr_mono1_pa": dict(modality="CR", photometric="MONOCHROME1", view="PA", bits_stored=12),
    "cr_mono2_ap": dict(modality="CR", photometric="MONOCHROME2", view="AP", bits_stored=15),
    "dx_mono1_pa": dict(modality="DX", photometric="MONOCHROME1", view="PA", bits_stored=14),
    "dx_mono2_ap": dict(modality="DX", photometric="MONOCHROME2", view="AP", bits_stored=16),
    "cr_lateral": dict(modality="CR", photometric="MONOCHROME1", view="LL", bits_stored=12),
    "dx_lateral": dict(modality="DX", photometric="MONOCHROME2", view="LL", bits_stored=16),
    "cr_hand": dict(modality="CR", photometric="MONOCHROME2", body_part="HAND", bits_stored=12),
    "dx_abdomen": dict(modality="DX", photometric="MONOCHROME1", body_part="ABDOMEN", bits_stored=14),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dciodvfy_reports_no_errors(case: str, tmp_path: Path) -> None:
    ds = make_phantom_dataset(size=512, random_state=3, **CASES[case])
    path = tmp_path / f"{case}.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    sop = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
    assert pydicom.dcmread(path).SOPClassUID == sop[CASES[case]["modality"]]


def test_headers_are_realistic() -> None:
    ds = make_phantom_dataset(modality="DX", photometric="MONOCHROME1", size=256, sex="F", age=57,
                              race="Asian", random_state=1)
    assert ds.PatientSex == "F" and ds.PatientAge == "057Y" and ds.EthnicGroup == "Asian"
    assert ds.Manufacturer == "cxr-ai phantom" and ds.BodyPartExamined == "CHEST"
    assert ds.PresentationLUTShape == "INVERSE" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.BurnedInAnnotation == "NO" and ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
    assert 0.1 < float(ds.ImagerPixelSpacing[0]) < 2.0 and list(ds.PatientOrientation) == ["L", "F"]
    assert ds.pixel_array.max() < 2**ds.BitsStored and float(ds.WindowWidth) > 0


def test_monochrome1_is_the_inverse_of_monochrome2() -> None:
    common = dict(modality="CR", size=128, bits_stored=12, random_state=9)
    m1 = make_phantom_dataset(photometric="MONOCHROME1", **common).pixel_array.astype(float)
    m2 = make_phantom_dataset(photometric="MONOCHROME2", **common).pixel_array.astype(float)
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] < -0.999


# --- determinism ------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    config = PhantomConfig(n_studies=3, size=96, fraction_lateral=0.5)
    a, b, c = (generate_studies(tmp_path / name, config, seed=s)
               for name, s in (("a", 4), ("b", 4), ("c", 5)))
    tree_a, tree_b, tree_c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert tree_a == tree_b
    assert a.equals(b)
    assert set(a["sop_uid"]).isdisjoint(c["sop_uid"])
    assert tree_a["study_0000/img_00.dcm"] != tree_c["study_0000/img_00.dcm"]


def test_make_phantom_dataset_is_deterministic() -> None:
    one = make_phantom_dataset(size=96, random_state=11)
    two = make_phantom_dataset(size=96, random_state=11)
    other = make_phantom_dataset(size=96, random_state=12)
    assert one.SOPInstanceUID == two.SOPInstanceUID and one.PixelData == two.PixelData
    assert other.SOPInstanceUID != one.SOPInstanceUID


# --- labels CSV ------------------------------------------------------------------------------


def test_labels_csv_columns_and_files(mixed: tuple[Path, pd.DataFrame]) -> None:
    out, table = mixed
    with open(out / "labels.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header[: len(LABEL_COLUMNS)]) == LABEL_COLUMNS
    on_disk = pd.read_csv(out / "labels.csv", dtype={"accession": str})
    assert len(on_disk) == len(table) == len(list(out.rglob("*.dcm")))
    assert on_disk["file"].str.fullmatch(r"study_\d{4}/img_\d{2}\.dcm").all()
    assert table["study_uid"].nunique() == MIXED.n_studies
    assert set(table["view"]) <= {"PA", "AP", "LL"}


def test_labels_agree_with_headers(mixed: tuple[Path, pd.DataFrame]) -> None:
    out, table = mixed
    for row in table.itertuples():
        ds = pydicom.dcmread(out / row.file, stop_before_pixels=True)
        assert ds.PatientID == row.patient_id
        assert ds.StudyInstanceUID == row.study_uid and ds.SeriesInstanceUID == row.series_uid
        assert ds.SOPInstanceUID == row.sop_uid and ds.AccessionNumber == row.accession
        assert ds.Modality == row.modality and ds.ViewPosition == row.view
        assert ds.BodyPartExamined == row.body_part
        assert ds.PatientSex == row.sex and ds.PatientAge == f"{row.age:03d}Y"
        assert ds.EthnicGroup == row.race
        assert ds.PhotometricInterpretation == row.photometric
        assert (ds.Rows, ds.Columns) == (row.rows, row.columns)
        assert row.frontal_chest == int(row.body_part == "CHEST" and row.view in ("PA", "AP"))


def test_mixed_set_has_gate_negatives_and_shift(mixed: tuple[Path, pd.DataFrame]) -> None:
    _, table = mixed
    assert (table["view"] == "LL").any()
    assert (table["body_part"] != "CHEST").any()
    assert (table["frontal_chest"] == 1).any()
    assert (table["shifted"] == (table["race"] == "White").astype(int)).all()


def test_read_radiograph_round_trip(mixed: tuple[Path, pd.DataFrame]) -> None:
    from cxr_ai.dicom.reader import read_radiograph

    out, table = mixed
    for row in table.itertuples():
        rg = read_radiograph(out / row.file)
        assert rg.patient_id == row.patient_id and rg.sex == row.sex
        assert rg.age_years is not None and int(rg.age_years) == row.age
        assert rg.view_position == row.view and rg.modality == row.modality
        assert rg.body_part == row.body_part and rg.photometric == row.photometric
        assert (rg.rows, rg.columns) == (row.rows, row.columns)
        pixels = rg.pixels()
        assert pixels.shape == (row.rows, row.columns) and pixels.dtype == np.uint16
        assert int(pixels.max()) < 2**row.bits_stored and pixels.std() > 0


# --- ground truth -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def population() -> pd.DataFrame:
    return sample_labels(PhantomConfig(n_studies=400, seed=21))


def test_cardiomegaly_and_low_ef_follow_their_rules(population: pd.DataFrame) -> None:
    assert (population["cardiomegaly"] == (population["ctr"] > 0.5).astype(int)).all()
    assert (population["low_ef"] == (population["lvef"] <= 40).astype(int)).all()
    assert population["age"].between(18, 95).all()
    # AP films magnify the heart; PA films show it true to size
    chest = population[population["body_part"] == "CHEST"]
    ap, pa = chest[chest["view"] == "AP"], chest[chest["view"] == "PA"]
    assert (ap["ctr_apparent"] > ap["ctr"]).all() and (pa["ctr_apparent"] == pa["ctr"]).all()


def test_low_ef_correlates_with_cardiomegaly_but_is_not_identical(population: pd.DataFrame) -> None:
    frontal = population[population["frontal_chest"] == 1]
    tab = pd.crosstab(frontal["cardiomegaly"], frontal["low_ef"])
    assert tab.loc[1, 0] > 0 and tab.loc[0, 1] > 0  # label noise in both directions
    phi = np.corrcoef(frontal["cardiomegaly"], frontal["low_ef"])[0, 1]
    assert 0.3 < phi < 0.9
    assert 0.15 < frontal["cardiomegaly"].mean() < 0.35
    assert 0.12 < frontal["low_ef"].mean() < 0.30
    # congestion signs come mostly with low EF
    congested = frontal["congestion"] > 0
    assert frontal.loc[congested, "low_ef"].mean() > 0.6


def test_several_studies_per_patient_exist(population: pd.DataFrame) -> None:
    studies = population.groupby("patient_id")["study_uid"].nunique()
    assert (studies > 1).any() and (studies == 1).any()
    # a study belongs to one patient; later visits are not younger
    assert (population.groupby("study_uid")["patient_id"].nunique() == 1).all()
    for _, visits in population.groupby("patient_id"):
        assert visits.sort_values("visit")["age"].is_monotonic_increasing


def test_prevalence_parameters_are_honoured() -> None:
    table = sample_labels(PhantomConfig(n_studies=300, seed=2, prevalence_cardiomegaly=0.5,
                                        prevalence_low_ef=0.05, fraction_non_chest=0.0))
    assert 0.4 < table["cardiomegaly"].mean() < 0.6
    assert table["low_ef"].mean() < 0.12


def test_sample_chest_params_matches_labels() -> None:
    params, labels = sample_chest_params(n=50, random_state=0)
    assert len(params) == len(labels) == 50
    assert [p.ctr for p in params] == labels["ctr"].tolist()
    assert {p.view for p in params} <= {"PA", "AP"}


# --- images -----------------------------------------------------------------------------------


def _highpass_std(img: np.ndarray) -> float:
    """Noise estimate: robust spread of the horizontal second difference."""
    d = img[:, 2:] - 2 * img[:, 1:-1] + img[:, :-2]
    return float(np.median(np.abs(d - np.median(d))) / 0.6745 / np.sqrt(6))


def test_render_shape_range_and_heart_side() -> None:
    rng = np.random.default_rng(0)
    img = render_chest(ChestParams(ctr=0.55), 160, 192, rng)
    assert img.shape == (160, 192) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    # the heart lies mostly to the patient's left = image right: the cardiac band is brighter there
    band = img[85:115]
    assert band[:, 106:140].mean() > band[:, 52:86].mean() + 0.05


def test_larger_ctr_shows_a_larger_heart() -> None:
    small = render_chest(ChestParams(ctr=0.40, noise=0.0), 128, 128, np.random.default_rng(1))
    large = render_chest(ChestParams(ctr=0.60, noise=0.0), 128, 128, np.random.default_rng(1))
    lower_lungs = np.s_[64:100, 16:112]
    assert (large[lower_lungs] > 0.75).mean() > (small[lower_lungs] > 0.75).mean() + 0.05


def test_shift_group_images_are_noisier() -> None:
    params = ChestParams(ctr=0.45)
    plain = render_chest(params, 256, 256, np.random.default_rng(3))
    shifted = render_chest(ChestParams(ctr=0.45, quality_shift=1.0), 256, 256, np.random.default_rng(3))
    assert _highpass_std(shifted) > 2.0 * _highpass_std(plain)
    # and lower in contrast
    def spread(img: np.ndarray) -> float:
        return float(np.percentile(img, 95) - np.percentile(img, 5))

    assert spread(shifted) < spread(plain)


def test_shifted_rows_in_generated_studies_are_noisier(mixed: tuple[Path, pd.DataFrame]) -> None:
    out, table = mixed
    frontal = table[table["frontal_chest"] == 1]
    assert frontal["shifted"].nunique() == 2

    def noise(row: pd.Series) -> float:
        ds = pydicom.dcmread(out / row["file"])
        return _highpass_std(ds.pixel_array.astype(np.float64)) / float(ds.WindowWidth)

    levels = frontal.assign(noise=frontal.apply(noise, axis=1)).groupby("shifted")["noise"].median()
    assert levels[1] > 1.5 * levels[0]


# --- configuration ----------------------------------------------------------------------------


def test_config_rejects_bad_values_with_clear_messages() -> None:
    with pytest.raises(ConfigError, match="shift_group keys"):
        PhantomConfig(shift_group={"eye_colour": "blue"})
    with pytest.raises(ConfigError, match="bits_stored"):
        PhantomConfig(bits_stored=(8,))
    with pytest.raises(ConfigError, match="prevalence_low_ef"):
        PhantomConfig(prevalence_low_ef=1.5)


def test_generate_studies_overrides(tmp_path: Path) -> None:
    table = generate_studies(tmp_path, n=2, seed=3, size=64)
    assert table["study_uid"].nunique() == 2
    assert set(table["rows"]) == {64} and table["patient_id"].str.startswith("PH3-").all()
