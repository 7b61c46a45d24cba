"""Causal self-attention for training and scoring: query blocks that skip the masked keys.

`causal` computes softmax(q kᵀ / sqrt(Dh) + bias) v for grouped-query heads, exactly what the
plain einsum formulation in `model/llama.py` computes, but

* the queries run in blocks of `block` positions and block i multiplies only the keys it can
  see (slots [0, end of block i)), so a causal T x T score matrix costs
  (n + 1) / 2n of the full one for n blocks (62.5% at n = 4) in the forward and backward pass;
* its backward pass is written by hand (`jax.custom_vjp`): it keeps q, k, v and the per-row
  log-sum-exp, recomputes each block's probabilities, and orders every product so that no
  [.., T, S] matrix is ever transposed. Left to autodiff, the key and value gradients
  (dSᵀ q and Pᵀ dO) contract the score matrices over their row axis, which XLA's CPU backend
  runs by first copying the whole transposed score matrix; here the small operand (q or dO,
  Dh wide) is transposed instead and the products come out as [.., Dh, S];
* the query heads of one key/value head are laid out time-major, row t*G + g, so a query
  block is one contiguous [c*G, Dh] slab (no gather of G strided pieces per block).

All products take compute-dtype operands and accumulate in f32 (bf16 compute stays bf16 x
bf16 -> f32, as `dots.einsum` does); the softmax runs in f32. `bias` is the additive f32 mask
(0 or a large negative number, no gradient) and must itself mask every key slot after the
query's slot (the model's bias does: causality by slot index); the keys after a block's last
query are skipped without reading it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mdkif_jax.ops import dots

F32 = jnp.float32


def causal(
  q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, block: int = 64
) -> jax.Array:
  """Grouped-query causal attention.

  q: [B, T, K, G, Dh] (K key/value heads, G query heads per key head); k, v: [B, T, K, Dh];
  bias: [B, T, T] f32 added to the scaled scores (0 = allowed). Returns [B, T, K, G, Dh] in
  q's dtype. block: query positions per block (<= 0 or >= T: one block).
  """
  T = q.shape[1]
  if k.shape[1] != T or bias.shape[-2:] != (T, T):
    raise ValueError(
      f"attention.causal: self-attention only (q {q.shape}, k {k.shape}, bias {bias.shape})"
    )
  return _attend(blocks(T, block), q, k.astype(q.dtype), v.astype(q.dtype), bias.astype(F32))


def blocks(T: int, block: int) -> tuple[tuple[int, int], ...]:
  """The query blocks [(start, end), ...] of `causal`; block i multiplies keys [0, end)."""
  c = block if 0 < block < T else T
  return tuple((s, min(s + c, T)) for s in range(0, T, c))


def computed_pairs(T: int, block: int) -> int:
  """(query, key) pairs `causal` multiplies for T positions: T² for one block, ~T²/2 for many."""
  return sum((e - s) * e for s, e in blocks(T, block))


def _query_rows(q):
  """[B, T, K, G, D] -> [B, K, T*G, D]: row t*G + g."""
  B, T, K, G, D = q.shape
  return jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, K, T * G, D)


def _heads_first(q, k, v):
  """q as `_query_rows`; [B, S, K, D] -> [B, K, S, D]."""
  return _query_rows(q), jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def _scores(qb, kt, bias, t0, t1, G):
  """Scaled, masked f32 scores [B, K, c*G, e] of one query block against keys [0, t1)."""
  B, K, X, D = qb.shape
  s = jnp.einsum("bkxd,bksd->bkxs", qb, kt[:, :, :t1], preferred_element_type=F32)
  s = s.reshape(B, K, t1 - t0, G, t1) * (1.0 / math.sqrt(D)) + bias[:, None, t0:t1, None, :t1]
  return s.reshape(B, K, X, t1)


def _forward(spans, q, k, v, bias):
  B, T, K, G, D = q.shape
  qt, kt, vt = _heads_first(q, k, v)
  outs, lses = [], []
  for t0, t1 in spans:
    s = _scores(qt[:, :, t0 * G : t1 * G], kt, bias, t0, t1, G)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkxs,bksd->bkxd", p.astype(q.dtype), vt[:, :, :t1], preferred_element_type=F32)
    outs.append(o / total)
    lses.append((m + jnp.log(total))[..., 0])
  o = jnp.concatenate(outs, axis=2).astype(q.dtype).reshape(B, K, T, G, D)
  return jnp.transpose(o, (0, 2, 1, 3, 4)), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spans, q, k, v, bias):
  """spans: the query blocks, `blocks(T, block)`."""
  return _forward(spans, q, k, v, bias)[0]


def _fwd(spans, q, k, v, bias):
  o, lse = _forward(spans, q, k, v, bias)
  return o, (dots.pack(q), dots.pack(k), dots.pack(v), bias, lse)  # bf16 as bits: see dots.pack


def _t(x):
  """Materialised swap of the last two axes (kept a real transpose, not folded into a dot)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _bwd(spans, res, g):
  q, k, v = map(dots.unpack, res[:3])
  bias, lse = res[3:]
  B, T, K, G, D = q.shape
  compute = q.dtype
  qt, kt, vt = _heads_first(q, k, v)
  gt = _query_rows(g.astype(compute))
  scale = 1.0 / math.sqrt(D)
  dqs, dkt, dvt = [], jnp.zeros((B, K, D, T), F32), jnp.zeros((B, K, D, T), F32)
  for t0, t1 in spans:
    r0, r1 = t0 * G, t1 * G
    qb, gb = qt[:, :, r0:r1], gt[:, :, r0:r1]
    p = jnp.exp(_scores(qb, kt, bias, t0, t1, G) - lse[:, :, r0:r1, None])  # [B, K, c*G, e]
    dp = jnp.einsum("bkxd,bksd->bkxs", gb, vt[:, :, :t1], preferred_element_type=F32)
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
    ds = (ds * scale).astype(compute)
    pc = p.astype(compute)
    dqs.append(jnp.einsum("bkxs,bksd->bkxd", ds, kt[:, :, :t1], preferred_element_type=F32))
    pad = ((0, 0), (0, 0), (0, 0), (0, T - t1))  # the small operand transposed: [B, K, D, c*G]
    dkt += jnp.pad(jnp.einsum("bkdx,bkxs->bkds", _t(qb), ds, preferred_element_type=F32), pad)
    dvt += jnp.pad(jnp.einsum("bkdx,bkxs->bkds", _t(gb), pc, preferred_element_type=F32), pad)
  dq = jnp.concatenate(dqs, axis=2).reshape(B, K, T, G, D)
  dq = jnp.transpose(dq, (0, 2, 1, 3, 4)).astype(q.dtype)
  dk = jnp.transpose(dkt, (0, 3, 1, 2)).astype(k.dtype)
  dv = jnp.transpose(dvt, (0, 3, 1, 2)).astype(v.dtype)
  return dq, dk, dv, jnp.zeros_like(bias)


_attend.defvjp(_fwd, _bwd)
