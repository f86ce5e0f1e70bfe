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
