"""The int8 shortlist graph for large catalogues: it ranks like the float32 table, and the re-rank is exact."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
ort = pytest.importorskip("onnxruntime")

from sasrec_export.shortlist import build_shortlist_graph, quantize_table  # noqa: E402
from sasrec_serve.shortlist import ShortlistScorer  # noqa: E402


def table(V: int, D: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = (rng.standard_normal((V + 1, D)) * rng.lognormal(0, 0.5, (V + 1, 1))).astype(np.float32)
    t[0] = 0.0  # padding row
    return t


def scorer(t: np.ndarray, shortlist: int, tmp_path) -> ShortlistScorer:
    path = tmp_path / "shortlist.onnx"
    onnx.save(build_shortlist_graph(t, shortlist), str(path))
    return ShortlistScorer(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), t)


def test_quantization_round_trip():
    t = table(50)
    q, scale = quantize_table(t)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    np.testing.assert_allclose(q * scale, t, atol=scale / 2 + 1e-7)


def test_shortlist_top10_equals_the_float32_top10(tmp_path):
    t = table(5000)
    s = scorer(t, 100, tmp_path)
    h_NxD = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    items, scores = s.top_k(h_NxD, 10)
    exact = h_NxD @ t.T
    exact[:, 0] = -np.inf
    want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    assert (items == want).mean(axis=1).min() == 1.0  # every session identical
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want, 1), rtol=1e-5)
    assert (items != 0).all()


def test_small_catalogue_and_short_lists(tmp_path):
    t = table(7)
    s = scorer(t, 256, tmp_path)  # the shortlist is capped at the catalogue (+ padding row)
    h = np.ones((1, 16), np.float32)
    items, _ = s.top_k(h, 10)
    assert sorted(items[0].tolist()) == list(range(1, 8))  # all 7 real items, never the padding row
