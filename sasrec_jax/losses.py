"""Training losses over gathered real positions: full softmax CE, sampled softmax, and the paper's BCE.

Every loss takes hidden states h_NxD at the N positions that have a target, the targets t_N, and weights
w_N (0 for bucket padding), and returns a weighted mean. Everything here is float32: the logits of a
large catalogue overflow bfloat16's precision long before they overflow its range.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from sasrec_serve.ids import PAD

from sasrec_jax.model import NEG_INF


def _weighted_mean(loss_N: jax.Array, w_N: jax.Array) -> jax.Array:
    return jnp.sum(loss_N * w_N) / jnp.maximum(jnp.sum(w_N), 1.0)


def full_softmax_ce(
    h_NxD: jax.Array,
    table_VxD: jax.Array,
    t_N: jax.Array,
    w_N: jax.Array,
    label_smoothing: float = 0.0,
    chunk: int | None = None,
) -> jax.Array:
    """Cross-entropy over the whole catalogue (the "SASRec+" recipe); padding column excluded.

    `chunk` (None: `ce_chunk_size`) > 0 computes the log-sum-exp over the item table in blocks of `chunk` items
    (`chunked_logsumexp`), so no [N, V] array exists in the forward or the backward pass; 0 materialises the
    logits at once, which is faster while they are small. Both give the same value and gradients."""
    chunk = ce_chunk_size(h_NxD.shape[0], table_VxD.shape[0]) if chunk is None else chunk
    h_NxD = h_NxD.astype(jnp.float32)
    V = table_VxD.shape[0]
    if chunk:
        lse_N = chunked_logsumexp(h_NxD, table_VxD, chunk)
        nll_N = lse_N - jnp.sum(h_NxD * table_VxD[t_N], axis=-1)
        if label_smoothing:
            # the mean of −log p over the V − 1 real items is lse − h · (mean of their embeddings): no [N, V] needed
            real_Vx1 = (jnp.arange(V) != PAD)[:, None]
            mean_item_D = jnp.sum(jnp.where(real_Vx1, table_VxD, 0.0), axis=0) / (V - 1)
            smooth_N = lse_N - h_NxD @ mean_item_D
            nll_N = (1.0 - label_smoothing) * nll_N + label_smoothing * smooth_N
        return _weighted_mean(nll_N, w_N)
    logits_NxV = h_NxD @ table_VxD.T
    is_pad_V = jnp.arange(V) == PAD
    logp_NxV = jax.nn.log_softmax(jnp.where(is_pad_V[None], NEG_INF, logits_NxV), axis=-1)
    nll_N = -jnp.take_along_axis(logp_NxV, t_N[:, None], axis=-1)[:, 0]
    if label_smoothing:
        smooth_N = -jnp.sum(jnp.where(is_pad_V[None], 0.0, logp_NxV), axis=-1) / (V - 1)
        nll_N = (1.0 - label_smoothing) * nll_N + label_smoothing * smooth_N
    return _weighted_mean(nll_N, w_N)


# The chunked path starts where the [N, V] logits pass this many float32 values (256 MB). Measured on CPU
# (benchmarks/chunked_ce.py, N = 2,048, d = 128): one-shot is faster at 3.4k items (35 against 48 ms), the two
# cross near 10k, chunked is 1.3x faster at 20k and 2x at 316k (with 7x less memory). The threshold keeps every
# ML-1M step of the default recipe (at most 12,800 x 3,417 logits) on the path it was tuned with.
CE_CHUNK_FROM_LOGITS = 1 << 26
# Each block of the chunked pass holds about this many float32 logits ([N, chunk], 32 MB).
CE_CHUNK_LOGITS = 1 << 23


def ce_chunk_size(num_positions: int, num_rows: int) -> int:
    """The item block of `full_softmax_ce` for N positions over a table of `num_rows` rows (0: one shot)."""
    if num_positions * num_rows <= CE_CHUNK_FROM_LOGITS:
        return 0
    chunk = max(256, CE_CHUNK_LOGITS // max(num_positions, 1) // 256 * 256)
    return min(chunk, num_rows)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def chunked_logsumexp(h_NxD: jax.Array, table_VxD: jax.Array, chunk: int) -> jax.Array:
    """log Σ_v exp(h · E_v) over the real items v ≥ 1 (row 0, the padding, excluded), computed over blocks of
    `chunk` rows with an online max and sum. The backward pass recomputes each block's logits instead of storing
    them (a custom VJP), so memory is O(N · chunk) instead of O(N · V) in both directions — the idea of "cut
    cross-entropy" (Wijmans et al., 2024)."""
    return _lse_forward(h_NxD, table_VxD, chunk)[0]


def _blocks(table_VxD: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """The table as [num_blocks, chunk, D] (zero rows appended) and the [num_blocks, chunk] mask of real items."""
    V, D = table_VxD.shape
    n = math.ceil(V / chunk)
    padded = jnp.pad(table_VxD, ((0, n * chunk - V), (0, 0)))
    row = jnp.arange(n * chunk).reshape(n, chunk)
    return padded.reshape(n, chunk, D), (row != PAD) & (row < V)


def _lse_forward(h_NxD, table_VxD, chunk):
    blocks_KxCxD, real_KxC = _blocks(table_VxD.astype(jnp.float32), chunk)
    N = h_NxD.shape[0]

    def body(carry, xs):
        m_N, s_N = carry
        block_CxD, real_C = xs
        logits_NxC = jnp.where(real_C[None], h_NxD @ block_CxD.T, -jnp.inf)
        m_new_N = jnp.maximum(m_N, jnp.max(logits_NxC, axis=-1))
        s_N = s_N * jnp.exp(m_N - m_new_N) + jnp.sum(jnp.exp(logits_NxC - m_new_N[:, None]), axis=-1)
        return (m_new_N, s_N), None

    init = (jnp.full((N,), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32))
    (m_N, s_N), _ = jax.lax.scan(body, init, (blocks_KxCxD, real_KxC))
    lse_N = m_N + jnp.log(s_N)
    return lse_N, (h_NxD, table_VxD, lse_N)


def _lse_backward(chunk, residuals, g_N):
    h_NxD, table_VxD, lse_N = residuals
    blocks_KxCxD, real_KxC = _blocks(table_VxD.astype(jnp.float32), chunk)

    def body(dh_NxD, xs):
        block_CxD, real_C = xs
        # d lse / d logit = softmax probability, recomputed from the block's logits and the saved lse
        p_NxC = jnp.where(real_C[None], jnp.exp(h_NxD @ block_CxD.T - lse_N[:, None]), 0.0)
        gp_NxC = p_NxC * g_N[:, None]
        return dh_NxD + gp_NxC @ block_CxD, gp_NxC.T @ h_NxD

    dh_NxD, dblocks_KxCxD = jax.lax.scan(body, jnp.zeros_like(h_NxD), (blocks_KxCxD, real_KxC))
    V, D = table_VxD.shape
    dtable_VxD = dblocks_KxCxD.reshape(-1, D)[:V].astype(table_VxD.dtype)
    return dh_NxD.astype(h_NxD.dtype), dtable_VxD


chunked_logsumexp.defvjp(_lse_forward, _lse_backward)


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
