"""Two-operand einsums that accumulate in f32 and keep their backward pass in the compute dtype.

With bf16 compute, `jnp.einsum(..., preferred_element_type=f32)` runs the forward product as a
fast bf16 x bf16 -> f32 matmul, but JAX's own transpose rule then multiplies the *f32*
cotangent with the bf16 operand: a mixed f32 x bf16 product that XLA runs at f32 speed (or
slower), so the backward pass gains nothing from bf16. `einsum` below casts the cotangent to
the operands' dtype first and accumulates the two transposed products in f32 too: every
matmul of the training step, forward and backward, is then bf16 x bf16 -> f32 (the usual
mixed-precision recipe). With f32 operands it computes exactly what autodiff would.

Specs are explicit ("btd,dv->btv"): no ellipsis, no index repeated within an operand, and
every index of an operand appears in the other operand or the output (true of every product
in a transformer layer), so each transposed product is again one einsum.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
  """`jnp.einsum(spec, a, b)` with f32 accumulation, cast to `out_dtype` (default a's dtype).

  `a` and `b` must share a dtype (cast the frozen weight to the compute dtype first).
  """
  if a.dtype != b.dtype:
    raise TypeError(f"dots.einsum({spec!r}): operand dtypes differ ({a.dtype} vs {b.dtype})")
  out_dtype = jnp.dtype(out_dtype or a.dtype)
  return _einsum(_parse(spec), out_dtype, a, b)


@functools.cache
def _parse(spec: str) -> tuple[str, str, str]:
  ins, out = spec.replace(" ", "").split("->")
  lhs, rhs = ins.split(",")
  for name, op, other in (("lhs", lhs, rhs + out), ("rhs", rhs, lhs + out)):
    if "." in op or len(set(op)) != len(op) or not set(op) <= set(other):
      raise ValueError(f"dots.einsum: unsupported spec {spec!r} ({name} {op!r})")
  return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum(parsed, out_dtype, a, b):
  lhs, rhs, out = parsed
  spec = f"{lhs},{rhs}->{out}"
  free = [i for i, d in enumerate(lhs) if d in out and d not in rhs]
  batched = any(d in rhs and d in out for d in lhs)
  one_row = free and not batched and math.prod(a.shape[i] for i in free) == 1
  if one_row and a.dtype != F32 and jax.default_backend() == "cpu":
    # One row (batch-1 decoding): XLA:CPU runs a one-row product as Eigen's matrix-vector
    # product, which has no fast bf16 kernel (~10x slower than f32 on a [1, 576] x [576,
    # 49152] head); two rows go through its GEMM library. Pad a zero row, drop its output.
    a = jnp.concatenate([a, jnp.zeros_like(a)], axis=free[0])
    y = jnp.einsum(spec, a, b, preferred_element_type=F32)
    y = jax.lax.slice_in_dim(y, 0, 1, axis=out.index(lhs[free[0]]))
    return y.astype(out_dtype)
  return jnp.einsum(spec, a, b, preferred_element_type=F32).astype(out_dtype)


def pack(x: jax.Array) -> jax.Array:
  """A residual for the backward pass: bf16 travels as its uint16 bits.

  Residuals saved inside the model's layer scan are stacked over layers with one
  dynamic-update-slice per layer. XLA's CPU backend normalises a bf16 update-slice to f32
  (convert the whole [L, ...] stack, update, convert back), a full copy of the stack on every
  layer; on uint16 it is an in-place write. Bits are unchanged: `unpack` restores x exactly.
  """
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def unpack(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _fwd(parsed, out_dtype, a, b):
  return _einsum(parsed, out_dtype, a, b), (pack(a), pack(b))


def _bwd(parsed, out_dtype, res, g):
  lhs, rhs, out = parsed
  a, b = map(unpack, res)
  g = g.astype(a.dtype)
  da = _product(out, g, rhs, b, lhs).astype(a.dtype)
  db = _product(out, g, lhs, a, rhs).astype(b.dtype)
  return da, db


def _product(sx: str, x: jax.Array, sy: str, y: jax.Array, so: str) -> jax.Array:
  """einsum(sx, sy -> so) in f32, operands ordered for the CPU's matmul.

  A weight gradient sums over the leading (token) dims of both operands, e.g. "bto,btr->or".
  In f32, XLA's CPU dot then transposes the cotangent [tokens, out] first, as an extra pass
  fused into whatever produced it, which costs about as much as the matmul itself. So in f32
  the smaller operand is transposed explicitly and goes on the left of a plain [m, k] x
  [k, n] dot; the output is transposed back (small too). In bf16 the same rewrite was slower
  (docs/design.md), so bf16 (and every other product) keeps the cotangent on the left, as
  autodiff does.
  """
  contracted = [d for d in sx if d in sy and d not in so]
  batch = [d for d in sx if d in sy and d in so]
  leading = not batch and sx[: len(contracted)] == sy[: len(contracted)] == "".join(contracted)
  if leading and x.dtype == F32:
    if x.size > y.size:
      sx, x, sy, y = sy, y, sx, x
    n = len(contracted)
    k = math.prod(x.shape[:n])
    # materialised: a transpose folded into the dot runs it on a slower generic CPU kernel
    # (for bf16 x bf16 -> f32 that kernel does not even exist)
    xt = jax.lax.optimization_barrier(x.reshape(k, -1).T)
    out = jnp.dot(xt, y.reshape(k, -1), preferred_element_type=F32)
    out = out.reshape(x.shape[n:] + y.shape[n:])
    free = sx[n:] + sy[n:]
    return jnp.transpose(out, [free.index(d) for d in so])
  return jnp.einsum(f"{sx},{sy}->{so}", x, y, preferred_element_type=F32)


_einsum.defvjp(_fwd, _bwd)
