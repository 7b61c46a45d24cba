"""The model's hand-written backward passes (RMSNorm, SwiGLU) equal autodiff of the plain math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax.ops import layers

F32 = jnp.float32


def plain_rms_norm(x, w, eps):
  xf = x.astype(F32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return w.astype(x.dtype) * xf.astype(x.dtype)


def plain_swiglu(gate, up):
  return jax.nn.silu(gate.astype(F32)).astype(up.dtype) * up


def _grads(f, *args):
  probe = jax.random.normal(jax.random.key(9), f(*args).shape)
  return jax.grad(lambda *a: jnp.sum(f(*a).astype(F32) * probe), argnums=(0, 1))(*args)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_rms_norm_value_and_gradients_match_autodiff(dtype, tol):
  x = (3.0 * jax.random.normal(jax.random.key(0), (2, 5, 16))).astype(dtype)
  w = (1.0 + 0.1 * jax.random.normal(jax.random.key(1), (16,))).astype(dtype)
  np.testing.assert_array_equal(layers.rms_norm(x, w, 1e-5), plain_rms_norm(x, w, 1e-5))
  ours_g = _grads(lambda x, w: layers.rms_norm(x, w, 1e-5), x, w)
  ref_g = _grads(lambda x, w: plain_rms_norm(x, w, 1e-5), x, w)
  for ours, ref in zip(ours_g, ref_g, strict=True):
    assert ours.dtype == ref.dtype
    scale = float(jnp.max(jnp.abs(ref.astype(F32))))
    assert float(jnp.max(jnp.abs(ours.astype(F32) - ref.astype(F32)))) <= tol * scale


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_swiglu_value_and_gradients_match_autodiff(dtype, tol):
  gate = (4.0 * jax.random.normal(jax.random.key(2), (2, 5, 16))).astype(dtype)
  up = jax.random.normal(jax.random.key(3), (2, 5, 16)).astype(dtype)
  np.testing.assert_array_equal(layers.swiglu(gate, up), plain_swiglu(gate, up))
  for ours, ref in zip(
    _grads(layers.swiglu, gate, up), _grads(plain_swiglu, gate, up), strict=True
  ):
    assert ours.dtype == ref.dtype
    scale = float(jnp.max(jnp.abs(ref.astype(F32))))
    assert float(jnp.max(jnp.abs(ours.astype(F32) - ref.astype(F32)))) <= tol * scale
