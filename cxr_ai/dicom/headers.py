"""Header attributes every result object shares: patient and study, and the algorithm as
contributing equipment.

The writers (:mod:`cxr_ai.dicom.sr`, :mod:`cxr_ai.dicom.heatmap`, :mod:`cxr_ai.dicom.parametric_map`) build their objects with
highdicom, whose constructors copy different subsets of the source's patient and study
attributes (the Secondary Capture constructor drops IssuerOfPatientID, for one). A PACS files
an object by these attributes, so every result object of a study must carry the same values:
:func:`finish` copies :data:`PATIENT_STUDY_KEYWORDS` from the source into each object, the
same set for every kind.

Contributing Equipment (PS3.3 C.7.5.1, ``ContributingEquipmentSequence``): IHE AI Results
asks for the algorithm itself. :func:`algorithm_equipment` is that item: manufacturer, model
name = the bundle's name, software version = the bundle's version and Device UID = the
model's device UID (which changes when the model is retrained,
:func:`cxr_ai.models.bundle.device_uid`). Its purpose of reference is DCM 109102 "Processing
Equipment": CID 7005 (Contributing Equipment Purposes of Reference) has no "Processing
Algorithm" concept, and a code outside the context group would fail validation. The item
goes first; the source's own contributing equipment (its acquisition device) follows as
highdicom copied it; the highdicom library itself is not listed (it is a build tool, not
equipment that contributed to the result).
"""

from __future__ import annotations

import copy
import logging

from pydicom.dataset import Dataset

from cxr_ai.dicom import codes
from cxr_ai.results import ModelInfo

logger = logging.getLogger(__name__)

#: Patient module (PS3.3 C.7.1.1) attributes a source radiograph may carry.
PATIENT_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "EthnicGroup", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
)
#: General Study (C.7.2.1) and Patient Study (C.7.2.2) attributes.
STUDY_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight",
)
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = PATIENT_KEYWORDS + STUDY_KEYWORDS

#: General Series (C.7.3.1) and General Equipment (C.7.5.1) attributes: series-level, so
#: identical in every instance of a series (tests check it over every object kind).
SERIES_KEYWORDS: tuple[str, ...] = (
    "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Laterality",
    "BodyPartExamined", "ProtocolName", "OperatorsName", "PatientPosition",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "StationName",
)


def copy_patient_study(target: Dataset, source: Dataset) -> None:
    """Give ``target`` the source's value of every :data:`PATIENT_STUDY_KEYWORDS` attribute
    the source has (deep copies: the source is never shared or changed)."""
    if "SpecificCharacterSet" in source:  # the copied names are encoded in the source's set
        target["SpecificCharacterSet"] = copy.deepcopy(source["SpecificCharacterSet"])
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])


def algorithm_equipment(model: ModelInfo, *, description: str) -> Dataset:
    """The Contributing Equipment item naming the algorithm (see the module doc)."""
    from highdicom.sr import CodedConcept

    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(codes.PROCESSING_EQUIPMENT)]
    item.Manufacturer = model.manufacturer[:64]
    item.ManufacturerModelName = model.name[:64]
    item.SoftwareVersions = model.version[:64]
    item.DeviceUID = model.device_uid
    item.ContributionDescription = description[:1024]
    return item


def contributing_equipment(target: Dataset, model: ModelInfo, *, description: str) -> None:
    """Put the algorithm first in ``target``'s Contributing Equipment Sequence, keep the
    source's acquisition equipment after it, and leave the building library out."""
    kept = []
    for item in target.get("ContributingEquipmentSequence", []):
        purposes = item.get("PurposeOfReferenceCodeSequence", [])
        if any(str(p.CodeValue) == codes.ACQUISITION_EQUIPMENT.value for p in purposes):
            kept.append(item)
    target.ContributingEquipmentSequence = [algorithm_equipment(model, description=description), *kept]


def finish(target: Dataset, source: Dataset, model: ModelInfo, *, description: str) -> None:
    """What every result object gets after its constructor: the source's patient and study
    attributes and the algorithm as contributing equipment."""
    copy_patient_study(target, source)
    contributing_equipment(target, model, description=description)
