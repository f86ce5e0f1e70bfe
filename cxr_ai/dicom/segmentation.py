"""The heatmap as a DICOM Segmentation (opt-in: ``[outputs] segmentation = true``).

Why a third carrier besides the Secondary Capture and the Parametric Map: a viewer can only
overlay a derived object on a projection radiograph if it can place it without a Frame of
Reference. OHIF's Parametric Map support loads a map only as a derived *volume* of its
referenced series, which a single CR/DX image is not ("stack viewport PMAP is not supported
yet"), while its stack segmentation (OHIF 3.9/3.10, aimed explicitly at DX, CR, MG and US)
overlays a Segmentation on a 2D image through the per-frame Source Image references. highdicom
builds such a Segmentation without a Frame of Reference, one frame on the one source frame.

**FRACTIONAL, type PROBABILITY**: the Grad-CAM map (0-1) is stored as 0-255 (Maximum
Fractional Value 255), so the grading survives and a viewer can colour or threshold it. One
segment per finding, one instance per finding (like the Parametric Map), in one series
(:data:`SEG_SERIES_NUMBER`). Segmented property: the finding's concept (category and type),
algorithm type AUTOMATIC with the bundle as the algorithm. Invalid source pixel spacing (RG1's
``0\\0``) is dropped, and the source's Patient Orientation is copied (empty when unknown), as
the General Image module requires without a Frame of Reference.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from cxr_ai.dicom import codes, headers
from cxr_ai.dicom.common import check_source, sanitize_lo, series_description, software_versions
from cxr_ai.dicom.uids import identity_of
from cxr_ai.results import FindingResult, ModelInfo

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 993
#: Fractional values are stored as round(v * MAX_FRACTIONAL) in 8 bits.
MAX_FRACTIONAL = 255


def build_segmentation(
    source_ds: Dataset,
    finding: FindingResult,
    model: ModelInfo,
    *,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """The FRACTIONAL Segmentation of one finding's heatmap, pixel for pixel on the source.

    Raises
    ------
    ValueError
        Missing heatmap or one whose shape is not the source's rows x columns.
    """
    from cxr_ai.dicom.heat import heat_of, patient_orientation, valid_spacing

    check_source(source_ds)
    heat = heat_of(source_ds, finding)
    concept = codes.finding_code(finding.key)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=sanitize_lo(f"{finding.display} saliency"),
        segmented_property_category=concept,
        segmented_property_type=concept,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=sanitize_lo(model.name), version=sanitize_lo(model.version),
            family=codes.ARTIFICIAL_INTELLIGENCE),
        anatomic_regions=[codes.CHEST],
    )
    identity = identity_of(source_ds, model.device_uid)
    seg = hd.seg.Segmentation(
        source_images=[source_ds],
        pixel_array=heat,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL,
        segment_descriptions=[description],
        series_instance_uid=identity.series_uid("seg"),
        series_number=series_number,
        sop_instance_uid=identity.seg_uid(finding.key),
        instance_number=instance_number,
        manufacturer=sanitize_lo(model.manufacturer),
        manufacturer_model_name=sanitize_lo(model.name),
        software_versions=software_versions(model),
        device_serial_number=model.device_uid[:64],
        content_label=f"{finding.key.upper()}_SEG"[:16],
        content_description=sanitize_lo(f"{finding.display} Grad-CAM saliency - AI, not for diagnostic use"),
        series_description=series_description("heatmap segmentation", model, []),
    )
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures and not valid_spacing(measures[0].get("PixelSpacing")):
        del shared.PixelMeasuresSequence  # never copy an invalid spacing into an output
    orientation = patient_orientation(source_ds)
    seg.PatientOrientation = list(orientation) if orientation else None  # Type 2C: empty = unknown
    headers.finish(seg, source_ds, model, description=f"{finding.display} saliency segmentation by {model.label}")
    logger.debug("built Segmentation %s (%s) for instance %s", seg.SOPInstanceUID, finding.key,
                 source_ds.SOPInstanceUID)
    return seg


def stored_fraction(seg: Dataset) -> np.ndarray:
    """The fractional values of a one-frame Segmentation as 0-1 floats (for tests and readers)."""
    return np.asarray(seg.pixel_array, dtype=np.float32) / float(seg.MaximumFractionalValue)
