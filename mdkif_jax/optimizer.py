"""Stage 1's optimizer: per-skill gradient clipping, AdamW on a warm-up schedule, wrapped by the
AdaLoRA rank allocator (peft/adalora.py), then gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mdkif_jax.errors import ConfigError
from mdkif_jax.peft import adalora


def adalora_config(config, total_step: int) -> adalora.AdaLoraConfig:
  """The AdaLoRA schedule and conventions of a stage config's `adalora` section."""
  section = config.adalora
  return adalora.AdaLoraConfig(
    init_r=section.init_r,
    target_r=section.target_r,
    tinit=section.tinit,
    tfinal=section.tfinal,
    delta_t=section.delta_t,
    beta1=section.beta1,
    beta2=section.beta2,
    total_step=total_step,
    orth_reg_weight=section.orth_reg_weight,
    orth_reg_form=section.orth_reg_form,
    sensitivity=section.sensitivity,
    lora_alpha=section.lora_alpha,
    scale_convention=section.scale_convention,
  )


def learning_rate_schedule(opt, steps: int) -> optax.Schedule:
  if opt.decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0,
      opt.learning_rate,
      opt.warmup_steps,
      max(steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.end_lr_fraction,
    )
  if opt.decay == "constant":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1)),
        optax.constant_schedule(opt.learning_rate),
      ],
      [max(opt.warmup_steps, 1)],
    )
  raise ConfigError(f"--config.optimizer.decay must be 'cosine' or 'constant', got {opt.decay!r}")


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


IMPORTANCE_GRADS = ("clipped", "raw")


def with_allocator(clip, update, adalora_cfg, importance_grads: str = "clipped"):
  """AdaLoRA's allocator around `update`, with the gradient clipping `clip` (or None) placed
  so the allocator's importance scores see the clipped gradient ("clipped": what PEFT's
  update_and_allocate sees under HF Trainer, which clips the gradients in place before the
  optimizer step) or the raw one ("raw")."""
  if importance_grads not in IMPORTANCE_GRADS:
    raise ConfigError(
      f"--config.adalora.importance_grads must be one of {IMPORTANCE_GRADS}, "
      f"got {importance_grads!r}"
    )
  if clip is None:
    return adalora.adalora(update, adalora_cfg)
  if importance_grads == "clipped":
    return optax.chain(clip, adalora.adalora(update, adalora_cfg))
  return adalora.adalora(optax.chain(clip, update), adalora_cfg)


def build_optimizer(
  config, steps: int
) -> tuple[optax.GradientTransformation, adalora.AdaLoraConfig]:
  """clip per skill -> AdamW(schedule), with the AdaLoRA allocator (`with_allocator`), then
  accumulation. The schedule is validated here, before anything is compiled."""
  opt = config.optimizer
  adalora_cfg = adalora_config(config, steps)
  try:
    adalora_cfg.validate()
  except ValueError as e:
    raise ConfigError(
      f"the AdaLoRA schedule (--config.adalora.*, --config.train.steps): {e}"
    ) from None
  clip = clip_by_skill_norm(opt.clip_norm) if opt.clip_norm > 0 else None
  update = optax.adamw(
    learning_rate_schedule(opt, steps),
    b1=opt.b1,
    b2=opt.b2,
    eps=opt.eps,
    weight_decay=opt.weight_decay,
  )
  tx = with_allocator(clip, update, adalora_cfg, config.adalora.importance_grads)
  if opt.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
  return tx, adalora_cfg
