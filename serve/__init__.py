"""The thin serving side: ONNX bundles read and checked with numpy and onnxruntime only."""

from serve.bundle import BundleError, check_bundle

__all__ = ["BundleError", "check_bundle"]
