"""Orbax checkpoints of what trains: adapters, optimizer + allocator state, step, data position.

Never the frozen base (it is reloaded from its own files). Saves are atomic (Orbax writes to a
temporary directory and renames), so a process killed at any moment leaves either the previous
checkpoint or the new one, never a half-written one. A checkpoint records the model and skill
set it belongs to; restoring into a different one is refused.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir belongs to another model, skill set or adapter shape."""


def manager(directory: str | pathlib.Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(
    pathlib.Path(directory).absolute(), options=options, item_names=("state", "data", "meta")
  )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict):
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    ),
  )


def check_meta(saved: dict, expected: dict, where: str) -> None:
  """Refuse a checkpoint whose identity (model, skills, adapter shape) differs."""
  problems = [
    f"{key}: checkpoint has {json.dumps(saved.get(key))}, this run has {json.dumps(value)}"
    for key, value in expected.items()
    if saved.get(key) != value
  ]
  if problems:
    raise CheckpointMismatchError(
      f"{where}: this checkpoint belongs to a different run; refusing to resume. "
      + "; ".join(problems)
      + ". Use another --workdir, or delete the checkpoint to start over."
    )


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, expected_meta: dict):
  """(step, state, data_state) of the latest checkpoint, or None when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  where = str(pathlib.Path(mngr.directory) / str(step))
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_meta(meta, expected_meta, where)
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    ),
  )
  return step, restored["state"], restored["data"]


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target of a live pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
