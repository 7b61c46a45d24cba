"""The elementwise and small layers of the Llama block: RoPE, RMSNorm, SwiGLU and the
f32-accumulating projection matmul. Pure functions of arrays; the model composes them."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mdkif_jax.ops import dots

F32 = jnp.float32


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
  """Inverse RoPE frequencies, with Llama 3 / linear scaling (`scaling`, transformers'
  rope_scaling dict) as in transformers."""
  dim = head_dim
  inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=F32) / dim))
  if scaling is None:
    return inv
  kind = scaling["rope_type"]
  if kind == "linear":
    return inv / scaling["factor"]
  # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_ctx = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
  wavelen = 2 * math.pi / inv
  inv_low = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old_ctx / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_low / factor + smooth * inv_low
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, inv_low)


def rope_tables(positions_BT: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(signed sin, cos), each [B, T, head_dim] f32, for `apply_rope`. The sin table carries the
  rotation's sign: -sin on the first half of head_dim, +sin on the second."""
  ang = positions_BT.astype(F32)[..., None] * inv_freq
  sin, cos = jnp.sin(ang), jnp.cos(ang)
  return jnp.concatenate([-sin, sin], axis=-1), jnp.concatenate([cos, cos], axis=-1)


def apply_rope(
  x_BTHD: jax.Array, ssin_BTD: jax.Array, cos_BTD: jax.Array, out_dtype=None
) -> jax.Array:
  """Rotate-half RoPE (HF layout: the two halves of head_dim form the pairs).

  x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1], written as x·cos + swap(x)·ssin
  (swap = [x2, x1], a reversal of the halves; ssin = [-sin, sin] from `rope_tables`): the
  same products bit for bit, with a reversal instead of slices and a concatenation (whose
  backward is pads and adds). Computed in f32; the result is cast to `out_dtype` (default
  x's dtype)."""
  x = x_BTHD.astype(F32)
  *lead, d = x.shape
  swap = jnp.flip(x.reshape(*lead, 2, d // 2), axis=-2).reshape(x.shape)
  out = x * cos_BTD[:, :, None, :] + swap * ssin_BTD[:, :, None, :]
  return out.astype(out_dtype or x_BTHD.dtype)


# RMSNorm and SwiGLU compute in f32 whatever the compute dtype. Left to autodiff, each keeps
# its f32 intermediates (x in f32, the normalised x, silu's sigmoid) for every layer until the
# backward pass: with bf16 compute those stacks outweigh every other activation. The custom
# VJPs below keep only their inputs and recompute the cheap elementwise rest.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in f32, scaled by the weight after casting back (as transformers does)."""
  return _rms_norm_fwd(x, w, eps)[0]


def _normalise(x, eps):
  xf = x.astype(F32)
  r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return xf * r, r


def _rms_norm_fwd(x, w, eps):
  n, _ = _normalise(x, eps)
  return w.astype(x.dtype) * n.astype(x.dtype), (dots.pack(x), w)


def _rms_norm_bwd(eps, res, g):
  x, w = dots.unpack(res[0]), res[1]
  n, r = _normalise(x, eps)
  nd = n.astype(x.dtype)
  dn = (g * w.astype(x.dtype)).astype(F32)
  dx = r * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
  dw = jnp.sum((g * nd).astype(F32), axis=tuple(range(g.ndim - 1)))
  return dx.astype(x.dtype), dw.astype(w.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up: silu in f32, cast back to the compute dtype, then the product."""
  return jax.nn.silu(gate.astype(F32)).astype(up.dtype) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (dots.pack(gate), dots.pack(up))


def _swiglu_bwd(res, g):
  gate, up = map(dots.unpack, res)
  gf = gate.astype(F32)
  s = jax.nn.sigmoid(gf)
  d_up = g * (gf * s).astype(up.dtype)
  d_gate = (g * up).astype(F32) * (s * (1.0 + gf * (1.0 - s)))
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """x @ w with x's dtype as operands and f32 accumulation, forward and backward (see
  dots.py); the result in `out_dtype` (default x's dtype)."""
  lead = "abcdefgh"[: x.ndim - 1]
  return dots.einsum(f"{lead}i,io->{lead}o", x, w.astype(x.dtype), out_dtype)
