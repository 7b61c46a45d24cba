"""Task-level router on a tiny model: exact limits (w = 0, one-hot), merged == unmerged,
gradient descent and CMA-ES recover a planted mixture, sharded == single device, and a skill
added later joins without retraining the others."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdkif_jax import router, sharding
from mdkif_jax.peft import adapters, serving
from tests import router_fixtures as fx

W_STAR = np.array([0.7, 0.3], np.float32)
F32 = jnp.float32


@pytest.fixture(scope="module")
def setup():
  base, graphdef, frozen = fx.tiny_base()
  stacked = fx.random_skills(base.cfg, 2, seed=1)
  batch = fx.planted(graphdef, frozen, stacked, np.broadcast_to(W_STAR, (fx.B, 2)), fx.raw_batch(0))
  return base, graphdef, frozen, stacked, batch


def _forward(graphdef):
  @jax.jit
  def run(params, tokens, stacked=None, ctx=None):
    return nnx.merge(graphdef, params)(tokens, adapters=stacked, adapter_ctx=ctx)

  return run


def test_parametrisations_and_regularisers():
  for p in router.PARAMETRISATIONS:
    np.testing.assert_allclose(router.task_weights(router.init_theta(4, p), p), 0.25, rtol=1e-6)
  w = jnp.array([0.5, -0.5, 0.0])
  assert float(router.regulariser(w, "l1")) == pytest.approx(1.0)
  assert float(router.regulariser(w, "entropy")) == pytest.approx(np.log(2), rel=1e-6)
  assert float(router.regulariser(jnp.array([1.0, 0.0]), "entropy")) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="parametrisation"):
    router.task_weights(w, "tanh")
  with pytest.raises(ValueError, match="regulariser"):
    router.regulariser(w, "l2")


def test_zero_weights_are_the_base_and_one_hot_is_that_skill(setup):
  _, graphdef, frozen, stacked, batch = setup
  run = _forward(graphdef)
  tokens = batch["tokens"]
  base = run(frozen, tokens)
  ctx0 = adapters.AdapterCtx(fx.SCALE, weights=jnp.zeros((fx.B, 2)))
  np.testing.assert_array_equal(run(frozen, tokens, stacked, ctx0), base)  # bit-exact
  zero_merged = serving.merged_params(frozen, stacked, jnp.zeros(2), fx.SCALE)
  np.testing.assert_array_equal(run(zero_merged, tokens), base)
  for s in range(2):
    onehot = adapters.AdapterCtx(fx.SCALE, weights=jnp.broadcast_to(jnp.eye(2)[s], (fx.B, 2)))
    ids = adapters.AdapterCtx(fx.SCALE, skill_ids=jnp.full((fx.B,), s, jnp.int32))
    got, want = run(frozen, tokens, stacked, onehot), run(frozen, tokens, stacked, ids)
    assert float(jnp.abs(want - base).max()) > 1.0  # the skill really changes the logits
    # the same sum in another f32 order: logits of magnitude ~10 agree to ~4e-5
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_merged_equals_unmerged(setup):
  _, graphdef, frozen, stacked, batch = setup
  run = _forward(graphdef)
  w = jnp.asarray([0.7, -0.4])
  ctx = adapters.AdapterCtx(fx.SCALE, weights=jnp.broadcast_to(w, (fx.B, 2)))
  unmerged = run(frozen, batch["tokens"], stacked, ctx)
  merged = run(serving.merged_params(frozen, stacked, w, fx.SCALE), batch["tokens"])
  np.testing.assert_allclose(merged, unmerged, atol=1e-4, rtol=1e-5)
  # and the frozen params are untouched by merging (a copy is made)
  assert not np.array_equal(
    frozen["q"][...], serving.merged_params(frozen, stacked, w, 1.0)["q"][...]
  )


def _pruned(stacked, seed=3):
  """An AdaLoRA-like final allocation: about half of every skill's ranks pruned (E = 0)."""
  rng = np.random.default_rng(seed)
  return {
    t: {**leaf, "E": leaf["E"] * (rng.random(leaf["E"].shape) < 0.5)} for t, leaf in stacked.items()
  }


@pytest.mark.parametrize("compact", [False, True])
def test_served_layout_is_the_stacked_mixture(setup, compact):
  _, graphdef, frozen, stacked, batch = setup
  pruned = _pruned(stacked)
  served = serving.serving_stack(pruned, compact=compact, bucket=1)
  S, r = 2, fx.RANK
  assert serving.num_skills(served) == serving.num_skills(pruned) == S
  for t, leaf in served.items():
    kept = np.asarray(pruned[t]["E"] != 0).sum(axis=(0, 2))  # per layer
    R = leaf["route"].shape[1]
    want = int(kept.max()) if compact else S * r
    assert want == R
    assert leaf["A"].shape[:2] == leaf["route"].shape[:2] and leaf["B"].shape[2] == R
    assert "E" not in leaf  # folded into A
  assert any(leaf["route"].shape[1] < S * r for leaf in served.values()) == compact
  run = _forward(graphdef)
  tokens = batch["tokens"]
  for ctx in _random_mixtures(graphdef, frozen, S, seed=4):
    got, want = run(frozen, tokens, served, ctx), run(frozen, tokens, pruned, ctx)
    assert float(jnp.abs(want - run(frozen, tokens)).max()) > 1.0
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  ctx0 = adapters.AdapterCtx(fx.SCALE, weights=jnp.zeros((fx.B, S)))
  np.testing.assert_array_equal(run(frozen, tokens, served, ctx0), run(frozen, tokens))
  w = jnp.asarray([0.7, -0.4])
  for t in served:
    np.testing.assert_allclose(
      serving.merged_params(frozen, served, w, fx.SCALE)[t][...],
      serving.merged_params(frozen, pruned, w, fx.SCALE)[t][...],
      rtol=1e-5,
      atol=1e-6,
    )
  # the router's loss and its gradient w.r.t. the weights are the same through either layout
  _assert_same_loss_and_grad(graphdef, batch, (frozen, served), (frozen, pruned))


def _random_mixtures(graphdef, frozen, S, seed):
  """AdapterCtx with N(0, 1) weights per row [B, S], and per row and layer [B, L, S]."""
  L = nnx.merge(graphdef, frozen).cfg.num_hidden_layers
  rng = np.random.default_rng(seed)
  return [
    adapters.AdapterCtx(fx.SCALE, weights=jnp.asarray(rng.standard_normal(shape), F32))
    for shape in ((fx.B, S), (fx.B, L, S))
  ]


def _assert_same_loss_and_grad(graphdef, batch, got_layout, want_layout):
  """router.task_loss and its gradient w.r.t. task weights agree on two (params, skills)."""
  fit = router.TaskFit(parametrisation="softmax", regulariser="l1", reg_weight=0.1)
  f = jax.jit(jax.value_and_grad(router.task_loss, has_aux=True), static_argnums=(1, 4, 6))
  theta = jnp.asarray([0.3, -0.2])
  (got, _), got_g = f(theta, graphdef, *got_layout, fx.SCALE, batch, fit)
  (want, _), want_g = f(theta, graphdef, *want_layout, fx.SCALE, batch, fit)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)


def test_packed_serving_layout_gives_the_served_mixture_and_its_gradient(setup):
  _, graphdef, frozen, stacked, batch = setup
  served = serving.serving_stack(_pruned(stacked), bucket=4)
  params, packed = serving.packed_params(frozen, served, max_rank_fraction=1.0)
  S = serving.num_skills(served)
  for t, leaf in served.items():
    R = leaf["route"].shape[1]
    L, d_in, d_out = frozen[t][...].shape
    assert params[t][...].shape == (L, d_in + R, d_out) and "B" not in packed[t]
    np.testing.assert_array_equal(params[t][...][:, :d_in], frozen[t][...])  # base rows intact
    np.testing.assert_array_equal(params[t][...][:, d_in:], np.swapaxes(leaf["B"], 1, 2))
  # a rank fraction between the targets' R / in packs some and leaves the others as served
  fractions = sorted(served[t]["route"].shape[1] / frozen[t][...].shape[1] for t in served)
  assert fractions[0] < fractions[-1]
  cut = (fractions[0] + fractions[-1]) / 2
  some_params, some = serving.packed_params(frozen, served, max_rank_fraction=cut)
  for t, leaf in served.items():
    is_packed = leaf["route"].shape[1] <= cut * frozen[t][...].shape[1]
    assert ("B" not in some[t]) == is_packed
    assert (some_params[t][...].shape == params[t][...].shape) == is_packed
  assert any("B" in leaf for leaf in some.values()) and any("B" not in x for x in some.values())
  run = _forward(graphdef)
  tokens = batch["tokens"]
  for ctx in _random_mixtures(graphdef, frozen, S, seed=5):
    want = run(frozen, tokens, served, ctx)
    assert float(jnp.abs(want - run(frozen, tokens)).max()) > 1.0
    np.testing.assert_allclose(run(params, tokens, packed, ctx), want, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(run(some_params, tokens, some, ctx), want, atol=1e-4, rtol=1e-5)
  # zero weights, or no skills at all ([x, 0] into the packed GEMM), give the base
  base = run(frozen, tokens)
  ctx0 = adapters.AdapterCtx(fx.SCALE, weights=jnp.zeros((fx.B, S)))
  np.testing.assert_allclose(run(params, tokens, packed, ctx0), base, atol=1e-5, rtol=1e-6)
  np.testing.assert_allclose(run(params, tokens), base, atol=1e-5, rtol=1e-6)
  # the router's loss and gradient w.r.t. the weights match the unpacked layout
  _assert_same_loss_and_grad(graphdef, batch, (params, packed), (frozen, served))
  with pytest.raises(ValueError, match="packed served skills"):
    run(frozen, tokens, packed, ctx0)  # packed skills on the unpacked kernels
  with pytest.raises(ValueError, match="kernel is packed"):
    run(params, tokens, served, ctx0)  # unpacked skills on the packed kernels
  with pytest.raises(ValueError, match="not a served leaf"):
    serving.pack_served({t: frozen[t][...] for t in stacked}, stacked)


def test_gradient_descent_recovers_planted_mixture(setup):
  _, graphdef, frozen, stacked, batch = setup
  fit = router.TaskFit(
    parametrisation="free", regulariser="none", reg_weight=0.0, steps=60, learning_rate=0.1
  )
  theta, curve = router.fit_task_gd(graphdef, frozen, stacked, fx.SCALE, [batch], fit)
  np.testing.assert_allclose(router.task_weights(theta, "free"), W_STAR, atol=0.05)
  assert curve[-1] < curve[0] - 0.3


def test_cmaes_recovers_planted_mixture(setup):
  _, graphdef, frozen, stacked, batch = setup
  fit = router.TaskFit(
    parametrisation="free",
    regulariser="none",
    reg_weight=0.0,
    population=16,
    generations=30,
    sigma0=0.3,
  )
  theta, best = router.fit_task_cmaes(graphdef, frozen, stacked, fx.SCALE, batch, fit)

  task_loss = jax.jit(router.task_loss, static_argnums=(1, 4, 6))

  def loss(th):
    return float(
      task_loss(jnp.asarray(th, F32), graphdef, frozen, stacked, fx.SCALE, batch, fit)[0]
    )

  # the fitted weights beat the uniform start by a wide margin (~4.97 -> ~1.75) and are as good
  # as the planted ones; the reported best is the returned theta's loss
  fitted = loss(theta)
  assert fitted < loss(router.init_theta(2, "free")) - 1.0
  assert fitted < loss(W_STAR) + 0.01
  assert best[-1] == pytest.approx(fitted, rel=1e-5) and len(best) == 30
  np.testing.assert_allclose(theta, W_STAR, atol=0.05)


def test_sharded_equals_single_device(setup):
  _, graphdef, frozen, stacked, batch = setup
  fit = router.TaskFit(parametrisation="softmax", regulariser="entropy", reg_weight=0.1)
  theta = jnp.asarray([0.3, -0.2])

  def loss_and_grad(graphdef, frozen, stacked, batch):
    f = jax.jit(jax.value_and_grad(router.task_loss, has_aux=True), static_argnums=(1, 4, 6))
    return f(theta, graphdef, frozen, stacked, fx.SCALE, batch, fit)

  (want, want_nll), want_g = loss_and_grad(graphdef, frozen, stacked, batch)
  mesh = sharding.make_mesh((2, 2, 2))
  _, graphdef8, frozen8 = fx.tiny_base(mesh)
  assert len(frozen8["gate"][...].addressable_shards) == 8
  batch8 = {
    k: jax.device_put(v, sharding.named_sharding(mesh, ("batch", "length")[: v.ndim], v.shape))
    for k, v in batch.items()
  }
  (got, got_nll), got_g = loss_and_grad(graphdef8, frozen8, stacked, batch8)
  assert len(batch8["tokens"].addressable_shards) == 8
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5)
  reg = router.regulariser(jax.nn.softmax(theta), "entropy")  # the loss carries its regulariser
  np.testing.assert_allclose(got - got_nll, 0.1 * reg, rtol=1e-4)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)
  # stage 2's served layout, replicated over the mesh, gives the same loss
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  served8 = jax.device_put(serving.serving_stack(stacked), rep)
  (got_s, _), got_gs = loss_and_grad(graphdef8, frozen8, served8, batch8)
  np.testing.assert_allclose(got_s, want, rtol=1e-5)
  np.testing.assert_allclose(got_gs, want_g, rtol=1e-4, atol=1e-6)
  # and packed: [W ; Bᵀ] keeps the sharded kernels' layout over the mesh
  params8, packed8 = serving.packed_params(frozen8, served8, max_rank_fraction=1.0)
  assert params8["gate"][...].sharding == frozen8["gate"][...].sharding
  assert params8["gate"][...].shape[1] > frozen8["gate"][...].shape[1]
  (got_p, _), got_gp = loss_and_grad(graphdef8, params8, packed8, batch8)
  np.testing.assert_allclose(got_p, want, rtol=1e-5)
  np.testing.assert_allclose(got_gp, want_g, rtol=1e-4, atol=1e-6)


def test_thirteenth_skill_joins_without_retraining(setup):
  _, graphdef, frozen, stacked, _ = setup
  new = fx.random_skills(nnx.merge(graphdef, frozen).cfg, 1, seed=7, rank=2)  # another rank
  grown = serving.add_skills(stacked, new)
  # the old skills are the same arrays (zero rank-padding only); the new one is exact too
  for t in stacked:
    assert grown[t]["A"].shape[0] == 3
    np.testing.assert_array_equal(grown[t]["A"][:2], stacked[t]["A"])
    np.testing.assert_array_equal(
      adapters.delta_weight(grown[t], 1.0)[2], adapters.delta_weight(new[t], 1.0)[0]
    )
  w_star = np.array([0.0, 0.2, 0.8], np.float32)
  batch = fx.planted(graphdef, frozen, grown, np.broadcast_to(w_star, (fx.B, 3)), fx.raw_batch(3))
  fit = router.TaskFit(
    parametrisation="free",
    regulariser="none",
    reg_weight=0.0,
    population=16,
    generations=30,
    sigma0=0.3,
  )
  theta, _ = router.fit_task_cmaes(graphdef, frozen, grown, fx.SCALE, batch, fit)
  np.testing.assert_allclose(theta, w_star, atol=0.1)
  with pytest.raises(ValueError, match="does not fit the stack"):
    serving.add_skills(
      stacked, {t: {k: v[:, :1] for k, v in leaf.items()} for t, leaf in new.items()}
    )
