"""dots.einsum: autodiff-exact in f32, and a backward pass whose matmuls stay in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax import dots

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
  dtypes = [tuple(v.aval.dtype for v in e.invars) for e in _eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"]  # fmt: skip
  assert any(F32 in d for d in dtypes), dtypes


@pytest.mark.parametrize(
  "spec, problem",
  [
    ("...i,io->...o", "unsupported spec"),
    ("bii,io->bo", "unsupported spec"),
    ("btx,io->bto", "unsupported spec"),
  ],  # fmt: skip
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
def test_weight_gradient_puts_the_smaller_operand_first(spec):
  """The weight gradient (a sum over the token dims, leading in both operands) is one dot whose
  left operand is the smaller one (the one XLA's CPU dot transposes) and whose output starts
  with that operand's free dims; the requested layout is a transpose of the small result."""
  a, b = _operands(spec, F32)
  a = jnp.concatenate([a] * 8, axis=1)  # many tokens: the activations outweigh the weights
  loss = lambda a, b: jnp.sum(dots.einsum(spec, a, b) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1))(a, b)
  products = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  contracting = lambda e: tuple(map(tuple, e.params["dimension_numbers"][0]))
  weight_grad = [e for e in products if contracting(e) == ((0, 1), (0, 1))]
  assert len(weight_grad) == 1, products
  left, right = (v.aval for v in weight_grad[0].invars)
  assert left.size < right.size, (left, right)
