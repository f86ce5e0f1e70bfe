"""Phantom parameters: the labels, populations and constants, :class:`ChestParams` (one drawn
chest) and :class:`PhantomConfig` (one generated collection)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydicom.sr.codedict import codes

from cxr_ai.dicom.codes import CHEST
from cxr_ai.errors import ConfigError

#: SOP Class UIDs (PS3.4 B.5).
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

#: The labels CSV starts with exactly these columns (extras follow).
LABEL_COLUMNS: tuple[str, ...] = (
    "file",
    "patient_id",
    "study_uid",
    "series_uid",
    "sop_uid",
    "accession",
    "modality",
    "view",
    "body_part",
    "frontal_chest",
    "ctr",
    "cardiomegaly",
    "lvef",
    "low_ef",
    "sex",
    "age",
    "race",
    "insurance",
    "shifted",
)
EXTRA_COLUMNS: tuple[str, ...] = (
    "ctr_apparent",
    "congestion",
    "effusion",
    "photometric",
    "bits_stored",
    "rows",
    "columns",
    "pixel_spacing_mm",
    "study_date",
    "visit",
)

CTR_THRESHOLD = 0.5
LOW_EF_THRESHOLD = 40.0
RACES: tuple[str, ...] = ("White", "Black", "Asian", "Hispanic", "Other")
RACE_WEIGHTS: tuple[float, ...] = (0.58, 0.18, 0.09, 0.11, 0.04)
INSURANCES: tuple[str, ...] = ("Medicare", "Medicaid", "Private", "Other")
SHIFT_KEYS: tuple[str, ...] = ("race", "sex", "insurance")
VIEWS: tuple[str, ...] = ("PA", "AP", "LL")
NON_CHEST_PARTS: tuple[str, ...] = ("ABDOMEN", "HAND")
MANUFACTURER = "cxr-ai phantom"
ISSUER = "CXR-AI-PHANTOM"
_UID_TAG = "cxr-ai-phantom"
_REF_SIZE = 2048  # image size at which noise amplitudes are specified
_MAX_WORK = 896  # anatomy is rendered at most at this size, then upsampled

# Coded concepts for DX headers (pydicom's CID 4010 view codes and CID 4031 regions).
_VIEW_CODES = {"PA": codes.SCT.PosteroAnterior, "AP": codes.SCT.AnteroPosterior,
               "LL": codes.SCT.LeftLateral}
_REGION_CODES = {"CHEST": CHEST, "ABDOMEN": codes.SCT.Abdomen, "HAND": codes.SCT.Hand}

_SYLLABLES = ("ka", "lo", "mi", "ra", "ne", "so", "ta", "vi", "do", "re", "lu", "ma", "ko",
              "sa", "te", "ni", "ba", "ve", "ri", "no", "ga", "lin", "mar", "tos", "len")




# ============================================================================================
# Parameters
# ============================================================================================


@dataclass(frozen=True)
class ChestParams:
    """What one synthetic radiograph shows; all geometry in units of half the image size.

    Parameters
    ----------
    view : {"PA", "AP", "LL"}
        Projection. ``LL`` renders a left-lateral chest.
    ctr : float
        True (PA-equivalent) cardiothoracic ratio.
    magnification : float
        Heart magnification of the projection (1 for PA, ~1.05-1.12 for AP).
    globular : float
        0..1, rounding of the cardiac silhouette (dilated left ventricle).
    congestion : float
        0..1, perihilar haze and upper-zone vascular redistribution.
    kerley : float
        0..1, intensity of Kerley B lines at the lateral lung bases.
    effusion_right, effusion_left : float
        0..1, pleural fluid (patient's right is image left on frontal views).
    breast : float
        0..1, breast soft-tissue shadow over the lower zones.
    thorax_width : float
        Inner thoracic half-width.
    inspiration : float
        Lung height factor (AP / supine films are less inspired).
    habitus : float
        0..1, soft-tissue thickness.
    bone : float
        Bone density factor.
    shift_x, shift_y : float
        Patient position (translation).
    quality_shift : float
        0..1, acquisition-quality degradation (noise, mottle, veil, blur).
    noise : float
        Quantum-noise factor.
    """

    view: str = "PA"
    ctr: float = 0.45
    magnification: float = 1.0
    globular: float = 0.0
    congestion: float = 0.0
    kerley: float = 0.0
    effusion_right: float = 0.0
    effusion_left: float = 0.0
    breast: float = 0.0
    thorax_width: float = 0.70
    inspiration: float = 1.0
    habitus: float = 0.5
    bone: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    quality_shift: float = 0.0
    noise: float = 1.0

    @property
    def ctr_apparent(self) -> float:
        """The cardiothoracic ratio as drawn on the image."""
        return float(self.ctr * self.magnification)


@dataclass(frozen=True)
class PhantomConfig:
    """What :func:`generate_studies` writes.

    Parameters
    ----------
    n_studies : int
        Number of studies (patient visits, one folder each).
    seed : int
        Seed of everything: same config, same bytes.
    size : int, optional
        Square image size override (pixels a side), e.g. 512 for fast tests. When ``None``,
        rows and columns are drawn from ``size_range``.
    size_range : (int, int)
        Range of image sides when ``size`` is ``None``.
    prevalence_cardiomegaly, prevalence_low_ef : float
        Approximate per-visit prevalences of the two labels.
    fraction_ap : float
        Fraction of frontal chest studies that are AP (more for sicker patients).
    fraction_lateral : float
        Fraction of PA studies that also carry a left-lateral image.
    fraction_non_chest : float
        Fraction of studies that are not chest (``ABDOMEN`` AP or ``HAND`` PA).
    fraction_repeat_patient : float
        Probability that a patient has more than one study.
    max_studies_per_patient : int
        Upper bound of studies per patient.
    modalities : tuple of {"CR", "DX"}
        Modalities to mix (DX is Digital X-Ray Image Storage - For Presentation).
    fraction_monochrome1 : float
        Fraction of studies stored MONOCHROME1.
    bits_stored : tuple of int
        BitsStored values to mix (12..16; BitsAllocated is 16).
    shift_group : mapping, optional
        Subgroup whose images are degraded, e.g. ``{"race": "Black"}``; keys among
        ``race``, ``sex``, ``insurance``.
    shift_strength : float
        0..1, strength of that degradation.
    """

    n_studies: int = 20
    seed: int = 0
    size: int | None = None
    size_range: tuple[int, int] = (1760, 2500)
    prevalence_cardiomegaly: float = 0.25
    prevalence_low_ef: float = 0.20
    fraction_ap: float = 0.30
    fraction_lateral: float = 0.20
    fraction_non_chest: float = 0.08
    fraction_repeat_patient: float = 0.30
    max_studies_per_patient: int = 4
    modalities: tuple[str, ...] = ("CR", "DX")
    fraction_monochrome1: float = 0.5
    bits_stored: tuple[int, ...] = (12, 14, 15, 16)
    shift_group: Mapping[str, str] | None = field(default=None, hash=False)
    shift_strength: float = 0.0

    def __post_init__(self) -> None:
        if self.n_studies < 1:
            raise ConfigError(f"n_studies must be >= 1, got {self.n_studies}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.size is not None and not 64 <= self.size <= 4096:
            raise ConfigError(f"size must be within 64..4096 pixels, got {self.size}")
        lo, hi = self.size_range
        if not 64 <= lo <= hi <= 4096:
            raise ConfigError(f"size_range must satisfy 64 <= lo <= hi <= 4096, got {self.size_range}")
        for name in ("prevalence_cardiomegaly", "prevalence_low_ef", "fraction_ap",
                     "fraction_lateral", "fraction_non_chest", "fraction_repeat_patient",
                     "fraction_monochrome1", "shift_strength"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1], got {value}")
        if self.max_studies_per_patient < 1:
            raise ConfigError("max_studies_per_patient must be >= 1")
        bad = [m for m in self.modalities if m not in ("CR", "DX")]
        if bad or not self.modalities:
            raise ConfigError(
                f"modalities must be a non-empty subset of ('CR', 'DX'), got {self.modalities}"
            )
        bad_bits = [b for b in self.bits_stored if not 12 <= b <= 16]
        if bad_bits or not self.bits_stored:
            raise ConfigError(f"bits_stored values must be within 12..16, got {self.bits_stored}")
        if self.shift_group is not None:
            unknown = sorted(set(self.shift_group) - set(SHIFT_KEYS))
            if unknown or not self.shift_group:
                raise ConfigError(
                    f"shift_group keys must be among {SHIFT_KEYS}, got {dict(self.shift_group)}"
                )
            object.__setattr__(self, "shift_group", dict(self.shift_group))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "bits_stored", tuple(self.bits_stored))
        object.__setattr__(self, "size_range", tuple(self.size_range))


