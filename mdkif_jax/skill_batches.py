"""Stage-1 batches: one data stream per skill, joined into one static-shape global batch.

A batch holds `rows_per_skill` rows of every selected skill from that skill's own stream, so a
skill sees exactly the rows it would see if trained alone. Logits are needed only at answer
positions, whose indices are precomputed here with power-of-two padding.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from mdkif_jax import checkpoint, data, sharding


def answer_index(
  loss_mask_BT: np.ndarray, smallest: int = 16, at_least: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Positions of the answer tokens per row, padded to a power of two (static shapes for jit).

  The loss needs logits only there, so the vocabulary projection — the largest matmul of a
  small model — runs on K answer positions instead of all T. Powers of two keep the number
  of compiled shapes to a handful.
  """
  counts = (loss_mask_BT > 0).sum(axis=1)
  K = smallest
  while max(int(counts.max()), at_least) > K:
    K *= 2
  K = min(K, loss_mask_BT.shape[1])
  idx = np.zeros((loss_mask_BT.shape[0], K), np.int32)
  valid = np.zeros((loss_mask_BT.shape[0], K), np.float32)
  for b, row in enumerate(loss_mask_BT):
    pos = np.flatnonzero(row > 0)[:K]
    idx[b, : len(pos)] = pos
    valid[b, : len(pos)] = row[pos]
  return idx, valid


class SkillBatches:
  """One data stream per skill; a batch is `rows` rows of each, padded to a common length."""

  def __init__(self, per_skill: dict[str, data.pipeline.Batches], pad_id: int):
    self.per_skill, self.pad_id = per_skill, pad_id

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.per_skill.values()]
    T = max(p["tokens"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
      arrays = []
      for p in parts:
        a = p[key]
        if a.ndim == 2 and a.shape[1] < T:
          fill = self.pad_id if key in ("tokens", "targets") else 0
          a = np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=fill)
        arrays.append(a)
      out[key] = np.concatenate(arrays, axis=0)
    # every process must feed the step the same shapes (the pipeline already agrees on T)
    longest = int((out["loss_mask"] > 0).sum(axis=1).max())
    if jax.process_count() > 1:
      longest = int(multihost_utils.process_allgather(np.int32(longest)).max())
    out["answer_idx"], out["answer_valid"] = answer_index(out["loss_mask"], at_least=longest)
    return out

  def get_state(self) -> dict:
    return {s: it.get_state() for s, it in self.per_skill.items()}

  def set_state(self, state: dict) -> None:
    if set(state) != set(self.per_skill):
      raise checkpoint.CheckpointMismatchError(
        f"data state is for skills {sorted(state)}, this run trains {sorted(self.per_skill)}"
      )
    for s, it in self.per_skill.items():
      it.set_state(state[s])


def make_batches(config, skills: tuple[str, ...], tok) -> SkillBatches:
  examples = data.load_examples(config.data, "train")
  by_skill = {s: [e for e in examples if e.skill == s] for s in skills}
  missing = [s for s, ex in by_skill.items() if not ex]
  if missing:
    raise ValueError(
      f"no training examples for skill(s) {missing} in data_dir={config.data.data_dir}"
    )
  cfg_data = config.data.copy_and_resolve_references()
  with cfg_data.unlocked():
    cfg_data.batch_size = config.train.rows_per_skill
  per_skill = {
    s: data.make_iterator(
      ex, tok, cfg_data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    for s, ex in by_skill.items()
  }
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  return SkillBatches(per_skill, pad)


def make_eval_batch(config, skills: tuple[str, ...], tok) -> dict[str, np.ndarray] | None:
  """One fixed batch of each skill's first reserved ("eval") examples, or None if disabled.

  The same rows are scored before and after training, so the change is the skill's learning,
  not batch-to-batch noise.
  """
  n = int(config.train.eval_rows_per_skill)
  if n <= 0:
    return None
  examples = data.load_examples(config.data, "eval")
  by_skill = {s: [e for e in examples if e.skill == s][:n] for s in skills}
  by_skill = {s: ex for s, ex in by_skill.items() if ex}
  if not by_skill:
    return None
  cfg_data = config.data.copy_and_resolve_references()
  with cfg_data.unlocked():
    cfg_data.batch_size = n
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  per = {}
  for s, ex in by_skill.items():
    it = data.make_iterator(ex, tok, cfg_data)
    it.batch_size = min(n, it.num_examples)  # every reserved row once, none repeated
    per[s] = it
  return next(SkillBatches(per, pad))


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Host-local rows -> one global array per key, sharded over the batch axes."""
  out = {}
  n_proc = jax.process_count()
  rows = next(iter(batch.values())).shape[0] * n_proc
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if n_proc > 1 and rows % dp:
    raise ValueError(
      f"the global batch has {rows} rows (rows_per_skill x skills x {n_proc} processes), not "
      f"divisible by the {dp} data x fsdp devices: raise train.rows_per_skill or change "
      "mesh.shape"
    )
  for k, v in batch.items():
    names = ("batch", "length")[: v.ndim]
    global_shape = (v.shape[0] * n_proc, *v.shape[1:])
    sh = sharding.named_sharding(mesh, names, global_shape)
    out[k] = jax.make_array_from_process_local_data(sh, v, global_shape)
  return out
