"""The fused vocabulary projection + cross-entropy: autodiff's values and gradients, without
ever keeping the [N, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax.ops import dots, losses

G, N, D, V = 2, 64, 32, 1000


def _inputs(dtype, tied):
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], (G, N, D)).astype(dtype)
  w = jax.random.normal(k[1], (V, D) if tied else (D, V)) * 0.1
  t = jax.random.randint(k[2], (G, N), 0, V)
  g = jax.random.uniform(k[3], (G, N))  # per-position loss weights
  return h, w, t, g


def _plain_nll(h, w, t, tied):
  """What the training step computed before: full logits, then logsumexp - target logit."""
  spec = "gnd,vd->gnv" if tied else "gnd,dv->gnv"
  logits = dots.einsum(spec, h, w.astype(h.dtype), out_dtype=jnp.float32)
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]


@pytest.mark.parametrize("tied", [True, False])
# bf16: the fused backward rounds dh once (f32 product x weight), autodiff twice: 1 bf16 ulp
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("chunk", [16, 24, 64])  # 24 does not divide N = 64: padded chunks
def test_fused_nll_and_gradient_equal_autodiff(tied, dtype, tol, chunk):
  h, w, t, g = _inputs(dtype, tied)
  fused = jax.jit(lambda h: losses.token_nll(h, w, t, tied=tied, chunk=chunk))
  plain = jax.jit(lambda h: _plain_nll(h, w, t, tied))
  np.testing.assert_allclose(fused(h), plain(h), rtol=1e-6, atol=1e-5)
  grad_f = jax.jit(jax.grad(lambda h: jnp.sum(fused(h) * g)))(h)
  grad_p = jax.jit(jax.grad(lambda h: jnp.sum(plain(h) * g)))(h)
  assert grad_f.dtype == dtype
  f32 = np.float32
  scale = np.abs(np.asarray(grad_p, f32)).max()
  np.testing.assert_allclose(
    np.asarray(grad_f, f32), np.asarray(grad_p, f32), rtol=tol, atol=tol * scale / 10
  )


def test_backward_never_holds_the_full_logits():
  n, v = 1024, 8192  # logits [n, v] in f32: 32 MiB
  h = jnp.ones((1, n, 16))
  w = jnp.ones((v, 16)) * 0.01
  t = jnp.zeros((1, n), jnp.int32)

  def temp_bytes(nll):
    step = jax.jit(jax.grad(lambda h: jnp.sum(nll(h))))
    return step.lower(h).compile().memory_analysis().temp_size_in_bytes

  plain = temp_bytes(lambda h: _plain_nll(h, w, t, True))
  fused = temp_bytes(lambda h: losses.token_nll(h, w, t, tied=True, chunk=128))
  assert plain >= n * v * 4  # autodiff keeps (at least) the logits
  assert fused < n * v * 4 / 2 and fused < plain / 4, (fused, plain)  # chunks of 128 x v
