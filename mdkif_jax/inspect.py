"""What a run's checkpoints hold, read without restoring them.

  python -m mdkif_jax.inspect WORKDIR_OR_STEP_DIR [--step N] [--json] [--plot OUT.png]

for stage-1, router and evaluation workdirs. Shapes, dtypes and sizes come from Orbax's tree
metadata and the identity from the small JSON items, so no array is read; of stage 1's arrays
only the AdaLoRA masks are restored (a partial restore of that subtree) for the kept ranks.
A damaged step is reported (which item, what is wrong) and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import pathlib
import re
import sys
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from mdkif_jax import checkpoint, inspect_report, inspect_step, metrics, reporting, suite_report
from mdkif_jax.data import suite
from mdkif_jax.peft import adalora

SET_ASIDE = re.compile(r"(\d+)\.damaged(-\d+)?")  # checkpoint._set_aside's names


class InspectError(ValueError):
  """PATH is not a run this tool reads, or --step names no checkpoint of it."""


def metric_rows(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  rows = []
  for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a line cut by a kill: the rows around it still count
  return rows


# ---- stage 1 -----------------------------------------------------------------------------
def schedule_of(meta: dict) -> dict | None:
  """The AdaLoRA schedule recorded in a stage-1 checkpoint (train.schedule_identity)."""
  keys = ("train.steps", "adalora.tinit", "adalora.tfinal", "adalora.delta_t", "adalora.target_r")
  if not all(k in meta for k in keys):
    return None  # a checkpoint from before the schedule was recorded
  n = len(meta["targets"]) * int(meta["model"]["num_hidden_layers"])
  target_r = checkpoint.trained_target_r(meta)
  return {
    "total_step": int(meta["train.steps"]),
    "tinit": int(meta["adalora.tinit"]),
    "tfinal": int(meta["adalora.tfinal"]),
    "delta_t": int(meta["adalora.delta_t"]),
    "init_r": int(meta["init_r"]),
    "target_r": target_r,
    "matrices": n,
    "init_budget": n * int(meta["init_r"]),
    "target_budget": n * target_r,
    "grad_accum_steps": int(meta.get("optimizer.grad_accum_steps", 1)),
  }


def phase_at(step: int, s: dict) -> dict:
  """Where `step` (optimizer updates done) stands in the schedule; the allocator numbers
  updates from t = 0, so the last one done is t = step - 1."""
  T, tinit, tfinal = s["total_step"], s["tinit"], s["tfinal"]
  t = step - 1
  if step == 0:
    return {"name": "not started", "update": None, "scheduled_budget": s["init_budget"]}
  if t <= tinit:
    name = f"warm-up: no masking until update t={tinit + 1}"
  elif t < T - tfinal:
    name = f"budgeting: masks every {s['delta_t']} update(s) until update t={T - tfinal}"
  else:
    name = f"final: the pattern was fixed at update t={T - tfinal}"
  if step >= T:
    name += " (training done)"
  budget, _ = adalora.budget_schedule(
    t,
    tinit=tinit,
    tfinal=tfinal,
    total_step=T,
    delta_t=s["delta_t"],
    init_bgt=s["init_budget"],
    target_bgt=s["target_budget"],
  )
  return {"name": name, "update": t, "scheduled_budget": int(budget)}


def bad_steps(workdir: pathlib.Path, step: int) -> dict | None:
  """The non-finite step count train.py logs; the checkpoint does not hold it, and the count
  restarts with each (re)start of the run."""
  rows = [r for r in metric_rows(workdir) if "skipped_steps" in r and r.get("step", 0) <= step]
  if not rows:
    return None
  return {"count": int(rows[-1]["skipped_steps"]), "at_step": int(rows[-1]["step"])}


def stage1(workdir: pathlib.Path, step: int, step_dir: pathlib.Path, got: dict) -> tuple:
  """(the stage-1 fields of a report, damage): identity, schedule, phase, ranks."""
  meta, tree, damaged = got.get("meta"), got.get("tree"), []
  rep: dict[str, Any] = {"optimizer_step": step, "data_position": got.get("data")}
  if meta is not None:
    rep.update({k: meta.get(k) for k in ("model", "skills", "targets", "init_r", "scale")})
    rep["serving"] = meta.get("serving")
    rep["schedule"] = schedule_of(meta)
    if rep["schedule"]:
      rep["phase"] = phase_at(step, rep["schedule"])
  rep["bad_steps"] = bad_steps(workdir, step)
  where = inspect_step.allocator_path(tree) if tree is not None else None
  if tree is not None and where is None:
    damaged.append(inspect_step.damage(step_dir, "state", "no AdaLoRA masks"))
  if where is not None and meta is not None:
    try:
      masks = inspect_step.restore_subtree(step_dir / "state", tree, (*where, "mask"))
    except Exception as e:  # a damaged mask array (or the OCDBT index that holds it)
      damaged.append(inspect_step.damage(step_dir, "state (masks)", e))
    else:
      ranks = reporting.rank_table(masks, meta["targets"])  # [S, L, targets]
      rep["ranks"] = {
        s: {t: ranks[i, :, j].tolist() for j, t in enumerate(meta["targets"])}
        for i, s in enumerate(meta["skills"])
      }
      rep["mean_rank"] = {s: float(ranks[i].mean()) for i, s in enumerate(meta["skills"])}
      rep["kept"] = {s: int(ranks[i].sum()) for i, s in enumerate(meta["skills"])}
  return rep, damaged


# ---- routers ------------------------------------------------------------------------------
def router_scores(workdir: pathlib.Path) -> dict:
  """{method: {metric: value}} of the last scored row fit_router wrote to metrics.jsonl."""
  rows = [r for r in metric_rows(workdir) if any(k.startswith("eval/") for k in r)]
  out: dict[str, dict] = {}
  for key, value in (rows[-1] if rows else {}).items():
    if key.startswith("eval/"):
      _, method, metric = key.split("/", 2)
      out.setdefault(method, {})[metric] = value
  return out


def router(workdir: pathlib.Path, step_dir: pathlib.Path, got: dict) -> tuple:
  """(the router fields of a report, damage): method, task, weights per skill, the gate's
  layers, and the scores of the run's evaluation."""
  meta, tree, damaged = got.get("meta") or {}, got.get("tree"), []
  keys = ("model", "skills", "task", "method", "parametrisation", "gate_hidden", "gate_top_k")
  rep: dict[str, Any] = {k: meta.get(k) for k in keys}
  rep["rows"] = got.get("data")
  rep["scores"] = router_scores(workdir)
  if tree is None:
    return rep, damaged
  try:  # a router is a few small arrays: restoring them all is cheap
    state = inspect_step.restore_subtree(step_dir / "state", tree, ())
  except Exception as e:
    damaged.append(inspect_step.damage(step_dir, "state", e))
    return rep, damaged
  skills = rep["skills"] or [str(i) for i in range(len(state["weights"]))]
  rep["weights"] = dict(zip(skills, np.asarray(state["weights"]).tolist(), strict=True))
  if "theta" in state:
    rep["theta"] = np.asarray(state["theta"]).tolist()
  if "gate" in state:
    rep["gate_layers"] = {}
    for name, layer in state["gate"].items():
      kernel = np.asarray(layer["kernel"])
      entry = {"kernel": list(kernel.shape), "kernel_norm": float(np.linalg.norm(kernel))}
      if kernel.shape[-1] == len(skills):  # the layer that scores skills: per skill
        bias = np.asarray(layer.get("bias", np.zeros(len(skills))))
        entry["per_skill"] = {
          s: {"kernel_norm": float(np.linalg.norm(kernel[:, i])), "bias": float(bias[i])}
          for i, s in enumerate(skills)
        }
      rep["gate_layers"][name] = entry
  return rep, damaged


# ---- evaluation workdirs ------------------------------------------------------------------
def evaluation(workdir: pathlib.Path) -> dict:
  """The results table of an evaluation workdir and its finished cells."""
  rep: dict[str, Any] = {"kind": "evaluation", "workdir": str(workdir), "damaged": []}
  rep["cells"], rep["cell_scores"], rep["cell_minutes"] = {}, {}, {}
  for path in sorted((workdir / "cells").glob("*/*.json")):
    task = path.parent.name
    rep["cells"].setdefault(task, []).append(path.stem)
    try:
      cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      rep["damaged"].append(inspect_step.damage(path.parent, path.name, e))
      continue
    # an evaluation still running has no results.json yet: each finished cell's headline
    # metric (a registered task's first; a task file's accuracy) and its minutes
    spec = suite.TASKS.get(task)
    metric = spec.metrics[0] if spec else "accuracy"
    try:  # from the rows' outcomes, as the table will be (an archived cell has no gold)
      out = metrics.Outcomes.from_json(cell["outcomes"])
      score = metrics.metric_on(metric, out, np.arange(out.n))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
      stored = cell.get("scores") if isinstance(cell, dict) else None
      score = stored.get(metric) if isinstance(stored, dict) else None
    seconds = cell.get("seconds") if isinstance(cell, dict) else None
    minutes = seconds / 60 if isinstance(seconds, int | float) else float("nan")
    rep["cell_minutes"].setdefault(task, {})[path.stem] = minutes
    if isinstance(score, int | float) and not isinstance(score, bool):
      rep["cell_scores"].setdefault(task, {"metric": metric, "cells": {}})["cells"][path.stem] = {
        "score": score,
        "minutes": minutes,
      }
  rep["remaining"] = remaining(workdir, rep)
  rep["results"] = None
  if (workdir / "results.json").is_file():
    try:
      results = json.loads((workdir / "results.json").read_text(encoding="utf-8"))
      rep["table"] = suite_report.results_table(results)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
      rep["damaged"].append(inspect_step.damage(workdir, "results.json", e))
    else:
      rep["results"] = {
        "model": results["model"],
        "skills": results["skills"],
        "scores": {
          t: {m: e["score"] for m, e in r["methods"].items()} for t, r in results["tasks"].items()
        },
      }
  return rep


def remaining(workdir: pathlib.Path, rep: dict) -> dict | None:
  """The cells of plan.json (written by the evaluation when it starts) not finished yet, and
  their minutes if each takes its method's median over the finished cells (the median of all
  finished cells for a method none has finished): a running suite's time left, roughly (a
  task's rows are as long as its data makes them). None when there is no plan."""
  path = workdir / "plan.json"
  if not path.is_file():
    return None
  try:
    plan = json.loads(path.read_text(encoding="utf-8"))
    tasks, cells = list(plan["tasks"]), list(plan["cells"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    rep["damaged"].append(inspect_step.damage(workdir, path.name, e))
    return None
  left = {t: [c for c in cells if c not in rep["cells"].get(t, [])] for t in tasks}
  left = {t: c for t, c in left.items() if c}
  by_cell: dict[str, list[float]] = {}
  for t in rep["cell_minutes"].values():
    for c, m in t.items():
      if np.isfinite(m):
        by_cell.setdefault(c, []).append(m)
  every = [m for ms in by_cell.values() for m in ms]
  minutes = None
  if every:
    fallback = float(np.median(every))
    minutes = sum(
      float(np.median(by_cell[c])) if c in by_cell else fallback for cs in left.values() for c in cs
    )
  count = sum(len(c) for c in left.values())
  return {"cells": left, "count": count, "of": len(tasks) * len(cells), "minutes": minutes}


# ---- one run, one step ----------------------------------------------------------------------
def locate(
  path: str | pathlib.Path,
) -> tuple[pathlib.Path, pathlib.Path | None, pathlib.Path | None]:
  """(workdir, its checkpoints directory or None, the step directory PATH names or None)."""
  p = pathlib.Path(path)
  if not p.exists():
    raise InspectError(f"{p}: no such file or directory")
  if p.parent.name == "checkpoints" and (p.name.isdigit() or SET_ASIDE.fullmatch(p.name)):
    return p.parent.parent, p.parent, p
  if p.name == "checkpoints" and p.is_dir():
    return p.parent, p, None
  if (p / "checkpoints").is_dir():
    return p, p / "checkpoints", None
  return p, None, None


def checkpointed(workdir: pathlib.Path, ckpt: pathlib.Path, step_dir, step: int | None) -> dict:
  """The report of one stage-1 or router checkpoint directory at one step (default: the
  latest), with the damage found in every step Orbax lists."""
  steps = sorted(ocp.utils.checkpoint_steps(ckpt))
  set_aside = sorted(p.name for p in ckpt.iterdir() if SET_ASIDE.fullmatch(p.name))
  if step_dir is None:
    if step is None and not steps:
      raise InspectError(f"{ckpt}: no committed checkpoint step (set aside: {set_aside or 'none'})")
    step = steps[-1] if step is None else step
    step_dir = ckpt / str(step)
    if not step_dir.is_dir():
      raise InspectError(f"--step={step}: {ckpt} holds steps {steps or 'none'}")
  step = int(step_dir.name.split(".")[0])
  got, damaged = inspect_step.read_step(step_dir)
  for other in steps:  # the others: their JSON and tree metadata (no array)
    if ckpt / str(other) != step_dir:
      damaged += inspect_step.read_step(ckpt / str(other))[1]
  meta, tree = got.get("meta") or {}, got.get("tree") or {}
  is_router = "method" in meta or ("weights" in tree and "adapters" not in tree)
  rep: dict[str, Any] = {
    "kind": "router" if is_router else "stage 1",
    "workdir": str(workdir),
    "checkpoints": str(ckpt),
    "steps": steps,
    "set_aside": set_aside,
    "step": step,
    "step_dir": str(step_dir),
    "items": got["items"],
    "bytes": got["bytes"],
    "disk_bytes": got["disk_bytes"],
  }
  if is_router:
    fields, more = router(workdir, step_dir, got)
  else:
    fields, more = stage1(workdir, step, step_dir, got)
  rep.update(fields)
  rep["damaged"] = damaged + more
  return rep


def inspect(path: str | pathlib.Path, step: int | None = None) -> dict:
  """The report of PATH: a stage-1 workdir (joint, or separate runs `<workdir>/<skill>/`), a
  router workdir, a checkpoints directory, one step directory, or an evaluation workdir."""
  workdir, ckpt, step_dir = locate(path)
  if ckpt is not None:
    return checkpointed(workdir, ckpt, step_dir, step)
  runs = checkpoint.stage1_runs(workdir, complete=False)
  if runs != [workdir]:
    reps = [checkpointed(r, r / "checkpoints", None, step) for r in runs]
    damaged = [d for r in reps for d in r["damaged"]]
    return {
      "kind": "stage 1 (separate runs)",
      "workdir": str(workdir),
      "runs": reps,
      "damaged": damaged,
    }
  if any((workdir / f).exists() for f in ("results.json", "cells", "plan.json")):
    if step is not None:
      raise InspectError(f"--step={step}: {workdir} is an evaluation workdir, with no checkpoints")
    return evaluation(workdir)
  raise InspectError(
    f"{workdir}: not a run (no checkpoints/, results.json, cells/ or plan.json); give a "
    "stage-1, router or evaluation workdir, or one of its checkpoint steps"
  )


def plot(report: dict, out: str | pathlib.Path) -> list[pathlib.Path]:
  """The rank heatmap of the inspected step (reporting.plot_rank_allocation, the figure
  training writes); for separate runs one file per run, `OUT_<run>.png`."""
  out = pathlib.Path(out)
  runs = report.get("runs", [report])
  if any(r["kind"] != "stage 1" for r in runs):
    raise InspectError(
      f"--plot draws stage 1's rank heatmap; {report['workdir']} is a {report['kind']} workdir"
    )
  written = []
  for r in runs:
    if "ranks" not in r:
      continue  # its masks are damaged: reported with the damage
    path = out if len(runs) == 1 else out.with_stem(f"{out.stem}_{pathlib.Path(r['workdir']).name}")
    ranks = np.asarray([[r["ranks"][s][t] for t in r["targets"]] for s in r["skills"]])
    reporting.plot_rank_allocation(
      path, ranks.transpose(0, 2, 1), r["skills"], r["targets"], r["init_r"]
    )
    written.append(path)
  return written


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m mdkif_jax.inspect",
    description="What a stage-1, router or evaluation run's checkpoints hold (no array restored).",
  )
  parser.add_argument("path", help="a workdir, its checkpoints/ directory or one step directory")
  parser.add_argument("--step", type=int, help="the step to inspect (default: the latest)")
  parser.add_argument("--json", action="store_true", help="the same report as JSON, for scripts")
  parser.add_argument("--plot", help="write stage 1's rank heatmap of the step to this file")
  args = parser.parse_args(argv)
  # Orbax logs each file it opens; when one read of a damaged step fails, the reads it still
  # had in flight end as asyncio errors and unraisable echoes of that failure, which the
  # report names once
  logging.getLogger("absl").setLevel(logging.ERROR)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
  try:
    return _run(args)
  finally:
    gc.collect()  # finalize those echoes now, while they are dropped
    sys.unraisablehook = hook


def _run(args) -> int:
  try:
    report = inspect(args.path, args.step)
    written = plot(report, args.plot) if args.plot else []
  except InspectError as e:
    print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print("\n".join(inspect_report.lines(report) + [f"rank heatmap: {p}" for p in written]))
  line = inspect_report.damage_line(report)
  if line:
    print(line, file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
