"""All Orbax I/O: checkpoints of what trains (adapters, optimizer + allocator state, step, data
position), the run identity they carry, stage 1's skills as stage 2 reads them, and routers.

Never the frozen base (it is reloaded from its own files). Saves are atomic (Orbax writes to a
temporary directory and renames), so a process killed at any moment leaves either the previous
checkpoint or the new one, never a half-written one. A checkpoint records the model and skill
set it belongs to (`run_identity`); restoring into a different one is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mdkif_jax.errors import CheckpointMismatchError, SkillsMismatchError
from mdkif_jax.peft import import_peft, serving

log = logging.getLogger(__name__)

# Test-only: SIGKILL this process right after the save of this step has started (Orbax's
# temporary directory exists, nothing is committed), so a test can kill inside a save.
KILL_IN_SAVE_ENV = "MDKIF_TEST_KILL_IN_SAVE"


class DamagedCheckpointError(RuntimeError):
  """Every checkpoint step in a directory is damaged: nothing to resume from."""


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


# ---- run identity ----------------------------------------------------------------------------
def model_identity(model_cfg) -> dict:
  """The base model's identity: its ModelConfig as JSON."""
  return json.loads(json.dumps(dataclasses.asdict(model_cfg), default=list))


def run_identity(model_cfg, skills, targets, init_r: int, scale: float) -> dict:
  """What a stage-1 checkpoint belongs to; a resume or a stage-2 load into another is refused."""
  return {
    "model": model_identity(model_cfg),
    "skills": list(skills),
    "targets": list(targets),
    "init_r": int(init_r),
    "scale": float(scale),
  }


def serving_meta(data_cfg) -> dict:
  """How the skills were prompted (template and max_len): stage 2 reads it, so its rows are
  built exactly as stage 1's. Recorded beside the identity, not checked on resume."""
  return {"template": data_cfg.template.to_dict(), "max_len": int(data_cfg.max_len)}


def manager(
  directory: str | pathlib.Path, keep: int, async_save: bool, keep_period: int | None = None
) -> ocp.CheckpointManager:
  """keep: the newest checkpoints kept; keep_period: steps that are its multiples are never
  deleted either (the learning curve's points)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    keep_period=keep_period or None,
    create=True,
    enable_async_checkpointing=async_save,
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
  if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def workdir_lock(workdir: str | pathlib.Path):
  """Hold the workdir for this run: a second run on it refuses at start. The lock is an
  flock on `<workdir>/.lock`, which the OS drops when the process dies, so a killed run never
  leaves it stuck. Process 0 holds it for a multi-process run."""
  if jax.process_index() != 0:
    yield
    return
  path = pathlib.Path(workdir) / ".lock"
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise WorkdirBusyError(
        f"{workdir} is in use by another run (pid {holder}); wait for it to finish, or give "
        "this run another --workdir"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


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


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def trained_target_r(meta: dict) -> int | None:
  """The final mean rank the adapters were trained to (None: not recorded). The checkpoint
  keeps the config's adalora.target_r; a union adapter under train.union_budget="all_skills"
  was trained to that times the skills it stands for (train.as_trained), like its init_r."""
  r = meta.get("adalora.target_r")
  if r is None:
    return None
  if meta.get("union_of") and meta.get("union_budget", "all_skills") == "all_skills":
    return int(r) * len(meta["union_of"])
  return int(r)


def _why(e: Exception) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:300]}"


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Rename a damaged step to `<step>.damaged[-k]` (kept for inspection, out of Orbax's way)."""
  src = pathlib.Path(mngr.directory) / str(step)
  dst = src.with_name(f"{step}.damaged")
  k = 1
  while dst.exists():
    dst, k = src.with_name(f"{step}.damaged-{k}"), k + 1
  if jax.process_index() == 0:
    src.rename(dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set aside damaged checkpoint {step}")
  return dst


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, expected_meta: dict):
  """(step, state, data_state) of the newest intact checkpoint, or None when there is none.

  Only the keys of `expected_meta` are compared with the checkpoint's meta: a checkpoint of
  another run is refused (CheckpointMismatchError). A damaged step (unreadable meta, a
  missing or truncated array file, bad metadata) does not end the run: it is renamed to
  `<step>.damaged`, a warning names it and what was wrong, and the next older step is tried;
  when none is intact, DamagedCheckpointError says so.
  """
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    where = str(pathlib.Path(mngr.directory) / str(step))
    try:
      meta = read_meta(mngr, step)
    except Exception as e:  # Orbax / tensorstore / JSON raise many types for damaged files
      damaged.append((step, f"meta: {_why(e)}"))
      continue
    check_meta(meta, expected_meta, where)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    )
    try:
      restored = mngr.restore(step, args=args)
      if not isinstance(restored["data"], dict):
        raise ValueError(f"data position is {type(restored['data']).__name__}, not a dict")
    except Exception as e:
      damaged.append((step, f"state or data: {_why(e)}"))
      continue
    _report_damaged(mngr, damaged, f"resuming from step {step}")
    return step, restored["state"], restored["data"]
  if damaged:
    _report_damaged(mngr, damaged, "no intact step is left")
    raise DamagedCheckpointError(
      f"{mngr.directory}: every checkpoint step is damaged ("
      + "; ".join(f"step {s}: {why}" for s, why in damaged)
      + "); they were renamed to <step>.damaged. Rerun to start over, or use another --workdir."
    )
  return None


def _report_damaged(mngr, damaged: list, outcome: str) -> None:
  for step, why in damaged:
    moved = _set_aside(mngr, step)
    log.warning("checkpoint step %d is damaged (%s); moved to %s; %s", step, why, moved, outcome)
  if damaged:
    mngr.reload()


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target of a live pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---- stage 1's skills, read by stage 2 -------------------------------------------------------
def _refuse_other_base(meta: dict, want: dict, where: pathlib.Path) -> None:
  have = meta.get("model") or {}
  if have == want:
    return
  diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
  raise SkillsMismatchError(
    f"{where}: these skills were trained on another base model (differs in "
    f"{', '.join(diff)}; checkpoint: "
    + ", ".join(f"{k}={have.get(k)}" for k in diff[:4])
    + "; this run: "
    + ", ".join(f"{k}={want.get(k)}" for k in diff[:4])
    + "). Set --config.model.source to the stage-1 base, or retrain the skills on this one."
  )


def load_one(workdir, base_cfg, mesh, step=None) -> tuple[dict, dict, float]:
  """(adapters [S, ...], meta, scale) of one stage-1 run, checked against this base."""
  ckpt = pathlib.Path(workdir) / "checkpoints"
  latest = None
  if ckpt.is_dir():
    mngr = manager(ckpt, keep=1, async_save=False)
    latest = mngr.latest_step() if step is None else step
  if latest is None:
    raise SkillsMismatchError(
      f"skills_from={str(workdir)!r}: no stage-1 checkpoint in {ckpt} (run stage 1 with "
      f"--workdir={workdir} first)"
    )
  if step is not None and step not in (steps := list(mngr.all_steps())):
    raise SkillsMismatchError(
      f"skills_from={str(workdir)!r}: no checkpoint at step {step} in {ckpt} (it holds {steps})"
    )
  meta = read_meta(mngr, latest)
  _refuse_other_base(meta, model_identity(base_cfg), ckpt / str(latest))
  planned = meta.get("train.steps")
  if step is None and planned is not None and latest < int(planned):
    # Taking the latest step of an unfinished run would silently score half-trained skills
    # (and pin an evaluation's cells to them): use one only when it is asked for by step.
    raise SkillsMismatchError(
      f"skills_from={str(workdir)!r}: stage 1 there reached step {latest} of {planned} (still "
      f"training, or stopped): let it finish (rerun stage 1 with --workdir={workdir}), or name "
      f"this checkpoint to use it on purpose: --config.skills_step={latest} (stage 2 and the "
      f"evaluation, on one joint-mode workdir) or export's --step {latest}"
    )
  S, r, L = len(meta["skills"]), int(meta["init_r"]), base_cfg.num_hidden_layers
  dims = base_cfg.projection_dims()
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  f32 = jnp.float32
  abstract = {
    t: {
      "A": jax.ShapeDtypeStruct((S, L, r, dims[t][0]), f32, sharding=rep),
      "E": jax.ShapeDtypeStruct((S, L, r), f32, sharding=rep),
      "B": jax.ShapeDtypeStruct((S, L, dims[t][1], r), f32, sharding=rep),
    }
    for t in meta["targets"]
  }
  # restore_args carry the target sharding: without them Orbax places the arrays as they were
  # saved (one device), and a run on a larger mesh then mixes device sets
  target = {"adapters": abstract}
  restore = ocp.args.PyTreeRestore(
    target,
    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    partial_restore=True,
  )
  restored = mngr.restore(latest, args=ocp.args.Composite(state=restore))
  return restored["state"]["adapters"], meta, float(meta["scale"])


@dataclasses.dataclass(frozen=True)
class Skills:
  """Stage 1's skills as stage 2 uses them: stacked on the skill axis, in skills_from order."""

  stacked: dict  # {target: {"A": [S, L, r, in], "E": [S, L, r], "B": [S, L, out, r]}}
  names: tuple[str, ...]
  scale: float  # the adapter scale of the whole stack
  serving: dict | None  # template and max_len of stage 1 (None: an older checkpoint)

  def __iter__(self):  # (stacked, names, scale) = load_skills(...)
    return iter((self.stacked, self.names, self.scale))

  def fingerprint(self) -> dict:
    """The skills' names, scale and a SHA-256 of every adapter array: an evaluation's cells
    belong to these exact weights (a retrained stage 1 that reproduces them bit for bit keeps
    its cells; one that does not is told apart)."""
    h = hashlib.sha256()
    for t in sorted(self.stacked):
      for k in sorted(self.stacked[t]):
        a = np.ascontiguousarray(jax.device_get(self.stacked[t][k]), np.float32)
        h.update(f"{t}.{k}{a.shape}".encode())
        h.update(a.tobytes())
    return {"skills": list(self.names), "scale": self.scale, "sha256": h.hexdigest()}


SEPARATE_PLAN = "separate_skills.json"  # the skills a train.mode=separate workdir trains


def plan_separate(workdir: str | pathlib.Path, skills) -> None:
  """Record the skills a separate-mode stage 1 trains in `workdir` (with those of earlier
  runs there), before the first one starts."""
  path = pathlib.Path(workdir) / SEPARATE_PLAN
  planned = set(json.loads(path.read_text())["skills"]) if path.exists() else set()
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"skills": sorted(planned | set(skills))}))


def stage1_runs(workdir: str | pathlib.Path, complete: bool = True) -> list[pathlib.Path]:
  """The stage-1 runs in a workdir: itself (train.mode=joint), or, when it holds no
  checkpoints of its own, its per-skill runs `<workdir>/<skill>/` (train.mode=separate) in
  registry order; a planned skill without a checkpoint yet is refused, not left out (unless
  `complete` is False: inspecting a stage 1 in progress)."""
  from mdkif_jax.data.skills import SKILLS

  workdir = pathlib.Path(workdir)
  per_skill = [workdir / s for s in SKILLS if (workdir / s / "checkpoints").is_dir()]
  if (workdir / "checkpoints").is_dir() or not per_skill:
    return [workdir]
  plan = workdir / SEPARATE_PLAN
  planned = json.loads(plan.read_text())["skills"] if plan.exists() else []
  missing = [s for s in planned if not (workdir / s / "checkpoints").is_dir()]
  if missing and complete:
    raise SkillsMismatchError(
      f"skills_from={str(workdir)!r}: skills {missing} of this separate-mode stage 1 have no "
      f"checkpoint yet: let it finish, or name the finished ones' folders (e.g. "
      f"{workdir / per_skill[0].name})"
    )
  return per_skill


def load_skills(config, base_cfg, mesh) -> Skills:
  """The skills of every entry in `config.skills_from`, stacked: stage-1 workdirs, and PEFT
  adapter directories as `peft:PATH` (peft/import_peft.py). The workdirs must agree on the
  prompt template and max_len (stage 2 builds its rows with them)."""
  dirs = [d.strip() for d in (config.skills_from or "").split(",") if d.strip()]
  if not dirs:
    raise SkillsMismatchError("config.skills_from is not set: give the stage-1 workdir(s)")
  peft = import_peft.PEFT_PREFIX
  dirs = [run for d in dirs for run in ([d] if d.startswith(peft) else stage1_runs(d))]
  step = config.skills_step if len(dirs) == 1 else None
  runs = [
    import_peft.load_peft_skill(str(d), base_cfg, mesh)
    if str(d).startswith(peft)
    else load_one(d, base_cfg, mesh, step)
    for d in dirs
  ]
  runs = import_peft.align_targets(runs)  # a PEFT adapter often adapts only q and v
  names = [s for _, meta, _ in runs for s in meta["skills"]]
  if len(set(names)) != len(names):
    raise SkillsMismatchError(f"skills_from={config.skills_from!r} names a skill twice: {names}")
  # An imported adapter carries no prompt template: stage 1's workdirs decide it
  ours = [meta for _, meta, _ in runs if "imported" not in meta]
  served = {json.dumps(meta.get("serving"), sort_keys=True) for meta in ours}
  if len(served) > 1:
    raise SkillsMismatchError(
      f"skills_from={config.skills_from!r}: the runs were trained with different prompt "
      f"templates or max_len ({sorted(served)}); retrain one of them with the other's"
    )
  scale = runs[0][2]
  stacked = None
  for skills, _, run_scale in runs:
    if run_scale != scale:  # fold a different scale into B so one scale serves the whole stack
      ratio = run_scale / scale
      skills = {t: {**leaf, "B": leaf["B"] * ratio} for t, leaf in skills.items()}
    stacked = skills if stacked is None else serving.add_skills(stacked, skills)
  return Skills(stacked, tuple(names), scale, ours[0].get("serving") if ours else None)


# ---- routers -------------------------------------------------------------------------------
def save_router(workdir: pathlib.Path, state: dict, meta: dict, data_state: dict) -> None:
  """One Orbax checkpoint (step 0) of the router; a rerun replaces it, a foreign one is kept."""
  mngr = manager(workdir / "checkpoints", keep=1, async_save=False)
  for step in mngr.all_steps():
    check_meta(read_meta(mngr, step), meta, str(workdir / "checkpoints" / str(step)))
    mngr.delete(step)
  save(mngr, 0, jax.tree.map(np.asarray, state), data_state, meta)  # every process
  mngr.wait_until_finished()
  mngr.close()


def load_router(workdir: str | pathlib.Path) -> tuple[dict, dict]:
  """(state, meta) of a saved router: {"weights": w_S, "theta"?: ..., "gate"?: pure dict}."""
  ckpt = pathlib.Path(workdir) / "checkpoints"
  if not ckpt.is_dir():  # before Orbax's manager, which would create it
    raise FileNotFoundError(f"no router checkpoint in {ckpt}")
  mngr = manager(ckpt, keep=1, async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no router checkpoint in {ckpt}")
  args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  out = mngr.restore(step, args=args)
  return out["state"], out["meta"]
