"""An int8 scoring graph for large catalogues: approximate scores over every item, top-S shortlist out.

A 1M × 64 float32 item table is 256 MB to read per request; stored as int8 it is 64 MB,
and onnxruntime's integer GEMM reads it ~4× faster. The shortlist's exact float32 scores are then recomputed
from `item_embeddings.npy` (see sasrec_serve.shortlist), so the final top-k is the float32 model's whenever its true
top-k is inside the shortlist — measured in benchmarks/inference_latency.py.
"""

from __future__ import annotations

import numpy as np


def quantize_table(table_VxD: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric int8 with one scale for the whole table: table ≈ q_VxD * scale.

    One scale (rather than one per item) keeps the integer dot products comparable across items, so the
    graph ranks them directly (no per-item rescaling pass over V scores); the precision lost on small-norm
    items is what the exact re-rank of the shortlist is for."""
    table_VxD = np.asarray(table_VxD, np.float32)
    scale = float(np.abs(table_VxD).max() / 127.0) or 1.0
    q_VxD = np.clip(np.rint(table_VxD / scale), -127, 127).astype(np.int8)
    return q_VxD, scale


def build_shortlist_graph(table_VxD: np.ndarray, shortlist: int, opset: int = 21):
    """ONNX model: session_embedding float32 [batch, D] → candidates int64 [batch, S] (approximate top-S).

    The session embedding is quantized per call (DynamicQuantizeLinear, uint8), multiplied with the int8
    table by MatMulInteger (int32 dot products), and TopK picks the S best. Candidates may include 0, the
    padding row: the caller drops it when re-ranking."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    V1, D = table_VxD.shape
    S = min(int(shortlist), V1)
    q_VxD, _ = quantize_table(table_VxD)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(q_VxD.T), "table_int8_DxV"),
        numpy_helper.from_array(np.array([S], np.int64), "shortlist_k"),
    ]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["session_embedding"], ["h_u8", "h_scale", "h_zp"]),
        helper.make_node("MatMulInteger", ["h_u8", "table_int8_DxV", "h_zp"], ["dots_i32"]),
        helper.make_node("TopK", ["dots_i32", "shortlist_k"], ["top_values", "candidates"], sorted=0),
    ]
    graph = helper.make_graph(
        nodes,
        "sasrec_int8_shortlist",
        [helper.make_tensor_value_info("session_embedding", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("candidates", TensorProto.INT64, ["batch", S])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sasrec-jax")
    model.ir_version = 10  # what onnxruntime >= 1.20 reads; onnx's newest IR may be ahead of it
    onnx.checker.check_model(model)
    return model
