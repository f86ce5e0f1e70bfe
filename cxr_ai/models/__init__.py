"""Models: bundle load/save (:mod:`.bundle`), networks (:mod:`.networks`), and the inference
engine with Grad-CAM (:mod:`.engine`)."""

from cxr_ai.models.bundle import Bundle, FindingSpec, device_uid, load_bundle, save_bundle
from cxr_ai.models.engine import (
    InferenceEngine,
    ModelOutput,
    Prediction,
    default_bundle_path,
    load_default_engine,
)
from cxr_ai.models.networks import CxrNet, NetworkConfig, build_network

__all__ = [
    "Bundle",
    "CxrNet",
    "FindingSpec",
    "InferenceEngine",
    "ModelOutput",
    "NetworkConfig",
    "Prediction",
    "build_network",
    "default_bundle_path",
    "device_uid",
    "load_bundle",
    "load_default_engine",
    "save_bundle",
]
