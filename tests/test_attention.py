"""attention.causal: plain softmax attention's values and gradients, with causal key skipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdkif_jax.model import llama as model
from mdkif_jax.model.config import ModelConfig, Numerics
from mdkif_jax.ops import attention

F32, BF16 = jnp.float32, jnp.bfloat16
B, K, G, D = 2, 2, 3, 8


def plain(q, k, v, bias):
  """Softmax attention over every key (no blocks), as autodiff sees it."""
  s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) / math.sqrt(D)
  p = jax.nn.softmax(s + bias[:, None, None], axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=F32).astype(q.dtype)


def _inputs(T, dtype, segments=False):
  ks = jax.random.split(jax.random.key(0), 4)
  q = (2.0 * jax.random.normal(ks[0], (B, T, K, G, D))).astype(dtype)
  k = (2.0 * jax.random.normal(ks[1], (B, T, K, D))).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, K, D)).astype(dtype)
  idx = jnp.arange(T)
  allowed = jnp.broadcast_to(idx[None, :] <= idx[:, None], (B, T, T))
  if segments:  # row 0: two packed examples and trailing padding; row 1: one example
    half = T // 2
    seg = jnp.array([[1] * half + [2] * (T - half - 2) + [0, 0], [1] * T])
    qs, kseg = seg[:, :, None], seg[:, None, :]
    allowed = allowed & (kseg > 0) & ((qs == kseg) | (qs == 0))
  bias = jnp.where(allowed, 0.0, jnp.finfo(F32).min)
  probe = jax.random.normal(ks[3], (B, T, K, G, D))
  return q, k, v, bias, probe


def _grads(f, q, k, v, bias, probe):
  loss = lambda q, k, v: jnp.sum(f(q, k, v, bias).astype(F32) * probe)  # noqa: E731
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)  # one compile, not op by op


def _rel(ours, ref):
  ref = ref.astype(F32)
  return float(jnp.max(jnp.abs(ours.astype(F32) - ref)) / jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("T, block", [(16, 4), (16, 16), (13, 4), (13, 0), (12, 5)])
@pytest.mark.parametrize("segments", [False, True])
def test_f32_values_and_gradients_equal_plain_attention(T, block, segments):
  q, k, v, bias, probe = _inputs(T, F32, segments)
  ours = jax.jit(lambda *a: attention.causal(*a, block=block))
  assert _rel(ours(q, k, v, bias), plain(q, k, v, bias)) < 1e-5
  for name, g_ours, g_ref in zip(
    "qkv", _grads(ours, q, k, v, bias, probe), _grads(plain, q, k, v, bias, probe), strict=True
  ):
    assert g_ours.shape == g_ref.shape and g_ours.dtype == F32
    assert _rel(g_ours, g_ref) < 2e-5, name


def test_bf16_stays_close_to_f32_and_keeps_its_dtype():
  q, k, v, bias, probe = _inputs(16, F32)
  low = [x.astype(BF16) for x in (q, k, v)]
  f = jax.jit(lambda *a: attention.causal(*a, block=4))
  out = f(*low, bias)
  assert out.dtype == BF16
  assert _rel(out, plain(q, k, v, bias)) < 2e-2
  for g_ours, g_ref in zip(
    _grads(f, *low, bias, probe), _grads(plain, q, k, v, bias, probe), strict=True
  ):
    assert g_ours.dtype == BF16
    assert _rel(g_ours, g_ref) < 3e-2


def test_keys_after_a_block_are_never_read():
  """Block skipping is real: NaN keys/values after block 0 reach neither block 0's outputs nor
  its query gradients (a masked but multiplied key would: NaN * 0 = NaN)."""
  T, block = 8, 4
  q, k, v, bias, probe = _inputs(T, F32)
  k = k.at[:, block:].set(jnp.nan)
  v = v.at[:, block:].set(jnp.nan)
  f = jax.jit(lambda *a: attention.causal(*a, block=block))
  assert bool(jnp.all(jnp.isfinite(f(q, k, v, bias)[:, :block])))
  assert not bool(jnp.any(jnp.isfinite(f(q, k, v, bias)[:, block:])))  # the NaNs are live
  dq = _grads(f, q, k, v, bias, probe.at[:, block:].set(0.0))[0]
  assert bool(jnp.all(jnp.isfinite(dq[:, :block])))


def test_cross_attention_shapes_are_refused():
  q, k, v, bias, _ = _inputs(8, F32)
  with pytest.raises(ValueError, match="self-attention only"):
    attention.causal(q, k[:, :6], v[:, :6], bias[:, :, :6])


def test_model_logits_and_weight_gradients_do_not_depend_on_the_block_size():
  cfg = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
  )
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 64)
  probe = jax.random.normal(jax.random.key(2), (2, 11, 64))
  outs = []
  for block in (0, 4):
    m = model.Llama(cfg, numerics=Numerics(attention_block=block), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)
    loss = lambda p, g=graphdef: jnp.sum(model.forward(g, p, tokens) * probe)  # noqa: E731
    logits = jax.jit(model.forward, static_argnums=0)(graphdef, params, tokens)
    outs.append((logits, jax.jit(jax.grad(loss))(params)))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
  grads = [jax.tree.leaves(g) for _, g in outs]
  assert len(grads[0]) == len(grads[1]) > 0
  for a, b in zip(*grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_computed_pairs_count_the_blocks_keys():
  assert attention.computed_pairs(256, 64) == 64 * (64 + 128 + 192 + 256)  # 62.5% of 256²
  assert attention.computed_pairs(13, 0) == attention.computed_pairs(13, 13) == 13 * 13
  assert attention.blocks(12, 5) == ((0, 5), (5, 10), (10, 12))
