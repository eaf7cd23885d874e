"""Predictor on a tiny bundle: ranking, exclusions, fallbacks, sampling, batch = single, ids, errors, no JAX."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx", reason="building the test bundle needs the export extra")

from sasrec_serve import (  # noqa: E402
    BundleError,
    InvalidRequest,
    NoKnownItems,
    Predictor,
    UnknownItem,
    because_you_viewed,
    recover_cart,
    reengage,
    session_focus,
)

from tests.serve_bundles import derive_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir) -> Path:
    """The session's shared tiny bundle (conftest): read only, copied by derive_bundle where a test edits it."""
    return tiny_bundle_dir


@pytest.fixture(scope="module")
def pred(bundle) -> Predictor:
    return Predictor.load(bundle)


def graph_scores(bundle: Path, items: list[str]) -> np.ndarray:
    """Scores [V] straight from model.onnx for a session of known ids (the reference the predictor must match)."""
    ids = json.loads((bundle / "items.json").read_text())
    seq = np.zeros((1, 8), np.int32)
    window = [ids.index(i) + 1 for i in items][-8:]
    seq[0, 8 - len(window) :] = window
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["scores"], {"item_ids": seq})[0][0, 1:]


def test_recommend_is_the_graphs_top_k_without_seen_items(pred, bundle):
    session = ["sku3", "sku4", "sku5"]
    scores = graph_scores(bundle, session)
    ranked = [pred.vocab.ids[j] for j in np.argsort(-scores, kind="stable") if pred.vocab.ids[j] not in session]
    rec = pred.recommend(session, k=5)
    assert list(rec.items) == ranked[:5]
    assert [i for i, _ in rec] == list(rec.items) and len(rec) == 5 and rec[0] == (rec.items[0], rec.scores[0])
    np.testing.assert_allclose(rec.scores, scores[pred.vocab.indices(rec.items) - 1], atol=1e-6)
    assert list(rec.scores) == sorted(rec.scores, reverse=True)
    assert not rec.fallback and rec.unknown == ()


def test_matches_the_jax_estimator(pred, bundle):
    from sasrec_jax import SASRec

    est = SASRec.load(bundle.parent / "run")
    for session in (["sku1"], ["sku7", "sku8", "sku9"], ["sku20", "sku1", "sku2", "sku3", "sku4", "sku5"]):
        want = est.recommend(session, k=6)
        got = pred.recommend(session, k=6)
        assert list(got.items) == [i for i, _ in want]
        np.testing.assert_allclose(got.scores, [s for _, s in want], atol=1e-4)


def test_long_sessions_keep_the_most_recent_window(pred):
    session = [f"sku{i}" for i in range(1, 13)]  # 12 items, L = 8
    assert pred.recommend(session, k=20, exclude_seen=False) == pred.recommend(session[-8:], k=20, exclude_seen=False)
    rec = pred.recommend(session, k=20)
    assert len(rec) == 8 and not set(rec.items) & set(session)  # items older than the window are excluded too


def test_unknown_items_are_skipped_and_reported(pred):
    rec = pred.recommend(["zz", "sku3", 99, "sku4", "zz"], k=4)
    assert rec.items == pred.recommend(["sku3", "sku4"], k=4).items
    assert rec.unknown == ("zz", 99, "zz") and not rec.fallback


def test_empty_and_all_unknown_sessions_fall_back_to_popular_items(pred, bundle):
    popular = json.loads((bundle / "popular.json").read_text())
    for session in ([], ["nope", 42]):
        rec = pred.recommend(session, k=3)
        assert rec.fallback and list(rec.items) == popular["items"][:3]
        np.testing.assert_allclose(rec.scores, np.log1p(popular["counts"][:3]))
        assert rec.unknown == tuple(session)
    rec = pred.recommend([], k=3, exclude=popular["items"][:2])
    assert rec.fallback and list(rec.items) == popular["items"][2:5]


def test_exclusions_and_k_beyond_the_catalogue(pred):
    full = pred.recommend(["sku3"], k=1000, exclude_seen=False)
    assert len(full) == 20 and set(full.items) == set(pred.vocab.ids)  # padding is never an item
    rec = pred.recommend(["sku3", "sku4"], k=1000, exclude=["sku5", "sku6", "not-an-item"])
    assert len(rec) == 16 and not {"sku3", "sku4", "sku5", "sku6"} & set(rec.items)
    assert pred.recommend(["sku3"], k=50, exclude=list(pred.vocab.ids)).items == ()


def test_temperature_sampling_is_reproducible_and_follows_the_softmax(pred, bundle):
    session = ["sku3", "sku4"]
    a = pred.recommend(session, k=5, temperature=1.0, seed=7)
    assert a == pred.recommend(session, k=5, temperature=1.0, seed=7)
    draws = {pred.recommend(session, k=5, temperature=1.0, seed=s).items for s in range(8)}
    assert len(draws) > 1
    for items in draws:
        assert len(set(items)) == 5 and not {"sku3", "sku4"} & set(items)
    # a vanishing temperature is the top k; an overflowing one still returns k allowed items
    assert pred.recommend(session, k=5, temperature=1e-9, seed=1).items == pred.recommend(session, k=5).items
    assert len(set(pred.recommend(session, k=5, temperature=1e-320, seed=1).items) - set(session)) == 5
    # k=1 draws land on items with their softmax probability
    n = 4000
    firsts = [r.items[0] for r in pred.recommend_batch([session] * n, k=1, temperature=1.0)]
    scores = graph_scores(bundle, session)
    allowed = [j for j, i in enumerate(pred.vocab.ids) if i not in session]
    p = np.exp(scores[allowed] - scores[allowed].max())
    p /= p.sum()
    for j, pj in zip(allowed, p):
        freq = firsts.count(pred.vocab.ids[j]) / n
        assert abs(freq - pj) < 4 * math.sqrt(pj * (1 - pj) / n) + 1e-3


def test_batch_equals_single(pred):
    sessions = [["sku1", "sku2"], [], ["zz"], [f"sku{i}" for i in range(20, 0, -1)], ["sku5", "x", "sku9"]]
    for kwargs in ({"k": 4}, {"k": 30, "exclude": ["sku10"]}, {"k": 3, "temperature": 0.7, "seed": 3}):
        batch = pred.recommend_batch(sessions, **kwargs)
        singles = [pred.recommend(s, **kwargs) for s in sessions]
        # same items in the same order; scores agree to float32 rounding (a batched GEMM may sum differently)
        assert [(r.items, r.fallback, r.unknown) for r in batch] == [(r.items, r.fallback, r.unknown) for r in singles]
        for a, b in zip(batch, singles):
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert pred.recommend_batch([]) == []


def test_scores_embeddings_and_similarity(pred, bundle):
    sessions = [["sku2", "sku3"], ["sku11"]]
    scores = pred.score_items(sessions)
    assert scores.shape == (2, 20) and scores.dtype == np.float32
    np.testing.assert_allclose(scores[0], graph_scores(bundle, sessions[0]), atol=1e-6)
    table = np.load(bundle / "item_embeddings.npy")
    np.testing.assert_allclose(pred.session_embedding(["sku11"]) @ table[1:].T, scores[1], atol=1e-4)
    with pytest.raises(NoKnownItems, match="items"):
        pred.session_embedding(["zz"])
    assert pred.item_similarity("sku3", "sku3") == pytest.approx(1.0)
    assert pred.item_similarity("sku3", "sku9") == pytest.approx(pred.item_similarity("sku9", "sku3"))
    assert -1.0 <= pred.item_similarity("sku3", "sku9") <= 1.0
    with pytest.raises(UnknownItem, match="b: item 'zz'"):
        pred.item_similarity("sku3", "zz")


def test_ids_are_matched_leniently(pred, bundle, tmp_path):
    ids = json.loads((bundle / "items.json").read_text())
    popular = json.loads((bundle / "popular.json").read_text())
    as_int = derive_bundle(bundle, tmp_path / "int", items=[int(i[3:]) for i in ids],
                           popular={**popular, "items": [int(i[3:]) for i in popular["items"]]})  # fmt: skip
    as_str = derive_bundle(bundle, tmp_path / "str", items=[i[3:] for i in ids],
                           popular={**popular, "items": [i[3:] for i in popular["items"]]})  # fmt: skip
    want = [int(i[3:]) for i in pred.recommend(["sku3", "sku4"], k=5).items]
    p_int, p_str = Predictor.load(as_int), Predictor.load(as_str)
    for query in ([3, 4], ["3", "4"], [3.0, np.int64(4)]):
        assert list(p_int.recommend(query, k=5).items) == want
    assert p_int.recommend([3, 4.5, "four", 4], k=5).unknown == (4.5, "four")
    # only a canonical integer string is that integer (the id policy, serve/ids.py): "007" and " 3" are other ids
    assert p_int.recommend([3, "007", " 4", "+4", 4], k=5).unknown == ("007", " 4", "+4")
    for query in ([3, 4], ["3", "4"], [np.str_("3"), 4]):
        assert [int(i) for i in p_str.recommend(query, k=5).items] == want


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda p: p.recommend(["sku1"], k=0), "k"),
        (lambda p: p.recommend(["sku1"], k=-3), "k"),
        (lambda p: p.recommend(["sku1"], k=True), "k"),
        (lambda p: p.recommend(["sku1"], k=2.5), "k"),
        (lambda p: p.recommend(["sku1"], k="3"), "k"),
        (lambda p: p.recommend("sku1"), "items"),
        (lambda p: p.recommend(None), "items"),
        (lambda p: p.recommend({"sku1": 1}), "items"),
        (lambda p: p.recommend(["sku1", None]), "items[1]"),
        (lambda p: p.recommend([float("nan")]), "items[0]"),
        (lambda p: p.recommend([["sku1"]]), "items[0]"),
        (lambda p: p.recommend([True]), "items[0]"),
        (lambda p: p.recommend(["sku1"] * 10_001), "items"),
        (lambda p: p.recommend(["sku1"], temperature=-1), "temperature"),
        (lambda p: p.recommend(["sku1"], temperature=float("nan")), "temperature"),
        (lambda p: p.recommend(["sku1"], temperature=float("inf")), "temperature"),
        (lambda p: p.recommend(["sku1"], temperature="hot"), "temperature"),
        (lambda p: p.recommend(["sku1"], temperature=1, seed=-1), "seed"),
        (lambda p: p.recommend(["sku1"], exclude="sku2"), "exclude"),
        (lambda p: p.recommend_batch(["sku1"]), "sessions[0]"),
        (lambda p: p.recommend_batch("sku1"), "sessions"),
        (lambda p: p.score_items([["sku1"], [None]]), "sessions[1][0]"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_field(pred, call, field):
    with pytest.raises(InvalidRequest) as e:
        call(pred)
    assert isinstance(e.value, ValueError) and e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_use_cases(pred, bundle, tmp_path):
    viewed = because_you_viewed(pred, ["sku3", "sku4"], k=4)
    assert viewed == pred.recommend(["sku3", "sku4"], k=4)

    history = [f"sku{i}" for i in range(1, 11)]
    again = reengage(pred, history, last_n=3)
    assert len(again) == 1 and again.items[0] not in history
    assert again.items == pred.recommend(history[-3:], k=1, exclude=history).items

    cart = recover_cart(pred, ["sku7", "sku8"], k=3)
    assert cart.items == pred.recommend(["sku7", "sku8"], k=3).items
    assert all(0 < p < 1 for p in cart.scores) and sum(cart.scores) <= 1
    assert sum(recover_cart(pred, ["sku7", "sku8"], k=100).scores) == pytest.approx(1.0)
    assert sum(recover_cart(pred, [], k=100).scores) == pytest.approx(1.0)  # fallback: over the popular items

    # embeddings built so that sku1..sku5 share a direction and the rest point elsewhere
    ids = json.loads((bundle / "items.json").read_text())
    rng = np.random.default_rng(0)
    table = rng.normal(size=(21, 16))
    for j, item in enumerate(ids, start=1):
        if int(item[3:]) <= 5:
            table[j] = np.eye(16)[0] * 3 + rng.normal(scale=0.1, size=16)
    p = Predictor.load(derive_bundle(bundle, tmp_path / "focus", embeddings=table))
    deep, scattered = session_focus(p, ["sku1", "sku2", "sku3", "sku4"]), session_focus(p, ["sku1", "sku9", "sku14"])
    assert 0.9 < deep <= 1.0 and 0.0 <= scattered < 0.5
    assert session_focus(p, ["sku1", "sku2", "zz", "sku1"]) == pytest.approx(session_focus(p, ["sku1", "sku2"]))
    assert session_focus(p, ["sku1", "sku1", "zz"]) is None and session_focus(p, []) is None
    same = Predictor.load(derive_bundle(bundle, tmp_path / "same", embeddings=np.ones((21, 16))))
    assert session_focus(same, ["sku1", "sku2", "sku3"]) == pytest.approx(1.0)


def test_concurrent_calls_agree_with_sequential_ones(pred):
    rng = np.random.default_rng(0)
    sessions = [[f"sku{i}" for i in rng.integers(1, 21, size=rng.integers(0, 12))] for _ in range(64)]
    want = [pred.recommend(s, k=5) for s in sessions]
    got, errors = [None] * len(sessions), []

    def work(rows):
        try:
            for r in rows:
                got[r] = pred.recommend(sessions[r], k=5)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(range(t, 64, 8),)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


def test_graphs_share_the_memory_mapped_item_table(pred, bundle, tmp_path):
    """The graphs read the item table from item_embeddings.npy (one buffer for every session) under the name
    export recorded, with the same results as each graph's own copy; bundles without the entry still load, and
    their graphs use their own copy."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["item_table"]["graphs"] == ["model.onnx", "encoder.onnx"]
    sessions = [["sku3", "sku4", "sku5"], ["sku17"]]
    plain = ort.InferenceSession(str(bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    seq = np.zeros((1, 8), np.int32)
    seq[0, -3:] = pred.vocab.indices(sessions[0])
    np.testing.assert_allclose(pred.session_embedding(sessions[0]), plain.run(None, {"item_ids": seq})[0][0], atol=1e-6)
    np.testing.assert_allclose(pred.score_items(sessions)[0], graph_scores(bundle, sessions[0]), atol=1e-6)
    # the graphs really read the file: a table export would never write (doubled) changes the embedding ...
    table = np.load(bundle / "item_embeddings.npy")
    doubled = Predictor.load(derive_bundle(bundle, tmp_path / "doubled", embeddings=2 * table))
    assert not np.allclose(doubled.session_embedding(sessions[0]), pred.session_embedding(sessions[0]), atol=1e-3)
    # ... unless the manifest names no shared table: then each graph keeps the copy it was exported with
    own = derive_bundle(bundle, tmp_path / "own", embeddings=2 * table, manifest={"item_table": None})
    old = Predictor.load(own)
    np.testing.assert_allclose(old.session_embedding(sessions[0]), pred.session_embedding(sessions[0]), atol=1e-6)
    np.testing.assert_allclose(old.score_items(sessions), pred.score_items(sessions), atol=1e-6)


def test_bad_bundles_are_refused(bundle, tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Predictor.load(tmp_path / "nothing")
    tampered = derive_bundle(bundle, tmp_path / "tampered")
    (tampered / "items.json").write_text(json.dumps(list(reversed(json.loads((bundle / "items.json").read_text())))))
    with pytest.raises(BundleError, match="checksum mismatch for items.json"):
        Predictor.load(tampered)
    wrong_len = derive_bundle(bundle, tmp_path / "wrong_len", manifest={"max_len": 9})
    with pytest.raises(BundleError, match="model.onnx: item_ids is tensor\\(int32\\)"):
        Predictor.load(wrong_len)
    with pytest.raises(ValueError, match="threads"):
        Predictor.load(bundle, threads=0)
    # files that pass their checksums but cannot be used are a BundleError too, not a crash
    broken = derive_bundle(bundle, tmp_path / "broken", popular={"items": [None], "counts": [3]})
    with pytest.raises(BundleError, match="popular.json: item ids must be int or str"):
        Predictor.load(broken)
    short = derive_bundle(bundle, tmp_path / "short", items=["a", "b"])
    with pytest.raises(BundleError, match="items.json has 2 ids, the manifest says 20"):
        Predictor.load(short)


def test_serving_needs_no_jax(bundle):
    code = (
        "import sys, sasrec_serve, sasrec_serve.app; "
        f"p = sasrec_serve.Predictor.load({str(bundle)!r}); "
        "assert p.recommend(['sku3', 'sku4'], k=3).items; "
        "bad = sorted(m for m in ('jax', 'jaxlib', 'flax', 'optax', 'pandas', 'sasrec_jax') if m in sys.modules); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_serve_sources_import_only_the_serving_stack():
    allowed = {"numpy", "onnxruntime", "fastapi", "pydantic", "uvicorn", "serve", *sys.stdlib_module_names}
    for path in (ROOT / "serve").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
