"""DICOM writing: the CR/DX data sets of sampled instances, :func:`generate_studies` and
:func:`make_phantom_dataset`."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from cxr_ai import __version__
from cxr_ai.dicom.codes import CHEST
from cxr_ai.phantoms.params import (
    CR_IMAGE_STORAGE,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    EXTRA_COLUMNS,
    ISSUER,
    LABEL_COLUMNS,
    MANUFACTURER,
    NON_CHEST_PARTS,
    PhantomConfig,
    RACES,
    RACE_WEIGHTS,
    VIEWS,
    _REGION_CODES,
    _VIEW_CODES,
)
from cxr_ai.phantoms.drawing import (
    render_image,
)
from cxr_ai.phantoms.truth import (
    _Instance,
    _Patient,
    _age_on,
    _as_generator,
    _chest_params,
    _clamp,
    _insurance,
    _name,
    _plan,
    _rng,
    _row,
    _sample_heart,
    _uid,
    _visit_congestion,
    _width,
)

logger = logging.getLogger(__name__)

# ============================================================================================
# DICOM
# ============================================================================================


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _stored_pixels(image: np.ndarray, inst: _Instance) -> np.ndarray:
    """Map a presentation image (1 = white) to stored values of the instance's encoding."""
    vmax = (1 << inst.bits_stored) - 1
    lo, hi = inst.level_lo * vmax, inst.level_hi * vmax
    if inst.photometric == "MONOCHROME1":
        values = hi - image * np.float32(hi - lo)
    else:
        values = lo + image * np.float32(hi - lo)
    return np.clip(np.rint(values), 0, vmax).astype(np.uint16)


def _window(pixels: np.ndarray) -> tuple[int, int]:
    sub = pixels[::4, ::4]
    p_lo, p_hi = np.percentile(sub, [0.5, 99.5])
    width = max(int(round((p_hi - p_lo) * 1.05)), 2)
    return int(round((p_hi + p_lo) / 2.0)), width


_ORIENTATION = {("CHEST", "PA"): ["L", "F"], ("CHEST", "AP"): ["L", "F"], ("CHEST", "LL"): ["P", "F"],
                ("ABDOMEN", "AP"): ["L", "F"], ("HAND", "PA"): ["L", "H"]}


def _dataset(inst: _Instance, pixels: np.ndarray) -> Dataset:
    """Build the CR or DX (For Presentation) dataset of an instance."""
    dx = inst.modality == "DX"
    sop_class = DX_IMAGE_STORAGE_FOR_PRESENTATION if dx else CR_IMAGE_STORAGE
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = inst.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    date = inst.study_date.strftime("%Y%m%d")
    start = _dt.datetime.combine(inst.study_date,
                                 _dt.datetime.strptime(inst.study_time, "%H%M%S").time())
    content_time = (start + _dt.timedelta(minutes=2 + 3 * inst.image_index)).strftime("%H%M%S")

    # SOP Common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = inst.sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = content_time
    _set_patient_and_study(ds, inst, date=date)
    _set_series_and_equipment(ds, inst, date=date, content_time=content_time, dx=dx)
    _set_image(ds, inst, date=date, content_time=content_time, dx=dx)
    _set_luts_and_pixels(ds, inst, pixels)
    return ds


def _set_patient_and_study(ds: Dataset, inst: _Instance, *, date: str) -> None:
    # Patient
    pt = inst.patient
    ds.PatientName = pt.name
    ds.PatientID = pt.patient_id
    ds.IssuerOfPatientID = ISSUER
    ds.PatientBirthDate = pt.birth_date.strftime("%Y%m%d")
    ds.PatientSex = pt.sex
    ds.PatientAge = f"{inst.age:03d}Y"
    ds.EthnicGroup = pt.race
    # General Study
    ds.StudyInstanceUID = inst.study_uid
    ds.StudyDate = date
    ds.StudyTime = inst.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{inst.study_index + 1}"
    ds.AccessionNumber = inst.accession
    ds.StudyDescription = inst.study_description


def _set_series_and_equipment(ds: Dataset, inst: _Instance, *, date: str, content_time: str, dx: bool) -> None:
    # General Series (+ CR Series / DX Series)
    ds.Modality = inst.modality
    ds.SeriesInstanceUID = inst.series_uid
    ds.SeriesNumber = inst.series_number
    ds.SeriesDate = date
    ds.SeriesTime = content_time
    ds.SeriesDescription = inst.series_description
    ds.BodyPartExamined = inst.body_part
    ds.ViewPosition = inst.view
    if inst.laterality and not dx:
        ds.Laterality = inst.laterality  # paired body part (General Series, Type 2C)
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Phantom General Hospital"
    ds.ManufacturerModelName = f"{inst.modality} phantom"
    ds.SoftwareVersions = f"cxr-ai {__version__}"


def _set_image(ds: Dataset, inst: _Instance, *, date: str, content_time: str, dx: bool) -> None:
    """General Image, CR Image or DX Image (with DX Anatomy Imaged and Positioning)."""
    # General Image / CR Image / DX Image
    ds.InstanceNumber = 1
    ds.PatientOrientation = _ORIENTATION[(inst.body_part, inst.view)]
    ds.ContentDate = date
    ds.ContentTime = content_time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = content_time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.KVP = inst.kvp
    ds.DistanceSourceToDetector = 1000 if inst.view == "AP" else 1800
    ds.ImagerPixelSpacing = [inst.spacing, inst.spacing]
    ds.PixelSpacing = [inst.spacing, inst.spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Phantom: detector pitch, no magnification"
    if dx:
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher values = less beam intensity (MONOCHROME2); +1 the reverse (MONOCHROME1)
        ds.PixelIntensityRelationshipSign = 1 if inst.photometric == "MONOCHROME1" else -1
        ds.PresentationLUTShape = "INVERSE" if inst.photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.ImageLaterality = inst.laterality or "U"
        ds.AnatomicRegionSequence = [_code_item(_REGION_CODES[inst.body_part])]
        ds.ViewCodeSequence = [_code_item(_VIEW_CODES[inst.view])]
        ds.AcquisitionContextSequence = []
        ds.PositionerType = "NONE"


def _set_luts_and_pixels(ds: Dataset, inst: _Instance, pixels: np.ndarray) -> None:
    # Modality LUT (identity) and VOI LUT (window from the image)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    center, width = _window(pixels)
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = "PHANTOM FULL RANGE"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = inst.photometric
    ds.Rows = inst.rows
    ds.Columns = inst.cols
    ds.BitsAllocated = 16
    ds.BitsStored = inst.bits_stored
    ds.HighBit = inst.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()


def _render_instance(inst: _Instance) -> np.ndarray:
    rng = _rng(*inst.render_seed)
    return render_image(inst.params, inst.rows, inst.cols, rng, body_part=inst.body_part,
                        laterality=inst.laterality or "L")


def _instance_dataset(inst: _Instance) -> Dataset:
    image = _render_instance(inst)
    return _dataset(inst, _stored_pixels(image, inst))


def generate_studies(out_dir: str | Path, config: PhantomConfig | None = None, *,
                     n: int | None = None, seed: int | None = None,
                     size: int | None = None) -> pd.DataFrame:
    """Write synthetic studies and their labels.

    Parameters
    ----------
    out_dir : str or Path
        Output folder; created if missing. Files go to ``study_XXXX/img_YY.dcm`` and
        ``labels.csv``.
    config : PhantomConfig, optional
        What to generate (defaults: ``PhantomConfig()``).
    n, seed, size : int, optional
        Overrides of ``config.n_studies``, ``config.seed`` and ``config.size``.

    Returns
    -------
    pandas.DataFrame
        The labels table (also written to ``out_dir/labels.csv``).
    """
    config = config or PhantomConfig()
    overrides = {k: v for k, v in (("n_studies", n), ("seed", seed), ("size", size)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = _width(config)
    instances = _plan(config)
    rows = []
    for inst in instances:
        path = out / inst.file_name(width)
        path.parent.mkdir(parents=True, exist_ok=True)
        _instance_dataset(inst).save_as(path, enforce_file_format=True)
        rows.append(_row(inst, width))
    table = pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *EXTRA_COLUMNS])
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        table.to_csv(fh, index=False, lineterminator="\n")
    logger.info("wrote %d phantom images in %d studies of %d patients to %s",
                len(table), config.n_studies, table["patient_id"].nunique(), out)
    return table


def make_phantom_dataset(*, modality: str = "CR", photometric: str = "MONOCHROME2",
                         view: str = "PA", body_part: str = "CHEST", size: int = 1024,
                         bits_stored: int = 12, ctr: float | None = None, lvef: float | None = None,
                         sex: str | None = None, age: int | None = None, race: str | None = None,
                         congestion: float | None = None, shift_strength: float = 0.0,
                         random_state: int | np.random.Generator = 0) -> Dataset:
    """One phantom image as a :class:`pydicom.Dataset` (with file meta, ready for ``save_as``).

    Unset clinical parameters are sampled from the default population. ``view`` is ``PA``,
    ``AP`` or ``LL`` for a chest; ``body_part`` ``ABDOMEN`` (AP) or ``HAND`` (PA) makes a
    non-chest image. UIDs are deterministic functions of all arguments and ``random_state``.
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be 'CR' or 'DX', got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 12 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be within 12..16, got {bits_stored}")
    if body_part not in ("CHEST", *NON_CHEST_PARTS):
        raise ValueError(f"body_part must be CHEST, ABDOMEN or HAND, got {body_part!r}")
    if body_part == "CHEST" and view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS} for a chest, got {view!r}")
    rng = _as_generator(random_state)
    key = [int(x) for x in rng.integers(0, 2**31 - 1, 4)]
    sex = sex or ("M" if rng.random() < 0.5 else "F")
    age_f = float(age) if age is not None else _clamp(rng.normal(61.0, 16.0), 18.5, 92.0)
    race = race or RACES[int(rng.choice(len(RACES), p=RACE_WEIGHTS))]
    base_lvef, base_ctr = _sample_heart(rng, config=PhantomConfig(), age=age_f, sex=sex)
    lvef_v = round(float(lvef if lvef is not None else base_lvef), 1)
    ctr_v = round(float(ctr if ctr is not None else base_ctr), 4)
    cong = float(congestion) if congestion is not None else _visit_congestion(rng, lvef_v)
    if body_part == "HAND":
        view, laterality = "PA", ("L" if rng.random() < 0.5 else "R")
    elif body_part == "ABDOMEN":
        view, laterality = "AP", ""
    else:
        laterality = ""
    params = _chest_params(rng, view=view if body_part == "CHEST" else "PA", ctr=ctr_v,
                           lvef=lvef_v, sex=sex, age=age_f, congestion=cong,
                           quality_shift=shift_strength)
    day = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    patient = _Patient(index=key[0], patient_id=f"PHX-{key[0]:010d}", name=_name(rng), sex=sex,
                       race=race, insurance=_insurance(rng, age_f),
                       birth_date=day - _dt.timedelta(days=int(age_f * 365.25)),
                       shifted=shift_strength > 0)
    ident = (modality, photometric, view, body_part, size, bits_stored, ctr_v, lvef_v, sex,
             int(age_f), race, cong, shift_strength, *key)
    description = (f"CHEST {view}" if body_part == "CHEST" else
                   "ABDOMEN AP" if body_part == "ABDOMEN" else
                   f"HAND {'LEFT' if laterality == 'L' else 'RIGHT'} PA")
    inst = _Instance(
        patient=patient, study_index=0, visit=0, image_index=0,
        study_uid=_uid("single", "study", *ident), series_uid=_uid("single", "series", *ident),
        sop_uid=_uid("single", "sop", *ident), accession=f"X{key[1]:09d}",
        study_date=day, study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00",
        study_description=description, series_description=description, series_number=1,
        modality=modality, photometric=photometric, bits_stored=bits_stored, rows=size, cols=size,
        spacing=round(400.0 / size, 4), body_part=body_part, view=view, laterality=laterality,
        age=_age_on(patient.birth_date, day), ctr=ctr_v, lvef=lvef_v, congestion=cong,
        params=params, level_lo=float(rng.uniform(0.02, 0.10)), level_hi=float(rng.uniform(0.80, 0.96)),
        kvp=120 if body_part == "CHEST" else 70, render_seed=tuple(key),
    )
    return _instance_dataset(inst)
