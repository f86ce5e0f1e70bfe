"""DICOM reading, applicability rules, coded concepts and result-object writers."""
