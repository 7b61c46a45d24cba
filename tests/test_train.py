"""Stage 1 training on a tiny model: joint == separate, sharded == single device, only the
adapters train, non-finite steps never reach the weights, checkpoints refuse foreign runs."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import skill
from mdkif_jax import checkpoint, optimizer, sharding, train
from mdkif_jax.data import batches
from mdkif_jax.model import loading
from mdkif_jax.model.config import PRESETS
from mdkif_jax.peft import adalora


def tiny_config(skills="qa+ner", steps=6, **train_over):
  c = skill.get_config("tiny")
  c.skills = skills
  c.train.steps = steps
  c.train.progress = False
  c.train.plot = False
  c.train.checkpoint_every = 100
  c.adalora.tinit, c.adalora.tfinal, c.adalora.delta_t = 1, 2, 1
  c.mesh.shape = (1, 1, 1)
  for k, v in train_over.items():
    setattr(c.train, k, v)
  return c


def _close(a, b, atol=2e-5):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol), a, b
  )


def test_joint_skills_equal_separate_runs(tmp_path):
  cfg = tiny_config()
  joint = train.train_skills(cfg, tmp_path / "joint", ("qa", "ner"))
  for i, s in enumerate(("qa", "ner")):
    alone = train.train_skills(cfg, tmp_path / s, (s,))
    _close(
      jax.tree.map(lambda x, i=i: x[i], joint["adapters"]),
      jax.tree.map(lambda x: x[0], alone["adapters"]),
    )
    for t in joint["masks"]:
      np.testing.assert_array_equal(joint["masks"][t][i], alone["masks"][t][0])
    np.testing.assert_allclose(
      [h[f"loss/{s}"] for h in joint["history"]],
      [h[f"loss/{s}"] for h in alone["history"]],
      atol=1e-5,
    )
  # and the pruning did happen: the final mean rank equals target_r
  assert joint["ranks"].mean() == pytest.approx(cfg.adalora.target_r)


def test_sharded_training_equals_single_device(tmp_path):
  cfg = tiny_config(rows_per_skill=2)
  single = train.train_skills(cfg, tmp_path / "one", ("qa", "ner"))
  cfg.mesh.shape = (2, 2, 2)
  mesh = sharding.make_mesh((2, 2, 2))
  base = loading.load_model(cfg.model.source, mesh=mesh)
  assert len(base.gate[...].addressable_shards) == 8
  sharded = train.train_skills(cfg, tmp_path / "eight", ("qa", "ner"), base=base)
  _close(single["adapters"], sharded["adapters"])
  for t in single["masks"]:
    np.testing.assert_array_equal(single["masks"][t], sharded["masks"][t])
  np.testing.assert_allclose(
    [h["loss/qa"] for h in single["history"]], [h["loss/qa"] for h in sharded["history"]], atol=1e-5
  )


def test_the_step_donates_its_state_but_never_the_base_and_only_adapters_get_optimizer_state():
  cfg = tiny_config(steps=4)
  run = train.setup_training(cfg, ("qa",))
  stream = batches.make_batches(cfg, ("qa",), run.tok)
  base = jax.tree.leaves(run.frozen)
  batch = batches.to_global(next(stream), run.mesh)
  # declared: every state leaf is donated, no base leaf is (an unusable donation of the base
  # would leave its arrays alive, so only the declaration shows it)
  state_info, frozen_info, _ = run.fns.train_step.lower(run.state, run.frozen, batch).args_info[0]
  assert all(a.donated for a in jax.tree.leaves(state_info))
  assert not any(a.donated for a in jax.tree.leaves(frozen_info))
  for _ in range(4):
    old = run.state
    run.state, _ = run.fns.train_step(run.state, run.frozen, batch)
    # done: the old state's arrays were given up to the update; the base's are all alive
    assert all(x.is_deleted() for x in jax.tree.leaves(old))
    assert not any(x.is_deleted() for x in base)
    batch = batches.to_global(next(stream), run.mesh)
  # every leaf of the trained optimizer/allocator state is adapter-shaped (or a scalar / mask /
  # per-skill value): no moments or sensitivities of any base weight
  alloc = adalora.find_state(run.state["opt_state"])
  adapter_shapes = {x.shape for x in jax.tree.leaves(run.state["adapters"])}
  mask_shapes = {m.shape for m in alloc.mask.values()}
  base_shapes = {x.shape for x in base}
  for leaf in jax.tree.leaves(run.state["opt_state"]):
    assert leaf.shape in adapter_shapes | mask_shapes | {()}, leaf.shape
    assert leaf.shape not in base_shapes - adapter_shapes
  # and E really changed while the pruned triplets (there are some) are zero
  e, kept = np.asarray(run.state["adapters"]["q"]["E"]), np.asarray(alloc.mask["q"])
  assert np.abs(e).max() > 0 and not kept.all()
  assert np.all(e[~kept] == 0)


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
  cfg = tiny_config(steps=6, max_bad_steps=3)
  real_next = batches.SkillBatches.__next__
  calls = {"n": 0}

  def poisoned(self):
    batch = real_next(self)
    calls["n"] += 1
    if calls["n"] == 2:  # one bad step: skipped, training goes on
      batch["answer_valid"] = batch["answer_valid"] * np.nan
    return batch

  monkeypatch.setattr(batches.SkillBatches, "__next__", poisoned)
  out = train.train_skills(cfg, tmp_path / "one_bad", ("qa",))
  assert out["skipped_steps"] == 1
  assert np.isfinite(np.asarray(out["adapters"]["q"]["E"])).all()

  def always_bad(self):
    batch = real_next(self)
    batch["answer_valid"] = batch["answer_valid"] * np.nan
    return batch

  monkeypatch.setattr(batches.SkillBatches, "__next__", always_bad)
  with pytest.raises(train.NonFiniteError, match="3 non-finite steps in a row"):
    train.train_skills(cfg, tmp_path / "all_bad", ("qa",))


def test_checkpoint_of_another_skill_set_or_model_is_refused(tmp_path):
  cfg = tiny_config(steps=4, checkpoint_every=1)
  train.train_skills(cfg, tmp_path, ("qa",))
  with pytest.raises(checkpoint.CheckpointMismatchError, match="skills"):
    train.train_skills(cfg, tmp_path, ("ner",))
  other = loading.random_init(
    dataclasses.replace(PRESETS["tiny_smollm_vocab"], num_hidden_layers=3)
  )
  with pytest.raises(checkpoint.CheckpointMismatchError, match="num_hidden_layers"):
    train.train_skills(cfg, tmp_path, ("qa",), base=other)


def test_bad_adalora_schedule_fails_before_any_compute():
  cfg = tiny_config(steps=3)
  cfg.adalora.tinit, cfg.adalora.tfinal = 2, 2
  with pytest.raises(ValueError, match="tinit < total_step - tfinal"):
    optimizer.build_optimizer(cfg, 3)


def test_rerun_resumes_and_finishes_like_uninterrupted(tmp_path):
  cfg = tiny_config(steps=6, checkpoint_every=2)
  full = train.train_skills(cfg, tmp_path / "full", ("qa",))
  # stop after 4 steps (as if the process died right after the step-4 checkpoint), rerun
  part = train.train_skills(cfg, tmp_path / "resumed", ("qa",), stop_after=4)
  assert len(part["history"]) == 4
  resumed = train.train_skills(cfg, tmp_path / "resumed", ("qa",))
  assert [h["step"] for h in resumed["history"]] == [5, 6]
  # each write records the wall and CPU time of its steps: both runs' rows add up the time
  rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  timed = [r for r in rows if "tokens_per_s" in r]
  assert {r["step"] for r in timed} >= {4, 6}, rows  # one before and one after the resume
  assert all(r["interval_wall_s"] > 0 and r["interval_cpu_s"] > 0 for r in timed)
  _close(full["adapters"], resumed["adapters"], atol=0)
  # the allocator state came back too: same masks as the uninterrupted run
  for t in full["masks"]:
    np.testing.assert_array_equal(full["masks"][t], resumed["masks"][t])


def test_gradient_accumulation_counts_optimizer_updates(tmp_path):
  cfg = tiny_config(steps=4)
  cfg.optimizer.grad_accum_steps = 2
  out = train.train_skills(cfg, tmp_path, ("qa",))
  assert [h["step"] for h in out["history"]] == [1, 2, 3, 4]
  # the allocator counted 4 optimizer updates, not 8 micro-batches, and pruned to target
  assert int(out["allocator_step"]) == 4
  assert out["ranks"].mean() == pytest.approx(cfg.adalora.target_r)
  assert out["data_state"]["qa"]["step"] == 8  # two micro-batches per update
