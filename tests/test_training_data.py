"""Dataset loaders on tiny files in the exact public formats; pixels through the one pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_ai.imaging import PixelPipelineSpec, display_array, letterbox, preprocess
from cxr_ai.dicom.reader import read_radiograph
from training import data as D

SPEC = PixelPipelineSpec(size=32)


def _picture(rng: np.random.Generator, h: int = 40, w: int = 48) -> np.ndarray:
    """A chest-like grey picture: dark lungs, bright mediastinum, some noise."""
    y, x = np.mgrid[0:h, 0:w]
    img = 0.6 - 0.35 * (np.abs(x - w / 2) > w / 8) * (np.abs(x - w / 2) < w / 2.3)
    return np.clip(img + 0.05 * rng.standard_normal((h, w)), 0, 1)


def _png(path: Path, arr: np.ndarray, bits: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        Image.fromarray((arr * 255).astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray((arr * 65535).astype(np.uint16)).save(path)


# --- NIH ChestX-ray14 ---------------------------------------------------------------------------

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
NIH_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,\n",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,\n",
    "00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.168,0.168,\n",
    "00000003_000.png,Effusion|Infiltration,0,3,074Y,F,PA,2048,2500,0.168,0.168,\n",
    "00000004_000.png,Mass,0,4,7,M,AP,2048,2500,0.168,0.168,\n",
]


@pytest.fixture()
def nih_root(tmp_path: Path) -> Path:
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text(NIH_HEADER + "".join(NIH_ROWS))
    rng = np.random.default_rng(0)
    for i, row in enumerate(NIH_ROWS[:4]):  # the last image is missing on disk
        folder = "images_001/images" if i < 2 else "images_002/images"
        _png(root / folder / row.split(",")[0], _picture(rng))
    return root


def test_nih_loader(nih_root: Path) -> None:
    df = D.load_nih_chestxray14(nih_root)
    assert list(df.columns[: len(D.MANIFEST_COLUMNS)]) == list(D.MANIFEST_COLUMNS)
    assert len(df) == 4  # the missing file is skipped
    assert df["cardiomegaly"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert df["low_ef"].isna().all()
    assert df["patient_id"].tolist() == ["nih-1", "nih-1", "nih-2", "nih-3"]
    assert df["study_id"].iloc[1] == "nih-1-1"
    assert df["age"].tolist() == [58.0, 58.0, 81.0, 74.0]  # "074Y" parsed
    assert df["sex"].tolist() == ["M", "M", "F", "F"]
    assert df["view"].tolist() == ["PA", "PA", "AP", "PA"]
    assert all(Path(p).is_file() for p in df["path"])
    img = D.load_image(df["path"].iloc[0], "image", SPEC)
    assert img.shape == (1, 32, 32) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.9


def test_nih_wrong_file_is_explained(tmp_path: Path) -> None:
    (tmp_path / "Data_Entry_2017.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns .* are missing; is this the NIH Data_Entry_2017.csv file"):
        D.load_nih_chestxray14(tmp_path)
    with pytest.raises(FileNotFoundError, match="NIH label file"):
        D.load_nih_chestxray14(tmp_path / "nowhere")


# --- CheXpert ----------------------------------------------------------------------------------

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices\n"
)
CHEXPERT_ROWS = [
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0\n",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,\n",
    "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,,1.0,1.0,,,-1.0,,,,,,1.0,\n",
    "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,1.0,1.0,,,-1.0,,,,,,1.0,\n",
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,AP,,,0.0,,,1.0,,,,0.0,,,,\n",
]


@pytest.fixture()
def chexpert_root(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv").write_text(CHEXPERT_HEADER + "".join(CHEXPERT_ROWS))
    rng = np.random.default_rng(1)
    for row in CHEXPERT_ROWS:
        rel = row.split(",")[0]
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((_picture(rng) * 255).astype(np.uint8)).convert("RGB").save(p, quality=95)
    return root


@pytest.mark.parametrize(
    "policy, expected",
    [("u_ones", [0.0, 1.0, 1.0, 0.0]), ("u_zeros", [0.0, 0.0, 1.0, 0.0]), ("ignore", [0.0, np.nan, 1.0, 0.0])],
)
def test_chexpert_uncertainty_policies(chexpert_root: Path, policy: str, expected: list) -> None:
    df = D.load_chexpert(chexpert_root, uncertainty=policy)
    assert len(df) == 4  # the lateral view is dropped
    np.testing.assert_array_equal(df["cardiomegaly"].to_numpy(), np.array(expected))
    assert df["patient_id"].tolist() == ["chexpert-patient00001", "chexpert-patient00002", "chexpert-patient00002", "chexpert-patient00003"]
    assert df["study_id"].iloc[1] != df["study_id"].iloc[2]
    assert df["sex"].tolist() == ["F", "F", "F", "M"]
    assert all(Path(p).is_file() for p in df["path"])
    assert df.attrs["uncertainty"] == policy
    img = D.load_image(df["path"].iloc[0], "image", SPEC)  # RGB JPEG -> grey -> pipeline
    assert img.shape == (1, 32, 32)


def test_chexpert_blank_can_be_masked(chexpert_root: Path) -> None:
    df = D.load_chexpert(chexpert_root, uncertainty="u_zeros", blank=np.nan)
    assert np.isnan(df["cardiomegaly"].iloc[0])  # blank (not mentioned) -> unknown


def test_chexpert_needs_an_explicit_policy(chexpert_root: Path) -> None:
    with pytest.raises(ValueError, match="uncertainty policy 'u_maybe' is not one of"):
        D.load_chexpert(chexpert_root, uncertainty="u_maybe")
    with pytest.raises(TypeError):
        D.load_chexpert(chexpert_root)  # type: ignore[call-arg]  # no silent default


def test_apply_uncertainty_values() -> None:
    s = pd.Series([1.0, 0.0, -1.0, np.nan])
    assert D.apply_uncertainty(s, "u_ones").tolist() == [1.0, 0.0, 1.0, 0.0]
    assert D.apply_uncertainty(s, "u_zeros").tolist() == [1.0, 0.0, 0.0, 0.0]
    out = D.apply_uncertainty(s, "ignore")
    assert out.iloc[:2].tolist() == [1.0, 0.0] and out.iloc[2:].isna().tolist() == [True, False]


# --- MIMIC-CXR-JPG + MIMIC-IV ----------------------------------------------------------------


@pytest.fixture()
def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    root.mkdir()
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
        "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
        "10000032,50414267,,,,,,,,,1.0,,,,,\n"
        "10000032,53189527,,1.0,,,,,,,,,,,,\n"
        "10000764,57375967,,-1.0,1.0,,,,,,,,,-1.0,,\n"
    )
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,"
        "ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning\n"
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect\n"
        "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect\n"
        "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PA AND LAT),AP,3056,2544,21800626,165500.312,CHEST (PA AND LAT),antero-posterior,Erect\n"
        "8061713c-ea8a8b02-5e1be2c5-a6a0e7f9-f2f71b3a,10000764,57375967,CHEST (PORTABLE AP),AP,2705,2539,21321015,143013.718,CHEST (PORTABLE AP),antero-posterior,\n"
    )
    patients = tmp_path / "patients.csv"
    patients.write_text("subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n10000032,F,52,2180,2014 - 2016,2180-09-09\n10000764,M,86,2132,2014 - 2016,\n")
    admissions = tmp_path / "admissions.csv"
    admissions.write_text(
        "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,admission_location,discharge_location,insurance,language,marital_status,race,edregtime,edouttime,hospital_expire_flag\n"
        "10000032,22595853,2180-05-06 22:23:00,2180-05-07 17:15:00,,URGENT,P874LG,TRANSFER FROM HOSPITAL,HOME,Other,ENGLISH,WIDOWED,WHITE,2180-05-06 19:17:00,2180-05-06 23:30:00,0\n"
        "10000032,22841357,2180-06-26 18:27:00,2180-06-27 18:49:00,,EW EMER.,P09Q6Y,EMERGENCY ROOM,HOME,Medicaid,ENGLISH,WIDOWED,WHITE,2180-06-26 15:54:00,2180-06-26 21:31:00,0\n"
        "10000032,29079034,2180-07-23 12:35:00,2180-07-25 17:55:00,,EW EMER.,P30KEH,EMERGENCY ROOM,HOSPICE,Medicaid,ENGLISH,WIDOWED,WHITE,2180-07-23 05:54:00,2180-07-23 14:00:00,0\n"
        "10000764,27897940,2132-10-14 23:31:00,2132-10-19 16:30:00,,OBSERVATION ADMIT,P5749B,EMERGENCY ROOM,SKILLED NURSING FACILITY,Medicare,ENGLISH,,BLACK/AFRICAN AMERICAN,2132-10-14 19:48:00,2132-10-15 01:25:00,0\n"
    )
    (tmp_path / "echo.csv").write_text("subject_id,study_id,lvef\n10000032,53189527,35\n10000764,57375967,60\n")
    rng = np.random.default_rng(2)
    for dicom_id, sid, stid in (
        ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267"),
        ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527"),
        ("8061713c-ea8a8b02-5e1be2c5-a6a0e7f9-f2f71b3a", "10000764", "57375967"),
    ):
        p = root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}" / f"{dicom_id}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((_picture(rng) * 255).astype(np.uint8)).save(p)
    return root


def test_mimic_loader_with_demographics_and_echo(mimic_root: Path) -> None:
    base = mimic_root.parent
    df = D.load_mimic_cxr(
        mimic_root,
        uncertainty="u_zeros",
        patients_csv=base / "patients.csv",
        admissions_csv=base / "admissions.csv",
        low_ef_csv=base / "echo.csv",
    )
    assert len(df) == 3  # lateral dropped
    by_id = df.set_index("image_id")
    assert by_id.loc["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "cardiomegaly"] == 1.0
    assert by_id.loc["8061713c-ea8a8b02-5e1be2c5-a6a0e7f9-f2f71b3a", "cardiomegaly"] == 0.0  # -1 under u_zeros
    assert by_id.loc["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "cardiomegaly"] == 0.0  # blank
    assert by_id.loc["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "low_ef"] == 1.0  # LVEF 35
    assert by_id.loc["8061713c-ea8a8b02-5e1be2c5-a6a0e7f9-f2f71b3a", "low_ef"] == 0.0
    assert np.isnan(by_id.loc["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "low_ef"])  # no echo
    assert by_id["patient_id"].tolist() == ["mimic-10000032", "mimic-10000032", "mimic-10000764"]
    assert by_id["sex"].tolist() == ["F", "F", "M"]
    assert by_id["age"].tolist() == [52.0, 52.0, 86.0]
    assert by_id["race"].tolist() == ["WHITE", "WHITE", "BLACK/AFRICAN AMERICAN"]
    assert by_id["insurance"].tolist() == ["Medicaid", "Medicaid", "Medicare"]  # most frequent
    assert all(Path(p).is_file() for p in df["path"])


def test_mimic_requires_policy(mimic_root: Path) -> None:
    with pytest.raises(ValueError, match="explicitly"):
        D.load_mimic_cxr(mimic_root, uncertainty="")


# --- our DICOM folder (phantoms) --------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    from cxr_ai.phantoms import PhantomConfig, generate_studies

    root = tmp_path_factory.mktemp("phantoms")
    generate_studies(root, PhantomConfig(n_studies=12, seed=11, size=96, fraction_lateral=0.5, fraction_non_chest=0.2))
    return root


def test_dicom_folder_keeps_frontal_chests(phantom_root: Path) -> None:
    labels = pd.read_csv(phantom_root / "labels.csv")
    df = D.load_dicom_folder(phantom_root)
    assert len(df) == int((labels["frontal_chest"] == 1).sum()) < len(labels)
    assert set(df["view"]) <= {"PA", "AP"}
    assert (df["kind"] == "dicom").all()
    assert df["cardiomegaly"].isin([0.0, 1.0]).all() and df["low_ef"].isin([0.0, 1.0]).all()
    assert {"ctr", "lvef", "shifted"} <= set(df.columns)
    everything = D.load_dicom_folder(phantom_root, frontal_only=False)
    assert len(everything) == len(labels)
    scanned = D.load_dicom_folder(phantom_root, labels_csv=None)
    assert len(scanned) == len(labels) and scanned["cardiomegaly"].isna().all()
    assert set(scanned["image_id"]) == set(labels["sop_uid"].astype(str))


def test_cache_returns_exactly_the_pipeline_output(phantom_root: Path, tmp_path: Path) -> None:
    df = D.load_dicom_folder(phantom_root)
    cache = D.ImageCache(tmp_path / "cache", SPEC)
    first = cache.get(df["path"].iloc[0], "dicom")
    direct = preprocess(read_radiograph(df["path"].iloc[0]), SPEC).image
    np.testing.assert_array_equal(first, direct)
    files = list(cache.root.rglob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(cache.get(df["path"].iloc[0], "dicom"), direct)  # from disk
    other = D.ImageCache(tmp_path / "cache", PixelPipelineSpec(size=48))
    assert other.root != cache.root and other.get(df["path"].iloc[0], "dicom").shape == (1, 48, 48)
    allimg = cache.load_all(df.iloc[:3])
    assert allimg.shape == (3, 1, 32, 32)


def test_picture_adapter_uses_the_same_pipeline(tmp_path: Path) -> None:
    """8-bit and 16-bit PNGs of one picture come out alike: percentile window + normalisation."""
    pic = _picture(np.random.default_rng(5), 64, 80)
    _png(tmp_path / "a8.png", pic, bits=8)
    _png(tmp_path / "a16.png", pic, bits=16)
    a = D.load_image(tmp_path / "a8.png", "image", SPEC)
    b = D.load_image(tmp_path / "a16.png", "image", SPEC)
    assert np.abs(a - b).max() < 0.02
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    img, _ = display_array(ds, D.read_picture(tmp_path / "a16.png"), SPEC)
    np.testing.assert_array_equal(letterbox(img, SPEC).image, b)
    with pytest.raises(ValueError, match="unknown image kind"):
        D.load_image(tmp_path / "a8.png", "tiff", SPEC)


# --- embeddings ---------------------------------------------------------------------------------


def test_embedding_files_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 1376)).astype(np.float32)
    ids = [f"img{i}" for i in range(5)]
    for name in ("e.npz", "e.parquet"):
        D.save_embeddings(tmp_path / name, ids, X)
        got_ids, got = D.load_embeddings(tmp_path / name)
        assert got_ids.tolist() == ids
        np.testing.assert_array_equal(got, X)
    np.save(tmp_path / "plain.npy", X)
    (tmp_path / "plain.ids.txt").write_text("\n".join(ids))
    got_ids, got = D.load_embeddings(tmp_path / "plain.npy")
    assert got_ids.tolist() == ids and got.shape == (5, 1376)
    wide = pd.DataFrame(X[:, :4], columns=[f"d{i}" for i in range(4)]).assign(dicom_id=ids)
    wide.to_parquet(tmp_path / "wide.parquet")
    got_ids, got = D.load_embeddings(tmp_path / "wide.parquet", id_column="dicom_id")
    np.testing.assert_array_equal(got, X[:, :4])
    with pytest.raises(ValueError, match="no id column 'image_id'"):
        D.load_embeddings(tmp_path / "wide.parquet")
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="needs a 2-D 'embeddings' array"):
        D.load_embeddings(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "e.csv").write_text("x")
        D.load_embeddings(tmp_path / "e.csv")


def test_summary_has_counts_prevalence_demographics(phantom_root: Path) -> None:
    df = D.load_dicom_folder(phantom_root)
    s = D.summarise(df)
    assert s["images"] == len(df) and s["patients"] == df["patient_id"].nunique()
    assert s["cardiomegaly_prevalence"] == pytest.approx(df["cardiomegaly"].mean())
    assert sum(s["demographics"]["sex"].values()) == len(df)
    assert "age" in s["demographics"] and "race" in s["demographics"]
