"""Stage-1 batches: one data stream per skill, joined into one static-shape global batch.

A batch holds `rows_per_skill` rows of every selected skill from that skill's own stream, so a
skill sees exactly the rows it would see if trained alone. Logits are needed only at answer
positions, whose indices are precomputed here, packed and padded to a power of two.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from mdkif_jax import data, errors, sharding


def answer_count(loss_mask_BT: np.ndarray, groups: int = 1) -> int:
  """Answer tokens in the fullest of `groups` equal consecutive row groups."""
  per_row = (loss_mask_BT > 0).sum(axis=1)
  return int(per_row.reshape(groups, -1).sum(axis=1).max())


def answer_index(
  loss_mask_BT: np.ndarray, groups: int = 1, smallest: int = 16, at_least: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Where the answer tokens are, packed: (idx [G, N] int32, weight [G, N] f32).

  The loss needs logits only at answer tokens, so the vocabulary projection (the largest
  matmul of a small model) runs on N packed positions instead of all B x T: a summary's
  200-token answer no longer pads every other row's 2-token answer to 200. The B rows are cut
  into G equal consecutive groups (G = the data-parallel devices, so a group never leaves its
  device); idx[g, n] = row_in_group * T + t indexes group g's rows flattened. N is a power of
  two (>= `smallest`, >= `at_least`), so only a handful of shapes ever compile; padding
  entries have weight 0.
  """
  B, T = loss_mask_BT.shape
  if B % groups:
    raise ValueError(f"{B} rows cannot be cut into {groups} equal answer groups")
  N = smallest
  while max(answer_count(loss_mask_BT, groups), at_least) > N:
    N *= 2
  N = min(N, B // groups * T)
  flat = loss_mask_BT.reshape(groups, -1)
  idx = np.zeros((groups, N), np.int32)
  valid = np.zeros((groups, N), np.float32)
  for g, row in enumerate(flat):
    pos = np.flatnonzero(row > 0)[:N]
    idx[g, : len(pos)] = pos
    valid[g, : len(pos)] = row[pos]
  return idx, valid


class SkillBatches:
  """One data stream per skill; a batch is `rows` rows of each, padded to a common length."""

  def __init__(self, per_skill: dict[str, data.pipeline.Batches], pad_id: int, groups: int = 1):
    self.per_skill, self.pad_id, self.groups = per_skill, pad_id, groups

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
    groups = self.groups if out["loss_mask"].shape[0] % self.groups == 0 else 1
    longest = answer_count(out["loss_mask"], groups)
    if jax.process_count() > 1:
      longest = int(multihost_utils.process_allgather(np.int32(longest)).max())
    out["answer_idx"], out["answer_valid"] = answer_index(
      out["loss_mask"], groups, at_least=longest
    )
    return out

  def get_state(self) -> dict:
    return {s: it.get_state() for s, it in self.per_skill.items()}

  def set_state(self, state: dict) -> None:
    if set(state) != set(self.per_skill):
      raise errors.CheckpointMismatchError(
        f"data state is for skills {sorted(state)}, this run trains {sorted(self.per_skill)}"
      )
    for s, it in self.per_skill.items():
      it.set_state(state[s])


def answer_groups(config) -> int:
  """Data-parallel devices of this process: the answer positions are packed per device."""
  dp = sharding.make_mesh(tuple(config.mesh.shape)).shape
  return max(dp["data"] * dp["fsdp"] // jax.process_count(), 1)


def make_batches(config, skills: tuple[str, ...], tok) -> SkillBatches:
  examples = data.load_examples(config.data, "train")
  by_skill = {s: [e for e in examples if e.skill == s] for s in skills}
  missing = [s for s, ex in by_skill.items() if not ex]
  if missing:
    raise ValueError(
      f"no training examples for skill(s) {missing} in data_dir={config.data.data_dir}"
    )
  per_skill = {
    s: data.make_iterator(
      ex,
      tok,
      config.data,
      batch_size=config.train.rows_per_skill,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    for s, ex in by_skill.items()
  }
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  return SkillBatches(per_skill, pad, answer_groups(config))


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
    cfg_data.pack = False  # one row per reserved example: each is scored on its own
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  per = {}
  for s, ex in by_skill.items():
    it = data.make_iterator(ex, tok, cfg_data, batch_size=n)
    it.batch_size = min(n, it.num_examples)  # every reserved row once, none repeated
    per[s] = it
  return next(SkillBatches(per, pad, answer_groups(config)))


def to_global(
  batch: dict[str, np.ndarray], mesh, *, per_process: bool = True
) -> dict[str, jax.Array]:
  """Host batches -> one global array per key, sharded over the batch axes.

  per_process: each process holds its own rows and the global batch is every process's rows
  side by side (stage-1 training); False: every process holds the same full batch (scoring,
  fitting a router), and each device takes its slice of it.
  """
  out = {}
  n_proc = jax.process_count() if per_process else 1
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
    if per_process:
      out[k] = jax.make_array_from_process_local_data(sh, v, global_shape)
    else:
      out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
  return out
