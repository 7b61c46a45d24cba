"""Stage 1 training on a tiny model: joint == separate, sharded == single device, only the
adapters train, non-finite steps never reach the weights, checkpoints refuse foreign runs."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from configs import skill
from mdkif_jax import checkpoint, optimizer, sharding, train
from mdkif_jax.data import batches
from mdkif_jax.model import loading
from mdkif_jax.model.config import PRESETS


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


def test_only_adapters_get_gradients_and_optimizer_state(tmp_path):
  cfg = tiny_config(steps=4)
  base = loading.load_model(cfg.model.source)
  before = jax.tree.map(lambda x: np.array(x), nnx.split(base)[1])
  out = train.train_skills(cfg, tmp_path, ("qa",), base=base)
  after = nnx.split(base)[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, after)
  # every optimizer/allocator leaf is adapter-shaped (or a scalar / mask / per-skill value)
  adapter_shapes = {x.shape for x in jax.tree.leaves(out["adapters"])}
  mask_shapes = {m.shape for m in out["masks"].values()}
  base_shapes = {x.shape for x in jax.tree.leaves(before)}
  tx, _ = optimizer.build_optimizer(cfg, 4)
  opt_state = tx.init(out["adapters"])
  for leaf in jax.tree.leaves(opt_state):
    assert leaf.shape in adapter_shapes | mask_shapes | {()}, leaf.shape
    assert leaf.shape not in base_shapes - adapter_shapes
  # and E really changed while the pruned triplets are zero
  e = out["adapters"]["q"]["E"]
  assert np.abs(np.asarray(e)).max() > 0
  assert np.all(np.asarray(e)[~out["masks"]["q"]] == 0)


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
