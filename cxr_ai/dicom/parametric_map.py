"""Heatmaps as DICOM, part 2: a Parametric Map to toggle.

**Parametric Map** (:func:`build_parametric_map`, highdicom ``pm.ParametricMap``): the Grad-CAM
map in the *source geometry* (same rows and columns, pixel for pixel), so a viewer can overlay
it on the radiograph and switch it off, which no viewer can do with burned-in SC pixels.
Choice: **one Parametric Map instance per finding**, all in one series. Each is a single
frame with its own Real World Value Mapping, content label and description, so a viewer lists
"CARDIOMEGALY_MAP" and "LOW_EF_MAP" as separate, separately toggleable layers; a single
multi-channel instance would depend on the viewer's support for per-frame value mappings.
Values are stored as 16-bit integers 0-10000 with a Real World Value Mapping of slope 1e-4
(0.0001 resolution, far finer than a Grad-CAM map; half the size of float32), quantity DCM
130404 "Saliency", unit UCUM "1", and a VOI window over the full range.

Projection radiographs (CR, DX) have no Frame of Reference, so highdicom builds the map on
its no-frame-of-reference path: one frame aligned pixel for pixel with the single source
frame, with no plane position or orientation. Pixel Measures are copied from the source
only when its PixelSpacing is plausible (0.01-5 mm); invalid spacing such as RG1's
``0.000\\0.000`` is dropped, never copied into an output.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from cxr_ai.dicom import codes, headers
from cxr_ai.dicom.common import (
    LO_MAX,
    PM_SERIES_NUMBER,
    check_source,
    sanitize_lo,
    series_description,
    software_versions,
)
from cxr_ai.dicom.heat import DIAGNOSTIC_WARNING, direction, heat_of, patient_orientation, valid_spacing
from cxr_ai.dicom.uids import ResultIdentity, identity_of
from cxr_ai.results import FindingResult, ModelInfo

logger = logging.getLogger(__name__)

#: Parametric Map storage: value v in [0, 1] is stored as round(v * PM_SCALE).
PM_SCALE = 10000


_PIXEL_TAGS = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}
_TYPE2_COPIED = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
)


#: The display convention of a frontal chest radiograph: rows run to the patient's left,
#: columns to the feet (PS3.3 C.7.6.1.1.1).
FRONTAL_CHEST_ORIENTATION = ("L", "F")
NOMINAL_SPACING_MM = 1.0


@dataclass(frozen=True)
class MapGeometry:
    """How a Parametric Map of a projection radiograph is placed (see :func:`map_geometry`)."""

    frame_of_reference_uid: str
    orientation: tuple[str, str]
    orientation_from_source: bool
    pixel_spacing: tuple[float, float]
    spacing_source: str  # "PixelSpacing", "ImagerPixelSpacing" or "nominal"

    def description(self) -> str:
        parts = []
        if not self.orientation_from_source:
            parts.append(
                "source has no valid PatientOrientation; the frontal-chest display convention "
                "L\\F is assumed"
            )
        if self.spacing_source == "nominal":
            parts.append(
                "source pixel spacing unknown or invalid; Pixel Measures carry a nominal "
                f"{NOMINAL_SPACING_MM:g} mm required by the Parametric Map IOD - do not measure on it"
            )
        elif self.spacing_source == "ImagerPixelSpacing":
            parts.append("pixel spacing is the source's Imager Pixel Spacing (detector plane)")
        return "; ".join(parts)


def map_geometry(source_ds: Dataset) -> MapGeometry:
    """The frame of reference a Parametric Map of ``source_ds`` is defined in.

    The Parametric Map IOD requires a Frame of Reference, plane position and orientation and
    pixel measures, which a projection radiograph does not have. The map therefore gets a
    frame of reference of its own: the source's image plane (UID derived from the source's
    SOP Instance UID, study and patient, shared by every map of that image), origin at the first pixel,
    orientation from the source's PatientOrientation (else the frontal-chest convention),
    spacing from the source's PixelSpacing, else its Imager Pixel Spacing, else a nominal
    1 mm that the derivation description says is nominal. Registration with the source is
    pixel for pixel (same matrix, Spatial Locations Preserved YES), independent of these.
    """
    orientation = patient_orientation(source_ds)
    spacing: tuple[float, float] = (NOMINAL_SPACING_MM, NOMINAL_SPACING_MM)
    spacing_source = "nominal"
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source_ds.get(keyword, None)
        if value is not None and valid_spacing(value):
            spacing = (float(value[0]), float(value[1]))
            spacing_source = keyword
            break
    return MapGeometry(
        frame_of_reference_uid=ResultIdentity.of(source_ds=source_ds, device_uid="").frame_of_reference_uid(),
        orientation=orientation or FRONTAL_CHEST_ORIENTATION,
        orientation_from_source=orientation is not None,
        pixel_spacing=spacing,
        spacing_source=spacing_source,
    )


def _geometry_source(source_ds: Dataset, geometry: MapGeometry) -> Dataset:
    """The source's metadata as highdicom should see it for the map.

    A copy without pixel data (the source is not modified), with the geometry of
    :func:`map_geometry` in place of the source's (possibly invalid) spacing. Type 2
    patient/study attributes the Parametric Map constructor reads are added empty when absent.
    """
    # Copy the elements (not just the dataset): assigning to a shared element would change
    # the caller's dataset.
    meta = Dataset({elem.tag: copy.copy(elem) for elem in source_ds if elem.tag not in _PIXEL_TAGS})
    if hasattr(source_ds, "file_meta"):
        meta.file_meta = source_ds.file_meta
    for keyword in _TYPE2_COPIED:
        if keyword not in meta:
            setattr(meta, keyword, "")
    row_dir = np.array(direction(geometry.orientation[0]))
    col_dir = np.array(direction(geometry.orientation[1]))
    col_dir = col_dir - np.dot(col_dir, row_dir) * row_dir  # orthonormal (oblique orientations)
    col_dir = col_dir / np.linalg.norm(col_dir)
    meta.FrameOfReferenceUID = geometry.frame_of_reference_uid
    meta.PositionReferenceIndicator = ""
    meta.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
    meta.ImagePositionPatient = [0.0, 0.0, 0.0]
    meta.PixelSpacing = list(geometry.pixel_spacing)
    meta.SliceThickness = None
    return meta


def _stored_values(heat: np.ndarray) -> np.ndarray:
    """``round(heat * PM_SCALE)`` as uint16, with one temporary."""
    stored = np.multiply(heat, np.float32(PM_SCALE))
    np.rint(stored, out=stored)
    return stored.astype(np.uint16)


def _value_mapping(finding: FindingResult) -> hd.pm.RealWorldValueMapping:
    """Stored values 0-PM_SCALE as saliency 0-1 (unitless)."""
    return hd.pm.RealWorldValueMapping(
        lut_label=finding.key[:16],
        lut_explanation=sanitize_lo(f"{finding.display} Grad-CAM saliency (0-1)"),
        unit=codes.UNITLESS,
        value_range=(0, PM_SCALE),
        slope=1.0 / PM_SCALE,
        intercept=0.0,
        quantity_definition=codes.SALIENCY,
    )


def build_parametric_map(
    source_ds: Dataset,
    finding: FindingResult,
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    series_number: int = PM_SERIES_NUMBER,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> hd.pm.ParametricMap:
    """Build the Parametric Map of one finding's heatmap in the source geometry.

    Raises
    ------
    ValueError
        Missing heatmap or a heatmap whose shape is not the source's rows x columns.
    """
    check_source(source_ds)
    heat = heat_of(source_ds, finding)
    stored = _stored_values(heat)
    label = f"{finding.key.upper()}_MAP"[:16]
    mapping = _value_mapping(finding)
    qualification = (
        hd.ContentQualificationValues.RESEARCH if model.not_for_clinical_use
        else hd.ContentQualificationValues.PRODUCT
    )
    geometry = map_geometry(source_ds)
    identity = identity_of(source_ds, model.device_uid)
    pm = hd.pm.ParametricMap(
        source_images=[_geometry_source(source_ds, geometry)],
        pixel_array=stored,
        series_instance_uid=series_instance_uid or identity.series_uid("pm"),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or identity.pm_uid(finding.key),
        instance_number=instance_number,
        manufacturer=sanitize_lo(model.manufacturer),
        manufacturer_model_name=sanitize_lo(model.name),
        software_versions=software_versions(model),
        device_serial_number=model.device_uid[:LO_MAX],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=PM_SCALE / 2, window_width=PM_SCALE)
        ],
        transfer_syntax_uid=transfer_syntax_uid,
        content_label=label,
        content_description=sanitize_lo(f"{finding.display} Grad-CAM saliency - {DIAGNOSTIC_WARNING}"),
        content_qualification=qualification,
        series_description=series_description("heatmap map", model, []),  # series-level: no finding
    )
    # Frame Anatomy (C.7.6.16.2.8): the chest, an unpaired region. Saying so is what makes
    # the General Series Laterality (Type 2C) not required.
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.CHEST)]
    anatomy.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    derivation = (
        f"Grad-CAM saliency of {finding.display} by {model.label}, pixel for pixel in the "
        "source geometry"
    )
    if geometry.description():
        derivation += "; " + geometry.description()
    for frame in pm.PerFrameFunctionalGroupsSequence:
        for item in frame.get("DerivationImageSequence", []):
            item.DerivationDescription = derivation[:1024]
    headers.finish(pm, source_ds, model, description=f"{finding.display} saliency map (Grad-CAM) by {model.label}")
    logger.debug(
        "built Parametric Map %s (%s) for instance %s", pm.SOPInstanceUID, finding.key, source_ds.SOPInstanceUID
    )
    return pm


def build_parametric_maps(
    source_ds: Dataset,
    findings: Sequence[FindingResult],
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    series_number: int = PM_SERIES_NUMBER,
    first_instance_number: int = 1,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> list[hd.pm.ParametricMap]:
    """One Parametric Map per finding, in one series (see the module docstring for why)."""
    return [
        build_parametric_map(
            source_ds, finding, model,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            instance_number=first_instance_number + i,
            transfer_syntax_uid=transfer_syntax_uid,
        )
        for i, finding in enumerate(findings)
    ]
