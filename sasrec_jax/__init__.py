"""sasrec-jax: SASRec in JAX/Flax — train on accelerators, evaluate honestly, export to ONNX."""

__version__ = "0.1.0"
__all__ = ["SASRec", "__version__"]


def __getattr__(name: str):
    # Lazy: `import sasrec_jax` (and the data layer) stays free of JAX until the estimator is used.
    if name == "SASRec":
        from sasrec_jax.api import SASRec

        return SASRec
    raise AttributeError(f"module 'sasrec_jax' has no attribute {name!r}")
