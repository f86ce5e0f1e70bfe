"""Truth sampling: patients, visits, the ground-truth model (LVEF, CTR, congestion) and the
labels table, all deterministic for a seed."""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydicom.uid import generate_uid

from cxr_ai.dicom.codes import CHEST
from cxr_ai.phantoms.params import (
    CTR_THRESHOLD,
    ChestParams,
    EXTRA_COLUMNS,
    INSURANCES,
    LABEL_COLUMNS,
    LOW_EF_THRESHOLD,
    NON_CHEST_PARTS,
    PhantomConfig,
    RACES,
    RACE_WEIGHTS,
    _SYLLABLES,
    _UID_TAG,
)
from cxr_ai.phantoms.drawing import (
    render_chest,
)

# ============================================================================================
# Population model
# ============================================================================================


@dataclass(frozen=True)
class _Patient:
    index: int
    patient_id: str
    name: str
    sex: str
    race: str
    insurance: str
    birth_date: _dt.date
    shifted: bool


@dataclass(frozen=True)
class _Instance:
    """Everything needed to render and write one image, and its label row."""

    patient: _Patient
    study_index: int
    visit: int
    image_index: int
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    study_date: _dt.date
    study_time: str
    study_description: str
    series_description: str
    series_number: int
    modality: str
    photometric: str
    bits_stored: int
    rows: int
    cols: int
    spacing: float
    body_part: str
    view: str
    laterality: str  # hand side (L/R); "" otherwise
    age: int
    ctr: float
    lvef: float
    congestion: float
    params: ChestParams
    level_lo: float  # stored-value range as fractions of the maximum
    level_hi: float
    kvp: int
    render_seed: tuple[int, ...]

    @property
    def cardiomegaly(self) -> int:
        return int(self.ctr > CTR_THRESHOLD)

    @property
    def low_ef(self) -> int:
        return int(self.lvef <= LOW_EF_THRESHOLD)

    @property
    def frontal_chest(self) -> int:
        return int(self.body_part == "CHEST" and self.view in ("PA", "AP"))

    def file_name(self, width: int) -> str:
        return f"study_{self.study_index:0{width}d}/img_{self.image_index:02d}.dcm"


def _as_generator(random_state: int | np.random.Generator) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    return np.random.default_rng(random_state)


def _clamp(value: float, lo: float, hi: float) -> float:
    """Scalar clip (np.clip is slow on Python scalars)."""
    return float(min(max(value, lo), hi))


def _rng(*key: int) -> np.random.Generator:
    """Independent generator for a (seed, ...) key: order-independent determinism."""
    return np.random.default_rng(np.random.SeedSequence(entropy=key[0], spawn_key=tuple(key[1:])))


def _uid(*parts: object) -> str:
    """Deterministic UID: pydicom's root + a SHA-512 hash of the parts (PS3.5 B.2 permits
    a registered root with a unique suffix; ``prefix=None`` would ignore the entropy)."""
    return generate_uid(entropy_srcs=[_UID_TAG, *map(str, parts)])


def _fingerprint(config: PhantomConfig) -> str:
    """Everything but ``n_studies`` (so that a larger set extends a smaller one)."""
    fields_ = dataclasses.asdict(config)
    fields_.pop("n_studies")
    if fields_["shift_group"] is not None:
        fields_["shift_group"] = sorted(fields_["shift_group"].items())
    return repr(sorted(fields_.items()))


def _name(rng: np.random.Generator) -> str:
    def word(n: int) -> str:
        return "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), n)).upper()

    return f"{word(int(rng.integers(2, 4)))}^{word(2)}"


def _age_on(birth: _dt.date, day: _dt.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _insurance(rng: np.random.Generator, age: float) -> str:
    if age >= 65:
        probs = (0.82, 0.06, 0.10, 0.02)
    else:
        probs = (0.05, 0.30, 0.52, 0.13)
    return INSURANCES[int(rng.choice(len(INSURANCES), p=probs))]


def _cm_given_low(config: PhantomConfig) -> tuple[float, float]:
    """P(cardiomegaly | low EF) and P(cardiomegaly | normal EF) meeting the prevalences."""
    p_cm, p_low = config.prevalence_cardiomegaly, config.prevalence_low_ef
    a = min(0.78, 0.9 * p_cm / p_low) if p_low > 0 else 0.0
    q = (p_cm - p_low * a) / (1.0 - p_low) if p_low < 1 else 0.0
    return a, _clamp(q, 0.0, 1.0)


def _sample_heart(rng: np.random.Generator, *, config: PhantomConfig, age: float, sex: str
                  ) -> tuple[float, float]:
    """Baseline (LVEF %, true CTR) of a patient."""
    p_low = config.prevalence_low_ef * (0.55 + 0.9 * (age - 18.0) / 77.0) * (1.2 if sex == "M" else 0.8)
    low = rng.random() < min(p_low, 0.95)
    lvef = 15.0 + 25.0 * rng.beta(2.5, 1.5) if low else _clamp(rng.normal(60.0, 6.0), 42.0, 78.0)
    a, q = _cm_given_low(config)
    enlarged = rng.random() < (a if low else q)
    if enlarged:
        ctr = min(0.505 + rng.gamma(2.0, 0.035), 0.75)
    else:
        ctr = _clamp(rng.normal(0.44 + 0.0005 * (age - 50.0), 0.028), 0.33, 0.495)
    return float(lvef), float(ctr)


def _chest_params(rng: np.random.Generator, *, view: str, ctr: float, lvef: float, sex: str,
                  age: float, congestion: float, quality_shift: float) -> ChestParams:
    """Anatomy and acquisition for one chest image of a visit."""
    low = lvef <= LOW_EF_THRESHOLD
    kerley = congestion * rng.uniform(0.6, 1.0) if congestion > 0.45 else 0.0
    eff_r = eff_l = 0.0
    if congestion > 0:
        if rng.random() < 0.15 + 0.6 * congestion:
            eff_r = congestion * rng.uniform(0.35, 0.85)
        if rng.random() < 0.05 + 0.4 * congestion:
            eff_l = congestion * rng.uniform(0.3, 0.7)
    ap = view == "AP"
    return ChestParams(
        view=view,
        ctr=ctr,
        magnification=float(rng.uniform(1.05, 1.12)) if ap else 1.0,
        globular=float(rng.uniform(0.4, 1.0) if low else rng.uniform(0.0, 0.35)),
        congestion=float(congestion),
        kerley=float(kerley),
        effusion_right=float(eff_r),
        effusion_left=float(eff_l),
        breast=float(rng.uniform(0.5, 1.0)) if sex == "F" else 0.0,
        thorax_width=float(rng.uniform(0.64, 0.74)),
        inspiration=float(rng.uniform(0.86, 0.96) if ap else rng.uniform(0.96, 1.06)),
        habitus=float(rng.uniform(0.0, 1.0)),
        bone=_clamp(1.1 - 0.004 * (age - 18.0) * (1.4 if sex == "F" else 1.0)
                           + rng.normal(0, 0.05), 0.6, 1.2),
        shift_x=float(rng.normal(0.0, 0.02)),
        shift_y=float(rng.normal(0.0, 0.02)),
        quality_shift=float(quality_shift),
        noise=float(rng.uniform(0.8, 1.2)),
    )


def _visit_congestion(rng: np.random.Generator, lvef: float) -> float:
    if lvef <= LOW_EF_THRESHOLD:
        if rng.random() < 0.80:
            return _clamp(0.35 + (LOW_EF_THRESHOLD - lvef) / 30.0 + rng.normal(0, 0.12), 0.2, 1.0)
        return 0.0
    return float(rng.uniform(0.2, 0.5)) if rng.random() < 0.06 else 0.0


def _matches(config: PhantomConfig, *, sex: str, race: str, insurance: str) -> bool:
    if not config.shift_group or config.shift_strength <= 0:
        return False
    values = {"sex": sex, "race": race, "insurance": insurance}
    return all(values[k] == v for k, v in config.shift_group.items())


def _plan(config: PhantomConfig) -> list[_Instance]:
    """Sample every study and image of a configuration (no rendering)."""
    fp = _fingerprint(config)
    seed = config.seed
    instances: list[_Instance] = []
    study_index = 0
    patient_index = 0
    while study_index < config.n_studies:
        rng = _rng(seed, patient_index)
        sex = "M" if rng.random() < 0.5 else "F"
        age0 = _clamp(rng.normal(61.0, 16.0), 18.5, 92.0)
        race = RACES[int(rng.choice(len(RACES), p=RACE_WEIGHTS))]
        insurance = _insurance(rng, age0)
        first = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 6 * 365)))
        birth = first - _dt.timedelta(days=int(age0 * 365.25))
        patient = _Patient(
            index=patient_index,
            patient_id=f"PH{seed}-{patient_index:06d}",
            name=_name(rng),
            sex=sex,
            race=race,
            insurance=insurance,
            birth_date=birth,
            shifted=_matches(config, sex=sex, race=race, insurance=insurance),
        )
        n_visits = 1
        if config.max_studies_per_patient > 1 and rng.random() < config.fraction_repeat_patient:
            n_visits = int(rng.integers(2, config.max_studies_per_patient + 1))
        n_visits = min(n_visits, config.n_studies - study_index)
        lvef0, ctr0 = _sample_heart(rng, config=config, age=age0, sex=sex)
        day = first
        for visit in range(n_visits):
            if visit:
                day = day + _dt.timedelta(days=int(rng.integers(20, 300)))
            instances.extend(_plan_study(config, fp, patient, visit, study_index, day, lvef0, ctr0))
            study_index += 1
        patient_index += 1
    return instances


def _plan_study(config: PhantomConfig, fp: str, patient: _Patient, visit: int, study_index: int,
                day: _dt.date, lvef0: float, ctr0: float) -> list[_Instance]:
    seed = config.seed
    rng = _rng(seed, patient.index, visit, 1)
    age = _age_on(patient.birth_date, day)
    lvef = round(_clamp(lvef0 + rng.normal(0.0, 2.0), 10.0, 80.0), 1)
    ctr = round(_clamp(ctr0 + rng.normal(0.0, 0.006), 0.30, 0.78), 4)
    congestion = round(_visit_congestion(rng, lvef), 3)
    sick = lvef <= LOW_EF_THRESHOLD or congestion > 0
    # what was imaged
    views: list[str]
    laterality = ""
    if rng.random() < config.fraction_non_chest:
        body_part = NON_CHEST_PARTS[int(rng.integers(0, len(NON_CHEST_PARTS)))]
        if body_part == "HAND":
            laterality = "L" if rng.random() < 0.5 else "R"
            views = ["PA"]
            description = f"HAND {'LEFT' if laterality == 'L' else 'RIGHT'} PA"
        else:
            views = ["AP"]
            description = "ABDOMEN AP"
    else:
        body_part = "CHEST"
        p_ap = _clamp(config.fraction_ap * (1.6 if sick else 0.85) * (1.2 if age >= 80 else 1.0),
                      0.0, 0.95)
        front = "AP" if rng.random() < p_ap else "PA"
        views = [front]
        if front == "PA" and rng.random() < config.fraction_lateral:
            views.append("LL")
        description = "CHEST PA AND LATERAL" if len(views) == 2 else f"CHEST {front}"
    # acquisition device for the visit
    modality = config.modalities[int(rng.integers(0, len(config.modalities)))]
    photometric = "MONOCHROME1" if rng.random() < config.fraction_monochrome1 else "MONOCHROME2"
    bits = int(config.bits_stored[int(rng.integers(0, len(config.bits_stored)))])
    if config.size is not None:
        rows = cols = int(config.size)
    else:
        lo, hi = config.size_range
        rows = int(rng.integers(lo, hi + 1))
        cols = int(_clamp(round(rows * rng.uniform(0.82, 1.0)), lo, hi))
    spacing = round(float(rng.uniform(350.0, 430.0)) / max(rows, cols), 4)
    hh, mm, ss = int(rng.integers(7, 20)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    study_uid = _uid(fp, seed, "study", patient.index, visit)
    accession = f"A{seed % 1_000_000:06d}{study_index:07d}"[:16]
    level_lo = float(rng.uniform(0.02, 0.10))
    level_hi = float(rng.uniform(0.80, 0.96))
    kvp = int(rng.integers(100, 126)) if body_part == "CHEST" else int(rng.integers(55, 85))
    out = []
    for k, view in enumerate(views):
        img_rng = _rng(seed, patient.index, visit, 2, k)
        q = config.shift_strength if patient.shifted else 0.0
        params = _chest_params(img_rng, view=view if body_part == "CHEST" else "PA", ctr=ctr,
                               lvef=lvef, sex=patient.sex, age=age, congestion=congestion,
                               quality_shift=q)
        out.append(_Instance(
            patient=patient, study_index=study_index, visit=visit, image_index=k,
            study_uid=study_uid,
            series_uid=_uid(fp, seed, "series", patient.index, visit, k),
            sop_uid=_uid(fp, seed, "sop", patient.index, visit, k),
            accession=accession, study_date=day, study_time=f"{hh:02d}{mm:02d}{ss:02d}",
            study_description=description,
            series_description={"PA": "PA", "AP": "AP", "LL": "LATERAL"}[view] if body_part == "CHEST"
            else description,
            series_number=k + 1, modality=modality, photometric=photometric, bits_stored=bits,
            rows=rows, cols=cols, spacing=spacing, body_part=body_part, view=view,
            laterality=laterality, age=age, ctr=ctr, lvef=lvef, congestion=congestion,
            params=params, level_lo=level_lo, level_hi=level_hi, kvp=kvp,
            render_seed=(seed, patient.index, visit, 3, k),
        ))
    return out


def _row(inst: _Instance, width: int) -> dict[str, Any]:
    p = inst.params
    return {
        "file": inst.file_name(width),
        "patient_id": inst.patient.patient_id,
        "study_uid": inst.study_uid,
        "series_uid": inst.series_uid,
        "sop_uid": inst.sop_uid,
        "accession": inst.accession,
        "modality": inst.modality,
        "view": inst.view,
        "body_part": inst.body_part,
        "frontal_chest": inst.frontal_chest,
        "ctr": inst.ctr,
        "cardiomegaly": inst.cardiomegaly,
        "lvef": inst.lvef,
        "low_ef": inst.low_ef,
        "sex": inst.patient.sex,
        "age": inst.age,
        "race": inst.patient.race,
        "insurance": inst.patient.insurance,
        "shifted": int(inst.patient.shifted),
        "ctr_apparent": round(p.ctr_apparent, 4),
        "congestion": inst.congestion,
        "effusion": int(p.effusion_left > 0 or p.effusion_right > 0),
        "photometric": inst.photometric,
        "bits_stored": inst.bits_stored,
        "rows": inst.rows,
        "columns": inst.cols,
        "pixel_spacing_mm": inst.spacing,
        "study_date": inst.study_date.strftime("%Y%m%d"),
        "visit": inst.visit,
    }


def _width(config: PhantomConfig) -> int:
    return max(4, len(str(config.n_studies - 1)))


def sample_labels(config: PhantomConfig) -> pd.DataFrame:
    """The labels table :func:`generate_studies` would write, without rendering anything.

    Cheap (thousands of rows per second): use it to study the label model.
    """
    width = _width(config)
    return pd.DataFrame([_row(i, width) for i in _plan(config)],
                        columns=[*LABEL_COLUMNS, *EXTRA_COLUMNS])


def sample_chest_params(*, n: int, random_state: int | np.random.Generator = 0,
                        prevalence_cardiomegaly: float = 0.25, prevalence_low_ef: float = 0.20,
                        fraction_ap: float = 0.30) -> tuple[list[ChestParams], pd.DataFrame]:
    """Sample ``n`` frontal chest images' parameters and labels, for rendering small images
    directly with :func:`render_chest` (e.g. training without DICOM round trips).

    Returns
    -------
    params : list of ChestParams
    labels : pandas.DataFrame
        Columns ``ctr, cardiomegaly, lvef, low_ef, view, sex, age, congestion``.
    """
    rng = _as_generator(random_state)
    config = PhantomConfig(prevalence_cardiomegaly=prevalence_cardiomegaly,
                           prevalence_low_ef=prevalence_low_ef, fraction_ap=fraction_ap)
    params, rows = [], []
    for _ in range(n):
        sex = "M" if rng.random() < 0.5 else "F"
        age = _clamp(rng.normal(61.0, 16.0), 18.5, 92.0)
        lvef, ctr = _sample_heart(rng, config=config, age=age, sex=sex)
        lvef, ctr = round(lvef, 1), round(ctr, 4)
        congestion = round(_visit_congestion(rng, lvef), 3)
        sick = lvef <= LOW_EF_THRESHOLD or congestion > 0
        view = "AP" if rng.random() < min(0.95, fraction_ap * (1.6 if sick else 0.85)) else "PA"
        params.append(_chest_params(rng, view=view, ctr=ctr, lvef=lvef, sex=sex, age=age,
                                    congestion=congestion, quality_shift=0.0))
        rows.append({"ctr": ctr, "cardiomegaly": int(ctr > CTR_THRESHOLD), "lvef": lvef,
                     "low_ef": int(lvef <= LOW_EF_THRESHOLD), "view": view, "sex": sex,
                     "age": int(age), "congestion": congestion})
    return params, pd.DataFrame(rows)


