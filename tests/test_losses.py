"""The training losses (sasrec_jax/losses.py) on tiny hand-checkable cases: full softmax cross-entropy against a numpy
reference (one-shot and chunked), label smoothing, positions of weight 0 (padding), the padding item, and what the
sampled softmax and the binary loss promise. The chunked path's gradients and memory: test_scale.py."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sasrec_jax import losses

N, V, D = 6, 8, 5  # positions, table rows (7 real items + the padding row 0), width


def case(seed: int = 0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D)).astype(np.float32)
    table = rng.normal(size=(V, D)).astype(np.float32)
    t = rng.integers(1, V, size=N).astype(np.int32)
    w = np.ones(N, np.float32)
    return h, table, t, w


def reference_ce(h, table, t, w, label_smoothing=0.0) -> float:
    """Cross-entropy over the real items 1..V-1 (the padding row 0 is no class), in float64."""
    logits = h.astype(np.float64) @ table.astype(np.float64).T
    real = logits[:, 1:]
    logp = real - (real.max(1, keepdims=True) + np.log(np.exp(real - real.max(1, keepdims=True)).sum(1, keepdims=True)))
    nll = -logp[np.arange(len(t)), t - 1]
    smooth = -logp.mean(axis=1)  # −log p averaged over the V − 1 real items
    per_position = (1 - label_smoothing) * nll + label_smoothing * smooth
    return float((per_position * w).sum() / max(w.sum(), 1.0))


@pytest.mark.parametrize("chunk", [0, 3])  # one shot; blocks of 3 items (the chunked log-sum-exp)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
def test_full_softmax_ce_equals_the_numpy_reference(chunk, label_smoothing):
    h, table, t, w = case()
    got = float(losses.full_softmax_ce(h, table, t, w, label_smoothing, chunk=chunk))
    assert got == pytest.approx(reference_ce(h, table, t, w, label_smoothing), rel=1e-5)


def test_label_smoothing_mixes_the_target_with_the_mean_over_items_and_zero_is_plain_ce():
    h, table, t, w = case(1)
    plain = float(losses.full_softmax_ce(h, table, t, w))
    assert float(losses.full_softmax_ce(h, table, t, w, 0.0)) == plain
    assert plain == pytest.approx(reference_ce(h, table, t, w), rel=1e-5)
    # the smoothed loss is linear in the smoothing: (1 − ε)·CE + ε·(mean of −log p over the real items)
    uniform = reference_ce(h, table, t, w, 1.0)
    for eps in (0.1, 0.3):
        want = (1 - eps) * plain + eps * uniform
        assert float(losses.full_softmax_ce(h, table, t, w, eps)) == pytest.approx(want, rel=1e-5)


def loss_of(kind: str, table, t, w, *, num_negatives: int = 4, key=None):
    """The loss `kind` as a function of the hidden states h [N, D] (the other inputs fixed)."""
    key = jax.random.key(0) if key is None else key
    if kind == "ce":
        return lambda h: losses.full_softmax_ce(h, table, t, w)
    if kind == "sampled":
        return lambda h: losses.sampled_softmax(h, table, t, w, key, num_negatives)
    return lambda h: losses.binary_ce(h, table, t, w, key, num_negatives)


def _loss(kind: str, h, table, t, w, **kw) -> float:
    return float(loss_of(kind, table, t, w, **kw)(h))


@pytest.mark.parametrize("kind", ["ce", "sampled", "bce"])
def test_the_loss_falls_as_the_prediction_moves_to_the_target(kind):
    """One-hot item embeddings, so the logit of item j is h[j]: h = s · e_target scores the target s and every
    other item 0. The loss falls as s grows; the softmax losses vanish, the binary one keeps its negatives' part
    (each non-target negative adds −log σ(0) = log 2, averaged over the 2 positions)."""
    table = np.eye(V, dtype=np.float32)
    t = np.array([3, 5], np.int32)
    w = np.ones(2, np.float32)
    values = [_loss(kind, s * table[t], table, t, w) for s in (0.0, 2.0, 8.0, 20.0)]
    assert all(np.isfinite(values)) and values == sorted(values, reverse=True), values
    if kind == "bce":
        halves = 2 * values[-1] / np.log(2)
        assert halves == pytest.approx(round(halves), abs=1e-5)
    else:
        assert values[-1] < 1e-6 < values[0]


@pytest.mark.parametrize("kind", ["ce", "sampled", "bce"])
def test_positions_of_weight_zero_carry_no_loss(kind):
    """Bucket padding gathers position 0 with weight 0: whatever sits there changes neither the loss nor the
    gradients, and the mean is over the weighted positions only."""
    h, table, t, w = case(2)
    w[[1, 4]] = 0.0
    other_h, other_t = h.copy(), t.copy()
    other_h[[1, 4]] = 50.0 * np.random.default_rng(9).normal(size=(2, D))
    other_t[[1, 4]] = 1
    base = _loss(kind, h, table, t, w)
    assert np.isfinite(base)
    assert _loss(kind, other_h, table, other_t, w) == pytest.approx(base, rel=1e-6)
    grad = np.asarray(jax.grad(loss_of(kind, table, t, w))(jnp.asarray(h)))
    assert not grad[[1, 4]].any() and grad[[0, 2, 3, 5]].any()
    if kind == "ce":  # the mean over the four weighted positions alone (the sampled losses draw per batch)
        keep = w > 0
        assert _loss(kind, h[keep], table, t[keep], w[keep]) == pytest.approx(base, rel=1e-6)
    # every position padding: no loss at all, not a division by zero
    assert _loss(kind, h, table, t, np.zeros(N, np.float32)) == 0.0


def test_the_padding_row_is_never_a_class():
    """Row 0 of the table (PAD) is excluded from the softmax: its embedding does not change the loss, and it takes
    no gradient."""
    h, table, t, w = case(3)
    loud = table.copy()
    loud[0] = 100.0 * h.mean(axis=0)  # would dominate every softmax if it were a class
    for chunk in (0, 3):
        loss = partial(losses.full_softmax_ce, h, t_N=t, w_N=w, label_smoothing=0.1, chunk=chunk)
        base = float(loss(table_VxD=table))
        assert float(loss(table_VxD=loud)) == pytest.approx(base, rel=1e-6)
        d_table = jax.grad(lambda e, loss=loss: loss(table_VxD=e))(jnp.asarray(table))
        assert not np.asarray(d_table)[0].any()


def test_sampled_negatives_equal_to_the_target_are_masked():
    """With a catalogue of one item every negative is the target: all are masked, so the sampled softmax is 0 and
    the binary loss is its positive term alone, −log σ(h · e_target)."""
    rng = np.random.default_rng(4)
    table = rng.normal(size=(2, D)).astype(np.float32)  # padding + item 1
    h = rng.normal(size=(N, D)).astype(np.float32)
    t = np.ones(N, np.int32)
    w = np.ones(N, np.float32)
    assert _loss("sampled", h, table, t, w, num_negatives=16) == pytest.approx(0.0, abs=1e-6)
    pos = h.astype(np.float64) @ table[1].astype(np.float64)
    want = float(np.mean(np.log1p(np.exp(-pos))))  # −log σ(pos)
    assert _loss("bce", h, table, t, w, num_negatives=16) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["sampled", "bce"])
def test_sampled_losses_depend_only_on_the_key_for_their_negatives(kind):
    rng = np.random.default_rng(5)
    h = rng.normal(size=(N, D)).astype(np.float32)
    table = rng.normal(size=(200, D)).astype(np.float32)
    t = rng.integers(1, 200, size=N).astype(np.int32)
    w = np.ones(N, np.float32)
    a = _loss(kind, h, table, t, w, key=jax.random.key(1))
    assert _loss(kind, h, table, t, w, key=jax.random.key(1)) == a  # the same draws
    others = {_loss(kind, h, table, t, w, key=jax.random.key(k)) for k in range(2, 6)}
    assert all(np.isfinite(list(others))) and a not in others  # other negatives


def test_the_sampled_softmax_is_a_softmax_over_the_target_and_m_uniform_negatives():
    """Uniform negatives need no correction: with every logit equal, the loss is −log(1 / (1 + M)) = log(1 + M).
    (In a catalogue of 100,000 items, the chance that one of the 8 draws is the target, which would be masked,
    is below 1e-4; the draws are fixed by the key.)"""
    table = np.zeros((100_001, D), np.float32)  # every logit 0
    h = np.ones((N, D), np.float32)
    t = np.full(N, 1, np.int32)
    w = np.ones(N, np.float32)
    assert _loss("sampled", h, table, t, w, num_negatives=8, key=jax.random.key(7)) == pytest.approx(np.log(9))
