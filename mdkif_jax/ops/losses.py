"""Next-token cross-entropy fused with the vocabulary projection, a chunk of positions at a time.

Left to autodiff, `logits = h @ Wᵀ` followed by a log-softmax keeps the f32 logits [N, V] for
the backward pass and builds their gradient [N, V] there: with SmolLM2's 49152-token
vocabulary that is 0.4 GB each at N = 2048 positions, the largest temporaries of a training
step. Here the N positions are processed `chunk` at a time (a scan): each chunk's logits give
its NLL and, when differentiating, its gradient with respect to h right away,
dh = (softmax - onehot) W, which is all the backward pass needs (the NLL is linear in its
incoming cotangent, and the frozen W gets no gradient). Only [chunk, V] logits ever exist.
The products run as `dots.einsum` does: compute-dtype operands, f32 accumulation, the
softmax gradient cast to the compute dtype before its matmul; the same matmuls as autodiff.
With bf16 compute the result can differ from autodiff's by one bf16 rounding: here the
cotangent scales dh after the product, autodiff scales the softmax gradient before it.

W is treated as a constant (the frozen base): it gets no gradient, and there is no forward-
mode rule. No sharding constraint is placed inside the scan; on a mesh where the vocabulary
axis is sharded, GSPMD chooses the layout of each chunk's logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def token_nll(
  h_GND: jax.Array, w: jax.Array, targets_GN: jax.Array, *, tied: bool, chunk: int = 256
) -> jax.Array:
  """-log softmax(h Wᵀ)[target] per position, f32 [G, N].

  w: the tied embedding [V, D] (tied=True) or the untied head [D, V], cast to h's dtype.
  chunk: positions per scan step (N is padded up to a multiple of it; <= 0 = one chunk).
  """
  G, N, _ = h_GND.shape
  c = chunk if 0 < chunk < N else N
  pad = -N % c
  if pad:  # padded positions are sliced off below, so they get no gradient either
    h_GND = jnp.pad(h_GND, ((0, 0), (0, pad), (0, 0)))
    targets_GN = jnp.pad(targets_GN, ((0, 0), (0, pad)))
  nll = _nll(tied, c, jnp.dtype(h_GND.dtype), h_GND, w.astype(h_GND.dtype), targets_GN)
  return nll[:, :N]


def _chunked(x, c):
  """[G, N, ...] -> [N // c, G, c, ...]: the scan runs over the leading axis."""
  return jnp.swapaxes(x.reshape(x.shape[0], -1, c, *x.shape[2:]), 0, 1)


def _unchunked(x):
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _scan(tied: bool, c: int, h, w, targets, with_grad: bool):
  logits_spec = "gcd,vd->gcv" if tied else "gcd,dv->gcv"
  grad_spec = "gcv,vd->gcd" if tied else "gcv,dv->gcd"

  def body(_, xs):
    hc, tc = xs
    logits = jnp.einsum(logits_spec, hc, w, preferred_element_type=F32)
    target = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    m = jnp.max(logits, axis=-1, keepdims=True)
    # exp once: its row sums give the log-sum-exp and, divided by them, the softmax gradient
    # (XLA:CPU runs a fused exp + sum reduction much slower than the exp written out)
    e = jnp.exp(logits - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    nll = (m + jnp.log(total))[..., 0] - target
    if not with_grad:
      return None, nll
    hit = jnp.arange(logits.shape[-1]) == tc[..., None]
    d_logits = (e * (1.0 / total) - hit).astype(h.dtype)
    dh = jnp.einsum(grad_spec, d_logits, w, preferred_element_type=F32)
    return None, (nll, dh)

  _, out = jax.lax.scan(body, None, (_chunked(h, c), _chunked(targets, c)))
  return jax.tree.map(_unchunked, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _nll(tied, c, dtype, h, w, targets):
  del dtype  # h's dtype, for the backward pass
  return _scan(tied, c, h, w, targets, with_grad=False)


def _fwd(tied, c, dtype, h, w, targets):
  del dtype
  nll, dh = _scan(tied, c, h, w, targets, with_grad=True)
  return nll, dh  # dh [G, N, D] in f32: small (D wide, not V)


def _bwd(tied, c, dtype, dh, g):
  return (dh * g[..., None]).astype(dtype), None, None


_nll.defvjp(_fwd, _bwd)
