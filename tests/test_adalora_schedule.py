"""Budget schedule vs PEFT's RankAllocator.budget_schedule, and config validation."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from peft.tuners.adalora.layer import RankAllocator

from mdkif_jax.peft.adalora import AdaLoraConfig, adalora, budget_schedule


def peft_schedule(tinit, tfinal, total_step, delta_t, b0, bT, steps):
  """Call PEFT's own budget_schedule (the allocator built without a model)."""
  ra = RankAllocator.__new__(RankAllocator)
  ra.peft_config = types.SimpleNamespace(
    tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=delta_t
  )
  ra.init_bgt, ra.target_bgt = b0, bT
  out = [ra.budget_schedule(int(t)) for t in steps]
  return np.array([b for b, _ in out]), np.array([m for _, m in out])


def ours(tinit, tfinal, total_step, delta_t, b0, bT, steps):
  b, m = budget_schedule(
    jnp.asarray(steps),
    tinit=tinit,
    tfinal=tfinal,
    total_step=total_step,
    delta_t=delta_t,
    init_bgt=b0,
    target_bgt=bT,
  )
  return np.asarray(b), np.asarray(m)


def naive_f32(tinit, tfinal, total_step, b0, bT, steps):
  """The schedule evaluated in float32, as a device would without the host table."""
  f = np.float32
  m = f(1) - (steps - tinit).astype(f) / f(total_step - tfinal - tinit)
  return np.floor(f(b0 - bT) * m * m * m + f(bT)).astype(np.int64)


def test_anchor_values():
  kw = dict(tinit=10, tfinal=20, total_step=100, b0=48, bT=32)
  want = {0: 48, 10: 48, 11: 47, 20: 42, 30: 37, 50: 33, 70: 32, 80: 32, 81: 32}
  steps = list(want)
  b, m = ours(delta_t=1, steps=steps, **kw)
  assert dict(zip(steps, b.tolist(), strict=True)) == want
  assert not m[0] and not m[1] and m[2:].all()
  b, m = ours(delta_t=10, steps=[11, 20], **kw)
  assert b.tolist() == [47, 42] and m.tolist() == [False, True]


def test_grid_equals_peft():
  grid = itertools.product(
    [0, 1, 10],  # tinit
    [0, 1, 20],  # tfinal
    [12, 101],  # total_step
    [1, 3, 10],  # deltaT
    [(48, 32), (12, 12), (2520, 1680), (100, 0), (7, 3)],  # (b0, bT)
  )
  checked = 0
  for tinit, tfinal, T, dt, (b0, bT) in grid:
    if tinit >= T - tfinal:
      continue
    steps = np.arange(0, T + 5)
    want = peft_schedule(tinit, tfinal, T, dt, b0, bT, steps)
    got = ours(tinit, tfinal, T, dt, b0, bT, steps)
    np.testing.assert_array_equal(got[0], want[0], err_msg=str((tinit, tfinal, T, dt, b0, bT)))
    np.testing.assert_array_equal(got[1], want[1], err_msg=str((tinit, tfinal, T, dt, b0, bT)))
    checked += 1
  assert checked > 150


def test_long_schedules_match_peft_double_rounding():
  """Long schedules with wide budgets, where float32 arithmetic would disagree with PEFT."""
  rng = np.random.default_rng(0)
  f32_mismatches = 0
  for _ in range(6):
    T = int(rng.integers(5_000, 20_000))
    tinit = int(rng.integers(0, T // 3))
    tfinal = int(rng.integers(0, T // 3))
    bT = int(rng.integers(0, 3000))
    b0 = bT + int(rng.integers(1, 3000))
    steps = np.arange(0, T + 2)
    want = peft_schedule(tinit, tfinal, T, 7, b0, bT, steps)
    got = ours(tinit, tfinal, T, 7, b0, bT, steps)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    mid = (steps > tinit) & (steps <= T - tfinal)
    f32_mismatches += int((naive_f32(tinit, tfinal, T, b0, bT, steps[mid]) != want[0][mid]).sum())
  assert f32_mismatches > 0  # these configs do exercise the double-rounding cases


def test_schedule_jits_on_traced_step():
  f = jax.jit(
    lambda t: budget_schedule(
      t, tinit=10, tfinal=20, total_step=100, delta_t=10, init_bgt=48, target_bgt=32
    )
  )
  assert [int(f(t)[0]) for t in (11, 20, 30)] == [47, 42, 37]


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(total_step=None), "total_step > 0"),
    (dict(total_step=0), "total_step > 0"),
    (dict(total_step=100, tinit=60, tfinal=40), "no budgeting phase"),
    (dict(total_step=100, tinit=0, tfinal=100), "no budgeting phase"),
    (dict(total_step=100, init_r=4, target_r=8), "target_r <= init_r"),
    (dict(total_step=100, beta1=1.0), "beta1"),
    (dict(total_step=100, beta2=0.0), "beta2"),
    (dict(total_step=100, delta_t=0), "delta_t"),
    (dict(total_step=100, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=100, sensitivity="before"), "sensitivity"),
  ],
)
def test_validation_raises_when_optimizer_is_built(kw, match):
  with pytest.raises(ValueError, match=match):
    adalora(optax.sgd(0.1), AdaLoraConfig(**kw))


def test_valid_config_builds():
  tx = adalora(optax.sgd(0.1), AdaLoraConfig(total_step=100, tinit=10, tfinal=20))
  assert isinstance(tx, optax.GradientTransformation)
