"""Ground truth and demographics from public label tables, as one tidy frame.

Every loader returns a :class:`pandas.DataFrame` with the columns of :data:`TRUTH_COLUMNS`:

``id``
    The key predictions are joined on (ours: SOP Instance UID; NIH: ``Image Index``;
    CheXpert: ``Path``; MIMIC-CXR-JPG: ``dicom_id``; DICOM headers: SOP Instance UID).
``patient_id``, ``study_id``
    As the source names them (research tables; never written to the monitoring logs).
``cardiomegaly``, ``low_ef``, ``no_finding``
    1.0 / 0.0, or NaN where the source does not label that finding for that image.
``sex``
    ``"M"``, ``"F"`` or ``"Unknown"``.
``age``, ``age_band``
    Years (float, NaN when unknown) and a band label (:func:`age_band`).
``race``, ``insurance``
    Normalised labels (:func:`normalise_race`); ``"Unknown"`` when the source has none.
``source``
    Name of the format (``ours``, ``nih``, ``chexpert``, ``mimic``, ``dicom``).

Joins are explicit: every loader that joins tables returns :class:`JoinReport` objects that
count and give examples of the rows that did not match, and :func:`join_predictions` does the
same for predictions ↔ truth. Nothing unmatched is dropped silently.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

FINDINGS: tuple[str, ...] = ("cardiomegaly", "low_ef", "no_finding")
TRUTH_COLUMNS: tuple[str, ...] = (
    "id", "patient_id", "study_id", *FINDINGS, "sex", "age", "age_band", "race", "insurance",
    "source",
)
LABEL_FORMATS: tuple[str, ...] = ("ours", "nih", "chexpert", "mimic", "dicom")
UNCERTAINTY_POLICIES: tuple[str, ...] = ("u_ones", "u_zeros", "ignore")
#: What a blank (unmentioned) CheXpert/MIMIC label becomes. ``negative`` is the convention of
#: the CheXpert paper and its labeller (a finding the report does not mention is taken as
#: absent); ``ignore`` excludes those rows from that finding's metrics.
BLANK_POLICIES: tuple[str, ...] = ("negative", "ignore")
DEFAULT_BLANK_POLICY = "negative"
#: Key of ``DataFrame.attrs`` where the CheXpert/MIMIC loaders put :func:`policy_summary`.
POLICY_ATTR = "label_policy"
UNKNOWN = "Unknown"
#: Lower edges of the default age bands (years), as in Seyyed-Kalantari et al., Nat Med 2021.
DEFAULT_AGE_EDGES: tuple[int, ...] = (0, 20, 40, 60, 80)

MSG_MISSING_COLUMNS = (
    "{source}: the {fmt} label table lacks the column(s) {missing}; found {found}. Check that "
    "--labels-format matches the file, or that the file is the unmodified public release."
)
MSG_BAD_POLICY = (
    "uncertainty policy {policy!r} is not known; choose one of {known} (u_ones: uncertain = "
    "positive, u_zeros: uncertain = negative, ignore: uncertain = not labelled)."
)
MSG_MISSING_FILE = (
    "{what} not found at {path}; {hint}"
)
MSG_NO_UNCERTAINTY_POLICY = (
    "{fmt} labels need an explicit uncertainty policy: pass --uncertain u_ones (uncertain = "
    "positive), u_zeros (uncertain = negative) or ignore (uncertain rows left out); there is no "
    "default because the choice changes the results."
)
MSG_BAD_BLANK = (
    "blank-label policy {policy!r} is not known; choose one of {known} (negative: an unmentioned "
    "finding is absent, the CheXpert convention; ignore: unmentioned rows are left out)."
)
MSG_BAD_FORMAT = "labels format {fmt!r} is not known; choose one of {known}."
MSG_NO_MATCH = (
    "no prediction matched any ground-truth row (predictions key {pred_key!r}, truth key "
    "{truth_key!r}); examples: predictions {pred_examples}, truth {truth_examples}. Check "
    "the join keys (--pred-key/--truth-key) and the labels format."
)


@dataclass
class JoinReport:
    """What an explicit join matched and what it did not."""

    name: str
    left: str
    right: str
    keys: list[str]
    n_left: int
    n_right: int
    n_matched: int
    n_left_unmatched: int
    n_right_unmatched: int
    examples_left_unmatched: list[str] = field(default_factory=list)
    examples_right_unmatched: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _examples(frame: pd.DataFrame, keys: Sequence[str], n: int = 5) -> list[str]:
    return ["/".join(str(v) for v in row) for row in frame[list(keys)].head(n).itertuples(index=False)]


def explicit_join(
    left: pd.DataFrame, right: pd.DataFrame, *, on: Sequence[str] | None = None,
    left_on: Sequence[str] | None = None, right_on: Sequence[str] | None = None,
    how: str = "inner", name: str, left_name: str, right_name: str,
) -> tuple[pd.DataFrame, JoinReport]:
    """Merge two frames on explicit keys and report what did not match on either side."""
    lk = list(on if on is not None else left_on or [])
    rk = list(on if on is not None else right_on or [])
    if not lk or len(lk) != len(rk):
        raise ValueError(f"join {name}: give the same number of left and right keys")
    merged = left.merge(right, left_on=lk, right_on=rk, how="outer", indicator="_merge",
                        suffixes=("", "_right"))
    left_only = merged[merged["_merge"] == "left_only"]
    right_only = merged[merged["_merge"] == "right_only"]
    report = JoinReport(
        name=name, left=left_name, right=right_name,
        keys=[f"{a}={b}" if a != b else a for a, b in zip(lk, rk)],
        n_left=len(left), n_right=len(right),
        n_matched=int((merged["_merge"] == "both").sum()),
        n_left_unmatched=len(left_only), n_right_unmatched=len(right_only),
        examples_left_unmatched=_examples(left_only, lk),
        examples_right_unmatched=_examples(right_only, rk if on is None else lk),
    )
    keep = {"inner": ["both"], "left": ["both", "left_only"], "right": ["both", "right_only"],
            "outer": ["both", "left_only", "right_only"]}[how]
    out = merged[merged["_merge"].isin(keep)].drop(columns="_merge").reset_index(drop=True)
    if report.n_left_unmatched or report.n_right_unmatched:
        logger.warning("join %s: %d %s rows and %d %s rows unmatched", name,
                       report.n_left_unmatched, left_name, report.n_right_unmatched, right_name)
    return out, report


# --- Normalisation --------------------------------------------------------------------------

def age_band(age: Any, *, edges: Sequence[int] = DEFAULT_AGE_EDGES) -> str:
    """Band label of an age in years: with the default edges ``0-19``, ``20-39``, ``40-59``,
    ``60-79``, ``80+``; ``Unknown`` for a missing or negative age."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if not np.isfinite(a) or a < edges[0]:
        return UNKNOWN
    for lo, hi in itertools.pairwise(edges):
        if lo <= a < hi:
            return f"{lo}-{hi - 1}"
    return f"{edges[-1]}+"


def normalise_sex(value: Any) -> str:
    """``M`` / ``F`` from DICOM (M/F/O), NIH (M/F), CheXpert (Male/Female), MIMIC (M/F)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return UNKNOWN
    v = str(value).strip().upper()
    if v in ("M", "MALE"):
        return "M"
    if v in ("F", "FEMALE"):
        return "F"
    return UNKNOWN


_RACE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"HISPANIC|LATINO|LATINA|SOUTH AMERICAN", "Hispanic"),
    (r"BLACK|AFRICAN", "Black"),
    (r"ASIAN", "Asian"),
    (r"WHITE|CAUCASIAN|PORTUGUESE", "White"),
    (r"UNKNOWN|UNABLE|DECLINED|NOT SPECIFIED|^$", UNKNOWN),
)


def normalise_race(value: Any) -> str:
    """Broad race/ethnicity group from MIMIC-IV ``race`` (e.g. ``BLACK/AFRICAN AMERICAN``,
    ``HISPANIC/LATINO - PUERTO RICAN``), DICOM EthnicGroup or our phantom labels.

    Hispanic/Latino is checked first, as in MIMIC-based fairness work; anything recognised as
    none of White, Black, Asian, Hispanic or unknown is ``Other``.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return UNKNOWN
    v = str(value).strip().upper()
    for pattern, label in _RACE_PATTERNS:
        if re.search(pattern, v):
            return label
    return "Other"


def normalise_insurance(value: Any) -> str:
    """``Medicare`` / ``Medicaid`` / ``Private`` / ``Other`` / ``Unknown``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return UNKNOWN
    v = str(value).strip().lower()
    for label in ("Medicare", "Medicaid", "Private"):
        if v == label.lower():
            return label
    return UNKNOWN if not v else "Other"


def _finish(frame: pd.DataFrame, source: str, *, age_edges: Sequence[int]) -> pd.DataFrame:
    out = frame.copy()
    for col in FINDINGS:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float) if col in out else np.nan
    for col in ("patient_id", "study_id"):
        if col not in out:
            out[col] = ""
    out["age"] = pd.to_numeric(out.get("age", np.nan), errors="coerce").astype(float)
    out["sex"] = out["sex"].map(normalise_sex) if "sex" in out else UNKNOWN
    out["age_band"] = [age_band(a, edges=age_edges) for a in out["age"]]
    out["race"] = out["race"].map(normalise_race) if "race" in out else UNKNOWN
    out["insurance"] = out["insurance"].map(normalise_insurance) if "insurance" in out else UNKNOWN
    out["source"] = source
    out["id"] = out["id"].astype(str)
    return out[list(TRUTH_COLUMNS)].reset_index(drop=True)


def _require(frame: pd.DataFrame, columns: Sequence[str], *, source: str, fmt: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(MSG_MISSING_COLUMNS.format(
            source=source, fmt=fmt, missing=missing, found=list(frame.columns)[:20]))


# --- Loaders --------------------------------------------------------------------------------

def load_ours(path: str | os.PathLike, *, age_edges: Sequence[int] = DEFAULT_AGE_EDGES) -> pd.DataFrame:
    """Our phantom ``labels.csv`` (:data:`cxr_ai.phantoms.LABEL_COLUMNS`); ``id`` = ``sop_uid``."""
    table = pd.read_csv(path, dtype={"sop_uid": str, "study_uid": str, "patient_id": str})
    _require(table, ("sop_uid", "study_uid", "patient_id", "cardiomegaly", "low_ef", "sex", "age",
                     "race", "insurance"), source=str(path), fmt="ours")
    frame = table.rename(columns={"sop_uid": "id", "study_uid": "study_id"})
    for col in ("cardiomegaly", "low_ef"):
        frame[col] = frame[col].map(_bool_label)
    return _finish(frame, "ours", age_edges=age_edges)


def _bool_label(value: Any) -> float:
    if isinstance(value, str):
        v = value.strip().lower()
        return {"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0}.get(v, np.nan)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    return float(bool(value))


def load_nih(path: str | os.PathLike, *, age_edges: Sequence[int] = DEFAULT_AGE_EDGES) -> pd.DataFrame:
    """NIH ChestX-ray14 ``Data_Entry_2017.csv``; ``id`` = ``Image Index``.

    ``Finding Labels`` is pipe-separated; ``cardiomegaly`` = it lists ``Cardiomegaly``,
    ``no_finding`` = it is ``No Finding``. The table has no low-EF label (NaN), no race and no
    insurance (``Unknown``).
    """
    table = pd.read_csv(path, dtype={"Image Index": str, "Patient ID": str})
    _require(table, ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender"),
             source=str(path), fmt="nih")
    labels = table["Finding Labels"].fillna("").astype(str).str.split("|")
    frame = pd.DataFrame({
        "id": table["Image Index"],
        "patient_id": table["Patient ID"],
        "study_id": table["Patient ID"] + "_" + table.get("Follow-up #", pd.Series(0, index=table.index)).astype(str),
        "cardiomegaly": labels.map(lambda ls: float("Cardiomegaly" in ls)),
        "no_finding": labels.map(lambda ls: float(ls == ["No Finding"])),
        "sex": table["Patient Gender"],
        "age": table["Patient Age"],
    })
    return _finish(frame, "nih", age_edges=age_edges)


def apply_uncertainty_policy(values: pd.Series, policy: str, *,
                             blank: str = DEFAULT_BLANK_POLICY) -> pd.Series:
    """CheXpert-style labels (1.0, 0.0, -1.0 uncertain, blank unmentioned) to 1/0/NaN.

    ``policy`` (uncertain): ``u_ones`` → 1; ``u_zeros`` → 0; ``ignore`` → NaN (excluded from
    that finding's metrics). ``blank`` (unmentioned): ``negative`` → 0, the convention of
    CheXpert and its labeller; ``ignore`` → NaN.
    """
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(MSG_BAD_POLICY.format(policy=policy, known=UNCERTAINTY_POLICIES))
    if blank not in BLANK_POLICIES:
        raise ValueError(MSG_BAD_BLANK.format(policy=blank, known=BLANK_POLICIES))
    v = pd.to_numeric(values, errors="coerce").astype(float)
    unmentioned = v.isna()
    uncertain = {"u_ones": 1.0, "u_zeros": 0.0, "ignore": np.nan}[policy]
    v = v.where(v != -1.0, uncertain)
    return v.mask(unmentioned, 0.0) if blank == "negative" else v


def policy_summary(columns: dict[str, pd.Series], *, uncertainty: str, blank: str) -> dict[str, Any]:
    """How many rows each label policy touched, per source column (for the report)."""
    out: dict[str, Any] = {"uncertain_policy": uncertainty, "blank_policy": blank, "columns": {}}
    for name, raw in columns.items():
        v = pd.to_numeric(raw, errors="coerce")
        out["columns"][name] = {"n_rows": int(len(v)), "n_uncertain": int((v == -1.0).sum()),
                                "n_blank": int(v.isna().sum()), "n_positive": int((v == 1.0).sum()),
                                "n_negative": int((v == 0.0).sum())}
    return out


def load_chexpert(path: str | os.PathLike, *, uncertainty: str, blank: str = DEFAULT_BLANK_POLICY,
                  age_edges: Sequence[int] = DEFAULT_AGE_EDGES) -> pd.DataFrame:
    """CheXpert ``train.csv`` / ``valid.csv``; ``id`` = ``Path``.

    ``uncertainty`` is required (no default): one of :data:`UNCERTAINTY_POLICIES`; ``blank``
    one of :data:`BLANK_POLICIES`. ``patient_id`` / ``study_id`` come from the path
    (``.../patient00001/study1/...``). ``attrs[POLICY_ATTR]`` of the result counts the rows
    each policy affected (:func:`policy_summary`).
    """
    if uncertainty not in UNCERTAINTY_POLICIES:
        raise ValueError(MSG_BAD_POLICY.format(policy=uncertainty, known=UNCERTAINTY_POLICIES))
    table = pd.read_csv(path, dtype={"Path": str})
    _require(table, ("Path", "Sex", "Age", "Cardiomegaly", "No Finding"), source=str(path),
             fmt="chexpert")
    parts = table["Path"].str.extract(r"(patient\d+)/(study\d+)")
    frame = pd.DataFrame({
        "id": table["Path"],
        "patient_id": parts[0].fillna(""),
        "study_id": (parts[0] + "/" + parts[1]).fillna(""),
        "cardiomegaly": apply_uncertainty_policy(table["Cardiomegaly"], uncertainty, blank=blank),
        "no_finding": apply_uncertainty_policy(table["No Finding"], uncertainty, blank=blank),
        "sex": table["Sex"],
        "age": table["Age"],
    })
    out = _finish(frame, "chexpert", age_edges=age_edges)
    out.attrs[POLICY_ATTR] = policy_summary({"Cardiomegaly": table["Cardiomegaly"],
                                             "No Finding": table["No Finding"]},
                                            uncertainty=uncertainty, blank=blank)
    return out


def load_mimic(
    chexpert_csv: str | os.PathLike, metadata_csv: str | os.PathLike, *,
    patients_csv: str | os.PathLike | None, admissions_csv: str | os.PathLike | None,
    uncertainty: str, blank: str = DEFAULT_BLANK_POLICY, age_edges: Sequence[int] = DEFAULT_AGE_EDGES,
) -> tuple[pd.DataFrame, list[JoinReport]]:
    """MIMIC-CXR-JPG labels joined with MIMIC-IV demographics; ``id`` = ``dicom_id``.

    Joins (each reported):

    1. ``metadata`` (one row per image) ⋈ ``chexpert`` on (``subject_id``, ``study_id``):
       images without labels and labels without images are reported; only images with labels
       are kept.
    2. ⋈ ``patients`` on ``subject_id``: ``gender``, ``anchor_age``. The age at the study is
       ``anchor_age + (year(StudyDate) - anchor_year)`` (MIMIC shifts dates consistently per
       patient), else ``anchor_age``.
    3. ⋈ ``admissions`` on ``subject_id``: ``race`` and ``insurance`` of the patient's most
       recent admission (by ``admittime``), a documented choice; patients without admissions
       keep ``Unknown``.
    """
    labels = pd.read_csv(chexpert_csv)
    meta = pd.read_csv(metadata_csv, dtype={"dicom_id": str})
    _require(labels, ("subject_id", "study_id", "Cardiomegaly", "No Finding"),
             source=str(chexpert_csv), fmt="mimic chexpert")
    _require(meta, ("dicom_id", "subject_id", "study_id"), source=str(metadata_csv),
             fmt="mimic metadata")
    reports: list[JoinReport] = []
    frame, rep = explicit_join(meta, labels, on=["subject_id", "study_id"], how="inner",
                               name="mimic images-labels", left_name="metadata",
                               right_name="chexpert labels")
    reports.append(rep)
    frame["age"] = np.nan
    frame["sex"] = UNKNOWN
    if patients_csv is not None:
        pats = pd.read_csv(patients_csv)
        _require(pats, ("subject_id", "gender", "anchor_age"), source=str(patients_csv),
                 fmt="mimic-iv patients")
        keep = [c for c in ("subject_id", "gender", "anchor_age", "anchor_year") if c in pats]
        frame, rep = explicit_join(frame.drop(columns=["age", "sex"]), pats[keep], on=["subject_id"],
                                   how="left", name="mimic images-patients", left_name="images",
                                   right_name="patients")
        rep.n_right_unmatched = 0  # patients without chest images are expected, not an error
        rep.examples_right_unmatched = []
        rep.note = "patients without images are not counted"
        reports.append(rep)
        age = frame["anchor_age"].astype(float)
        if "anchor_year" in frame and "StudyDate" in frame:
            year = pd.to_numeric(frame["StudyDate"].astype(str).str[:4], errors="coerce")
            age = age + (year - frame["anchor_year"]).fillna(0)
        frame["age"] = age
        frame["sex"] = frame["gender"]
    frame["race"] = UNKNOWN
    frame["insurance"] = UNKNOWN
    if admissions_csv is not None:
        adm = pd.read_csv(admissions_csv)
        _require(adm, ("subject_id", "admittime", "race", "insurance"),
                 source=str(admissions_csv), fmt="mimic-iv admissions")
        last = (adm.assign(_t=pd.to_datetime(adm["admittime"], errors="coerce"))
                .sort_values(["subject_id", "_t"]).groupby("subject_id", as_index=False).last())
        frame, rep = explicit_join(frame.drop(columns=["race", "insurance"]),
                                   last[["subject_id", "race", "insurance"]], on=["subject_id"],
                                   how="left", name="mimic images-admissions",
                                   left_name="images", right_name="admissions (latest per subject)")
        rep.n_right_unmatched = 0
        rep.examples_right_unmatched = []
        rep.note = "race/insurance of the most recent admission; subjects without images not counted"
        reports.append(rep)
    out = pd.DataFrame({
        "id": frame["dicom_id"],
        "patient_id": frame["subject_id"].astype(str),
        "study_id": frame["study_id"].astype(str),
        "cardiomegaly": apply_uncertainty_policy(frame["Cardiomegaly"], uncertainty, blank=blank),
        "no_finding": apply_uncertainty_policy(frame["No Finding"], uncertainty, blank=blank),
        "sex": frame["sex"], "age": frame["age"], "race": frame["race"],
        "insurance": frame["insurance"],
    })
    result = _finish(out, "mimic", age_edges=age_edges)
    result.attrs[POLICY_ATTR] = policy_summary({"Cardiomegaly": frame["Cardiomegaly"],
                                                "No Finding": frame["No Finding"]},
                                               uncertainty=uncertainty, blank=blank)
    return result, reports


def find_mimic_files(directory: str | os.PathLike) -> dict[str, Path | None]:
    """Locate the MIMIC files in a folder by their public names (``.csv`` or ``.csv.gz``,
    also under ``hosp/``): chexpert and metadata are required, patients/admissions optional."""
    d = Path(directory)
    names = {"chexpert": "mimic-cxr-2.0.0-chexpert", "metadata": "mimic-cxr-2.0.0-metadata",
             "patients": "patients", "admissions": "admissions"}
    found: dict[str, Path | None] = {}
    for key, stem in names.items():
        hits = [p for sub in ("", "hosp") for ext in (".csv", ".csv.gz")
                if (p := d / sub / f"{stem}{ext}").is_file()]
        found[key] = hits[0] if hits else None
    for key in ("chexpert", "metadata"):
        if found[key] is None:
            raise FileNotFoundError(MSG_MISSING_FILE.format(
                what=f"MIMIC-CXR-JPG {names[key]}.csv(.gz)", path=d,
                hint="pass the folder holding the MIMIC-CXR-JPG and MIMIC-IV hosp CSVs"))
    return found


def load_dicom_demographics(root: str | os.PathLike, *,
                            age_edges: Sequence[int] = DEFAULT_AGE_EDGES) -> pd.DataFrame:
    """Sex, age and EthnicGroup from the DICOM headers of every file under ``root``;
    ``id`` = SOP Instance UID. No findings (NaN); files that are not DICOM are skipped and
    counted in the log."""
    from cxr_ai.dicom.reader import iter_dicom_files, read_radiograph
    from cxr_ai.errors import ReadError

    rows = []
    skipped = 0
    for path in iter_dicom_files(root):
        try:
            rg = read_radiograph(path)
        except ReadError:
            skipped += 1
            continue
        rows.append({"id": rg.sop_instance_uid, "patient_id": rg.patient_id,
                     "study_id": rg.study_instance_uid, "sex": rg.sex, "age": rg.age_years,
                     "race": rg.ethnic_group})
    if skipped:
        logger.warning("%d files under %s are not readable DICOM and were skipped", skipped, root)
    frame = pd.DataFrame(rows, columns=["id", "patient_id", "study_id", "sex", "age", "race"])
    return _finish(frame, "dicom", age_edges=age_edges)


def load_labels(path: str | os.PathLike, *, fmt: str, uncertainty: str | None = None,
                blank: str = DEFAULT_BLANK_POLICY,
                age_edges: Sequence[int] = DEFAULT_AGE_EDGES) -> tuple[pd.DataFrame, list[JoinReport]]:
    """Dispatch on ``fmt`` (:data:`LABEL_FORMATS`). ``mimic`` takes the folder of its CSVs;
    ``dicom`` a folder of DICOM files. Returns ``(truth, join_reports)``; for CheXpert and
    MIMIC ``truth.attrs[POLICY_ATTR]`` says which label policies applied to how many rows."""
    if fmt not in LABEL_FORMATS:
        raise ValueError(MSG_BAD_FORMAT.format(fmt=fmt, known=LABEL_FORMATS))
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(MSG_MISSING_FILE.format(
            what=f"labels ({fmt})", path=p, hint="check the --labels path"))
    if fmt in ("chexpert", "mimic") and uncertainty is None:
        raise ValueError(MSG_NO_UNCERTAINTY_POLICY.format(fmt=fmt))
    if blank not in BLANK_POLICIES:
        raise ValueError(MSG_BAD_BLANK.format(policy=blank, known=BLANK_POLICIES))
    if fmt == "ours":
        return load_ours(p, age_edges=age_edges), []
    if fmt == "nih":
        return load_nih(p, age_edges=age_edges), []
    if fmt == "chexpert":
        return load_chexpert(p, uncertainty=uncertainty, blank=blank, age_edges=age_edges), []  # type: ignore[arg-type]
    if fmt == "mimic":
        files = find_mimic_files(p)
        return load_mimic(files["chexpert"], files["metadata"], patients_csv=files["patients"],  # type: ignore[arg-type]
                          admissions_csv=files["admissions"], uncertainty=uncertainty,  # type: ignore[arg-type]
                          blank=blank, age_edges=age_edges)
    return load_dicom_demographics(p, age_edges=age_edges), []


def fill_demographics(truth: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """Fill ``Unknown`` sex/age/race of ``truth`` from ``extra`` (same ``id``), e.g. DICOM
    headers (:func:`load_dicom_demographics`) or the demographics columns of a predictions
    table. Known values are never overwritten."""
    out = truth.copy()
    ext = extra.drop_duplicates("id").set_index("id")
    for col in ("sex", "race", "insurance", "age_band"):
        if col not in ext:
            continue
        fill = out["id"].map(ext[col])
        mask = (out[col] == UNKNOWN) & fill.notna() & (fill != UNKNOWN)
        out.loc[mask, col] = fill[mask]
    if "age" in ext:
        fill = out["id"].map(ext["age"])
        mask = out["age"].isna() & fill.notna()
        out.loc[mask, "age"] = fill[mask]
    return out
