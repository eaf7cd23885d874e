"""The sparse retail-shaped generator: the shape it promises, seeded, and its checks."""

from __future__ import annotations

import numpy as np
import pytest

from sasrec_jax import data, evaluate
from sasrec_jax.errors import ConfigError
from sasrec_jax.retail import RetailConfig, generate_retail


@pytest.mark.slow  # generates and ranks the full 40,000-user log (~5 s)
def test_the_default_log_has_the_sparse_retail_shape_and_a_markov_signal():
    """40k users, a catalogue larger than the user count, mean ~8.8 and median 6 events per user, and a Markov
    chain well above the popular baseline (what the module docstring states, on a 2,000-user test sample)."""
    df = generate_retail()
    seqs = data.from_interactions(df, user_col="user_id", item_col="item_id", time_col="timestamp")
    lengths = seqs.lengths
    assert seqs.num_users == 40_000 and 50_000 < seqs.vocab.size < 60_000
    assert lengths.min() >= 3 and np.median(lengths) == 6 and 8.5 < lengths.mean() < 9.1
    assert (df.groupby("user_id")["timestamp"].diff().dropna() > 0).all()  # time order within each user
    split = data.leave_one_out(seqs)
    V = seqs.vocab.size
    test = split.test.take(evaluate.sample_rows(len(split.test), 2000, 0))
    ndcg = {
        name: evaluate.rank(fn, test, V, 50, batch_size=500).summary(V)["NDCG@10"]
        for name, fn in evaluate.baseline_scorers(split.train, V).items()
    }
    assert ndcg["random"] < 0.001 < ndcg["popular"] < 0.02 and 2 * ndcg["popular"] < ndcg["markov"] < 0.05


def test_seeded_and_configurable():
    small = dict(n_users=300, n_items=2_000, n_categories=20)
    a, b = generate_retail(**small), generate_retail(**small)
    assert a.equals(b) and not a.equals(generate_retail(**small, seed=1))
    assert list(a.columns) == ["user_id", "item_id", "timestamp"] and a["user_id"].nunique() == 300
    longer = generate_retail(RetailConfig(**small, min_len=5, median_len=7, mean_len=9))
    assert longer.groupby("user_id").size().min() == 5


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_users=0), "n_users must be an integer >= 1"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(n_items=10, n_categories=20), "n_items .10. must be >= n_categories"),
        (dict(median_len=10, mean_len=8), "min_len <= median_len <= mean_len <= max_len"),
        (dict(p_related=0.7, p_preferred=0.5), "sum <= 1"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        RetailConfig(**bad)


def test_the_retail_format_reads_the_generator(monkeypatch):
    from sasrec_jax import retail

    small = generate_retail(n_users=50, n_items=500, n_categories=5)
    monkeypatch.setattr(retail, "generate_retail", lambda: small)
    assert data.read_table(None, "retail") is small
