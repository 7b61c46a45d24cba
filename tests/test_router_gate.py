"""The input-conditioned gate: it learns to send each kind of input to the skill that generated
its answers, rows with different mixtures share one unmerged pass that equals each row's merged
model, top-k keeps k skills, and the gate's loss and weights are the same on a 2x2x2 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdkif_jax import router, sharding
from mdkif_jax.peft import serving
from tests import router_fixtures as fx


def two_kinds(graphdef, frozen, stacked, seed):
  """Rows 0..B/2 have prompts of token ids 3..10 and skill 0's answers; the rest prompts of
  ids 400..407 and skill 1's answers (answer-side tokens are random for both)."""
  half = fx.B // 2
  raw = fx.raw_batch(seed)
  rng = np.random.default_rng(seed)
  raw["tokens"][:half, : fx.PROMPT] = rng.integers(3, 11, (half, fx.PROMPT))
  raw["tokens"][half:, : fx.PROMPT] = rng.integers(400, 408, (half, fx.PROMPT))
  w = np.repeat(np.eye(2, dtype=np.float32), half, axis=0)
  return fx.planted(graphdef, frozen, stacked, w, raw, seed=seed + 2), w


@pytest.fixture(scope="module")
def setup():
  base, graphdef, frozen = fx.tiny_base()
  stacked = fx.random_skills(base.cfg, 2, seed=1)
  return graphdef, frozen, stacked


def test_gate_routes_each_input_to_its_skill(setup):
  graphdef, frozen, stacked = setup
  train = [two_kinds(graphdef, frozen, stacked, s)[0] for s in (10, 20)]
  gate, curve = router.fit_gate(
    graphdef, frozen, stacked, fx.SCALE, train, hidden=32, steps=60, learning_rate=1e-2
  )
  assert curve[-1] < curve[0] - 0.5
  held, want = two_kinds(graphdef, frozen, stacked, 30)  # unseen rows of both kinds
  stats, w_BS = router.gate_stats(gate, graphdef, frozen, stacked, fx.SCALE, held)
  assert np.mean(np.sum(np.asarray(w_BS) * want, axis=1)) > 0.9
  uniform = router.mixture_stats(
    graphdef, frozen, stacked, fx.SCALE, held, jnp.full((fx.B, 2), 0.5)
  )
  assert float(router.mean_nll(stats)) < float(router.mean_nll(uniform)) - 0.3

  # per-row unmerged mixtures in one pass == each row run alone on its own merged kernels
  plain = jax.jit(lambda p, b: router.mixture_stats(graphdef, p, None, fx.SCALE, b))
  for b in (0, fx.B - 1):
    row = {k: v[b : b + 1] for k, v in held.items()}
    merged = serving.merged_params(frozen, stacked, w_BS[b], fx.SCALE)
    np.testing.assert_allclose(plain(merged, row)["nll"], stats["nll"][b : b + 1], rtol=1e-4)


def test_top_k_gate_keeps_k_skills():
  gate = router.Gate(16, 5, hidden=8, top_k=2, rngs=nnx.Rngs(0))
  gate.out.kernel[...] = jax.random.normal(jax.random.key(1), gate.out.kernel.shape)
  w = np.asarray(gate(jax.random.normal(jax.random.key(2), (6, 16))))
  assert ((w > 0).sum(1) == 2).all()
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
  dense = router.Gate(16, 5, hidden=8, rngs=nnx.Rngs(0))  # zero output layer: uniform start
  np.testing.assert_allclose(dense(jnp.ones((2, 16))), 0.2, rtol=1e-6)


def test_gate_sharded_equals_single_device(setup):
  graphdef, frozen, stacked = setup
  batch, _ = two_kinds(graphdef, frozen, stacked, 40)
  gate = router.Gate(64, 2, hidden=16, rngs=nnx.Rngs(3))
  gate.out.kernel[...] = jax.random.normal(jax.random.key(4), gate.out.kernel.shape)
  want_stats, want_w = router.gate_stats(gate, graphdef, frozen, stacked, fx.SCALE, batch)
  mesh = sharding.make_mesh((2, 2, 2))
  _, graphdef8, frozen8 = fx.tiny_base(mesh)
  batch8 = {
    k: jax.device_put(v, sharding.named_sharding(mesh, ("batch", "length")[: v.ndim], v.shape))
    for k, v in batch.items()
  }
  got_stats, got_w = router.gate_stats(gate, graphdef8, frozen8, stacked, fx.SCALE, batch8)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_stats["nll"], want_stats["nll"], rtol=1e-5)
