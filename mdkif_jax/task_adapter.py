"""The reference a router must approach: one AdaLoRA adapter trained on a task's fit rows with
the same budget of forward/backward passes as the gradient-descent router (router.steps
batches of router.batch_size rows), then merged into the kernels and scored like any method.

It trains with stage 1's own step (train.setup_training: the same AdaLoRA allocator, loss and
clipping), on the evaluation config's `adalora` and `optimizer` sections, with the schedule's
total_step set to router.steps.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from mdkif_jax import evaluate, fit_router, reporting, train
from mdkif_jax.data import batches, task
from mdkif_jax.data.skills import skill_id
from mdkif_jax.peft import serving

SLOT = "qa"  # the skill slot the task adapter occupies in stage 1's step (any one works)


def train_adapter(t) -> tuple[dict, float, list[float]]:
  """(adapters [1, L, ...], scale, loss per step) of an AdaLoRA adapter fitted on t.fit_rows."""
  config = t.config.copy_and_resolve_references()
  steps = int(config.router.steps)
  with config.unlocked():
    config.train.steps = steps
  base = nnx.merge(t.graphdef, t.frozen)
  run = train.setup_training(config, (SLOT,), base=base, tok=t.tok)
  dp = t.mesh.shape["data"] * t.mesh.shape["fsdp"]
  host = task.make_batches(t.fit_rows, t.tok, config.data, int(config.router.batch_size), dp)
  device = []
  for b in host:
    b = {**b, "skill_ids": np.full(len(b["tokens"]), skill_id(SLOT), np.int32)}
    device.append(batches.to_global(b, t.mesh, per_process=False))
  state, curve = run.state, []
  # a bar like the routers' fit bars (the loss read each step paces it)
  bar = reporting.progress_bar(
    bool(config.progress), total=steps, desc="adalora_task", unit="step", leave=False
  )
  with bar:
    for i in range(steps):
      state, m = run.fns.train_step(state, run.frozen, device[i % len(device)])
      curve.append(float(np.asarray(m["loss_S"])[0]))
      bar.set_postfix(loss=f"{curve[-1]:.4f}", refresh=False)
      bar.update()
  return state["adapters"], run.scale, curve


def train_and_score(t):
  adapters, scale, curve = train_adapter(t)
  params = serving.merged_params(t.frozen, adapters, np.ones(1, np.float32), scale)
  stats_fn = lambda batch: evaluate.merged_stats(params, batch, graphdef=t.graphdef)  # noqa: E731
  model = nnx.merge(t.graphdef, params)
  scores = t.scorer(stats_fn, evaluate.Decoder(t.tok, t.config, model))
  return fit_router.Fitted(scores, None, curve)
