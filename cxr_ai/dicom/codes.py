"""Every coded concept cxr-ai emits or reads, defined once.

Call sites import names from here; no code value is written as a string anywhere else.

Sources
-------
- SNOMED CT International Edition (browser: browser.ihtsdotools.org).
- DICOM PS3.16 (Content Mapping Resource): CID 241 / CID 244, DCM codes.
- LOINC (loinc.org).
"""

from __future__ import annotations

from pydicom.sr.coding import Code

# --- Findings --------------------------------------------------------------------------------
#: SNOMED CT 8186001 |Cardiomegaly (disorder)|. NB: pydicom's ``codes.SCT.Cardiomegaly`` is
#: 287272002, a different concept; do not use it.
CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")

#: SNOMED CT 134401001 |Left ventricular systolic dysfunction (disorder)|.
#: Chosen for the low-ejection-fraction model: the model predicts reduced LV systolic function
#: (LVEF at or below a cut-off, default 40 %, the HFrEF boundary of the 2021 ESC / 2022
#: AHA/ACC/HFSA heart-failure guidelines), which is a finding about the ventricle, not a
#: heart-failure diagnosis (703272007 |Heart failure with reduced ejection fraction| would
#: claim a clinical syndrome the radiograph cannot establish).
LV_SYSTOLIC_DYSFUNCTION = Code("134401001", "SCT", "Left ventricular systolic dysfunction")

#: LOINC 10230-1 "Left ventricular Ejection fraction" — the echocardiography measurement used
#: as low-EF ground truth (not in pydicom's dictionary, which has only method-specific codes).
LVEF_MEASUREMENT = Code("10230-1", "LN", "Left ventricular Ejection fraction")

# --- Qualitative values (DICOM CID 241 / SNOMED CT) -----------------------------------------
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")

# --- Anatomy ---------------------------------------------------------------------------------
HEART = Code("80891009", "SCT", "Heart")
CHEST = Code("816094009", "SCT", "Chest")

# --- Measurements ----------------------------------------------------------------------------
PROBABILITY = Code("122157", "DCM", "Probability")
UNITLESS = Code("1", "UCUM", "no units")

# --- Result objects: SR, Parametric Map, FHIR (cxr_ai.dicom.sr / .heatmap, cxr_ai.fhir) ----
#: SNOMED CT 399208008 |Plain X-ray of chest (procedure)|: TID 1500 "Procedure reported" of the
#: SR (CID 100 is extensible; it has no chest-radiograph entry).
PLAIN_XRAY_CHEST = Code("399208008", "SCT", "Plain X-ray of chest")

#: LOINC 36554-4 "XR Chest Single view" (LOINC/RSNA Radiology Playbook): the FHIR
#: DiagnosticReport code. The models read one frontal image, so the single-view code is the
#: honest one even when the study also holds a lateral (36643-5 "XR Chest 2V" would claim both).
XR_CHEST_SINGLE_VIEW = Code("36554-4", "LN", "XR Chest Single view")

#: DCM 123110 "Artificial Intelligence" (PS3.16 CID 7162, the Algorithm Family of TID 4019):
#: algorithm family in the SR and FHIR ``Observation.method``.
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

#: DCM 130404 "Saliency" (PS3.16 CID 7180 / CID 218): the quantity a Grad-CAM Parametric Map holds.
SALIENCY = Code("130404", "DCM", "Saliency")

#: DCM 121007 "Device" (CID 270 Observer Type): the SR observer is the model, not a person.
OBSERVER_TYPE_DEVICE = Code("121007", "DCM", "Device")

#: DCM 113001 "Rejected for Patient Safety Reasons" (PS3.16 CID 7011 Rejected for Quality
#: Reasons / CID 7010 Key Object Selection Document Title): the title of an IHE IOCM rejection
#: note that withdraws cxr-ai's results of a study (``cxr-ai retract``).
REJECTED_FOR_PATIENT_SAFETY = Code("113001", "DCM", "Rejected for Patient Safety Reasons")

#: DCM 122411 "Threshold Value": the operating threshold reported next to the probability.
THRESHOLD_VALUE = Code("122411", "DCM", "Threshold Value")

#: DCM 109102 "Processing Equipment" (CID 7005 Contributing Equipment Purposes of Reference):
#: the purpose of the Contributing Equipment item that names the algorithm
#: (:mod:`cxr_ai.dicom.headers`; CID 7005 has no "Processing Algorithm" concept).
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
#: DCM 109101 "Acquisition Equipment" (CID 7005): the source's own device, kept after it.
ACQUISITION_EQUIPMENT = Code("109101", "DCM", "Acquisition Equipment")

# FHIR-only concepts. Their scheme designators are local names that :data:`FHIR_SYSTEMS` maps
# to the HL7 code system URIs (terminology.hl7.org).
#: observation-category "imaging" (FHIR R4 Observation.category, preferred binding).
OBSERVATION_CATEGORY_IMAGING = Code("imaging", "HL7-observation-category", "Imaging")
#: v3 ObservationInterpretation POS / NEG (FHIR R4 Observation.interpretation, extensible).
INTERPRETATION_POSITIVE = Code("POS", "HL7-v3-ObservationInterpretation", "Positive")
INTERPRETATION_NEGATIVE = Code("NEG", "HL7-v3-ObservationInterpretation", "Negative")
#: v2 table 0074 "RAD" Radiology (FHIR R4 DiagnosticReport.category, example binding).
DIAGNOSTIC_SERVICE_RADIOLOGY = Code("RAD", "HL7-v2-0074", "Radiology")
#: v2 table 0203 "MR" Medical record number (Identifier.type of the patient identifier).
IDENTIFIER_TYPE_MR = Code("MR", "HL7-v2-0203", "Medical record number")

#: Scheme designator -> FHIR code system URI (FHIR R4 "Using Codes", DICOM PS3.16 Section 8).
FHIR_SYSTEMS: dict[str, str] = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "HL7-observation-category": "http://terminology.hl7.org/CodeSystem/observation-category",
    "HL7-v3-ObservationInterpretation": (
        "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
    ),
    "HL7-v2-0074": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "HL7-v2-0203": "http://terminology.hl7.org/CodeSystem/v2-0203",
}


def fhir_system(code: Code) -> str:
    """The FHIR code system URI of ``code``'s scheme designator."""
    try:
        return FHIR_SYSTEMS[code.scheme_designator]
    except KeyError:
        raise KeyError(
            f"no FHIR code system URI for scheme {code.scheme_designator!r} (code "
            f"{code.value} {code.meaning!r}); add it to FHIR_SYSTEMS in cxr_ai/dicom/codes.py"
        ) from None


#: Finding key (as used in bundles, logs and tables) -> coded concept.
FINDING_CODES: dict[str, Code] = {
    "cardiomegaly": CARDIOMEGALY,
    "low_ef": LV_SYSTOLIC_DYSFUNCTION,
}


def finding_code(key: str) -> Code:
    """Return the coded concept for a finding key, with a clear error for unknown keys."""
    try:
        return FINDING_CODES[key]
    except KeyError:
        raise KeyError(
            f"unknown finding {key!r}: known findings are {sorted(FINDING_CODES)}; "
            "add new findings to cxr_ai/dicom/codes.py"
        ) from None
