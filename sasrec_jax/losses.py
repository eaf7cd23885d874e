"""Training losses over gathered real positions: full softmax CE, sampled softmax, and the paper's BCE.

Every loss takes hidden states h_NxD at the N positions that have a target, the targets t_N, and weights
w_N (0 for bucket padding), and returns a weighted mean. Everything here is float32: the logits of a
large catalogue overflow bfloat16's precision long before they overflow its range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sasrec_jax.data import PAD
from sasrec_jax.model import NEG_INF


def _weighted_mean(loss_N: jax.Array, w_N: jax.Array) -> jax.Array:
    return jnp.sum(loss_N * w_N) / jnp.maximum(jnp.sum(w_N), 1.0)


def full_softmax_ce(
    h_NxD: jax.Array, table_VxD: jax.Array, t_N: jax.Array, w_N: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Cross-entropy over the whole catalogue (the "SASRec+" recipe); padding column excluded."""
    logits_NxV = h_NxD.astype(jnp.float32) @ table_VxD.T
    is_pad_V = jnp.arange(logits_NxV.shape[-1]) == PAD
    logp_NxV = jax.nn.log_softmax(jnp.where(is_pad_V[None], NEG_INF, logits_NxV), axis=-1)
    nll_N = -jnp.take_along_axis(logp_NxV, t_N[:, None], axis=-1)[:, 0]
    if label_smoothing:
        smooth_N = -jnp.sum(jnp.where(is_pad_V[None], 0.0, logp_NxV), axis=-1) / (logits_NxV.shape[-1] - 1)
        nll_N = (1.0 - label_smoothing) * nll_N + label_smoothing * smooth_N
    return _weighted_mean(nll_N, w_N)


def sampled_softmax(
    h_NxD: jax.Array, table_VxD: jax.Array, t_N: jax.Array, w_N: jax.Array, key: jax.Array, num_negatives: int
) -> jax.Array:
    """Softmax over the target and M negatives drawn uniformly and shared by the batch.

    Uniform sampling needs no log-Q correction (it adds the same constant to every logit). A negative that
    happens to equal a row's target is masked out for that row.
    """
    h_NxD = h_NxD.astype(jnp.float32)
    num_items = table_VxD.shape[0] - 1
    negs_M = jax.random.randint(key, (num_negatives,), 1, num_items + 1)
    pos_N = jnp.sum(h_NxD * table_VxD[t_N], axis=-1)
    neg_NxM = h_NxD @ table_VxD[negs_M].T
    neg_NxM = jnp.where(negs_M[None] == t_N[:, None], NEG_INF, neg_NxM)
    logits_Nx1M = jnp.concatenate([pos_N[:, None], neg_NxM], axis=-1)
    nll_N = -jax.nn.log_softmax(logits_Nx1M, axis=-1)[:, 0]
    return _weighted_mean(nll_N, w_N)


def binary_ce(
    h_NxD: jax.Array, table_VxD: jax.Array, t_N: jax.Array, w_N: jax.Array, key: jax.Array, num_negatives: int
) -> jax.Array:
    """The paper's loss: −log σ(pos) − Σ log(1 − σ(neg)) with negatives drawn uniformly per position."""
    h_NxD = h_NxD.astype(jnp.float32)
    num_items = table_VxD.shape[0] - 1
    negs_NxM = jax.random.randint(key, (t_N.shape[0], num_negatives), 1, num_items + 1)
    pos_N = jnp.sum(h_NxD * table_VxD[t_N], axis=-1)
    neg_NxM = jnp.einsum("nd,nmd->nm", h_NxD, table_VxD[negs_NxM])
    neg_loss_NxM = jnp.where(negs_NxM == t_N[:, None], 0.0, -jax.nn.log_sigmoid(-neg_NxM))
    loss_N = -jax.nn.log_sigmoid(pos_N) + jnp.sum(neg_loss_NxM, axis=-1)
    return _weighted_mean(loss_N, w_N)
