"""dots.einsum: autodiff-exact in f32, and a backward pass whose matmuls stay in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax.ops import dots

F32, BF16 = jnp.float32, jnp.bfloat16
SPECS = {  # every product shape the model and the adapters use
  "bti,io->bto": ((2, 5, 6), (6, 4)),
  "btd,vd->btv": ((2, 5, 6), (7, 6)),
  "btkgd,bskd->bkgts": ((2, 5, 3, 2, 4), (2, 5, 3, 4)),
  "bkgts,bskd->btkgd": ((2, 3, 2, 5, 5), (2, 5, 3, 4)),
  "bti,bri->btr": ((2, 5, 6), (2, 3, 6)),
  "btsr,sor->bto": ((2, 5, 4, 3), (4, 7, 3)),
  "bti,ri->btr": ((2, 5, 6), (3, 6)),
  "btr,or->bto": ((2, 5, 3), (7, 3)),
}


def _operands(spec, dtype):
  sa, sb = SPECS[spec]
  a = jax.random.normal(jax.random.key(0), sa, F32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), sb, F32).astype(dtype)
  return a, b


def _reference(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=F32)


@pytest.mark.parametrize("spec", list(SPECS))
def test_f32_value_and_gradients_equal_autodiff(spec):
  a, b = _operands(spec, F32)
  probe = jax.random.normal(jax.random.key(2), _reference(spec, a, b).shape)
  ours = jax.grad(lambda a, b: jnp.sum(dots.einsum(spec, a, b) * probe), argnums=(0, 1))(a, b)
  ref = jax.grad(lambda a, b: jnp.sum(_reference(spec, a, b) * probe), argnums=(0, 1))(a, b)
  np.testing.assert_allclose(dots.einsum(spec, a, b), _reference(spec, a, b), rtol=1e-6)
  for x, y in zip(ours, ref, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", list(SPECS))
def test_bf16_backward_matmuls_take_bf16_operands_and_accumulate_in_f32(spec):
  a, b = _operands(spec, BF16)
  loss = lambda a, b: jnp.sum(dots.einsum(spec, a, b, out_dtype=F32) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)
  products = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(products) == 3  # forward, d(lhs), d(rhs)
  for e in products:
    assert [v.aval.dtype for v in e.invars] == [BF16, BF16], e
    assert e.params["preferred_element_type"] == F32, e
  # and the gradients are the f32 ones up to bf16 rounding
  got = jax.grad(loss, argnums=(0, 1))(a, b)
  want = jax.grad(lambda a, b: jnp.sum(_reference(spec, a, b) ** 2), argnums=(0, 1))(
    a.astype(F32), b.astype(F32)
  )
  for x, y in zip(got, want, strict=True):
    scale = float(jnp.max(jnp.abs(y)))
    assert float(jnp.max(jnp.abs(x.astype(F32) - y))) <= 0.03 * scale


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in _params_jaxprs(e):
      yield from _eqns(sub)


def _params_jaxprs(e):
  """Sub-jaxprs of an equation (jit, custom rules): ClosedJaxprs or Jaxprs in its params."""
  for p in e.params.values():
    if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
      yield p.jaxpr
    elif hasattr(p, "eqns"):
      yield p


def test_plain_autodiff_would_multiply_an_f32_cotangent_with_bf16():
  """Why dots.einsum exists: JAX's own transpose of a bf16 -> f32 product is mixed-precision."""
  a, b = _operands("bti,io->bto", BF16)
  loss = lambda a, b: jnp.sum(_reference("bti,io->bto", a, b).astype(BF16).astype(F32) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)
  dtypes = [
    tuple(v.aval.dtype for v in e.invars)
    for e in _eqns(jaxpr.jaxpr)
    if e.primitive.name == "dot_general"
  ]
  assert any(F32 in d for d in dtypes), dtypes


@pytest.mark.parametrize(
  "spec, problem",
  [
    ("...i,io->...o", "unsupported spec"),
    ("bii,io->bo", "unsupported spec"),
    ("btx,io->bto", "unsupported spec"),
  ],
)
def test_unsupported_specs_are_refused_with_the_spec_named(spec, problem):
  a, b = _operands("bti,io->bto", F32)
  with pytest.raises(ValueError, match=problem):
    dots.einsum(spec, a, b)


def test_mixed_operand_dtypes_are_refused():
  a, b = _operands("bti,io->bto", F32)
  with pytest.raises(TypeError, match="operand dtypes differ"):
    dots.einsum("bti,io->bto", a, b.astype(BF16))


@pytest.mark.parametrize("spec", ["bti,io->bto", "bti,ri->btr", "btr,or->bto"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_weight_gradient_transposes_only_the_smaller_operand_in_f32(spec, dtype):
  """The f32 weight gradient (a sum over the token dims, leading in both operands) is one
  plain [m, k] x [k, n] dot whose left operand is the smaller one, transposed explicitly (XLA's
  CPU dot would otherwise transpose the larger one, fused into whatever produced it); bf16
  keeps autodiff's order (measured faster). Both compile and run at a real size (a transpose
  folded into a bf16 x bf16 -> f32 dot crashed XLA's CPU dot thunk)."""
  a, b = _operands(spec, dtype)
  a = jnp.concatenate([a] * 8, axis=1)  # many tokens: the activations outweigh the weights
  loss = lambda a, b: jnp.sum(dots.einsum(spec, a, b, out_dtype=F32) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1))(a, b)
  eqns = list(_eqns(jaxpr.jaxpr))
  barrier_out = {v for e in eqns if e.primitive.name == "optimization_barrier" for v in e.outvars}
  weight_grad = [
    e for e in eqns if e.primitive.name == "dot_general" and e.invars[0] in barrier_out
  ]
  assert len(weight_grad) == (1 if dtype == F32 else 0), eqns
  if dtype == F32:
    left, right = (v.aval for v in weight_grad[0].invars)
    assert left.size < right.size, (left, right)
    assert tuple(map(tuple, weight_grad[0].params["dimension_numbers"][0])) == ((1,), (0,))
  got = jax.jit(jax.grad(loss, argnums=1))(a, b)
  want = jax.grad(lambda a, b: jnp.sum(_reference(spec, a, b) ** 2), argnums=1)(
    a.astype(F32), b.astype(F32)
  )
  tol = 1e-5 if dtype == F32 else 0.03
  assert float(jnp.max(jnp.abs(got.astype(F32) - want))) <= tol * float(jnp.max(jnp.abs(want)))
  # the real shape that crashed: an adapter B gradient over 2048 tokens
  h, w = jnp.ones((8, 256, 12), dtype), jnp.ones((1536, 12), dtype)
  big = jax.jit(jax.grad(lambda h, w: jnp.sum(dots.einsum("btr,or->bto", h, w, F32)), 1))(h, w)
  np.testing.assert_allclose(np.asarray(big, np.float32), 2048.0)


def test_bf16_residuals_travel_as_uint16_bits():
  """Residuals of the custom VJPs (stacked over the layer scan) are uint16 in bf16: XLA's CPU
  backend turns a bf16 update-slice into a full f32 copy of the stack every layer."""
  x = jax.random.normal(jax.random.key(3), (4, 5), F32).astype(BF16)
  assert dots.pack(x).dtype == jnp.uint16
  np.testing.assert_array_equal(
    np.asarray(dots.unpack(dots.pack(x)), np.float32), np.asarray(x, np.float32)
  )
  assert dots.pack(x.astype(F32)).dtype == F32
  w = jax.random.normal(jax.random.key(4), (5, 3), F32).astype(BF16)
  _, res = dots._fwd(dots._parse("bi,io->bo"), F32, x, w)
  assert [r.dtype for r in res] == [jnp.uint16, jnp.uint16]
