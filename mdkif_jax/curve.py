"""The learning curve of docs/results.md: a track's mean difference to the base (metric points;
or `--measure gain`: the mean relative gain) against the training examples each skill had
seen, one point per evaluation of a stage-1 checkpoint.

  python -m mdkif_jax.curve runs/paper/skill runs/paper/curve_75 runs/paper/curve_150 \
    runs/paper/eval --out docs/results/paper/learning_curve.png

Each evaluation workdir's cells_identity.json names the stage-1 workdir and step it scored
(`skills_step`; none = the latest); the examples come from that checkpoint's data position
(read without restoring any array), so the x axis is what the skills saw, packing included.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from mdkif_jax import inspect as inspect_run
from mdkif_jax import suite_report


class CurveError(ValueError):
  """An evaluation workdir that does not belong to the stage-1 run, or has no results."""


def point(skill_dir: pathlib.Path, eval_dir: pathlib.Path, track: str) -> dict:
  """One curve point: the checkpoint's step and examples per skill, each method's gain."""
  results_path, ident_path = eval_dir / "results.json", eval_dir / "cells_identity.json"
  for p in (results_path, ident_path):
    if not p.is_file():
      raise CurveError(f"{eval_dir}: no {p.name} (run the evaluation stage there first)")
  results = json.loads(results_path.read_text())
  ident = json.loads(ident_path.read_text())
  source = ident.get("skills_from")
  if source is None or pathlib.Path(source).resolve() != skill_dir.resolve():
    raise CurveError(f"{eval_dir}: scored the skills of {source!r}, not of {skill_dir}")
  if track not in results.get("tracks", {}):
    have = ", ".join(results.get("tracks", {})) or "none"
    raise CurveError(f"{eval_dir}: no {track!r} track in results.json (it has: {have})")
  report = inspect_run.inspect(skill_dir, ident.get("skills_step"))
  positions = report.get("data_position") or {}
  seen = {s: int(st["position"]) for s, st in positions.items()}
  if not seen:
    raise CurveError(f"{skill_dir}: the checkpoint at step {report.get('step')} has no data state")
  tasks = {
    name: {m: e["score"] for m, e in t["methods"].items()}
    for name, t in results["tasks"].items()
    if t["track"] == track
  }
  return {
    "eval_dir": str(eval_dir),
    "step": int(report["optimizer_step"]),
    "examples_per_skill": {"mean": float(np.mean(list(seen.values()))), **seen},
    # the resamples its interval stands on: those where a base resampled to 0 have no gain
    "gain": {
      m: {"mean": g["mean_relative_gain"], "ci": g["ci"], **_resamples(g)}
      for m, g in results["tracks"][track].items()
    },
    # in metric points (absent from results.json written before it was recorded)
    "delta": {
      m: {"mean": g["mean_delta"]["mean"], "ci": g["mean_delta"]["ci"]}
      for m, g in results["tracks"][track].items()
      if "mean_delta" in g
    },
    "scores": tasks,
    # each task's paired difference to the base, per method (the per-task panel)
    "task_delta": {
      name: {m: e["delta_vs_base"] for m, e in t["methods"].items() if "delta_vs_base" in e}
      for name, t in results["tasks"].items()
      if t["track"] == track
    },
  }


def _resamples(g: dict) -> dict:
  """A track gain's [used, total] resamples (absent from results.json written before it was)."""
  return {"resamples": list(g["resamples"])} if "resamples" in g else {}


def curve(skill_dir, eval_dirs, track: str = "unseen_data") -> list[dict]:
  points = [point(pathlib.Path(skill_dir), pathlib.Path(d), track) for d in eval_dirs]
  return sorted(points, key=lambda p: p["step"])


def plot(
  points: list[dict],
  out: pathlib.Path,
  track: str,
  measure: str = "delta",
  per_task: str | None = "gd",
) -> None:
  """measure: "delta" (the mean difference to the base in metric points: readable when a
  task's base scores near 0) or "gain" (the mean relative gain, the paper's "+x%").
  per_task: a method whose difference to the base is drawn per task in a second panel (a
  track's mean can hide one task that falls while the others rise); None, or a method some
  point lacks, leaves one panel."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panel = per_task is not None and all(
    p.get("task_delta") and all(per_task in d for d in p["task_delta"].values()) for p in points
  )
  fig, axes = plt.subplots(1, 2 if panel else 1, figsize=(12 if panel else 6, 4.5), squeeze=False)
  ax = axes[0, 0]
  x = [p["examples_per_skill"]["mean"] for p in points]
  # the methods every point scored (the final point may be the full suite's evaluation)
  methods = [m for m in points[0][measure] if m != "base" and all(m in p[measure] for p in points)]
  for i, m in enumerate(methods):
    have = [(xi, p[measure][m]) for xi, p in zip(x, points, strict=True)]
    label = m
    if measure == "gain":  # an interval on fewer resamples than the others says so
      used = [h[1]["resamples"] for h in have if "resamples" in h[1]]  # (older results: none)
      if any(u < t for u, t in used):
        label += " (CI on " + ", ".join(f"{u}/{t}" for u, t in used) + " resamples)"
    unit = 100 if measure == "gain" else 1
    _errorbar(ax, have, 0.01 * (i - len(methods) / 2), label, unit)
  ax.axhline(0.0, color="grey", lw=0.8, ls="--")
  for xi, p in zip(x, points, strict=True):
    ax.annotate(
      f"step {p['step']}",
      (xi, 0),
      textcoords="offset points",
      xytext=(0, -14),
      ha="center",
      fontsize=7,
      color="grey",
    )
  ax.set_xlabel("training examples per skill (mean over skills)")
  ax.set_ylabel(
    f"mean relative gain over base, {track} (%)"
    if measure == "gain"
    else f"mean difference to base, {track} (metric points)"
  )
  ax.set_title("gain over the base vs stage-1 training (95% bootstrap CI)")
  ax.legend()
  if panel:
    _per_task_panel(axes[0, 1], points, x, per_task)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def _errorbar(ax, have: list[tuple[float, dict]], shift: float, label: str, unit: float = 1):
  """One line of (x, {"mean", "ci"}) points, its x shifted by a fraction so lines don't overlap."""
  xs = np.asarray([h[0] for h in have]) * (1 + shift)
  mean = np.asarray([unit * h[1]["mean"] for h in have])
  # a mean can sit outside its percentile interval: bars never go negative
  lo = np.maximum(mean - np.asarray([unit * h[1]["ci"][0] for h in have]), 0)
  hi = np.maximum(np.asarray([unit * h[1]["ci"][1] for h in have]) - mean, 0)
  ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=label)


def _per_task_panel(ax, points: list[dict], x: list[float], method: str) -> None:
  """One line per task: the method's paired difference to the base, with its interval."""
  tasks = list(points[0]["task_delta"])
  for i, task in enumerate(tasks):
    have = [(xi, p["task_delta"][task][method]) for xi, p in zip(x, points, strict=True)]
    _errorbar(ax, have, 0.008 * (i - len(tasks) / 2), task)
  ax.axhline(0.0, color="grey", lw=0.8, ls="--")
  ax.set_xlabel("training examples per skill (mean over skills)")
  ax.set_ylabel(f"{method} minus base (metric points)")
  ax.set_title(f"{method} minus base, per task (95% bootstrap CI)")
  ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mdkif_jax.curve", description=__doc__.split("\n")[0])
  ap.add_argument("skill_dir", help="the stage-1 workdir the evaluations scored")
  ap.add_argument("eval_dirs", nargs="+", help="evaluation workdirs, one per checkpoint")
  ap.add_argument("--track", default="unseen_data", help="the suite track (default unseen_data)")
  ap.add_argument("--out", required=True, help="the plot (.png); the points go beside it (.json)")
  ap.add_argument(
    "--measure",
    choices=("delta", "gain"),
    default="delta",
    help="y axis: the mean difference to the base in metric points (default; readable when a "
    "base scores near 0) or the mean relative gain (%%)",
  )
  ap.add_argument(
    "--per-task",
    default="gd",
    help="the method drawn per task in a second panel, as its difference to the base "
    "(default gd; 'none': no panel)",
  )
  args = ap.parse_args(argv)
  try:
    points = curve(args.skill_dir, args.eval_dirs, args.track)
    if args.measure == "delta" and not all(p["delta"] for p in points):
      raise CurveError(
        "a results.json has no mean_delta (rerun its evaluation): use --measure gain"
      )
  except (CurveError, inspect_run.InspectError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  per_task = None if args.per_task == "none" else args.per_task
  plot(points, out, args.track, args.measure, per_task)
  out.with_suffix(".json").write_text(json.dumps(points, indent=1) + "\n")
  for p in points:
    gains = "  ".join(
      f"{m} {suite_report.pct(g, 'mean')}"
      + (f" ({suite_report.signed(p['delta'][m])} points)" if m in p["delta"] else "")
      for m, g in p["gain"].items()
      if m != "base"
    )
    print(f"step {p['step']:>5}  {p['examples_per_skill']['mean']:>8.0f} examples/skill  {gains}")
    if per_task is not None:
      deltas = "  ".join(
        f"{t} {suite_report.signed(d[per_task])}"
        for t, d in p.get("task_delta", {}).items()
        if per_task in d
      )
      if deltas:
        print(f"{'':>11}{per_task} minus base per task: {deltas}")
  print(f"wrote {out} and {out.with_suffix('.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
