"""The estimator: fit, recommendations for raw ids, fallbacks, embeddings, pre-trained init, save/load.

Most tests read the session's shared model (conftest `fitted_model`: the "sku" cycle, learnt)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sasrec_jax import SASRec, checkpoint
from sasrec_jax.errors import CheckpointError, ConfigError, DataError
from tests.conftest import TINY_MODEL, TINY_TRAIN, tiny_cycle
from tests.serve_bundles import TINY_EPOCHS, tiny_events

# conftest's tiny configuration (compiled once per session) as estimator arguments
TINY = dict(**TINY_MODEL, **TINY_TRAIN, progress=False, verbose=False)


@pytest.fixture
def fitted(fitted_model):
    return fitted_model


def test_recommend_raw_ids(fitted):
    recs = fitted.recommend(["sku3", "sku4", "sku5"], k=3)
    assert [i for i, _ in recs][0] == "sku6"
    scores = [s for _, s in recs]
    assert scores == sorted(scores, reverse=True) and len(recs) == 3
    assert all(i not in ("sku3", "sku4", "sku5") for i, _ in recs)  # seen items excluded by default
    assert fitted.recommend(["sku5"], k=1, exclude=["sku6"])[0][0] != "sku6"


def test_unknown_and_empty_sessions_fall_back_to_popular(fitted):
    popular = fitted.recommend([], k=5)
    assert len(popular) == 5 and popular.fallback and popular.unknown == ()
    unknown = fitted.recommend(["nope", "never"], k=5)
    assert unknown.items == popular.items and unknown.scores == popular.scores
    assert unknown.fallback and unknown.unknown == ("nope", "never")  # said, not dropped silently
    rec = fitted.recommend(["nope", "sku3"], k=1)
    assert rec[0][0] == "sku4" and rec.unknown == ("nope",) and not rec.fallback  # unknown ids skipped


def test_the_estimator_and_the_predictor_rank_by_the_same_rules(fitted):
    """Exclusions, the fallback and its scores are sasrec_serve.ranking's (the predictor's) rules."""
    import numpy as np
    from sasrec_serve import ranking

    popular = fitted.recommend([], k=3)
    counts = dict(fitted.data_info["popular"])
    want = ranking.popular_scores(fitted.vocab.size, counts.items())
    assert list(popular.scores) == sorted(want[np.isfinite(want)], reverse=True)[:3]
    # exclude_seen drops every known item of the session, also those older than the window (max_len 8)
    long = [f"sku{i}" for i in range(1, 11)]
    assert not set(fitted.recommend(long, k=20).items) & set(long)


def test_k_must_be_positive(fitted):
    for k in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="k must be a positive integer"):
            fitted.recommend(["sku1"], k=k)


def test_score_items_predict_and_embeddings(fitted):
    scores = fitted.score_items([["sku1", "sku2"], ["sku7"]])
    assert scores.shape == (2, 20)
    cands = fitted.predict(["sku1", "sku2"], ["sku3", "sku9", "unknown"])
    assert cands[0] > cands[1] and np.isnan(cands[2])
    emb = fitted.item_embeddings
    assert len(emb) == 20 and emb["sku1"].shape == (16,)
    assert list(fitted.history.columns) == ["epoch", "train_loss", "valid_ndcg@10", "valid_hr@10", "seconds", "step"]
    assert len(fitted.history) == TINY_EPOCHS


def test_recommend_users_and_evaluate(fitted):
    recs = fitted.recommend_users([0, 1], k=2)
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"] and len(recs) == 4
    with pytest.raises(DataError, match="unknown user"):
        fitted.recommend_users([12345])
    metrics = fitted.evaluate()
    assert metrics["test"]["HR@1"] > 0.9
    assert set(metrics["baselines"]) == {"random", "popular", "markov"}
    with pytest.raises(ConfigError, match="needs more than 100 items"):
        fitted.evaluate(protocol="sampled")  # 20 items cannot give 100 negatives


def test_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "run")
    assert (path / "config.json").is_file() and checkpoint.has_best(path)
    loaded = SASRec.load(path)
    session = ["sku2", "sku3"]
    np.testing.assert_allclose(loaded.score_items([session]), fitted.score_items([session]), rtol=1e-6)
    assert loaded.recommend([], k=3) == fitted.recommend([], k=3)  # popular fallback survives without data
    assert type(loaded.module).__name__ == "SASRec" and loaded.params.keys() == fitted.params.keys()
    with pytest.raises(DataError, match="in-memory DataFrame"):
        loaded.evaluate()
    df = tiny_events()
    loaded.set_data(df)
    assert loaded.evaluate(baselines=False)["test"]["HR@1"] == fitted.evaluate(baselines=False)["test"]["HR@1"]
    with pytest.raises(DataError, match="differs"):
        loaded.set_data(df.iloc[:-1])


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        SASRec.load(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="not a sasrec-jax run"):
        SASRec.load(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text('{"format_version": 99}')
    with pytest.raises(CheckpointError, match="format_version 99"):
        SASRec.load(tmp_path / "run")


def test_pretrained_item_embeddings(tmp_path, capsys):
    df = tiny_cycle()
    rng = np.random.default_rng(0)
    vectors = {i: rng.normal(size=16).astype(np.float32) for i in range(1, 11)}  # half the catalogue
    vectors[999] = rng.normal(size=16).astype(np.float32)  # an item the data does not have
    m = SASRec(epochs=1, **{**TINY, "verbose": True})
    m.fit(df, init_item_embeddings=vectors, freeze_embeddings_epochs=1)
    out = capsys.readouterr().out
    assert "10 from pre-trained vectors, 10 initialised randomly, 1 vectors of unknown items ignored" in out
    np.testing.assert_allclose(m.item_embeddings[3], vectors[3])  # frozen: unchanged after training
    path = tmp_path / "vec.parquet"
    pd.DataFrame({"item_id": [1, 2], "embedding": [np.ones(8), np.ones(8)]}).to_parquet(path)
    with pytest.raises(DataError, match="dimension 8"):
        SASRec(epochs=1, **TINY).fit(df, init_item_embeddings=str(path))
