"""The thin serving side: ONNX bundles read and checked, and served, with numpy and onnxruntime only."""

from sasrec_serve.bundle import BundleError, check_bundle
from sasrec_serve.ids import ItemVocab
from sasrec_serve.predictor import InvalidRequest, NoKnownItems, Predictor, UnknownItem
from sasrec_serve.ranking import Recommendation
from sasrec_serve.use_cases import because_you_viewed, recover_cart, reengage, session_focus

__all__ = [
    "BundleError",
    "InvalidRequest",
    "ItemVocab",
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
