"""Model shapes, causality, left-padding invariance, right-aligned positions and the padding column."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasrec_jax.config import ModelConfig
from sasrec_jax.model import NEG_INF, SASRec

CFG = ModelConfig(num_items=30, max_len=8, dim=16, num_heads=2, num_blocks=2, dropout=0.3)


@pytest.fixture(params=["pre", "post"])
def model(request):
    return SASRec(ModelConfig(**{**CFG.__dict__, "norm": request.param}), rngs=nnx.Rngs(0))


def test_shapes(model):
    seq = jnp.array([[0, 0, 0, 1, 2, 3, 4, 5], [0] * 7 + [9]], jnp.int32)
    assert model.hidden(seq).shape == (2, 8, 16)
    assert model.encode(seq).shape == (2, 16)
    scores = model(seq)
    assert scores.shape == (2, 31) and scores.dtype == jnp.float32
    assert np.all(np.asarray(scores[:, 0]) == NEG_INF)  # padding never ranks


def test_causal(model):
    """The output at position t depends on no input after t: checked through the gradient."""
    seq = jnp.array([[3, 4, 5, 6, 7, 8, 9, 10]], jnp.int32)
    graphdef, state = nnx.split(model)

    def out_at(state, t):
        return nnx.merge(graphdef, state).hidden(seq)[0, t].sum()

    for t in (0, 3, 6):
        grads = jax.grad(out_at)(state, t)
        emb_grad = np.asarray(grads["item_embed"]["embedding"][...])
        touched = np.flatnonzero(np.abs(emb_grad).sum(axis=1) > 0)
        assert set(touched.tolist()) == set(np.asarray(seq[0, : t + 1]).tolist())


def test_changing_future_items_keeps_past_outputs(model):
    a = jnp.array([[0, 0, 1, 2, 3, 4, 5, 6]], jnp.int32)
    b = a.at[0, 6:].set(jnp.array([20, 21]))
    np.testing.assert_allclose(model.hidden(a)[0, :6], model.hidden(b)[0, :6], atol=1e-6)


def test_left_padding_does_not_change_the_outputs_of_real_positions(model):
    """The session 7, 8, 9 behind 5, 2 or no padding columns (a narrower window keeps its positions right-aligned):
    the same hidden states at its three real positions, the same session embedding and scores; padding positions
    stay zero. A model whose attention reached padding keys, or whose positions were counted from the left, fails."""
    real = [7, 8, 9]
    padded = {pad: jnp.array([[0] * pad + real], jnp.int32) for pad in (5, 2, 0)}
    widest = padded[5]
    for pad, seq in padded.items():
        assert seq.shape == (1, pad + 3)
        np.testing.assert_allclose(model.hidden(seq)[:, -3:], model.hidden(widest)[:, -3:], atol=1e-5, err_msg=pad)
        np.testing.assert_allclose(model.encode(seq), model.encode(widest), atol=1e-5, err_msg=pad)
        np.testing.assert_allclose(model(seq), model(widest), atol=1e-5, err_msg=pad)
        assert not np.asarray(model.hidden(seq))[0, :pad].any()
    # the same holds inside a batch, next to a session with no padding at all
    batch = jnp.array([[0] * 5 + real, [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
    np.testing.assert_allclose(model(batch)[:1], model(widest), atol=1e-5)


def test_dropout_only_with_a_key(model):
    seq = jnp.array([[0, 0, 1, 2, 3, 4, 5, 6]], jnp.int32)
    np.testing.assert_array_equal(model.hidden(seq), model.hidden(seq))
    a = model.hidden(seq, key=jax.random.key(1))
    b = model.hidden(seq, key=jax.random.key(2))
    assert not np.allclose(a, b)


def test_all_padding_row_is_finite(model):
    seq = jnp.zeros((1, 8), jnp.int32)
    assert np.isfinite(np.asarray(model(seq))[:, 1:]).all()


def test_window_longer_than_max_len_is_an_error(model):
    with pytest.raises(ValueError, match="longer than max_len"):
        model.encode(jnp.ones((1, 9), jnp.int32))


def test_bfloat16_compute_keeps_float32_params_and_scores():
    m = SASRec(ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    assert m.item_embed.embedding[...].dtype == jnp.float32
    assert m(jnp.array([[0, 0, 0, 0, 1, 2, 3, 4]], jnp.int32)).dtype == jnp.float32


def test_attention_weights_are_causal_distributions(model):
    seq = jnp.array([[0, 0, 0, 4, 5, 6, 7, 8]], jnp.int32)
    maps = model.attention_weights(seq)
    assert len(maps) == CFG.num_blocks and maps[0].shape == (1, 2, 8, 8)
    real = np.asarray(maps[0])[0, :, 3:, :]  # queries at real positions
    np.testing.assert_allclose(real.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(np.asarray(maps[-1])[0, 0], k=1) < 1e-6)  # nothing attends to the future
    assert np.all(real[:, :, :3] < 1e-6)  # nor to padding


def test_hashed_dropout_bits_are_uniform_and_key_dependent():
    from sasrec_jax.model import dropout, hashed_bits

    a = np.asarray(hashed_bits(jax.random.key(0), (400, 500)), np.float64) / 2**32
    b = np.asarray(hashed_bits(jax.random.key(1), (400, 500)), np.float64) / 2**32
    assert abs(a.mean() - 0.5) < 0.01 and abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(a.ravel()[:-1], a.ravel()[1:])[0, 1]) < 0.01
    kept = np.asarray(dropout(jnp.ones((400, 500)), 0.2, jax.random.key(2)))
    assert abs((kept > 0).mean() - 0.8) < 0.01 and np.allclose(kept[kept > 0], 1 / 0.8)


@pytest.mark.parametrize("num_blocks", [0, 1, 3])
def test_encode_is_the_last_hidden_state(model, num_blocks):
    """`encode` evaluates its last block for the last query only; it must equal the full forward pass."""
    m = SASRec(ModelConfig(**{**model.cfg.__dict__, "num_blocks": num_blocks}), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    seq = rng.integers(1, 31, size=(6, 8)).astype(np.int32)
    seq[1, :5] = 0  # left padding
    seq[2, :7] = 0  # one item
    seq[3, :] = 0  # empty session: both give zeros
    for window in (8, 3):  # the full window and a shorter right-aligned one
        s = jnp.asarray(seq[:, -window:])
        np.testing.assert_allclose(m.encode(s), m.hidden(s)[:, -1], atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m.encode(jnp.asarray(seq)))[3], 0.0)
