"""AdaLoRA rank allocation as an optax GradientTransformation, with PEFT's exact semantics.

The adapters are a dict {target: {"A": ([S,] L, r0, in), "E": ([S,] L, r0), "B": ([S,] L, out, r0)}}
(see peft/adapters.py). `adalora(inner, cfg)` wraps any optax optimizer: it runs `inner`, then does
what PEFT's `AdaLoraModel.update_and_allocate(t)` does after `optimizer.step()` — sensitivity
EMAs, the cubic budget schedule, the global triplet ranking and the in-place zeroing of pruned
singular values — all inside jit with static shapes. Leading axes before L (the skill axis S)
are independent allocation problems: each skill ranks its own n = targets x layers matrices
against its own budget.

Step convention: the allocator counts optimizer updates itself. The first update is t = 0,
as in PEFT's own examples (`update_and_allocate(global_step)` with global_step starting at 0
and incremented after the call). Under `optax.MultiSteps(adalora(...), k)` t counts optimizer
updates, not micro-batches, and the importance is computed from the accumulated gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdkif_jax.peft import adapters as adapters_lib


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
  """AdaLoRA hyperparameters (PEFT `AdaLoraConfig` names and defaults; deltaT -> delta_t)."""

  init_r: int = 12  # initial rank r0 of every adapted matrix; b_0 = n * init_r
  target_r: int = 8  # average final rank; b_T = n * target_r
  tinit: int = 0  # warm-up steps without masking
  tfinal: int = 0  # LENGTH of the final phase with a frozen pattern (not a time point)
  delta_t: int = 1  # mask every delta_t steps during the budgeting phase
  beta1: float = 0.85  # sensitivity EMA
  beta2: float = 0.85  # uncertainty EMA
  total_step: int | None = None  # T, in optimizer updates; required
  orth_reg_weight: float = 0.5  # gamma
  orth_reg_form: str = "peft"  # "peft": mean of unsquared norms; "paper": sum of squared norms
  sensitivity: str = "post_update"  # "post_update" (PEFT, loralib) | "pre_update" (paper Alg. 1)
  lora_alpha: float = 8.0
  scale_convention: str = "peft"  # see adapters.adapter_scale

  def scale(self) -> float:
    """The adapter multiplier for AdapterCtx(scale=...)."""
    return adapters_lib.adapter_scale(self.lora_alpha, self.init_r, self.scale_convention)

  def validate(self) -> None:
    """Raise ValueError for a schedule PEFT would crash on late (or silently mis-train)."""
    T = self.total_step
    if T is None or T <= 0:
      raise ValueError(f"AdaLoRA needs total_step > 0 (optimizer updates), got {T}")
    if self.tinit < 0 or self.tfinal < 0:
      raise ValueError(f"tinit and tfinal must be >= 0, got {self.tinit}, {self.tfinal}")
    if self.tinit >= T - self.tfinal:
      raise ValueError(
        f"no budgeting phase: need tinit < total_step - tfinal, got tinit={self.tinit}, "
        f"total_step={T}, tfinal={self.tfinal} (tfinal is a duration, not a time point)"
      )
    if self.delta_t < 1:
      raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")
    if not 0 <= self.target_r <= self.init_r or self.init_r < 1:
      raise ValueError(
        f"need 0 <= target_r <= init_r and init_r >= 1, got {self.target_r}, {self.init_r}"
      )
    for name in ("beta1", "beta2"):
      if not 0.0 < getattr(self, name) < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
    if self.orth_reg_weight < 0:
      raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
    if self.orth_reg_form not in ("peft", "paper"):
      raise ValueError(f"orth_reg_form must be 'peft' or 'paper', got {self.orth_reg_form!r}")
    if self.sensitivity not in ("post_update", "pre_update"):
      raise ValueError(f"sensitivity must be post_update|pre_update, got {self.sensitivity!r}")


def peft_config_kwargs(cfg: AdaLoraConfig) -> dict:
  """The same settings as keyword arguments of PEFT's AdaLoraConfig (for parity and export)."""
  return dict(
    init_r=cfg.init_r,
    target_r=cfg.target_r,
    tinit=cfg.tinit,
    tfinal=cfg.tfinal,
    deltaT=cfg.delta_t,
    beta1=cfg.beta1,
    beta2=cfg.beta2,
    total_step=cfg.total_step,
    orth_reg_weight=cfg.orth_reg_weight,
    lora_alpha=cfg.lora_alpha,
  )


# ----------------------------------------------------------------------------- budget schedule


@functools.lru_cache(maxsize=64)
def budget_breaks(
  tinit: int, tfinal: int, total_step: int, init_bgt: int, target_bgt: int
) -> np.ndarray:
  """Steps at which the budget first drops to b_0-1, b_0-2, ..., b_T (int32, ascending).

  Evaluated once on the host in float64 with PEFT's exact expression
  int((b0 - bT) * (1 - (t - tinit) / D) ** 3 + bT), because float32 on device disagrees with
  PEFT's double arithmetic at about 1e-4 of steps. The budget is non-increasing in t, so
  b(t) = b0 - #{breaks <= t}: exact, and the table is b0 - bT long whatever T is.
  """
  D = total_step - tfinal - tinit
  t = np.arange(tinit + 1, total_step - tfinal + 1, dtype=np.int64)
  mul = 1 - (t - tinit) / D
  budget = ((init_bgt - target_bgt) * (mul**3) + target_bgt).astype(np.int64)  # trunc, as int()
  levels = np.arange(init_bgt - 1, target_bgt - 1, -1)
  first = np.searchsorted(-budget, -levels, side="left")
  never = np.iinfo(np.int32).max  # a level the float arithmetic skips is never reached
  breaks = np.where(first < len(t), t[np.minimum(first, len(t) - 1)], never)
  return breaks.astype(np.int32)


def budget_schedule(
  step: jax.Array | int,
  *,
  tinit: int,
  tfinal: int,
  total_step: int,
  delta_t: int,
  init_bgt: int,
  target_bgt: int,
) -> tuple[jax.Array, jax.Array]:
  """PEFT's `RankAllocator.budget_schedule(step)` as (budget int32, mask_ind bool).

  Pure jnp on a traced step (any shape); only the static schedule is read on the host.
  """
  step = jnp.asarray(step, jnp.int32)
  breaks = jnp.asarray(budget_breaks(tinit, tfinal, total_step, init_bgt, target_bgt))
  cubic = init_bgt - jnp.searchsorted(breaks, step, side="right").astype(jnp.int32)
  warm = step <= tinit
  final = step > total_step - tfinal
  budget = jnp.where(warm, init_bgt, jnp.where(final, target_bgt, cubic)).astype(jnp.int32)
  mask_ind = ~warm & (final | (step % delta_t == 0))
  return budget, mask_ind


# ----------------------------------------------------------------------------- scores, masks


def is_svd_leaf(x: Any) -> bool:
  return isinstance(x, dict) and set(x) == {"A", "E", "B"}


def triplet_scores(ipt: dict, unc: dict) -> dict:
  """Eq. 9 per target: s(E_i) + mean_j s(A[i, j]) + mean_j s(B[j, i]), shape ([S,] L, r0).

  s = Ibar * Ubar elementwise (Eq. 13). The sum order E + (A + B) follows PEFT's _combine_ipt.
  """
  out = {}
  for t in sorted(ipt):
    s = {k: ipt[t][k] * unc[t][k] for k in ("A", "E", "B")}
    out[t] = s["E"] + (jnp.mean(s["A"], axis=-1) + jnp.mean(s["B"], axis=-2))
  return out


def keep_top(scores_GN: jax.Array, budget: jax.Array) -> jax.Array:
  """Boolean keep-mask with exactly `budget` True per row of scores [..., N].

  The N - budget smallest scores are pruned; ties break by flat index (lower index pruned
  first), so unlike PEFT's `score <= kthvalue` no tie can over-prune.
  """
  n = scores_GN.shape[-1]
  order = jnp.argsort(scores_GN, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)  # inverse permutation
  return rank >= (n - budget)


def allocate(scores: dict, budget: jax.Array) -> dict:
  """One global ranking over all matrices of each skill; returns {target: ([S,] L, r0) bool}."""
  targets = sorted(scores)
  lead = scores[targets[0]].shape[:-2]
  flat = [scores[t].reshape(*lead, -1) for t in targets]
  keep = keep_top(jnp.concatenate(flat, axis=-1), budget)
  sizes = np.cumsum([f.shape[-1] for f in flat])[:-1]
  parts = jnp.split(keep, sizes, axis=-1)
  return {t: p.reshape(scores[t].shape) for t, p in zip(targets, parts, strict=True)}


def num_matrices(adapters: dict) -> int:
  """n: adapted matrices per skill (targets x layers)."""
  return sum(leaf["E"].shape[-2] for leaf in adapters.values())


# ----------------------------------------------------------------------------- the transform


class AdaLoraState(NamedTuple):
  """Allocator state: checkpoint it with the train state to resume an allocation exactly."""

  count: jax.Array  # int32: optimizer updates done = PEFT's global_step of the next update
  ipt: Any  # sensitivity EMA Ibar, f32, adapter-shaped
  unc: Any  # uncertainty EMA Ubar, f32, adapter-shaped
  mask: Any  # {target: ([S,] L, r0) bool}: the rank pattern of the latest allocation
  budget: jax.Array  # int32: budget of the latest allocation (for logging)
  inner_state: Any


def _check_adapters(params: dict, cfg: AdaLoraConfig) -> None:
  if not isinstance(params, dict) or not params:
    raise ValueError("adalora expects the adapter dict {target: {'A','E','B'}} as params")
  for t, leaf in params.items():
    if not is_svd_leaf(leaf):
      raise ValueError(f"adapter {t!r} is not in SVD form {{A, E, B}}: keys {sorted(leaf)}")
    if leaf["E"].shape[-1] != cfg.init_r:
      raise ValueError(f"adapter {t!r} has rank {leaf['E'].shape[-1]}, config init_r={cfg.init_r}")
  leads = {leaf["E"].shape[:-2] for leaf in params.values()}
  if len(leads) != 1:
    raise ValueError(f"adapters disagree on their leading (skill) axes: {leads}")


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _sensitivity_ema(theta, grads, cfg: AdaLoraConfig, avgs):
  """PEFT update_ipt: |θ·g| into the sensitivity EMA, then the uncertainty EMA, which uses the
  NEW sensitivity EMA."""
  ipt_avg, unc_avg = avgs
  ipt = jax.tree.map(lambda p, g: jnp.abs(_f32(p) * _f32(g)), theta, grads)
  ipt_avg = jax.tree.map(lambda a, i: cfg.beta1 * a + (1 - cfg.beta1) * i, ipt_avg, ipt)
  unc_avg = jax.tree.map(
    lambda u, i, a: cfg.beta2 * u + (1 - cfg.beta2) * jnp.abs(i - a), unc_avg, ipt, ipt_avg
  )
  return ipt_avg, unc_avg


def _zero_pruned(updates: dict, params: dict, mask: dict, apply: jax.Array) -> dict:
  """Updates that set every pruned E to 0 when `apply` (u' = -θ where pruned: θ + u' == 0)."""
  out = {}
  for tgt, u in updates.items():
    prune = apply & ~mask[tgt]
    out[tgt] = {**u, "E": jnp.where(prune, -params[tgt]["E"], u["E"]).astype(u["E"].dtype)}
  return out


def adalora(
  inner: optax.GradientTransformation, cfg: AdaLoraConfig
) -> optax.GradientTransformation:
  """Wrap `inner` with AdaLoRA's rank allocator (PEFT's update_and_allocate, inside jit).

  The config is validated here, before any compute. Wrap gradient accumulation around this
  (`optax.MultiSteps(adalora(inner, cfg), k)`), not inside it.
  """
  cfg.validate()
  T, tfinal = cfg.total_step, cfg.tfinal
  t_final = T - tfinal  # the forced final allocation happens at this step

  def init_fn(params):
    _check_adapters(params, cfg)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    mask = {t: jnp.ones(leaf["E"].shape, jnp.bool_) for t, leaf in params.items()}
    n = num_matrices(params)
    return AdaLoraState(
      count=jnp.zeros([], jnp.int32),
      ipt=zeros,
      unc=jax.tree.map(jnp.zeros_like, zeros),
      mask=mask,
      budget=jnp.asarray(n * cfg.init_r, jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("adalora needs params: call tx.update(grads, state, params)")
    updates, inner_state = inner.update(grads, state.inner_state, params)
    t = state.count
    n = num_matrices(params)
    schedule = functools.partial(
      budget_schedule,
      tinit=cfg.tinit,
      tfinal=tfinal,
      total_step=T,
      delta_t=cfg.delta_t,
      init_bgt=n * cfg.init_r,
      target_bgt=n * cfg.target_r,
    )
    theta = params
    if cfg.sensitivity == "post_update":
      theta = jax.tree.map(lambda p, u: _f32(p) + _f32(u), params, updates)
    ema = functools.partial(_sensitivity_ema, theta, grads, cfg)
    in_budget = t < t_final
    ipt_avg, unc_avg = jax.lax.cond(in_budget, ema, lambda a: a, (state.ipt, state.unc))

    is_final = t == t_final
    budget, mask_ind = schedule(t)
    do_alloc = (in_budget & mask_ind) | is_final
    mask, budget = jax.lax.cond(
      do_alloc,
      lambda: (allocate(triplet_scores(ipt_avg, unc_avg), budget), budget),
      lambda: (state.mask, state.budget),
    )
    # PEFT reset_ipt() after the forced allocation; the EMAs are unused from then on.
    ipt_avg, unc_avg = jax.lax.cond(
      is_final, lambda a: jax.tree.map(jnp.zeros_like, a), lambda a: a, (ipt_avg, unc_avg)
    )
    # PEFT zeroes pruned E in place after optimizer.step(): at each allocation, and every
    # step of the final phase. As an update: u' = -theta where pruned, so theta + u' == 0.
    new_updates = _zero_pruned(updates, params, mask, do_alloc | (t > t_final))
    new_state = AdaLoraState(
      count=optax.safe_increment(t),
      ipt=ipt_avg,
      unc=unc_avg,
      mask=mask,
      budget=budget,
      inner_state=inner_state,
    )
    return new_updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def find_state(opt_state: Any) -> AdaLoraState:
  """The AdaLoraState inside an optimizer state (e.g. under MultiSteps or chain)."""
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaLoraState))
    if isinstance(s, AdaLoraState)
  ]
  if len(found) != 1:
    raise ValueError(f"expected exactly one AdaLoraState, found {len(found)}")
  return found[0]


def allocator_metrics(state: AdaLoraState) -> dict:
  """Scalar metrics: current budget and the mean kept rank (per skill when S is present)."""
  kept = sum(jnp.sum(m, axis=(-2, -1)) for m in state.mask.values())
  n = sum(m.shape[-2] for m in state.mask.values())
  return {"adalora/budget": state.budget, "adalora/mean_rank": kept / n}


# ----------------------------------------------------------------------------- orth regulariser


def _safe_norm(sq: jax.Array) -> jax.Array:
  """sqrt with a zero (not NaN) gradient at 0."""
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def orth_reg(adapters: dict, form: str = "peft") -> jax.Array:
  """Orthogonality penalty on all A (A Aᵀ = I) and B (Bᵀ B = I), f32, shape = leading axes.

  "peft": mean over the 2n matrices of the UNsquared Frobenius norms ‖AAᵀ−I‖, ‖BᵀB−I‖
  (AdaLoraModel.forward; computed on the full r0 rows, pruned triplets included).
  "paper": Eq. 4, sum over k of the squared norms. With a skill axis the result is one value
  per skill (sum it into the loss: skills are independent).
  """
  sq_norms = []
  for t in sorted(adapters):
    a = adapters[t]["A"].astype(jnp.float32)
    b = adapters[t]["B"].astype(jnp.float32)
    eye = jnp.eye(a.shape[-2], dtype=jnp.float32)
    ga = jnp.einsum("...ri,...si->...rs", a, a) - eye
    gb = jnp.einsum("...or,...os->...rs", b, b) - eye
    sq_norms += [jnp.sum(ga * ga, axis=(-2, -1)), jnp.sum(gb * gb, axis=(-2, -1))]
  sq = jnp.concatenate(sq_norms, axis=-1)  # ([S,] 2n)
  if form == "peft":
    return jnp.mean(_safe_norm(sq), axis=-1)
  if form == "paper":
    return jnp.sum(sq, axis=-1)
  raise ValueError(f"orth_reg form must be 'peft' or 'paper', got {form!r}")


def orth_penalty(adapters: dict, cfg: AdaLoraConfig) -> jax.Array:
  """gamma * R, summed over skills (independent), to add to the task loss inside the loss fn."""
  return cfg.orth_reg_weight * jnp.sum(orth_reg(adapters, cfg.orth_reg_form))
