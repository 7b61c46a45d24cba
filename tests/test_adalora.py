"""The AdaLoRA allocator's behaviour: budgets, ties, phases, skills, accumulation, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdkif_jax import sharding
from mdkif_jax.peft import adapters as ad
from mdkif_jax.peft.adalora import (
  AdaLoraConfig,
  adalora,
  allocator_metrics,
  budget_schedule,
  find_state,
  keep_top,
  num_matrices,
  orth_penalty,
  orth_reg,
)

DIMS = ad.llama_target_dims(hidden=16, heads=2, kv_heads=1, head_dim=8, ffn=24)
L, R0, RT = 2, 4, 2
CFG = AdaLoraConfig(init_r=R0, target_r=RT, tinit=2, tfinal=4, delta_t=3, total_step=16)


def random_grads(adapters, step, seed=0):
  """Standard-normal gradients shaped like the adapters (numpy RNG: fast, deterministic)."""
  rng = np.random.default_rng(seed * 1000 + step)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapters)


def run(tx, adapters, grads_fn, steps):
  """Apply tx for `steps` updates; returns the adapters and states after every step."""
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state, grads):
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state

  history = []
  for t in range(steps):
    adapters, state = step(adapters, state, grads_fn(adapters, t))
    history.append((adapters, state))
  return history, step


def schedule(cfg, n, t):
  b, m = budget_schedule(
    t,
    tinit=cfg.tinit,
    tfinal=cfg.tfinal,
    total_step=cfg.total_step,
    delta_t=cfg.delta_t,
    init_bgt=n * cfg.init_r,
    target_bgt=n * cfg.target_r,
  )
  return int(b), bool(m)


def kept(state):
  return sum(int(m.sum()) for m in find_state(state).mask.values())


def test_keep_top_keeps_exactly_budget_with_ties():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.integers(0, 3, (3, 40)).astype(np.float32))  # heavy ties
  for b in range(41):
    keep = np.asarray(keep_top(scores, jnp.int32(b)))
    assert (keep.sum(-1) == b).all()
    s = np.asarray(scores)
    for row in range(3):  # every kept score >= every pruned score
      if 0 < b < 40:
        assert s[row][keep[row]].min() >= s[row][~keep[row]].max()


def test_every_allocation_keeps_exactly_the_budget_even_when_all_scores_tie():
  adapters = ad.init_adalora(jax.random.key(0), DIMS, L, R0)
  n = num_matrices(adapters)
  zero = lambda a, t: jax.tree.map(jnp.zeros_like, a)  # all scores 0: one big tie
  cfg = dataclasses.replace(CFG, delta_t=1)
  history, _ = run(adalora(optax.sgd(0.1), cfg), adapters, zero, cfg.total_step + 2)
  allocations = 0
  for t, (_, state) in enumerate(history):
    b, mask_ind = schedule(cfg, n, t)
    if mask_ind:
      assert kept(state) == b, t
      assert int(find_state(state).budget) == b
      allocations += 1
  assert allocations == cfg.total_step + 2 - cfg.tinit - 1
  assert kept(history[-1][1]) == n * RT


def test_emas_follow_peft_order_and_mode():
  """After the first update: Ibar = (1-β1)|θ·g|, Ubar = (1-β2)|I - Ibar| with θ post/pre step."""
  adapters = ad.init_adalora(jax.random.key(1), DIMS, L, R0)
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # non-zero E too
  g = random_grads(adapters, 0)
  lr = 0.1
  for mode in ("post_update", "pre_update"):
    cfg = dataclasses.replace(CFG, sensitivity=mode)
    tx = adalora(optax.sgd(lr), cfg)
    _, state = tx.update(g, tx.init(adapters), adapters)
    s = find_state(state)
    for tgt in DIMS:
      for k in ("A", "E", "B"):
        p, gk = np.asarray(adapters[tgt][k]), np.asarray(g[tgt][k])
        theta = p - lr * gk if mode == "post_update" else p
        ipt = np.abs(theta * gk)
        ibar = (1 - cfg.beta1) * ipt
        np.testing.assert_allclose(s.ipt[tgt][k], ibar, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(s.unc[tgt][k], (1 - cfg.beta2) * np.abs(ipt - ibar), rtol=1e-5)


def test_phases_reset_freeze_and_revival():
  adapters = ad.init_adalora(jax.random.key(2), DIMS, L, R0)
  cfg = CFG
  t_final = cfg.total_step - cfg.tfinal
  tx = adalora(optax.adam(1e-2), cfg)
  history, step = run(tx, adapters, lambda a, t: random_grads(a, t), cfg.total_step + 4)
  states = [find_state(s) for _, s in history]
  nonzero = lambda tree: any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(tree))
  # EMAs accumulate during budgeting, are reset by the forced final allocation, stay reset.
  assert nonzero(states[t_final - 1].ipt) and nonzero(states[t_final - 1].unc)
  for t in range(t_final, len(states)):
    assert not nonzero(states[t].ipt) and not nonzero(states[t].unc), t
  # From T - tfinal on the pattern is frozen and re-applied every step, while kept E move.
  final_mask = states[t_final].mask
  for t in range(t_final, len(states)):
    adapters_t = history[t][0]
    for tgt in DIMS:
      np.testing.assert_array_equal(states[t].mask[tgt], final_mask[tgt])
      e = np.asarray(adapters_t[tgt]["E"])
      assert (e[~np.asarray(final_mask[tgt])] == 0).all()
      assert (e[np.asarray(final_mask[tgt])] != 0).all()
  # Between mask events of the budgeting phase a pruned E may revive (PEFT, paper: a feature).
  mask_steps = [t for t in range(cfg.tinit + 1, t_final) if t % cfg.delta_t == 0]
  t0 = mask_steps[0]
  pruned = {tgt: ~np.asarray(states[t0].mask[tgt]) for tgt in DIMS}
  assert sum(p.sum() for p in pruned.values()) > 0
  for tgt in DIMS:
    assert (np.asarray(history[t0][0][tgt]["E"])[pruned[tgt]] == 0).all()
  revived = sum((np.asarray(history[t0 + 1][0][tgt]["E"])[pruned[tgt]] != 0).sum() for tgt in DIMS)
  assert revived > 0
  # One compilation covers warm-up, budgeting, the forced allocation and the final phase.
  assert step._cache_size() == 1
  m = allocator_metrics(states[-1])
  assert int(m["adalora/budget"]) == num_matrices(adapters) * RT
  np.testing.assert_allclose(float(m["adalora/mean_rank"]), RT)


def test_skill_axis_equals_separate_runs():
  S = 3
  per_skill = [ad.init_adalora(jax.random.key(10 + s), DIMS, L, R0) for s in range(S)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_skill)
  steps = CFG.total_step + 2

  def grads_s(s):
    return lambda a, t: random_grads(a, t, seed=s + 1)

  def grads_stacked(a, t):
    one = jax.tree.map(lambda x: x[0], a)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[grads_s(s)(one, t) for s in range(S)])

  tx = adalora(optax.adamw(1e-2, weight_decay=0.01), CFG)
  hist_all, _ = run(tx, stacked, grads_stacked, steps)
  final_all, state_all = hist_all[-1]
  masks_all = find_state(state_all).mask
  differ = False
  for s in range(S):
    final_s, state_s = run(tx, per_skill[s], grads_s(s), steps)[0][-1]
    for tgt in DIMS:
      np.testing.assert_array_equal(masks_all[tgt][s], find_state(state_s).mask[tgt])
      for k in ("A", "E", "B"):
        np.testing.assert_allclose(final_all[tgt][k][s], final_s[tgt][k], rtol=1e-6, atol=1e-7)
    differ |= any(not np.array_equal(masks_all[tgt][s], masks_all[tgt][0]) for tgt in DIMS if s > 0)
  assert differ  # skills really were ranked separately (different patterns)
  assert (np.asarray(find_state(state_all).budget) == num_matrices(per_skill[0]) * RT).all()


def test_multisteps_uses_accumulated_gradient_once_per_update():
  adapters = ad.init_adalora(jax.random.key(3), DIMS, L, R0)
  k = 2
  micro = lambda a, i: random_grads(a, i, seed=7)
  mean = lambda a, t: jax.tree.map(lambda x, y: (x + y) / 2, micro(a, 2 * t), micro(a, 2 * t + 1))
  tx = adalora(optax.sgd(0.2), CFG)
  ref, _ = run(tx, adapters, mean, CFG.total_step)
  got, _ = run(optax.MultiSteps(tx, k), adapters, micro, k * CFG.total_step)
  for t in range(CFG.total_step):
    params_ref, state_ref = ref[t]
    params_got, state_got = got[k * t + k - 1]
    assert int(find_state(state_got).count) == t + 1
    for tgt in DIMS:
      np.testing.assert_array_equal(
        find_state(state_got).mask[tgt], find_state(state_ref).mask[tgt]
      )
      for name in ("A", "E", "B"):
        np.testing.assert_allclose(params_got[tgt][name], params_ref[tgt][name], atol=1e-6)


def test_optimizer_state_only_mirrors_adapters():
  adapters = ad.init_adalora(jax.random.key(4), DIMS, L, R0)
  state = adalora(optax.adamw(1e-3), CFG).init(adapters)
  s = find_state(state)
  adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
  for x in jax.tree.leaves(s.inner_state):
    assert x.ndim == 0 or x.shape in adapter_shapes
  assert jax.tree.structure(s.ipt) == jax.tree.structure(adapters)


def test_sharded_steps_equal_single_device():
  adapters = ad.init_adalora(jax.random.key(5), DIMS, L, R0, num_skills=2)
  rules = dict(sharding.DEFAULT_RULES)
  rules.update(adapter_in="fsdp", adapter_out="tensor", layers="data")
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = jax.tree.map(
    lambda names, x: sharding.named_sharding(mesh, names, x.shape, tuple(rules.items())),
    ad.adapter_logical_axes(adapters),
    adapters,
    is_leaf=lambda x: isinstance(x, tuple),
  )
  tx = adalora(optax.adam(1e-2), CFG)
  grads = lambda a, t: random_grads(a, t, seed=3)
  ref, _ = run(tx, adapters, grads, CFG.total_step + 1)

  sharded = jax.device_put(adapters, shardings)
  got, _ = run(tx, sharded, lambda a, t: jax.device_put(grads(a, t), shardings), len(ref))
  assert len(got[-1][0]["gate"]["A"].sharding.device_set) == 8
  assert not got[-1][0]["gate"]["A"].sharding.is_fully_replicated
  for (p_ref, s_ref), (p_got, s_got) in zip(ref, got, strict=True):
    for tgt in DIMS:
      np.testing.assert_array_equal(find_state(s_got).mask[tgt], find_state(s_ref).mask[tgt])
      for name in ("A", "E", "B"):
        np.testing.assert_allclose(p_got[tgt][name], p_ref[tgt][name], rtol=1e-6, atol=1e-7)


def test_orth_penalty_sums_independent_skills():
  per_skill = [ad.init_adalora(jax.random.key(20 + s), DIMS, L, R0) for s in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_skill)
  for form in ("peft", "paper"):
    cfg = dataclasses.replace(CFG, orth_reg_form=form, orth_reg_weight=0.3)
    per = orth_reg(stacked, form)
    assert per.shape == (3,)
    for s in range(3):
      np.testing.assert_allclose(per[s], orth_reg(per_skill[s], form), rtol=1e-6)
    want = 0.3 * sum(float(orth_reg(a, form)) for a in per_skill)
    np.testing.assert_allclose(float(orth_penalty(stacked, cfg)), want, rtol=1e-6)
  assert CFG.scale() == ad.adapter_scale(CFG.lora_alpha, CFG.init_r)
