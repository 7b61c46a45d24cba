"""Stage 1: train the selected medical skills, one AdaLoRA adapter each, on one frozen base.

All skills train in one jitted program on the skill axis: every batch holds `rows_per_skill`
rows of each skill, drawn from that skill's own data stream; each skill's loss is the mean
over its own answer tokens, its gradient is clipped by its own norm, and Adam and the AdaLoRA
allocator are per-skill by construction (elementwise, or ranked within the skill). So the
adapters equal those of training each skill alone (tests/test_train.py proves it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mdkif_jax import checkpoint, data, evaluate, reporting, sharding
from mdkif_jax.data.batches import make_batches, make_eval_batch, to_global
from mdkif_jax.errors import ConfigError
from mdkif_jax.model import loading, tokenizer
from mdkif_jax.model.config import numerics_from
from mdkif_jax.ops import losses
from mdkif_jax.optimizer import build_optimizer
from mdkif_jax.peft import adalora, adapters

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row; the last good checkpoint is kept."""


# ---- loss and step ----------------------------------------------------------------------------
def skill_losses(nll_GN, weight_GN, skill_GN, num_skills: int):
  """(mean answer-token NLL per skill [S], answer tokens per skill [S]).

  Inputs are per packed answer position (data.batches.answer_index): its NLL
  (losses.token_nll), its weight (0 = padding) and the skill of its row.
  """
  nll = nll_GN.astype(jnp.float32)
  w = weight_GN.astype(jnp.float32)
  onehot = jax.nn.one_hot(skill_GN, num_skills, dtype=jnp.float32)  # [G, N, S]
  tok_S = jnp.einsum("gns,gn->s", onehot, w)
  sum_S = jnp.einsum("gns,gn->s", onehot, nll * w)
  return sum_S / jnp.maximum(tok_S, 1.0), tok_S


@dataclasses.dataclass(frozen=True)
class StepFns:
  train_step: Any  # (state, frozen, batch) -> (state, metrics); state donated
  eval_step: Any  # (adapters, frozen, batch) -> (loss per skill [S], answer tokens [S])
  state_sharding: Any


def make_step(
  graphdef,
  tx,
  adalora_cfg: adalora.AdaLoraConfig,
  scale: float,
  num_skills: int,
  registry_to_local: np.ndarray,
  mesh,
  state_example,
  loss_chunk: int = 256,
  freeze_e: bool = False,
):
  """The jitted `(state, frozen, batch) -> (state, metrics)`; the frozen base is an input.

  freeze_e: keep every E as it is (plain LoRA stored in the SVD form with E = 1)."""
  lookup = jnp.asarray(registry_to_local, jnp.int32)

  def loss_fn(adapter_tree, frozen, batch):
    local = lookup[batch["skill_ids"]]
    model = nnx.merge(graphdef, frozen)
    ctx = adapters.AdapterCtx(scale=scale, skill_ids=local)
    h, _ = model.hidden(
      batch["tokens"],
      positions_BT=batch["positions"],
      mask_BT=batch["attention_mask"],
      adapters=adapter_tree,
      adapter_ctx=ctx,
    )
    # logits only at the packed answer positions: group g = the rows of data-parallel shard g
    idx = batch["answer_idx"]  # [G, N], row_in_group * T + t
    G, (B, T) = idx.shape[0], batch["tokens"].shape
    h = jnp.take_along_axis(h.reshape(G, B // G * T, -1), idx[..., None], axis=1)
    targets = jnp.take_along_axis(batch["targets"].reshape(G, -1), idx, axis=1)
    w, tied = model.vocab_projection()
    nll = losses.token_nll(h, w, targets, tied=tied, chunk=loss_chunk)  # no [N, V] logits kept
    skill = jnp.take_along_axis(local.reshape(G, B // G), idx // T, axis=1)
    loss_S, tok_S = skill_losses(nll, batch["answer_valid"], skill, num_skills)
    orth_S = adalora.orth_reg(adapter_tree, adalora_cfg.orth_reg_form)
    total = jnp.sum(loss_S + adalora_cfg.orth_reg_weight * orth_S)
    return total, (loss_S, orth_S, tok_S)

  def train_step(state, frozen, batch):
    frozen = jax.lax.stop_gradient(frozen)
    (total, (loss_S, orth_S, tok_S)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["adapters"], frozen, batch
    )
    finite = jnp.isfinite(total) & jnp.all(
      jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["adapters"])
    new = {
      "adapters": optax.apply_updates(state["adapters"], updates),
      "opt_state": opt_state,
      "step": state["step"] + 1,
    }
    if freeze_e:  # whatever the optimizer did to E (weight decay, say) is undone
      new["adapters"] = {
        t: {**leaf, "E": state["adapters"][t]["E"]} for t, leaf in new["adapters"].items()
      }
    # a non-finite step never reaches the weights: keep the old adapters and optimizer state
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    kept["step"] = state["step"] + 1
    alloc = adalora.find_state(kept["opt_state"])
    metrics = {
      "loss_S": loss_S,
      "orth_S": orth_S,
      "tokens_S": tok_S,
      "finite": finite,
      "budget": alloc.budget,
      "rank_S": sum(jnp.sum(m, axis=(-2, -1)) for m in alloc.mask.values()),
    }
    return kept, metrics

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sharding = jax.tree.map(lambda _: replicated, state_example)
  step = jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_sharding, None))

  @jax.jit
  def eval_step(adapter_tree, frozen, batch):
    _, (loss_S, _, tok_S) = loss_fn(adapter_tree, frozen, batch)
    return loss_S, tok_S

  return StepFns(step, eval_step, state_sharding)


# ---- the run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything a stage-1 run builds before its first batch (`setup_training`)."""

  mesh: Any
  frozen: Any  # the frozen base's parameter state
  model_cfg: Any
  tok: Any
  adalora_cfg: adalora.AdaLoraConfig
  targets: tuple[str, ...]
  scale: float  # the adapter scale (adapters.adapter_scale of the AdaLoRA config)
  fns: StepFns
  state: dict  # adapters, optimizer/allocator state, step; placed by fns.state_sharding
  names: tuple[str, ...]  # the adapters on the skill axis (`adapter_names`)


def load_base(config, mesh, progress: bool = False):
  """The frozen base the config names (its own seed for random-weight presets)."""
  return loading.load_model(
    config.model.source,
    numerics=numerics_from(config),
    mesh=mesh,
    rules=tuple(tuple(r) for r in config.mesh.rules),
    seed=config.model.seed,
    progress=progress,
  )


ADAPTER_KINDS = ("adalora", "lora")
UNION = "union"  # the one adapter's name under train.union


def adapter_kind(config) -> str:
  """train.adapter; "adalora" for configs without it (the evaluation's task adapter)."""
  return config.train.get("adapter", "adalora")


def adapter_names(config, skills: tuple[str, ...]) -> tuple[str, ...]:
  """The adapters a run trains: one per skill, or one on the union of their data."""
  return (UNION,) if config.train.get("union", False) else tuple(skills)


UNION_BUDGETS = ("all_skills", "one_skill")


def as_trained(config, num_skills: int):
  """The config the optimizer and adapters are built from.

  train.adapter="lora": plain LoRA at rank adalora.target_r (init_r = target_r: the allocator's
  budget is every rank, so it never prunes) without the orthogonal regulariser.
  train.union with union_budget="all_skills": the one adapter gets the budget of the
  `num_skills` adapters it stands for (init_r, target_r and lora_alpha times num_skills, so the
  scale alpha / init_r stays a skill's)."""
  kind = adapter_kind(config)
  if kind not in ADAPTER_KINDS:
    raise ConfigError(
      f"--config.train.adapter must be one of {', '.join(ADAPTER_KINDS)}, got {kind!r}"
    )
  union = config.train.get("union", False)
  budget = config.train.get("union_budget", "all_skills")
  if union and budget not in UNION_BUDGETS:
    raise ConfigError(
      f"--config.train.union_budget must be one of {', '.join(UNION_BUDGETS)}, got {budget!r}"
    )
  if kind == "adalora" and not (union and budget == "all_skills"):
    return config
  config = config.copy_and_resolve_references()
  if union and budget == "all_skills":
    config.adalora.init_r *= num_skills
    config.adalora.target_r *= num_skills
    config.adalora.lora_alpha *= num_skills
  if kind == "lora":
    config.adalora.init_r = config.adalora.target_r
    config.adalora.orth_reg_weight = 0.0
  return config


def _init_adapters(config, skills, dims, num_layers: int, r: int) -> dict:
  """Stacked adapters [S, ...]: AdaLoRA's init, or plain LoRA's (A kaiming-uniform, B = 0)
  with E = 1 so the SVD form B·diag(E)·A is B·A and every later stage reads it unchanged."""
  key = jax.random.key(config.train.seed)
  # an adapter's init depends only on (seed, its registry id): joint == separate runs
  ids = [len(data.SKILLS) if s == UNION else data.skill_id(s) for s in skills]
  if adapter_kind(config) == "lora":
    per = [adapters.init_lora(jax.random.fold_in(key, i), dims, num_layers, r) for i in ids]
    per = [{t: {**leaf, "E": jnp.ones((num_layers, r))} for t, leaf in p.items()} for p in per]
  else:
    per = [
      adapters.init_adalora(
        jax.random.fold_in(key, i), dims, num_layers, r, std=config.adalora.init_std
      )
      for i in ids
    ]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per)


def setup_training(config, skills: tuple[str, ...], base=None, tok=None) -> Setup:
  """Load (or take) the frozen base and tokenizer, build the optimizer (validating the AdaLoRA
  schedule before any compute), the adapters (`adapter_names`) and the jitted steps."""
  config = as_trained(config, len(skills))
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  if tok is None:  # before the base: a preset without a tokenizer fails before any build
    tok = tokenizer.load_tokenizer(tokenizer.tokenizer_source(config.model))
  if base is None:
    base = load_base(config, mesh, progress=bool(config.train.progress))
  graphdef, frozen = nnx.split(base)
  cfg = base.cfg
  if len(tok) > cfg.vocab_size:
    raise ValueError(
      f"tokenizer has {len(tok)} tokens but the model's vocabulary is {cfg.vocab_size}"
    )
  tx, adalora_cfg = build_optimizer(config, int(config.train.steps))
  targets = adapters.select_targets([p.strip() for p in config.adalora.targets.split(",")])
  dims = {t: cfg.projection_dims()[t] for t in targets}
  names = adapter_names(config, skills)
  stacked = _init_adapters(config, names, dims, cfg.num_hidden_layers, adalora_cfg.init_r)
  state = {"adapters": stacked, "opt_state": tx.init(stacked), "step": jnp.zeros([], jnp.int32)}
  registry_to_local = np.full(len(data.SKILLS), 0, np.int32)  # union: every row to adapter 0
  if names != (UNION,):
    for i, s in enumerate(skills):
      registry_to_local[data.skill_id(s)] = i
  scale = adapters.adapter_scale(
    adalora_cfg.lora_alpha, adalora_cfg.init_r, adalora_cfg.scale_convention
  )
  fns = make_step(
    graphdef,
    tx,
    adalora_cfg,
    scale,
    len(names),
    registry_to_local,
    mesh,
    state,
    loss_chunk=int(config.train.loss_chunk),
    freeze_e=adapter_kind(config) == "lora",
  )
  state = jax.device_put(state, fns.state_sharding)
  return Setup(mesh, frozen, cfg, tok, adalora_cfg, targets, scale, fns, state, names)


@dataclasses.dataclass
class Progress:
  """The loop's running account: metric history, non-finite steps, throughput window."""

  history: list = dataclasses.field(default_factory=list)
  bad_in_row: int = 0
  bad_total: int = 0
  window: list = dataclasses.field(default_factory=list)  # per-step losses since the last write
  tokens_since: int = 0
  t_last: float = dataclasses.field(default_factory=time.perf_counter)
  cpu_last: float = dataclasses.field(default_factory=time.process_time)  # every thread's


def _optimizer_update(run: Setup, batches, config, progress: Progress, step: int, where):
  """One optimizer update (grad_accum_steps micro-batches); too many non-finite steps in a
  row stop the run (the last good checkpoint is kept)."""
  for _ in range(int(config.optimizer.grad_accum_steps)):
    batch = next(batches)
    progress.tokens_since += int((batch["attention_mask"] > 0).sum()) * jax.process_count()
    run.state, m = run.fns.train_step(run.state, run.frozen, to_global(batch, run.mesh))
    finite = bool(m["finite"])
    progress.bad_in_row = 0 if finite else progress.bad_in_row + 1
    progress.bad_total += int(not finite)
    if progress.bad_in_row >= config.train.max_bad_steps:
      where.mngr.wait_until_finished()
      raise NonFiniteError(
        f"{progress.bad_in_row} non-finite steps in a row at step {step + 1}: stopping. The "
        f"last good checkpoint is step {where.mngr.latest_step()} in {where.directory}; "
        "lower --config.optimizer.learning_rate or check the data."
      )
  return m


def _record(m, skills, progress: Progress, done: int) -> dict:
  loss_S = np.asarray(m["loss_S"])
  progress.window.append(loss_S)
  record = {f"loss/{s}": float(loss_S[i]) for i, s in enumerate(skills)}
  record.update({f"orth/{s}": float(m["orth_S"][i]) for i, s in enumerate(skills)})
  record["adalora/budget"] = float(m["budget"])
  record.update({f"rank/{s}": float(m["rank_S"][i]) for i, s in enumerate(skills)})
  record["skipped_steps"] = progress.bad_total
  progress.history.append({"step": done, **record})
  return record


def _write_mean(record, m, skills, progress: Progress, writer, bar, n_matrices: int, done: int):
  """Write the record with the loss averaged over the steps since the last write (less row
  noise) and the throughput, and show them on the progress bar."""
  now, cpu = time.perf_counter(), time.process_time()
  record["tokens_per_s"] = progress.tokens_since / max(now - progress.t_last, 1e-9)
  # wall and CPU seconds of the steps since the last write (the first includes compiling);
  # summed over metrics.jsonl they give a run's time across interruptions (steps redone
  # after a resume count once: the writer drops the interrupted run's later rows)
  record["interval_wall_s"] = now - progress.t_last
  record["interval_cpu_s"] = cpu - progress.cpu_last
  progress.t_last, progress.cpu_last, progress.tokens_since = now, cpu, 0
  mean_S = np.mean(progress.window, axis=0)
  progress.window.clear()
  record.update({f"loss/{s}": float(mean_S[i]) for i, s in enumerate(skills)})
  writer.write(done, record)
  per_skill = " ".join(f"{s}:{v:.2f}" for s, v in zip(skills, mean_S, strict=True))
  bar.set_postfix_str(
    f"loss {mean_S.mean():.3f} [{per_skill}] {record['tokens_per_s']:.0f} tok/s budget "
    f"{int(m['budget'])} (mean rank {float(m['budget']) / n_matrices:.1f})"
  )


@dataclasses.dataclass(frozen=True)
class _Checkpoints:
  mngr: Any
  directory: pathlib.Path
  meta: dict


def _loop(config, run: Setup, skills, batches, ckpt: _Checkpoints, writer, start, stop):
  """Steps start..stop with metrics, a progress bar and checkpoints; returns the Progress."""
  steps = int(config.train.steps)
  n_matrices = len(run.targets) * run.model_cfg.num_hidden_layers
  progress = Progress()
  bar = tqdm(
    total=steps,
    initial=start,
    desc=f"stage 1: {len(skills)} skill(s)",
    unit="step",
    disable=not config.train.progress or jax.process_index() != 0,
  )
  try:
    for step in range(start, stop):
      m = _optimizer_update(run, batches, config, progress, step, ckpt)
      done = step + 1
      record = _record(m, skills, progress, done)
      if done % config.train.log_every == 0 or done == steps:
        _write_mean(record, m, skills, progress, writer, bar, n_matrices, done)
      bar.update(1)
      if done % config.train.checkpoint_every == 0 or done == steps:
        checkpoint.save(ckpt.mngr, done, run.state, batches.get_state(), ckpt.meta)
  finally:
    bar.close()
  return progress


def _write_rank_pattern(config, workdir, run: Setup, skills) -> tuple[dict, np.ndarray]:
  """(masks, ranks [S, L, targets]) of the final allocation; rank_pattern.json and the plot."""
  masks = {t: np.asarray(m) for t, m in adalora.find_state(run.state["opt_state"]).mask.items()}
  ranks = reporting.rank_table(masks, list(run.targets))
  if jax.process_index() == 0:
    pattern = {
      s: {t: ranks[i, :, j].tolist() for j, t in enumerate(run.targets)}
      for i, s in enumerate(skills)
    }
    (workdir / "rank_pattern.json").write_text(json.dumps(pattern, indent=1))
    if config.train.plot:
      reporting.plot_rank_allocation(
        workdir / "rank_allocation.png",
        ranks,
        list(skills),
        list(run.targets),
        run.adalora_cfg.init_r,
      )
  return masks, ranks


def schedule_identity(config) -> dict:
  """The fields that fix stage 1's schedule (AdaLoRA's budget, the learning-rate shape, the
  optimizer state's structure), named as their flags: resuming under other values would
  silently train another schedule. The learning rate itself may change on a resume."""
  fields = (
    "train.steps",
    "adalora.target_r",
    "adalora.tinit",
    "adalora.tfinal",
    "adalora.delta_t",
    "optimizer.warmup_steps",
    "optimizer.decay",
    "optimizer.grad_accum_steps",
  )
  return {f: config[f.split(".")[0]][f.split(".")[1]] for f in fields}


def train_skills(
  config, workdir: str | pathlib.Path, skills: tuple[str, ...], base=None, stop_after=None
) -> dict:
  """Train `skills` jointly; returns final adapters, masks, metric history (for tests too).

  base: an already loaded frozen model (else loaded from config.model); stop_after: leave
  the loop after this many steps of the schedule (the schedule itself is unchanged).
  """
  workdir = pathlib.Path(workdir)
  run = setup_training(config, skills, base)
  steps = int(config.train.steps)
  batches = make_batches(config, skills, run.tok)  # every skill's stream, also under union
  names = run.names
  identity = checkpoint.run_identity(
    run.model_cfg, names, run.targets, run.adalora_cfg.init_r, run.scale
  )
  identity.update(schedule_identity(config))  # a resume under another schedule is refused
  # recorded only when not the default, so checkpoints written before these fields resume
  if names == (UNION,):
    identity["union_of"] = list(skills)
    if config.train.get("union_budget", "all_skills") != "all_skills":
      identity["union_budget"] = config.train.union_budget  # checkpoint.trained_target_r
  if adapter_kind(config) != "adalora":
    identity["adapter"] = adapter_kind(config)
  meta = {**identity, "serving": checkpoint.serving_meta(config.data)}
  directory = workdir / "checkpoints"
  mngr = checkpoint.manager(
    directory,
    config.train.keep_checkpoints,
    config.train.async_checkpoint,
    keep_period=config.train.get("keep_period", 0),
  )
  start = 0
  restored = checkpoint.restore_latest(mngr, checkpoint.abstract_of(run.state), identity)
  if restored is not None:
    start, run.state, data_state = restored
    batches.set_state(data_state)
    log.info("resumed from %s at step %d", directory, start)
  eval_batch = make_eval_batch(config, skills, run.tok)
  writer = reporting.MetricWriter(
    workdir, enabled=jax.process_index() == 0, resume_step=start if restored else None
  )

  def evaluate_now(step: int) -> dict[str, float]:
    if eval_batch is None:
      return {}
    adapters_now = run.state["adapters"]
    rec = evaluate.reserved_losses(
      run.fns.eval_step, adapters_now, run.frozen, eval_batch, run.mesh, names
    )
    writer.write(step, rec)
    return rec

  finished = start >= steps
  if finished:
    print(f"{workdir}: the checkpoint at step {start} already completes {steps} steps")
  eval_before = {} if finished else evaluate_now(start)
  stop = steps if stop_after is None else min(steps, stop_after)
  try:
    ckpt = _Checkpoints(mngr, directory, meta)
    progress = _loop(config, run, names, batches, ckpt, writer, start, stop)
    eval_after = {} if finished else evaluate_now(int(run.state["step"]))
  finally:
    mngr.wait_until_finished()
    writer.close()
  if eval_before and eval_after and jax.process_index() == 0:
    print(reporting.eval_change(eval_before, eval_after, start, int(run.state["step"])))
  masks, ranks = _write_rank_pattern(config, workdir, run, names)
  return {
    "adapters": run.state["adapters"],
    "masks": masks,
    "history": progress.history,
    "ranks": ranks,
    "skills": names,
    "skipped_steps": progress.bad_total,
    "eval_before": eval_before,
    "allocator_step": adalora.find_state(run.state["opt_state"]).count,
    "data_state": batches.get_state(),
    "eval_after": eval_after,
  }


def train_and_evaluate(config, workdir: str) -> dict:
  """Stage 1 entry point called by main.py."""
  try:
    skills = data.skills.select_skills(config.skills.replace("+", ","))
  except KeyError as e:
    raise ConfigError(f"--config.skills={config.skills}: {e.args[0]}") from None
  if not skills:
    raise ConfigError(f"--config.skills={config.skills!r} selects no skill")
  what = "one union adapter on" if config.train.get("union") else config.train.adapter
  log.info(
    "stage 1: %s %d skill(s) %s, mode %s, workdir %s",
    what,
    len(skills),
    skills,
    config.train.mode,
    workdir,
  )
  if config.train.mode == "joint":
    return train_skills(config, workdir, skills)
  if config.train.mode == "separate":
    if config.train.union:
      raise ConfigError("--config.train.union=True trains one adapter: use train.mode='joint'")
    base = load_base(config, sharding.make_mesh(tuple(config.mesh.shape)))
    checkpoint.plan_separate(workdir, skills)  # so stage 2 tells a skill not yet started
    return {s: train_skills(config, pathlib.Path(workdir) / s, (s,), base=base) for s in skills}
  raise ConfigError(f"--config.train.mode must be 'joint' or 'separate', got {config.train.mode!r}")
