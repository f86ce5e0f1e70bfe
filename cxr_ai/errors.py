"""Exception types shared across cxr-ai. Messages say what was wrong, with which input, and
what to do."""

from __future__ import annotations


class CxrAiError(Exception):
    """Base class for errors cxr-ai raises on purpose."""


class ReadError(CxrAiError):
    """An input could not be read as a DICOM radiograph.

    ``reason`` is machine-readable (e.g. ``not_dicom``, ``no_pixel_data``, ``decode_failed``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConfigError(CxrAiError):
    """The configuration is invalid."""


class BundleError(CxrAiError):
    """A model bundle is missing, corrupted, or incompatible."""
