"""Stage 2 routers: weights over frozen skills, the answer-token loss, and merged inference.

Skills are stacked on a leading skill axis S (stage 1's adapters, registry order). A mixture is
always the exact weighted sum of deltas, Σ_s w_s ΔW_s (never P and Q mixed separately):

- task-level weights w ∈ R^S (the paper's router): `task_weights(theta, parametrisation)`,
  fitted by gradient descent (`fit_task_gd`, optax, L1 or entropy regulariser) or by CMA-ES
  (`fit_task_cmaes`, evosax; the whole population is scored by one vmapped, jitted call);
  served by merging Σ_s w_s ΔW_s into a copy of the frozen kernels once
  (`serving.merged_params`), so inference costs exactly the base model's forward;
- an input-conditioned gate (`Gate`): a small MLP on the mean-pooled prompt hidden state of the
  frozen LLM (no adapters) gives per-row softmax weights [B, S] (optionally top-k), applied
  unmerged through `AdapterCtx(weights=...)`, so rows with different mixtures share one pass.

The frozen base (`frozen`) and the skills (`stacked`) are inputs of every jitted function,
never differentiated, donated or given optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mdkif_jax import reporting
from mdkif_jax.peft import serving
from mdkif_jax.peft.adapters import AdapterCtx

PARAMETRISATIONS = ("free", "softmax", "sigmoid")
REGULARISERS = ("none", "l1", "entropy")
F32 = jnp.float32


# ---- task-level weights --------------------------------------------------------------------
def task_weights(theta_S: jax.Array, parametrisation: str) -> jax.Array:
  """Skill weights w [S] from the router's raw parameters."""
  if parametrisation == "free":
    return theta_S
  if parametrisation == "softmax":
    return jax.nn.softmax(theta_S)
  if parametrisation == "sigmoid":
    return jax.nn.sigmoid(theta_S)
  raise ValueError(
    f"router parametrisation must be one of {PARAMETRISATIONS}, got {parametrisation!r}"
  )


def init_theta(num_skills: int, parametrisation: str) -> jax.Array:
  """Raw parameters whose weights are the uniform average 1/S (for every parametrisation)."""
  u = 1.0 / num_skills
  value = {"free": u, "softmax": 0.0, "sigmoid": math.log(u / (1 - u)) if num_skills > 1 else 0.0}
  if parametrisation not in value:
    raise ValueError(
      f"router parametrisation must be one of {PARAMETRISATIONS}, got {parametrisation!r}"
    )
  return jnp.full((num_skills,), value[parametrisation], F32)


def regulariser(w_S: jax.Array, kind: str) -> jax.Array:
  """L1 (sparse, small weights: LoraHub's choice) or the entropy of |w| normalised (peaked)."""
  if kind == "none":
    return jnp.zeros([], F32)
  if kind == "l1":
    return jnp.sum(jnp.abs(w_S))
  if kind == "entropy":
    p = jnp.abs(w_S) / (jnp.sum(jnp.abs(w_S)) + 1e-12)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0))
  raise ValueError(f"router regulariser must be one of {REGULARISERS}, got {kind!r}")


# ---- the answer-token loss -----------------------------------------------------------------
def answer_stats(model, h_BTD: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """Per-row answer-token NLL sum, token count, argmax-correct count (logits at answers only),
  and `choice_logp` [B, C] when the batch carries `choice_ids`: log p(candidate token |
  prompt) at the first answer position, from the same forward.

  A row whose every answer token (EOS included) is the argmax under teacher forcing is exactly
  the row greedy decoding reproduces, so `exact` is greedy exact match at no decoding cost.
  """
  idx = batch["answer_idx"]
  logits = model.logits(jnp.take_along_axis(h_BTD, idx[..., None], axis=1)).astype(F32)
  targets = jnp.take_along_axis(batch["targets"], idx, axis=1)
  valid = batch["answer_valid"].astype(F32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  right = (jnp.argmax(logits, axis=-1) == targets).astype(F32) * valid
  tokens = jnp.sum(valid, axis=1)
  correct = jnp.sum(right, axis=1)
  out = {
    "nll": jnp.sum(nll * valid, axis=1),
    "tokens": tokens,
    "correct": correct,
    "exact": ((correct == tokens) & (tokens > 0)).astype(F32),
  }
  if "choice_ids" in batch:  # label tasks whose candidates are one token each: no extra pass
    first = jnp.take_along_axis(h_BTD, idx[:, :1, None], axis=1)
    logp = jax.nn.log_softmax(model.logits(first)[:, 0].astype(F32), axis=-1)
    out["choice_logp"] = jnp.take_along_axis(logp, batch["choice_ids"], axis=1)
  return out


def mean_nll(stats: dict[str, jax.Array]) -> jax.Array:
  return jnp.sum(stats["nll"]) / jnp.maximum(jnp.sum(stats["tokens"]), 1.0)


def mixture_hidden(graphdef, frozen, stacked, scale, batch, weights_BS=None):
  """(model, final hidden states) of the base + Σ_s w_bs ΔW_s per row; None weights = base."""
  model = nnx.merge(graphdef, frozen)
  kw = {}
  if weights_BS is not None:
    kw = dict(adapters=stacked, adapter_ctx=AdapterCtx(scale, weights=weights_BS))
  h, _ = model.hidden(
    batch["tokens"], positions_BT=batch["positions"], mask_BT=batch["attention_mask"], **kw
  )
  return model, h


def mixture_stats(graphdef, frozen, stacked, scale, batch, weights_BS=None):
  """Answer stats of the base + Σ_s w_bs ΔW_s per row (unmerged); None weights = the base."""
  model, h = mixture_hidden(graphdef, frozen, stacked, scale, batch, weights_BS)
  return answer_stats(model, h, batch)


def descend(step, params, opt_state, batches, steps: int, progress: bool = False, desc="fit"):
  """`steps` calls of step(params, opt_state, batch) -> (params, opt_state, nll), cycling
  through `batches`; (params, [nll per step]) with one device read at the end.

  progress: a bar over the steps (process 0 only), showing the last loss. Dispatch is async,
  so the bar waits for each step (else it would finish at once and the ETA would mean
  nothing); the steps and their results are the same."""
  history = []
  bar = reporting.progress_bar(progress, total=steps, desc=desc, unit="step", leave=False)
  with bar:
    for i in range(steps):
      params, opt_state, nll = step(params, opt_state, batches[i % len(batches)])
      history.append(nll)
      if not bar.disable:
        bar.set_postfix(loss=f"{float(nll):.4f}", refresh=False)
        bar.update()
  return params, [float(x) for x in jax.device_get(history)]


@dataclasses.dataclass(frozen=True)
class TaskFit:
  """How task-level weights are fitted (see configs/router.py for each field)."""

  parametrisation: str = "free"
  regulariser: str = "l1"
  reg_weight: float = 0.05
  steps: int = 100
  learning_rate: float = 0.05
  population: int = 16
  generations: int = 40
  sigma0: float = 0.3
  bounds: tuple[float, float] = (-1.5, 1.5)
  seed: int = 0


def task_loss(theta_S, graphdef, frozen, stacked, scale, batch, fit: TaskFit):
  """Answer NLL under the task mixture + reg_weight * regulariser(w); (total, nll)."""
  w_S = task_weights(theta_S, fit.parametrisation)
  B = batch["tokens"].shape[0]
  stats = mixture_stats(
    graphdef, frozen, stacked, scale, batch, jnp.broadcast_to(w_S, (B, w_S.shape[0]))
  )
  nll = mean_nll(stats)
  return nll + fit.reg_weight * regulariser(w_S, fit.regulariser), nll


@functools.partial(jax.jit, static_argnames=("graphdef", "scale", "fit"))
def _gd_step(theta, opt_state, frozen, stacked, batch, *, graphdef, scale, fit: TaskFit):
  frozen, stacked = jax.lax.stop_gradient((frozen, stacked))
  (_, nll), g = jax.value_and_grad(task_loss, has_aux=True)(
    theta, graphdef, frozen, stacked, scale, batch, fit
  )
  updates, opt_state = optax.adam(fit.learning_rate).update(g, opt_state, theta)
  return optax.apply_updates(theta, updates), opt_state, nll


def fit_task_gd(
  graphdef, frozen, stacked, scale, batches, fit: TaskFit, theta0=None, progress: bool = False
):
  """Task-level weights by Adam on the regularised answer NLL; (theta, [nll per step]).

  batches: a list of prepared batches, cycled (a downstream task is small; pass one batch for
  full-batch descent). progress: a bar over the steps (`descend`).
  """
  S = serving.num_skills(stacked)
  theta = init_theta(S, fit.parametrisation) if theta0 is None else jnp.asarray(theta0, F32)
  fit = dataclasses.replace(fit, seed=0)  # the seed plays no part: one compile for all seeds
  opt_state = optax.adam(fit.learning_rate).init(theta)

  def step(theta, opt_state, batch):
    kw = dict(graphdef=graphdef, scale=scale, fit=fit)
    return _gd_step(theta, opt_state, frozen, stacked, batch, **kw)

  return descend(step, theta, opt_state, batches, fit.steps, progress, desc="gd")


def _cma_es(fit: TaskFit, num_skills: int):
  from evosax.algorithms import CMA_ES

  es = CMA_ES(population_size=fit.population, solution=jnp.zeros((num_skills,), F32))
  return es, es.default_params.replace(std_init=jnp.asarray(fit.sigma0, F32))


@functools.partial(jax.jit, static_argnames=("fit",))
def _cmaes_init(key, mean0, *, fit: TaskFit):
  """evosax's initial state around mean0 and one key per generation."""
  es, params = _cma_es(fit, mean0.shape[0])
  k_init, k_run = jax.random.split(key)
  return es.init(k_init, mean0, params), jax.random.split(k_run, fit.generations)


@functools.partial(jax.jit, static_argnames=("graphdef", "scale", "fit"))
def _cmaes_generations(state, keys_G, frozen, stacked, batch, *, graphdef, scale, fit: TaskFit):
  """One generation per key, as a `lax.scan`: (state after them, best fitness after each)."""
  frozen, stacked = jax.lax.stop_gradient((frozen, stacked))
  es, params = _cma_es(fit, state.mean.shape[0])
  lo, hi = fit.bounds

  def fitness(theta):
    return task_loss(theta, graphdef, frozen, stacked, scale, batch, fit)[0]

  def generation(state, key):
    k_ask, k_tell = jax.random.split(key)
    pop, state = es.ask(k_ask, state, params)
    pop = jnp.clip(pop, lo, hi)
    values = jax.vmap(fitness)(pop)  # the whole population in one batched forward
    state, _ = es.tell(k_tell, pop, values, state, params)
    return state, state.best_fitness

  return jax.lax.scan(generation, state, keys_G)


def fit_task_cmaes(
  graphdef, frozen, stacked, scale, batch, fit: TaskFit, theta0=None, progress: bool = False
):
  """Task-level weights by CMA-ES (evosax) on one (k-shot) batch; (theta, [best per generation]).

  Every generation's population is scored by one vmapped loss and all generations run in one
  jitted `lax.scan`: no Python loop per candidate or per generation. With `progress`, the scan
  runs one generation per call instead, carrying evosax's state from call to call, so a bar
  can show each generation; the keys and states are the same, so is theta (bit for bit).
  Candidates are clipped to `fit.bounds` (LoraHub's box) and the best one seen is returned.
  """
  S = serving.num_skills(stacked)
  mean0 = init_theta(S, fit.parametrisation) if theta0 is None else jnp.asarray(theta0, F32)
  key = jax.random.key(fit.seed)
  fit = dataclasses.replace(fit, seed=0)  # the seed is in the key: one compile for all seeds
  state, keys = _cmaes_init(key, mean0, fit=fit)
  kw = dict(graphdef=graphdef, scale=scale, fit=fit)
  bar = reporting.progress_bar(
    progress, total=fit.generations, desc="cmaes", unit="gen", leave=False
  )
  # by the flag, not by whether this process draws the bar: every process runs the same calls
  chunk = 1 if progress else max(fit.generations, 1)
  best = []
  with bar:
    for g in range(0, fit.generations, chunk):
      # The state (a few S-sized arrays) crosses through the host: every call then sees the
      # same argument types and placement, so the generations compile once, not twice.
      state = jax.device_get(state)
      state, best_G = _cmaes_generations(state, keys[g : g + chunk], frozen, stacked, batch, **kw)
      best.append(np.asarray(best_G))
      if not bar.disable:
        bar.set_postfix(best=f"{float(best[-1][-1]):.4f}", refresh=False)
        bar.update(len(best[-1]))
  return state.best_solution, [float(x) for b in best for x in b]


# ---- the input-conditioned gate --------------------------------------------------------------
def pooled_prompt(graphdef, frozen, batch) -> jax.Array:
  """Mean of the frozen base's final hidden states over prompt tokens [B, D] (no adapters).

  Prompt positions never attend to the answer (causal), so the features do not leak it.
  """
  model = nnx.merge(graphdef, frozen)
  h, _ = model.hidden(
    batch["tokens"], positions_BT=batch["positions"], mask_BT=batch["attention_mask"]
  )
  m = batch["prompt_mask"].astype(F32)
  return jnp.einsum("btd,bt->bd", h.astype(F32), m) / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1.0)


class Gate(nnx.Module):
  """pooled [B, D] -> RMS-normalised -> Linear -> GELU -> Linear -> softmax over S (top-k).

  The output layer starts at zero, so an untrained gate is the uniform average of skills.
  """

  def __init__(
    self, dim: int, num_skills: int, hidden: int = 64, top_k: int = 0, *, rngs: nnx.Rngs
  ):
    self.top_k = top_k
    self.hidden = nnx.Linear(dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_skills, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, pooled_BD: jax.Array) -> jax.Array:
    x = pooled_BD * jax.lax.rsqrt(jnp.mean(pooled_BD**2, -1, keepdims=True) + 1e-6)
    logits = self.out(jax.nn.gelu(self.hidden(x)))
    if self.top_k and self.top_k < logits.shape[-1]:
      kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
      logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def gate_loss(gate_params, gate_def, graphdef, frozen, stacked, scale, batch):
  gate = nnx.merge(gate_def, gate_params)
  w_BS = gate(jax.lax.stop_gradient(pooled_prompt(graphdef, frozen, batch)))
  return mean_nll(mixture_stats(graphdef, frozen, stacked, scale, batch, w_BS))


@functools.partial(jax.jit, static_argnames=("gate_def", "graphdef", "scale", "learning_rate"))
def _gate_step(
  params, opt_state, frozen, stacked, batch, *, gate_def, graphdef, scale, learning_rate
):
  frozen, stacked = jax.lax.stop_gradient((frozen, stacked))
  nll, g = jax.value_and_grad(gate_loss)(params, gate_def, graphdef, frozen, stacked, scale, batch)
  updates, opt_state = optax.adam(learning_rate).update(g, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, nll


def fit_gate(
  graphdef,
  frozen,
  stacked,
  scale,
  batches,
  *,
  hidden=64,
  top_k=0,
  steps=100,
  learning_rate=1e-3,
  seed=0,
  progress: bool = False,
) -> tuple[Gate, list[float]]:
  """Train a `Gate` (only its parameters) on the answer NLL; (gate module, [nll per step]).
  progress: a bar over the steps (`descend`)."""
  S = serving.num_skills(stacked)
  D = nnx.merge(graphdef, frozen).cfg.hidden_size
  gate_def, params = nnx.split(Gate(D, S, hidden, top_k, rngs=nnx.Rngs(seed)))
  opt_state = optax.adam(learning_rate).init(params)

  def step(params, opt_state, batch):
    kw = dict(gate_def=gate_def, graphdef=graphdef, scale=scale, learning_rate=learning_rate)
    return _gate_step(params, opt_state, frozen, stacked, batch, **kw)

  params, history = descend(step, params, opt_state, batches, steps, progress, desc="gate")
  return nnx.merge(gate_def, params), history


@functools.partial(jax.jit, static_argnames=("gate_def", "graphdef", "scale"))
def _gate_stats(params, frozen, stacked, batch, *, gate_def, graphdef, scale):
  w_BS = nnx.merge(gate_def, params)(pooled_prompt(graphdef, frozen, batch))
  return mixture_stats(graphdef, frozen, stacked, scale, batch, w_BS), w_BS


def gate_stats(gate: Gate, graphdef, frozen, stacked, scale, batch):
  """(answer stats, per-row weights [B, S]) of the gated mixture, unmerged, in one pass."""
  gate_def, params = nnx.split(gate)
  return _gate_stats(
    params, frozen, stacked, batch, gate_def=gate_def, graphdef=graphdef, scale=scale
  )
