"""The thin serving side: ONNX bundles read and checked, and served, with numpy and onnxruntime only."""

from serve.bundle import BundleError, check_bundle
from serve.predictor import InvalidRequest, NoKnownItems, Predictor, Recommendation, UnknownItem
from serve.use_cases import because_you_viewed, recover_cart, reengage, session_focus

__all__ = [
    "BundleError",
    "InvalidRequest",
    "NoKnownItems",
    "Predictor",
    "Recommendation",
    "UnknownItem",
    "because_you_viewed",
    "check_bundle",
    "recover_cart",
    "reengage",
    "session_focus",
]
