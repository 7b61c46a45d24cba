"""Adapter init, ΔW, merge/unmerge, skill mixtures and compaction to kept ranks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax.peft import adapters as ad
from mdkif_jax.peft import serving

DIMS = ad.llama_target_dims(hidden=16, heads=2, kv_heads=1, head_dim=8, ffn=24)
L, R0 = 3, 6


def with_random_e(adapters, seed=0):
  rng = np.random.default_rng(seed)
  return {
    t: {**leaf, "E": jnp.asarray(rng.standard_normal(leaf["E"].shape), jnp.float32)}
    for t, leaf in adapters.items()
  }


def kernels(seed=1):
  rng = np.random.default_rng(seed)
  return {t: jnp.asarray(rng.standard_normal((L, i, o)), jnp.float32) for t, (i, o) in DIMS.items()}


def test_init_shapes_and_identity():
  a = ad.init_adalora(jax.random.key(0), DIMS, L, R0, num_skills=2)
  x = jnp.ones((2, 5, 16))
  for t, (i, o) in DIMS.items():
    assert a[t]["A"].shape == (2, L, R0, i) and a[t]["B"].shape == (2, L, o, R0)
    assert a[t]["E"].shape == (2, L, R0) and not a[t]["E"].any()
    assert 0.015 < float(jnp.std(a[t]["A"])) < 0.025 and 0.015 < float(jnp.std(a[t]["B"])) < 0.025
    assert not np.array_equal(a[t]["A"][0], a[t]["A"][1])  # skills drawn independently
    assert not ad.delta_weight(a[t], 1.0).any()
  layer0 = jax.tree.map(lambda v: v[:, 0], a["q"])
  ctx = ad.AdapterCtx(scale=1.0, skill_ids=jnp.array([0, 1]))
  assert not ad.delta(x, layer0, ctx).any()


def test_init_lora_matches_peft_distributions():
  a = ad.init_lora(jax.random.key(1), DIMS, L, 8)
  for t, (i, _) in DIMS.items():
    assert float(jnp.abs(a[t]["A"]).max()) <= 1 / np.sqrt(i)
    assert float(jnp.abs(a[t]["A"]).max()) > 0.9 / np.sqrt(i)
    assert not a[t]["B"].any()
  g = ad.init_lora(jax.random.key(1), DIMS, L, 8, init="gaussian")
  np.testing.assert_allclose(float(jnp.std(g["gate"]["A"])), 1 / 8, rtol=0.1)
  with pytest.raises(ValueError, match="unknown LoRA init"):
    ad.init_lora(jax.random.key(1), DIMS, L, 8, init="orthogonal")


def test_scale_conventions_and_targets():
  assert ad.adapter_scale(8, 12) == pytest.approx(8 / 12.00001)
  assert ad.adapter_scale(0, 12) == pytest.approx(12 / 12.00001)
  assert ad.adapter_scale(16, 8, "alpha_over_r") == 2.0
  assert ad.adapter_scale(16, 4, "rslora") == 8.0
  assert ad.select_targets() == ad.TARGETS
  assert ad.select_targets(["q", "v"]) == ("q", "v")
  assert ad.select_targets("gate|up|down") == ("gate", "up", "down")
  with pytest.raises(ValueError, match="no adapter target"):
    ad.select_targets("q_proj")


def test_delta_equals_delta_weight_in_kernel_layout():
  a = with_random_e(ad.init_adalora(jax.random.key(2), DIMS, L, R0))
  scale = ad.adapter_scale(8, R0)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 24)), jnp.float32)
  for t in ("gate", "down"):
    i = DIMS[t][0]
    for layer in range(L):
      leaf = jax.tree.map(lambda v, layer=layer: v[layer], a[t])
      got = ad.delta(x[..., :i], leaf, ad.AdapterCtx(scale=scale))
      want = x[..., :i] @ ad.delta_weight(a[t], scale)[layer]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["plain", "one_skill", "skill_ids", "weights"])
def test_deltas_of_projections_sharing_an_input_equal_each_delta_and_its_gradient(mode):
  """q, k, v (and gate, up) run their down-products as one product on the stacked ranks:
  the same deltas, and the same gradients for x and every adapter factor, as one delta per
  projection, in every AdapterCtx mode."""
  skills = {"plain": None, "one_skill": 1, "skill_ids": 3, "weights": 3}[mode]
  a = with_random_e(ad.init_adalora(jax.random.key(7), DIMS, L, R0, num_skills=skills))
  layer = {t: jax.tree.map(lambda v: v[:, 1] if skills else v[1], a[t]) for t in ("q", "k", "v")}
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
  ctx = {
    "plain": ad.AdapterCtx(scale=0.7),
    "one_skill": ad.AdapterCtx(scale=0.7, skill_ids=jnp.zeros(3, jnp.int32)),
    "skill_ids": ad.AdapterCtx(scale=0.7, skill_ids=jnp.array([2, 0, 2])),
    "weights": ad.AdapterCtx(scale=0.7, weights=jnp.asarray(rng.random((3, 3)), jnp.float32)),
  }[mode]
  cot = {t: jnp.asarray(rng.standard_normal((3, 5, DIMS[t][1])), jnp.float32) for t in layer}

  def loss(x, leaves, grouped):
    names = list(leaves)
    if grouped:
      outs = ad.deltas(x, [leaves[t] for t in names], ctx)
    else:
      outs = [ad.delta(x, leaves[t], ctx) for t in names]
    return sum(jnp.sum(o * cot[t]) for o, t in zip(outs, names, strict=True)), outs

  (l1, o1), g1 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, layer, True)
  (l2, o2), g2 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, layer, False)
  for got, want in zip(o1, o2, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(g1[1]["k"]["E"]).max()) > 0  # the factors do get gradients
  assert ad.deltas(x, [], ctx) == []


def test_merge_unmerge_round_trip():
  a = with_random_e(ad.init_adalora(jax.random.key(4), DIMS, L, R0))
  w = kernels()
  scale = 0.5
  merged = serving.merge(w, a, scale)
  for t in DIMS:
    np.testing.assert_allclose(merged[t], w[t] + ad.delta_weight(a[t], scale), rtol=1e-6)
    assert not np.allclose(merged[t], w[t])
  back = serving.unmerge(merged, a, scale)
  for t in DIMS:
    np.testing.assert_allclose(back[t], w[t], atol=1e-6)
  only_q = serving.merge(w, {"q": a["q"]}, scale)
  assert only_q["k"] is w["k"]


def test_mixture_merge_equals_weighted_deltas_and_routed_forward():
  S = 3
  a = with_random_e(ad.init_adalora(jax.random.key(5), DIMS, L, R0, num_skills=S))
  w = kernels()
  wts = jnp.array([0.2, 0.5, 0.3])
  scale = 0.7
  mixed = serving.merge_mixture(w, a, wts, scale)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 4, 16)), jnp.float32)
  for t in ("q", "up"):
    want = w[t] + sum(
      wts[s] * ad.delta_weight(jax.tree.map(lambda v, s=s: v[s], a[t]), scale) for s in range(S)
    )
    np.testing.assert_allclose(mixed[t], want, rtol=1e-5, atol=1e-6)
    leaf = jax.tree.map(lambda v: v[:, 1], a[t])  # layer 1
    routed = ad.delta(x, leaf, ad.AdapterCtx(scale=scale, weights=wts[None]))
    np.testing.assert_allclose(x @ mixed[t][1], x @ w[t][1] + routed, rtol=1e-4, atol=1e-5)


def test_serving_stack_packs_kept_ranks_and_keeps_every_mixture():
  S = 3
  a = with_random_e(ad.init_adalora(jax.random.key(10), DIMS, L, R0, num_skills=S), seed=11)
  rng = np.random.default_rng(12)
  masks = {t: rng.random(leaf["E"].shape) < 0.3 for t, leaf in a.items()}
  masks["k"][...] = False  # a target pruned to rank 0 everywhere
  pruned = {t: {**leaf, "E": leaf["E"] * masks[t]} for t, leaf in a.items()}
  served = serving.serving_stack(pruned, bucket=4)
  x = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)
  w_BS = jnp.asarray(rng.standard_normal((2, S)), jnp.float32)
  for t, (i, _) in DIMS.items():
    most = int(masks[t].sum(axis=(0, 2)).max())  # kept ranks of all skills, busiest layer
    assert served[t]["A"].shape == (L, min(S * R0, max(4, -(-most // 4) * 4)), i)
    # every rank routes to at most one skill, and exactly the kept ranks route somewhere
    route = np.asarray(served[t]["route"])
    assert set(np.unique(route)) <= {0.0, 1.0} and (route.sum(-1) <= 1).all()
    np.testing.assert_array_equal(route.sum(axis=(1, 2)), masks[t].sum(axis=(0, 2)))
    for layer in range(L):
      leaf = jax.tree.map(lambda v, layer=layer: v[:, layer], pruned[t])
      sl = jax.tree.map(lambda v, layer=layer: v[layer], served[t])
      ctx = ad.AdapterCtx(scale=0.7, weights=w_BS)
      np.testing.assert_allclose(
        ad.delta(x[..., :i], sl, ctx), ad.delta(x[..., :i], leaf, ctx), rtol=1e-5, atol=1e-6
      )
  assert not served["k"]["A"].any()
  wts = jnp.array([0.2, -0.5, 0.3])
  w = kernels()
  for t, got in serving.merge_mixture(w, served, wts, 0.7).items():
    np.testing.assert_allclose(
      got, serving.merge_mixture(w, pruned, wts, 0.7)[t], rtol=1e-5, atol=1e-6
    )
  layer0 = jax.tree.map(lambda v: v[0], served["q"])
  with pytest.raises(ValueError, match="need AdapterCtx"):
    ad.delta(x[..., :16], layer0, ad.AdapterCtx(skill_ids=jnp.zeros(2, jnp.int32)))


@pytest.mark.parametrize("skills", [None, 2])
def test_compaction_keeps_delta_and_pads_to_bucket(skills):
  a = with_random_e(ad.init_adalora(jax.random.key(7), DIMS, L, R0, num_skills=skills), seed=8)
  rng = np.random.default_rng(9)
  masks = {t: rng.random(leaf["E"].shape) < 0.4 for t, leaf in a.items()}
  masks["k"][...] = False  # a target pruned to rank 0 everywhere
  masked = {t: {**leaf, "E": leaf["E"] * masks[t]} for t, leaf in a.items()}
  small, pattern = serving.compact(masked, masks, bucket=4)
  for t in DIMS:
    most = int(masks[t].sum(-1).max())
    r_pad = small[t]["E"].shape[-1]
    assert r_pad == min(R0, -(-most // 4) * 4)
    np.testing.assert_array_equal(pattern[t], masks[t])
    np.testing.assert_allclose(
      ad.delta_weight(small[t], 1.0), ad.delta_weight(masked[t], 1.0), rtol=1e-5, atol=1e-7
    )
    # every kept singular value survives, in its original order
    kept = np.asarray(masked[t]["E"])[masks[t]]
    got = np.asarray(small[t]["E"])
    np.testing.assert_array_equal(np.sort(got[got != 0]), np.sort(kept[kept != 0]))
  assert small["k"]["E"].shape[-1] == 0


def test_peft_rank_pattern_names():
  masks = {"q": np.array([[True, False], [False, False]]), "down": np.array([[1, 1], [0, 1]], bool)}
  rp = serving.peft_rank_pattern(masks)
  assert rp["model.layers.0.self_attn.q_proj.lora_E"] == [True, False]
  assert rp["model.layers.1.mlp.down_proj.lora_E"] == [False, True]
  assert len(rp) == 4
  with pytest.raises(ValueError, match="slice one skill"):
    serving.peft_rank_pattern({"q": np.ones((2, 3, 4), bool)})
