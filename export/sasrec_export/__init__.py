"""Export a trained sasrec-jax run to a verified ONNX bundle (`export_bundle`), and re-check one."""

from sasrec_export.bundle import ExportError, export_bundle

__all__ = ["ExportError", "export_bundle"]
