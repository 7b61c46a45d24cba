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

from mdkif_jax import (
  adalora,
  adapters,
  checkpoint,
  data,
  loading,
  losses,
  reporting,
  sharding,
  tokenizer,
)
from mdkif_jax import model as model_lib
from mdkif_jax.skill_batches import (  # noqa: F401  (re-exported: tests and benchmarks)
  SkillBatches,
  answer_index,
  make_batches,
  make_eval_batch,
  to_global,
)

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row; the last good checkpoint is kept."""


# ---- optimizer --------------------------------------------------------------------------------
def adalora_config(config, total_step: int) -> adalora.AdaLoraConfig:
  a = config.adalora
  return adalora.AdaLoraConfig(
    init_r=a.init_r, target_r=a.target_r, tinit=a.tinit, tfinal=a.tfinal, delta_t=a.delta_t,
    beta1=a.beta1, beta2=a.beta2, total_step=total_step, orth_reg_weight=a.orth_reg_weight,
    orth_reg_form=a.orth_reg_form, sensitivity=a.sensitivity, lora_alpha=a.lora_alpha,
    scale_convention=a.scale_convention,
  )  # fmt: skip


def learning_rate_schedule(o, steps: int) -> optax.Schedule:
  if o.decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, o.warmup_steps, max(steps, o.warmup_steps + 1),
      end_value=o.learning_rate * o.end_lr_fraction,
    )  # fmt: skip
  if o.decay == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
       optax.constant_schedule(o.learning_rate)], [max(o.warmup_steps, 1)],
    )  # fmt: skip
  raise ValueError(f"optimizer.decay must be 'cosine' or 'constant', got {o.decay!r}")


def clip_by_skill_norm(max_norm: float) -> optax.GradientTransformation:
  """Clip each skill's gradient (leading axis of every leaf) by its own global norm."""

  def update(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    sq = sum(
      jnp.sum(jnp.square(u.astype(jnp.float32)), axis=tuple(range(1, u.ndim))) for u in leaves
    )
    norm = jnp.sqrt(sq)
    factor = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
    scaled = jax.tree.map(
      lambda u: u * factor.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype), updates
    )
    return scaled, state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def build_optimizer(
  config, steps: int
) -> tuple[optax.GradientTransformation, adalora.AdaLoraConfig]:
  """clip per skill -> AdamW(schedule), wrapped by the AdaLoRA allocator, then accumulation.

  The schedule is validated here, before anything is compiled.
  """
  o = config.optimizer
  acfg = adalora_config(config, steps)
  parts = [clip_by_skill_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(
    optax.adamw(learning_rate_schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps,
                weight_decay=o.weight_decay)
  )  # fmt: skip
  tx = adalora.adalora(optax.chain(*parts), acfg)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx, acfg


# ---- loss and step ----------------------------------------------------------------------------
def skill_losses(nll_GN, weight_GN, skill_GN, num_skills: int):
  """(mean answer-token NLL per skill [S], answer tokens per skill [S]).

  Inputs are per packed answer position (skill_batches.answer_index): its NLL
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
  acfg: adalora.AdaLoraConfig,
  scale: float,
  num_skills: int,
  registry_to_local: np.ndarray,
  mesh,
  state_example,
  loss_chunk: int = 256,
):
  """The jitted `(state, frozen, batch) -> (state, metrics)`; the frozen base is an input."""
  lookup = jnp.asarray(registry_to_local, jnp.int32)

  def loss_fn(ad, frozen, batch):
    local = lookup[batch["skill_ids"]]
    model = nnx.merge(graphdef, frozen)
    ctx = adapters.AdapterCtx(scale=scale, skill_ids=local)
    h, _ = model.hidden(batch["tokens"], positions_BT=batch["positions"],
                        mask_BT=batch["attention_mask"], adapters=ad, adapter_ctx=ctx)  # fmt: skip
    # logits only at the packed answer positions: group g = the rows of data-parallel shard g
    idx = batch["answer_idx"]  # [G, N], row_in_group * T + t
    G, (B, T) = idx.shape[0], batch["tokens"].shape
    h = jnp.take_along_axis(h.reshape(G, B // G * T, -1), idx[..., None], axis=1)
    targets = jnp.take_along_axis(batch["targets"].reshape(G, -1), idx, axis=1)
    w, tied = model.vocab_projection()
    nll = losses.token_nll(h, w, targets, tied=tied, chunk=loss_chunk)  # no [N, V] logits kept
    skill = jnp.take_along_axis(local.reshape(G, B // G), idx // T, axis=1)
    loss_S, tok_S = skill_losses(nll, batch["answer_valid"], skill, num_skills)
    orth_S = adalora.orth_reg(ad, acfg.orth_reg_form)
    total = jnp.sum(loss_S + acfg.orth_reg_weight * orth_S)
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
    # a non-finite step never reaches the weights: keep the old adapters and optimizer state
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    kept["step"] = state["step"] + 1
    alloc = adalora.find_state(kept["opt_state"])
    metrics = {
      "loss_S": loss_S, "orth_S": orth_S, "tokens_S": tok_S, "finite": finite,
      "budget": alloc.budget,
      "rank_S": sum(jnp.sum(m, axis=(-2, -1)) for m in alloc.mask.values()),
    }  # fmt: skip
    return kept, metrics

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sharding = jax.tree.map(lambda _: replicated, state_example)
  step = jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_sharding, None))

  @jax.jit
  def eval_step(ad, frozen, batch):
    _, (loss_S, _, tok_S) = loss_fn(ad, frozen, batch)
    return loss_S, tok_S

  return StepFns(step, eval_step, state_sharding)


# ---- the run ----------------------------------------------------------------------------------
def _numerics(config) -> model_lib.Numerics:
  return model_lib.Numerics(
    param_dtype=jnp.dtype(config.model.param_dtype),
    compute_dtype=jnp.dtype(config.model.compute_dtype),
    remat=config.model.remat,
    attention_block=config.model.attention_block,
  )


def run_meta(model_cfg, skills, targets, acfg) -> dict:
  return {
    "model": json.loads(json.dumps(dataclasses.asdict(model_cfg), default=list)),
    "skills": list(skills),
    "targets": list(targets),
    "init_r": acfg.init_r,
    "scale": adapters.adapter_scale(acfg.lora_alpha, acfg.init_r, acfg.scale_convention),
  }


@dataclasses.dataclass
class Setup:
  """Everything a stage-1 run builds before its first batch (`setup_training`)."""

  mesh: Any
  frozen: Any  # the frozen base's parameter state
  model_cfg: Any
  tok: Any
  acfg: adalora.AdaLoraConfig
  targets: tuple[str, ...]
  fns: StepFns
  state: dict  # adapters, optimizer/allocator state, step; placed by fns.state_sharding


def setup_training(config, skills: tuple[str, ...], base=None, tok=None) -> Setup:
  """Load (or take) the frozen base and tokenizer, build the optimizer (validating the AdaLoRA
  schedule before any compute), the per-skill adapters and the jitted steps."""
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rules = tuple(tuple(r) for r in config.mesh.rules)
  if base is None:
    base = loading.load_model(config.model.source, numerics=_numerics(config), mesh=mesh,
                              rules=rules, seed=config.model.seed,
                              progress=bool(config.train.progress))  # fmt: skip
  graphdef, frozen = nnx.split(base)
  cfg = base.cfg
  if tok is None:
    tok = tokenizer.load_tokenizer(config.model.tokenizer or config.model.source)
  if len(tok) > cfg.vocab_size:
    raise ValueError(
      f"tokenizer has {len(tok)} tokens but the model's vocabulary is {cfg.vocab_size}"
    )
  tx, acfg = build_optimizer(config, int(config.train.steps))
  targets = adapters.select_targets([p.strip() for p in config.adalora.targets.split(",")])
  dims = {t: cfg.projection_dims()[t] for t in targets}
  key = jax.random.key(config.train.seed)
  # skill s's init depends only on (seed, its registry id): joint == separate runs
  per_skill = [
    adapters.init_adalora(
      jax.random.fold_in(key, data.skill_id(s)),
      dims,
      cfg.num_hidden_layers,
      acfg.init_r,
      std=config.adalora.init_std,
    )  # fmt: skip
    for s in skills
  ]
  ad = jax.tree.map(lambda *xs: jnp.stack(xs), *per_skill)
  state = {"adapters": ad, "opt_state": tx.init(ad), "step": jnp.zeros([], jnp.int32)}
  registry_to_local = np.full(len(data.SKILLS), 0, np.int32)
  for i, s in enumerate(skills):
    registry_to_local[data.skill_id(s)] = i
  scale = adapters.adapter_scale(acfg.lora_alpha, acfg.init_r, acfg.scale_convention)
  fns = make_step(graphdef, tx, acfg, scale, len(skills), registry_to_local, mesh, state,
                  loss_chunk=int(config.train.loss_chunk))  # fmt: skip
  state = jax.device_put(state, fns.state_sharding)
  return Setup(mesh, frozen, cfg, tok, acfg, targets, fns, state)


def train_skills(
  config, workdir: str | pathlib.Path, skills: tuple[str, ...], base=None, stop_after=None
) -> dict:
  """Train `skills` jointly; returns final adapters, masks, metric history (for tests too).

  base: an already loaded frozen model (else loaded from config.model); stop_after: leave
  the loop after this many steps of the schedule (the schedule itself is unchanged).
  """
  workdir = pathlib.Path(workdir)
  run = setup_training(config, skills, base)
  mesh, frozen, cfg, tok, acfg, targets, fns, state = (
    run.mesh, run.frozen, run.model_cfg, run.tok, run.acfg, run.targets, run.fns, run.state
  )  # fmt: skip
  steps = int(config.train.steps)
  n_matrices = len(targets) * cfg.num_hidden_layers

  batches = make_batches(config, skills, tok)
  meta = run_meta(cfg, skills, targets, acfg)
  mngr = checkpoint.manager(workdir / "checkpoints", config.train.keep_checkpoints,
                            config.train.async_checkpoint)  # fmt: skip
  start = 0
  restored = checkpoint.restore_latest(mngr, checkpoint.abstract_of(state), meta)
  if restored is not None:
    start, state, data_state = restored
    batches.set_state(data_state)
    log.info("resumed from %s at step %d", workdir / "checkpoints", start)
  eval_batch = make_eval_batch(config, skills, tok)

  def evaluate(step: int) -> dict[str, float]:
    if eval_batch is None:
      return {}
    loss_S, tok_S = fns.eval_step(state["adapters"], frozen, to_global(eval_batch, mesh))
    rec = {f"eval_loss/{s}": float(loss_S[i]) for i, s in enumerate(skills) if tok_S[i] > 0}
    writer.write(step, rec)
    return rec

  accum = int(config.optimizer.grad_accum_steps)
  writer = reporting.MetricWriter(
    workdir, enabled=jax.process_index() == 0, resume_step=start if restored else None
  )
  history: list[dict] = []
  bad_in_row, bad_total = 0, 0
  bar = tqdm(total=steps, initial=start, desc=f"stage 1: {len(skills)} skill(s)", unit="step",
             disable=not config.train.progress or jax.process_index() != 0)  # fmt: skip
  t_last, tokens_since = time.perf_counter(), 0
  finished = start >= steps
  if finished:
    print(f"{workdir}: the checkpoint at step {start} already completes {steps} steps")
  eval_before = {} if finished else evaluate(start)
  window: list[np.ndarray] = []
  eval_after: dict[str, float] = {}
  try:
    for step in range(start, steps if stop_after is None else min(steps, stop_after)):
      for _ in range(accum):
        batch = next(batches)
        tokens_since += int((batch["attention_mask"] > 0).sum()) * jax.process_count()
        state, m = fns.train_step(state, frozen, to_global(batch, mesh))
        finite = bool(m["finite"])
        bad_in_row = 0 if finite else bad_in_row + 1
        bad_total += int(not finite)
        if bad_in_row >= config.train.max_bad_steps:
          mngr.wait_until_finished()
          raise NonFiniteError(
            f"{bad_in_row} non-finite steps in a row at step {step + 1}: stopping. The last "
            f"good checkpoint is step {mngr.latest_step()} in {workdir / 'checkpoints'}; "
            "lower optimizer.learning_rate or check the data."
          )
      done = step + 1
      loss_S = np.asarray(m["loss_S"])
      window.append(loss_S)
      record = {f"loss/{s}": float(loss_S[i]) for i, s in enumerate(skills)}
      record.update({f"orth/{s}": float(m["orth_S"][i]) for i, s in enumerate(skills)})
      record["adalora/budget"] = float(m["budget"])
      record.update({f"rank/{s}": float(m["rank_S"][i]) for i, s in enumerate(skills)})
      record["skipped_steps"] = bad_total
      history.append({"step": done, **record})
      if done % config.train.log_every == 0 or done == steps:
        now = time.perf_counter()
        record["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
        t_last, tokens_since = now, 0
        # the logged loss is the mean over the steps since the last write: less row noise
        mean_S = np.mean(window, axis=0)
        window.clear()
        record.update({f"loss/{s}": float(mean_S[i]) for i, s in enumerate(skills)})
        writer.write(done, record)
        bar.set_postfix_str(
          f"loss {mean_S.mean():.3f} ["
          + " ".join(f"{s}:{v:.2f}" for s, v in zip(skills, mean_S, strict=True))
          + f"] {record['tokens_per_s']:.0f} tok/s budget {int(m['budget'])}"
          + f" (mean rank {float(m['budget']) / n_matrices:.1f})"
        )
      bar.update(1)
      if done % config.train.checkpoint_every == 0 or done == steps:
        checkpoint.save(mngr, done, state, batches.get_state(), meta)
    eval_after = {} if finished else evaluate(int(state["step"]))
  finally:
    bar.close()
    mngr.wait_until_finished()
    writer.close()
  if eval_before and eval_after and jax.process_index() == 0:
    lines = [
      f"  {k.split('/')[1]:5s} {eval_before[k]:7.3f} -> {eval_after[k]:7.3f}" for k in eval_after
    ]
    print(f"eval loss per skill on reserved rows (step {start} -> {int(state['step'])}):")
    print("\n".join(lines))
  masks = {t: np.asarray(m_) for t, m_ in adalora.find_state(state["opt_state"]).mask.items()}
  ranks = reporting.rank_table(masks, list(targets))
  if jax.process_index() == 0:
    pattern = {
      s: {t: ranks[i, :, j].tolist() for j, t in enumerate(targets)} for i, s in enumerate(skills)
    }
    (workdir / "rank_pattern.json").write_text(json.dumps(pattern, indent=1))
    if config.train.plot:
      reporting.plot_rank_allocation(workdir / "rank_allocation.png", ranks, list(skills),
                                     list(targets), acfg.init_r)  # fmt: skip
  return {"adapters": state["adapters"], "masks": masks, "history": history, "ranks": ranks,
          "skills": skills, "skipped_steps": bad_total, "eval_before": eval_before,
          "allocator_step": adalora.find_state(state["opt_state"]).count,
          "data_state": batches.get_state(),
          "eval_after": eval_after}  # fmt: skip


def train_and_evaluate(config, workdir: str) -> dict:
  """Stage 1 entry point called by main.py."""
  skills = data.skills.select_skills(config.skills.replace("+", ","))
  if not skills:
    raise ValueError(f"config.skills={config.skills!r} selects no skill")
  log.info(
    "stage 1: %d skill(s) %s, mode %s, workdir %s", len(skills), skills, config.train.mode, workdir
  )
  if config.train.mode == "joint":
    return train_skills(config, workdir, skills)
  if config.train.mode == "separate":
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    base = loading.load_model(config.model.source, numerics=_numerics(config), mesh=mesh,
                              rules=tuple(tuple(r) for r in config.mesh.rules))  # fmt: skip
    return {s: train_skills(config, pathlib.Path(workdir) / s, (s,), base=base) for s in skills}
  raise ValueError(f"train.mode must be 'joint' or 'separate', got {config.train.mode!r}")
