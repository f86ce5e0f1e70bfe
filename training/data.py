"""Datasets: public label formats -> one manifest; images -> the one pixel pipeline -> cache.

Every loader returns a *manifest*, a :class:`pandas.DataFrame` with one row per image and the
columns of :data:`MANIFEST_COLUMNS`:

``image_id``   unique id (file name stem, SOP Instance UID, dicom_id ...)
``path``       absolute path of the image file
``kind``       ``"dicom"`` (read with :func:`cxr_ai.dicom.reader.read_radiograph`) or
               ``"image"`` (PNG / JPEG, read with Pillow)
``patient_id`` the unit of splitting (no patient in two splits)
``study_id``   study / visit
``source``     dataset name (``dicom``, ``nih``, ``chexpert``, ``mimic``, ``phantom``)
finding columns (``cardiomegaly``, ``low_ef``): 1.0 / 0.0, NaN = unknown (masked in the loss)
``sex`` (``M``/``F``), ``age`` (years), ``race``, ``insurance``, ``view``, ``synthetic``

Pixels: DICOM goes through :func:`cxr_ai.imaging.preprocess` exactly as at inference. PNG and
JPEG files (NIH, CheXpert, MIMIC-CXR-JPG) are already windowed, display-ready MONOCHROME2
pictures; :func:`preprocess_array` runs them through the *same* functions
(:func:`cxr_ai.imaging.display_array` with a header that says MONOCHROME2 and has no VOI
window, so the percentile window and normalisation apply, then
:func:`cxr_ai.imaging.letterbox`). Nothing is re-implemented here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.utils import convert_to_tensor
from pydicom.dataset import Dataset

from cxr_ai.dicom.reader import read_radiograph
from cxr_ai.imaging import PixelPipelineSpec, Preprocessed, display_array, letterbox, preprocess

logger = logging.getLogger(__name__)

FINDINGS = ("cardiomegaly", "low_ef")
MANIFEST_COLUMNS = (
    "image_id",
    "path",
    "kind",
    "patient_id",
    "study_id",
    "source",
    *FINDINGS,
    "sex",
    "age",
    "race",
    "insurance",
    "view",
    "synthetic",
)
UNCERTAINTY_POLICIES = ("u_ones", "u_zeros", "ignore")
#: CheXpert / MIMIC-CXR column holding the cardiomegaly label.
CHEXPERT_CARDIOMEGALY = "Cardiomegaly"

MSG_MISSING_FILE = "{what} {path} does not exist; {hint}"
MSG_MISSING_COLUMNS = "{path}: columns {missing} are missing; is this the {fmt} file? (found: {found})"
MSG_POLICY = "uncertainty policy {policy!r} is not one of {known}: say explicitly how CheXpert's uncertain (-1) labels are used."
MSG_NO_IMAGES = "{path}: none of the {n} images listed were found under {root}; check the image folder (first missing: {first})."
MSG_EMBEDDINGS = "{path}: {detail}"


def _require(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(MSG_MISSING_FILE.format(what=what, path=path, hint=hint))
    return path


def _require_columns(df: pd.DataFrame, cols: Sequence[str], path: Path, fmt: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(MSG_MISSING_COLUMNS.format(path=path, missing=missing, fmt=fmt, found=list(df.columns)[:12]))


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan if col in (*FINDINGS, "age") else ("" if col != "synthetic" else False)
    for col in FINDINGS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["age"] = pd.to_numeric(df["age"], errors="coerce").astype(float)
    df["synthetic"] = df["synthetic"].astype(bool)
    for col in ("image_id", "path", "kind", "patient_id", "study_id", "source", "sex", "race", "insurance", "view"):
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    return df[list(MANIFEST_COLUMNS) + extra].reset_index(drop=True)


# --- our own format: DICOM folder + labels.csv (what cxr_ai.phantoms writes) -----------------


def load_dicom_folder(
    root: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = "labels.csv",
    frontal_only: bool = True,
    source: str = "dicom",
    synthetic: bool = False,
) -> pd.DataFrame:
    """A folder of DICOM files with a labels CSV (columns as :data:`cxr_ai.phantoms.LABEL_COLUMNS`).

    ``file`` is relative to ``root``. With ``frontal_only`` only rows with
    ``frontal_chest == 1`` are kept (laterals, abdomens and hands are what the gate rejects).
    With ``labels_csv=None`` the folder is scanned and labels are unknown (NaN), e.g. for
    embedding extraction.
    """
    root = Path(root).resolve()
    _require(root, "DICOM folder", "pass the folder that holds the images and labels.csv")
    if labels_csv is None:
        rows = []
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.suffix.lower() not in (".dcm", ""):
                continue
            try:
                rg = read_radiograph(p)
            except Exception as exc:  # noqa: BLE001 - scanning: skip what is not DICOM, say so
                logger.debug("skipping %s: %s", p.name, exc)
                continue
            rows.append(
                {
                    "image_id": rg.sop_instance_uid,
                    "path": str(p),
                    "kind": "dicom",
                    "patient_id": rg.patient_id,
                    "study_id": rg.study_instance_uid,
                    "source": source,
                    "sex": rg.sex or "",
                    "age": rg.age_years,
                    "view": rg.view_position,
                    "synthetic": synthetic,
                }
            )
        return _finish(pd.DataFrame(rows, columns=[c for c in MANIFEST_COLUMNS if c not in FINDINGS]))
    csv_path = _require(root / labels_csv, "labels CSV", f"{root} should hold {labels_csv}")
    df = pd.read_csv(csv_path, dtype={"patient_id": str, "study_uid": str, "sop_uid": str, "accession": str})
    _require_columns(df, ["file", "patient_id", "study_uid", "sop_uid", "frontal_chest", *FINDINGS], csv_path, "cxr-ai labels.csv")
    if frontal_only:
        df = df[df["frontal_chest"].astype(int) == 1]
    out = pd.DataFrame(
        {
            "image_id": df["sop_uid"].astype(str),
            "path": [str(root / f) for f in df["file"]],
            "kind": "dicom",
            "patient_id": df["patient_id"].astype(str),
            "study_id": df["study_uid"].astype(str),
            "source": source,
            "cardiomegaly": df["cardiomegaly"],
            "low_ef": df["low_ef"],
            "sex": df.get("sex", ""),
            "age": df.get("age", np.nan),
            "race": df.get("race", ""),
            "insurance": df.get("insurance", ""),
            "view": df.get("view", ""),
            "synthetic": synthetic,
        }
    )
    for extra in ("ctr", "lvef", "shifted"):
        if extra in df.columns:
            out[extra] = df[extra].to_numpy()
    return _finish(out)


# --- NIH ChestX-ray14 ------------------------------------------------------------------------


def _index_images(root: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {p.name: p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()}


def _parse_age(value: Any) -> float:
    """NIH ages are integers; early releases wrote ``058Y``/``006M``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    m = re.fullmatch(r"\s*(\d+)\s*([YMD]?)\s*", str(value))
    if not m:
        return np.nan
    n, unit = float(m.group(1)), m.group(2) or "Y"
    return n if unit == "Y" else n / 12.0 if unit == "M" else n / 365.25


def load_nih_chestxray14(
    root: str | os.PathLike,
    *,
    csv: str = "Data_Entry_2017.csv",
    require_images: bool = True,
) -> pd.DataFrame:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` + PNGs anywhere under ``root``
    (``images/``, ``images_001/images/`` ...).

    Cardiomegaly = "Cardiomegaly" among the pipe-separated ``Finding Labels``; low-EF is not
    labelled (NaN). All views are frontal (PA/AP). Published anchor: CheXNet AUROC 0.9248
    for cardiomegaly (Rajpurkar et al. 2017).
    """
    root = Path(root).resolve()
    csv_path = _require(root / csv, "NIH label file", f"download {csv} from the NIH ChestX-ray14 release into {root}")
    df = pd.read_csv(csv_path)
    _require_columns(df, ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"], csv_path, "NIH Data_Entry_2017.csv")
    index = _index_images(root, (".png",))
    paths = [index.get(name) for name in df["Image Index"]]
    found = [p is not None for p in paths]
    if require_images and not any(found) and len(df):
        raise FileNotFoundError(MSG_NO_IMAGES.format(path=csv_path, n=len(df), root=root, first=df["Image Index"].iloc[0]))
    if not all(found):
        logger.warning("NIH: %d of %d listed images are missing and are skipped", len(df) - sum(found), len(df))
    df = df[found]
    labels = df["Finding Labels"].fillna("").str.split("|")
    out = pd.DataFrame(
        {
            "image_id": df["Image Index"].astype(str),
            "path": [str(p) for p, ok in zip(paths, found) if ok],
            "kind": "image",
            "patient_id": "nih-" + df["Patient ID"].astype(str),
            "study_id": "nih-" + df["Patient ID"].astype(str) + "-" + df.get("Follow-up #", pd.Series(0, index=df.index)).astype(str),
            "source": "nih",
            "cardiomegaly": labels.apply(lambda xs: 1.0 if "Cardiomegaly" in xs else 0.0),
            "low_ef": np.nan,
            "sex": df["Patient Gender"].astype(str).str.upper().str[:1],
            "age": df["Patient Age"].apply(_parse_age),
            "view": df["View Position"].astype(str),
        }
    )
    return _finish(out)


# --- CheXpert --------------------------------------------------------------------------------


def apply_uncertainty(values: pd.Series, policy: str, *, blank: float = 0.0) -> pd.Series:
    """CheXpert label values -> 1.0 / 0.0 / NaN.

    ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank = not mentioned.

    - ``u_ones``: uncertain -> 1 (Irvin et al. 2019 found U-Ones best for cardiomegaly's
      neighbours atelectasis/oedema; for cardiomegaly itself U-MultiClass was best — the
      choice is the user's and is recorded).
    - ``u_zeros``: uncertain -> 0.
    - ``ignore``: uncertain -> NaN (masked out of the loss and the metrics).

    Blank (not mentioned) becomes ``blank`` (default 0: an unmentioned finding is taken as
    absent, the usual reading of radiology-report labellers); pass ``blank=np.nan`` to mask.
    """
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(MSG_POLICY.format(policy=policy, known=UNCERTAINTY_POLICIES))
    v = pd.to_numeric(values, errors="coerce").astype(float)
    out = v.copy()
    out[v.isna()] = blank
    uncertain = v == -1.0
    out[uncertain] = {"u_ones": 1.0, "u_zeros": 0.0, "ignore": np.nan}[policy]
    return out


def load_chexpert(
    root: str | os.PathLike,
    *,
    csv: str = "train.csv",
    uncertainty: str,
    frontal_only: bool = True,
    blank: float = 0.0,
) -> pd.DataFrame:
    """CheXpert ``train.csv`` / ``valid.csv``.

    ``Path`` values start with the release folder (``CheXpert-v1.0-small/train/patient00001/
    study1/view1_frontal.jpg``) and are resolved against ``root`` and its parent. The patient
    is the ``patientNNNNN`` path component. ``uncertainty`` must be given (see
    :func:`apply_uncertainty`); there is no silent default.
    """
    if uncertainty not in UNCERTAINTY_POLICIES:
        raise ValueError(MSG_POLICY.format(policy=uncertainty, known=UNCERTAINTY_POLICIES))
    root = Path(root).resolve()
    csv_path = _require(root / csv, "CheXpert label file", f"{root} should hold {csv}")
    df = pd.read_csv(csv_path)
    _require_columns(df, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", CHEXPERT_CARDIOMEGALY], csv_path, "CheXpert train.csv/valid.csv")
    if frontal_only:
        df = df[df["Frontal/Lateral"].astype(str).str.lower() == "frontal"]

    def resolve(rel: str) -> str:
        for base in (root.parent, root):
            p = base / rel
            if p.exists():
                return str(p)
        parts = Path(rel).parts
        return str(root.joinpath(*parts[1:])) if len(parts) > 1 else str(root / rel)

    patient = df["Path"].astype(str).str.extract(r"(patient\d+)")[0]
    study = df["Path"].astype(str).str.extract(r"(patient\d+/study\d+)")[0]
    sex = df["Sex"].astype(str).map({"Male": "M", "Female": "F"}).fillna("")
    out = pd.DataFrame(
        {
            "image_id": df["Path"].astype(str),
            "path": [resolve(p) for p in df["Path"].astype(str)],
            "kind": "image",
            "patient_id": "chexpert-" + patient.astype(str),
            "study_id": "chexpert-" + study.astype(str),
            "source": "chexpert",
            "cardiomegaly": apply_uncertainty(df[CHEXPERT_CARDIOMEGALY], uncertainty, blank=blank),
            "low_ef": np.nan,
            "sex": sex,
            "age": df["Age"],
            "view": df["AP/PA"].fillna("").astype(str),
        }
    )
    out.attrs["uncertainty"] = uncertainty
    return _finish(out)


# --- MIMIC-CXR-JPG + MIMIC-IV ----------------------------------------------------------------


def load_mimic_cxr(
    root: str | os.PathLike,
    *,
    uncertainty: str,
    chexpert_csv: str = "mimic-cxr-2.0.0-chexpert.csv",
    metadata_csv: str = "mimic-cxr-2.0.0-metadata.csv",
    patients_csv: str | os.PathLike | None = None,
    admissions_csv: str | os.PathLike | None = None,
    low_ef_csv: str | os.PathLike | None = None,
    lvef_cutoff: float = 40.0,
    frontal_views: Sequence[str] = ("PA", "AP"),
    blank: float = 0.0,
) -> pd.DataFrame:
    """MIMIC-CXR-JPG with MIMIC-IV demographics.

    Images are ``root/files/pXX/p<subject_id>/s<study_id>/<dicom_id>.jpg``. Labels come from
    the CheXpert-labeller file (same values and uncertainty policy as CheXpert), views from
    the metadata file (``ViewPosition``). ``patients_csv`` (``subject_id, gender,
    anchor_age``) and ``admissions_csv`` (``subject_id, race, insurance``; the most frequent
    value per subject) add demographics. Low-EF needs a linkage to echocardiography that
    MIMIC does not ship as a table: ``low_ef_csv`` with ``subject_id, study_id`` and either
    ``low_ef`` (0/1) or ``lvef`` (%, low = ``<= lvef_cutoff``), as CheXchoNet-style work
    builds it (published anchor: composite AUROC 0.80).
    """
    if uncertainty not in UNCERTAINTY_POLICIES:
        raise ValueError(MSG_POLICY.format(policy=uncertainty, known=UNCERTAINTY_POLICIES))
    root = Path(root).resolve()
    lab_path = _require(root / chexpert_csv, "MIMIC-CXR label file", f"{root} should hold {chexpert_csv}")
    meta_path = _require(root / metadata_csv, "MIMIC-CXR metadata file", f"{root} should hold {metadata_csv}")
    labels = pd.read_csv(lab_path)
    _require_columns(labels, ["subject_id", "study_id", CHEXPERT_CARDIOMEGALY], lab_path, "mimic-cxr-2.0.0-chexpert.csv")
    meta = pd.read_csv(meta_path)
    _require_columns(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_path, "mimic-cxr-2.0.0-metadata.csv")
    meta = meta[meta["ViewPosition"].astype(str).isin(list(frontal_views))]
    df = meta.merge(labels, on=["subject_id", "study_id"], how="inner")
    df["cardiomegaly"] = apply_uncertainty(df[CHEXPERT_CARDIOMEGALY], uncertainty, blank=blank).to_numpy()
    df["low_ef"] = np.nan
    if low_ef_csv is not None:
        ef_path = _require(Path(low_ef_csv), "low-EF linkage file", "pass a CSV with subject_id, study_id and low_ef or lvef")
        ef = pd.read_csv(ef_path)
        _require_columns(ef, ["subject_id", "study_id"], ef_path, "low-EF linkage")
        if "low_ef" not in ef.columns:
            _require_columns(ef, ["lvef"], ef_path, "low-EF linkage (low_ef or lvef)")
            ef["low_ef"] = np.where(ef["lvef"].isna(), np.nan, (ef["lvef"] <= lvef_cutoff).astype(float))
        ef = ef[["subject_id", "study_id", "low_ef"]].drop_duplicates(["subject_id", "study_id"])
        df = df.drop(columns=["low_ef"]).merge(ef, on=["subject_id", "study_id"], how="left")
    df["sex"], df["age"], df["race"], df["insurance"] = "", np.nan, "", ""
    if patients_csv is not None:
        pat_path = _require(Path(patients_csv), "MIMIC-IV patients file", "pass hosp/patients.csv(.gz)")
        pat = pd.read_csv(pat_path)
        _require_columns(pat, ["subject_id", "gender", "anchor_age"], pat_path, "MIMIC-IV patients")
        pat = pat.drop_duplicates("subject_id").set_index("subject_id")
        df["sex"] = df["subject_id"].map(pat["gender"]).fillna("").astype(str).str.upper().str[:1]
        df["age"] = df["subject_id"].map(pat["anchor_age"])
    if admissions_csv is not None:
        adm_path = _require(Path(admissions_csv), "MIMIC-IV admissions file", "pass hosp/admissions.csv(.gz)")
        adm = pd.read_csv(adm_path)
        _require_columns(adm, ["subject_id", "race", "insurance"], adm_path, "MIMIC-IV admissions")
        for col in ("race", "insurance"):
            mode = adm.dropna(subset=[col]).groupby("subject_id")[col].agg(lambda s: s.value_counts().index[0])
            df[col] = df["subject_id"].map(mode).fillna("").astype(str)
    sid = df["subject_id"].astype(int).astype(str)
    stid = df["study_id"].astype(int).astype(str)
    out = pd.DataFrame(
        {
            "image_id": df["dicom_id"].astype(str),
            "path": [str(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg") for s, t, d in zip(sid, stid, df["dicom_id"].astype(str))],
            "kind": "image",
            "patient_id": "mimic-" + sid,
            "study_id": "mimic-" + stid,
            "source": "mimic",
            "cardiomegaly": df["cardiomegaly"],
            "low_ef": df["low_ef"],
            "sex": df["sex"],
            "age": df["age"],
            "race": df["race"],
            "insurance": df["insurance"],
            "view": df["ViewPosition"].astype(str),
        }
    )
    out.attrs["uncertainty"] = uncertainty
    return _finish(out)


# --- embedding files -------------------------------------------------------------------------


def load_embeddings(path: str | os.PathLike, *, id_column: str = "image_id") -> tuple[np.ndarray, np.ndarray]:
    """Read embeddings: ``(ids (N,) str, X (N, D) float32)``.

    - ``.npz``: arrays ``embeddings`` (N, D) and ``ids`` (N,) (or the ``id_column`` key).
    - ``.npy``: an (N, D) array; ids come from a sidecar ``<name>.ids.txt`` (one a line), or
      are the row numbers.
    - ``.parquet``: an ``id_column`` column plus either one list/array column (``embedding``)
      or one numeric column per dimension.
    """
    p = Path(path)
    _require(p, "embeddings file", "pass an .npy, .npz or .parquet file")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            emb_key = "embeddings" if "embeddings" in keys else next((k for k in keys if z[k].ndim == 2), None)
            id_key = id_column if id_column in keys else "ids" if "ids" in keys else next((k for k in keys if z[k].ndim == 1), None)
            if emb_key is None or id_key is None:
                raise ValueError(MSG_EMBEDDINGS.format(path=p, detail=f"needs a 2-D 'embeddings' array and a 1-D 'ids' array; has {keys}"))
            X, ids = z[emb_key], z[id_key]
    elif suffix == ".npy":
        X = np.load(p, allow_pickle=False)
        side = p.with_suffix(".ids.txt")
        ids = np.array(side.read_text(encoding="utf-8").split()) if side.exists() else np.arange(len(X)).astype(str)
    elif suffix == ".parquet":
        df = pd.read_parquet(p)
        if id_column not in df.columns:
            raise ValueError(MSG_EMBEDDINGS.format(path=p, detail=f"no id column {id_column!r}; columns: {list(df.columns)[:8]}"))
        ids = df[id_column].to_numpy()
        rest = df.drop(columns=[id_column])
        list_cols = [c for c in rest.columns if rest[c].dtype == object]
        if list_cols:
            X = np.stack([np.asarray(v, dtype=np.float32) for v in rest[list_cols[0]]])
        else:
            X = rest.select_dtypes("number").to_numpy()
    else:
        raise ValueError(MSG_EMBEDDINGS.format(path=p, detail="unsupported file type; use .npy, .npz or .parquet"))
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or len(X) != len(ids):
        raise ValueError(MSG_EMBEDDINGS.format(path=p, detail=f"embeddings shape {X.shape} does not match {len(ids)} ids"))
    return np.asarray(ids).astype(str), X


def save_embeddings(path: str | os.PathLike, ids: Sequence[str], X: np.ndarray, *, id_column: str = "image_id") -> Path:
    """Write embeddings as ``.npz`` (``ids``, ``embeddings``) or ``.parquet`` (id + list column)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".parquet":
        pd.DataFrame({id_column: list(ids), "embedding": list(np.asarray(X, dtype=np.float32))}).to_parquet(p)
    else:
        np.savez(p, ids=np.asarray(ids).astype(str), embeddings=np.asarray(X, dtype=np.float32))
    return p


# --- pixels ----------------------------------------------------------------------------------


def _display_ready_header() -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def read_picture(path: str | os.PathLike) -> np.ndarray:
    """A PNG/JPEG as a 2-D array (8- or 16-bit grey; RGB is converted to luminance)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
            arr = np.asarray(im)
        else:
            arr = np.asarray(im.convert("L"))
    return np.asarray(arr)


def preprocess_array(pixels: np.ndarray, spec: PixelPipelineSpec) -> Preprocessed:
    """Run a display-ready picture (PNG/JPEG, white = dense) through the pixel pipeline.

    The same :func:`cxr_ai.imaging.display_array` and :func:`cxr_ai.imaging.letterbox` that
    DICOM goes through, with a MONOCHROME2 header without VOI window (percentile window and
    normalisation apply).
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey picture, got shape {pixels.shape}")
    img, used = display_array(_display_ready_header(), pixels, spec)
    return letterbox(img, spec, used_file_window=used)


def load_image(path: str | os.PathLike, kind: str, spec: PixelPipelineSpec) -> np.ndarray:
    """One image through the pixel pipeline: (1, S, S) float32."""
    if kind == "dicom":
        return preprocess(read_radiograph(path), spec).image
    if kind == "image":
        return preprocess_array(read_picture(path), spec).image
    raise ValueError(f"unknown image kind {kind!r} (expected 'dicom' or 'image')")


class ImageCache:
    """Preprocessed images on disk, keyed by pixel-pipeline spec and source file.

    ``<root>/<spec hash>/<xx>/<key>.npy`` where the key hashes the absolute path, size and
    modification time, so a changed file or a changed spec never reads a stale entry.
    """

    def __init__(self, root: str | os.PathLike, spec: PixelPipelineSpec) -> None:
        self.spec = spec
        spec_hash = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) / spec_hash
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2), encoding="utf-8")

    def _key(self, path: str) -> Path:
        st = os.stat(path)
        h = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return self.root / h[:2] / f"{h}.npy"

    def get(self, path: str, kind: str) -> np.ndarray:
        key = self._key(path)
        if key.exists():
            return np.load(key)
        img = load_image(path, kind, self.spec)
        key.parent.mkdir(exist_ok=True)
        tmp = key.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, img)
        os.replace(tmp, key)
        return img

    def load_all(self, manifest: pd.DataFrame) -> np.ndarray:
        """All images of a manifest as one (N, 1, S, S) float32 array (fills the cache)."""
        out = np.empty((len(manifest), 1, self.spec.size, self.spec.size), dtype=np.float32)
        for i, (path, kind) in enumerate(zip(manifest["path"], manifest["kind"])):
            out[i] = self.get(path, kind)
        return out


class ManifestDataset(torch.utils.data.Dataset):
    """Images (from an in-memory array or the cache) + label vector + label mask."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        *,
        findings: Sequence[str],
        images: np.ndarray | None = None,
        cache: ImageCache | None = None,
        transform: Any = None,
    ) -> None:
        if images is None and cache is None:
            raise ValueError("give either preloaded images or an ImageCache")
        self.manifest = manifest.reset_index(drop=True)
        self.images = images
        self.cache = cache
        self.transform = transform
        y = self.manifest[list(findings)].to_numpy(dtype=np.float32)
        self.mask = (~np.isnan(y)).astype(np.float32)
        self.labels = np.nan_to_num(y, nan=0.0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.manifest)

    def image(self, i: int) -> np.ndarray:
        if self.images is not None:
            return self.images[i]
        row = self.manifest.iloc[i]
        return self.cache.get(row["path"], row["kind"])  # type: ignore[union-attr]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.array(self.image(i), dtype=np.float32, copy=True))
        if self.transform is not None:
            # MONAI returns a MetaTensor; a plain tensor keeps autograd free of its overhead
            x = convert_to_tensor(self.transform(x), dtype=torch.float32, track_meta=False)
        return x, torch.from_numpy(self.labels[i]), torch.from_numpy(self.mask[i])


def summarise(manifest: pd.DataFrame, *, findings: Sequence[str] = FINDINGS) -> dict[str, Any]:
    """Counts, prevalence and demographics of a manifest (for bundles and logs; no PHI)."""
    out: dict[str, Any] = {
        "images": int(len(manifest)),
        "patients": int(manifest["patient_id"].nunique()),
        "sources": {str(k): int(v) for k, v in manifest["source"].value_counts().items()},
        "synthetic_images": int(manifest["synthetic"].sum()),
    }
    for f in findings:
        col = manifest[f]
        known = col.dropna()
        out[f"{f}_labelled"] = int(len(known))
        out[f"{f}_prevalence"] = float(known.mean()) if len(known) else None
    demo: dict[str, Any] = {}
    for col in ("sex", "race", "insurance", "view"):
        vc = manifest[col].replace("", "unknown").value_counts()
        demo[col] = {str(k): int(v) for k, v in vc.items()}
    ages = manifest["age"].dropna()
    if len(ages):
        demo["age"] = {
            "mean": round(float(ages.mean()), 1),
            "q25": float(ages.quantile(0.25)),
            "median": float(ages.median()),
            "q75": float(ages.quantile(0.75)),
        }
    out["demographics"] = demo
    return out
