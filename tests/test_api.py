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
        for call in (fitted.recommend_users, fitted.recommend_to_items):  # also when no id is known
            with pytest.raises(ConfigError, match="k must be a positive integer"):
                call(["nobody"], k=k, on_unknown="skip")


def test_score_items_predict_and_embeddings(fitted):
    scores = fitted.score_items([["sku1", "sku2"], ["sku7"]])
    assert scores.shape == (2, 20)
    cands = fitted.predict(["sku1", "sku2"], ["sku3", "sku9", "unknown"])
    assert cands[0] > cands[1] and np.isnan(cands[2])
    emb = fitted.item_embeddings
    assert len(emb) == 20 and emb["sku1"].shape == (16,)
    assert list(fitted.history.columns) == [
        *("epoch", "train_loss", "valid_loss", "valid_ndcg@10", "valid_hr@10", "seconds", "step")
    ]
    assert len(fitted.history) == TINY_EPOCHS


def test_recommend_users_and_evaluate(fitted):
    recs = fitted.recommend_users([0, 1], k=2)
    assert list(recs.columns) == ["user_id", "item_id", "score", "rank"] and len(recs) == 4  # RecTools' columns
    assert recs["rank"].tolist() == [1, 2, 1, 2]
    with pytest.raises(DataError, match="unknown user"):
        fitted.recommend_users([12345], on_unknown="raise")
    metrics = fitted.evaluate()  # a tidy frame: one row per (split, model, metric)
    assert list(metrics.columns) == ["split", "model", "metric", "value"]
    test = metrics.set_index(["split", "model", "metric"])["value"]
    assert test["test", "SASRec", "HR@1"] > 0.9 and test["valid", "SASRec", "HR@1"] > 0.9
    assert set(metrics.query("split == 'test'")["model"]) == {"SASRec", "random", "popular", "markov"}
    assert fitted.metrics["test"]["HR@1"] == test["test", "SASRec", "HR@1"]  # the nested dict stays in `metrics`
    table = metrics.pivot_table(index="metric", columns=["split", "model"], values="value")
    assert table.loc["NDCG@10", ("test", "SASRec")] > table.loc["NDCG@10", ("test", "popular")]
    with pytest.raises(ConfigError, match="needs more than 100 items"):
        fitted.evaluate(protocol="sampled")  # 20 items cannot give 100 negatives


def test_a_loaded_model_recommends_to_users_and_evaluates_from_its_run_directory_alone(fitted, tmp_path):
    """RecTools-style calls on `SASRec.load(dir)` with no data attached: the run directory records the training
    sequences (sequences.npz), so nothing else is needed; unknown users warn, skip or raise."""
    import warnings

    loaded = SASRec.load(fitted.save(tmp_path / "run"))
    want = fitted.recommend_users([0, 1, 2], k=3)
    with pytest.warns(UserWarning, match=r"1 unknown user id \(not in the training data\): \['nobody'\]; skipped"):
        got = loaded.recommend_users([0, "nobody", 1, 2], k=3)
    pd.testing.assert_frame_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(loaded.recommend_users(["nobody", 0], k=3, on_unknown="skip")) == 3
    with pytest.raises(DataError, match="unknown user id.*on_unknown='warn' or 'skip'"):
        loaded.recommend_users([0, "nobody"], on_unknown="raise")
    with pytest.raises(ConfigError, match="on_unknown must be one of warn, skip, raise"):
        loaded.recommend_users([0], on_unknown="ignore")
    assert loaded.evaluate(baselines=False).equals(fitted.evaluate(baselines=False))


def test_filter_viewed_and_the_item_allow_list(fitted):
    seen = set(fitted.vocab.decode(fitted.sequences.user_items(0)))
    recs = fitted.recommend_users([0], k=20)
    assert not set(recs["item_id"]) & seen  # filter_viewed leaves out the user's whole history
    assert set(fitted.recommend_users([0], k=20, filter_viewed=False)["item_id"]) == set(fitted.vocab.ids)
    allowed = fitted.recommend_users([0, 1], k=5, items_to_recommend=["sku4", "sku9", "sku17"], filter_viewed=False)
    assert set(allowed["item_id"]) <= {"sku4", "sku9", "sku17"} and allowed.groupby("user_id").size().tolist() == [3, 3]
    rec = fitted.recommend(["sku3"], k=5, items_to_recommend=["sku9", "sku4"])
    assert rec.items == ("sku4", "sku9")  # sku4 follows sku3 in the cycle
    with pytest.warns(UserWarning, match="unknown item in items_to_recommend"):
        fitted.recommend_users([0], k=2, items_to_recommend=["sku4", "gone"])


def test_recommend_to_items(fitted):
    with pytest.warns(UserWarning, match="1 unknown item id"):
        sims = fitted.recommend_to_items(["sku3", "gone", "sku10"], k=4)
    assert list(sims.columns) == ["target_item_id", "item_id", "score", "rank"]
    assert sims.groupby("target_item_id").size().to_dict() == {"sku10": 4, "sku3": 4}
    assert not (sims["target_item_id"] == sims["item_id"]).any()  # filter_itself
    assert sims["score"].between(-1, 1).all()
    for _, g in sims.groupby("target_item_id"):
        assert g["score"].is_monotonic_decreasing and g["rank"].tolist() == [1, 2, 3, 4]
    emb = fitted.item_embeddings
    a, b = emb["sku3"], emb[sims.iloc[0]["item_id"]]
    assert sims.iloc[0]["score"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)
    itself = fitted.recommend_to_items(["sku3"], k=1, filter_itself=False)
    assert itself.iloc[0]["item_id"] == "sku3" and itself.iloc[0]["score"] == pytest.approx(1.0, abs=1e-5)
    only = fitted.recommend_to_items(["sku3"], k=5, items_to_recommend=["sku7", "sku8"])
    assert set(only["item_id"]) == {"sku7", "sku8"}


def test_attention_maps_of_a_session(fitted):
    maps, ids = fitted.attention(["sku1", "nope", "sku2", "sku3"])
    assert ids == ["sku1", "sku2", "sku3"]  # unknown ids skipped; oldest first
    assert maps.shape == (2, 2, 3, 3) and maps.dtype == np.float32  # [blocks, heads, n, n]
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # each query's attention sums to one
    assert np.allclose(np.triu(maps, k=1), 0.0)  # causal: nothing attends to a later item
    with pytest.raises(DataError, match="no item of the session is in the catalogue"):
        fitted.attention(["nope"])


def test_scikit_learn_params_clone_repr_and_random_state():
    m = SASRec(dim=32, epochs=3, random_state=7, progress=False)
    params = m.get_params()
    assert params["dim"] == 32 and params["epochs"] == 3 and params["seed"] == 7 and params["preset"] == "auto"
    assert params["batch_size"] is None  # left to the preset, as given
    assert set(params) == set(SASRec.param_names())
    assert repr(m) == "SASRec(dim=32, progress=False, epochs=3, seed=7)"
    assert repr(SASRec()) == "SASRec()"
    c = m.clone()
    assert c is not m and c.get_params() == params and c.model_config is None
    assert m.set_params(lr=0.01, random_state=3) is m
    assert m.train_config.lr == 0.01 and m.train_config.seed == 3 and m.get_params()["dim"] == 32
    with pytest.raises(ConfigError, match="dropout"):
        m.set_params(dropout=2.0)
    with pytest.raises(ConfigError, match="disagree"):
        SASRec(seed=1, random_state=2)


def test_scikit_learn_clone_accepts_the_estimator():
    from sklearn import base

    m = SASRec(dim=32, epochs=3, progress=False)
    assert base.clone(m).get_params() == m.get_params()


def test_a_typo_in_an_argument_names_the_closest_one():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'epoch'; did you mean 'epochs'\?"):
        SASRec(epoch=3)
    with pytest.raises(ConfigError, match=r"'num_block'; did you mean 'num_blocks'\?"):
        SASRec(num_block=3)
    with pytest.raises(ConfigError, match=r"'learning_rat'; did you mean 'lr'\?"):
        SASRec().set_params(learning_rat=0.1)
    with pytest.raises(TypeError, match=r"'session_max_len'; did you mean 'max_len'\?"):  # RecTools' name
        SASRec(session_max_len=50)
    with pytest.raises(TypeError, match=r"'zzz'; see help\(SASRec\)"):
        SASRec(zzz=1)


def test_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "run")
    assert (path / "config.json").is_file() and checkpoint.has_best(path)
    loaded = SASRec.load(path)
    session = ["sku2", "sku3"]
    np.testing.assert_allclose(loaded.score_items([session]), fitted.score_items([session]), rtol=1e-6)
    assert loaded.recommend([], k=3) == fitted.recommend([], k=3)  # popular fallback survives without data
    assert type(loaded.module).__name__ == "SASRec" and loaded.params.keys() == fitted.params.keys()
    df = tiny_events()
    (path / "sequences.npz").write_bytes(b"not a zip")  # damaged: say so, and how to go on
    with pytest.raises(CheckpointError, match="sequences.npz is unreadable.*set_data"):
        SASRec.load(path).evaluate()
    (path / "sequences.npz").unlink()  # without it, a model fitted on a DataFrame needs the data again
    with pytest.raises(DataError, match="in-memory DataFrame"):
        SASRec.load(path).evaluate()
    loaded.set_data(df)
    assert loaded.evaluate(baselines=False).equals(fitted.evaluate(baselines=False))
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


def test_batch_recommendations_in_blocks_equal_one_block(fitted, monkeypatch):
    """recommend_users / recommend_to_items score a bounded block of rows at a time (a 316k-item catalogue would
    otherwise need [users, items] scores at once); the blocks change nothing."""
    from sasrec_jax import inference

    users, items = list(range(10)), [f"sku{i}" for i in range(1, 8)]
    whole = fitted.recommend_users(users, k=3), fitted.recommend_to_items(items, k=3)
    monkeypatch.setattr(inference, "rows_per_block", lambda num_items: 2)
    pd.testing.assert_frame_equal(fitted.recommend_users(users, k=3), whole[0])
    pd.testing.assert_frame_equal(fitted.recommend_to_items(items, k=3), whole[1])
