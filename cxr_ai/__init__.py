"""cxr-ai: a DICOM-native chest X-ray AI plugin (cardiomegaly and low-EF triage)."""

__version__ = "0.1.0"
