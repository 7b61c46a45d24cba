"""The controls of docs/results.md: one method (the GD router by default) scored by the main
evaluation and by each control evaluation (the union adapter, the plain-LoRA skills), task by
task on the same scored rows, as paired differences with 95% bootstrap intervals, and the
tracks' mean relative gain of the main evaluation over each control; a table and a plot.

  python -m mdkif_jax.compare runs/paper/eval runs/paper/eval_union runs/paper/eval_lora \
    --labels "AdaLoRA skills" "union AdaLoRA" "LoRA skills" --out docs/results/paper/controls.png

Every evaluation must have scored the same rows of a task, in the same order (each cell's
outcome golds and its predictions' ids and answers are compared); the resamples are the first
evaluation's (results.json's `bootstrap`), so a method's difference to its own base here is
its results.json's `delta_vs_base`. Tasks that some evaluation lacks are left out and named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

from mdkif_jax import evaluate_suite, metrics, stats, suite_report


class CompareError(ValueError):
  """An evaluation workdir without the cells to compare, or one that scored other rows."""


def _read(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, NotADirectoryError):
    raise CompareError(f"{path}: missing (run the evaluation stage there first)") from None
  except OSError as e:
    raise CompareError(f"{path}: {e.strerror}") from None
  except json.JSONDecodeError as e:
    raise CompareError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
  except UnicodeDecodeError:
    raise CompareError(f"{path}: not UTF-8 text") from None


def _results(eval_dir: pathlib.Path) -> dict:
  path = eval_dir / "results.json"
  r = _read(path)
  tasks = r.get("tasks") if isinstance(r, dict) else None
  if not isinstance(tasks, dict) or not all(
    isinstance(t, dict) and isinstance(t.get("methods", {}), dict) and {"track", "metric"} <= set(t)
    for t in tasks.values()
  ):
    raise CompareError(f"{path}: not an evaluation's results.json (tasks with a track and metric)")
  return r


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell's per-row outcomes and the rows it scored: the outcomes' gold in the scorer's
  row order, the predictions' (id, answer) of every row it could encode."""

  path: pathlib.Path
  outcomes: metrics.Outcomes
  rows: tuple

  def same_rows(self, other: Cell) -> bool:
    return (self.outcomes.n, self.outcomes.gold, self.rows) == (
      other.outcomes.n,
      other.outcomes.gold,
      other.rows,
    )


def _cell(path: pathlib.Path) -> Cell:
  c = _read(path)
  if "gold_digest" in c.get("outcomes", {}) and "gold" not in c["outcomes"]:
    raise CompareError(
      f"{path}: an archived cell (no reference answers: mdkif_jax.cells_archive); restore it "
      "into an evaluation (--config.restore_cells_from) and compare that"
    )
  try:
    out = metrics.Outcomes.from_json(c["outcomes"])
    rows = tuple((p["id"], p["answer"]) for p in c["predictions"])
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CompareError(f"{path}: not an evaluation cell ({type(e).__name__}: {e})") from None
  n = out.n
  if not (len(out.pred) == len(out.pred_norm) == len(out.rouge) == len(out.counts) == n):
    raise CompareError(f"{path}: its outcomes' fields have different row counts")
  if len(rows) > n:
    raise CompareError(f"{path}: {len(rows)} predictions for {n} scored rows")
  return Cell(path, out, rows)


def _method_cells(eval_dir: pathlib.Path, results: dict, task: str, method: str) -> list[Cell]:
  """The cells results.json assembled the method from: its seeds' cells, or METHOD.json."""
  methods = results["tasks"][task].get("methods", {})
  if method not in methods:
    have = ", ".join(methods) or "none"
    raise CompareError(f"{eval_dir}/results.json: {task} has no {method!r} (it has: {have})")
  names = list(methods[method].get("seeds") or [method])
  return [_cell(eval_dir / "cells" / task / f"{n}.json") for n in names]


def _estimate(cells: list[Cell], metric: str, idx: np.ndarray) -> stats.Estimate:
  """As the evaluation stage assembles it (seeds averaged)."""
  return evaluate_suite.method_estimate([c.outcomes for c in cells], idx, metric)[0]


def compare(
  eval_dirs: list[str | pathlib.Path],
  labels: list[str] | None = None,
  method: str = "gd",
  resamples: int | None = None,
  seed: int | None = None,
) -> dict:
  """The first evaluation against each of the others: per task, every evaluation's score and
  difference to its own base, and the first's paired difference to each other one. The
  resamples default to the first evaluation's (results.json's `bootstrap`)."""
  dirs = [pathlib.Path(d) for d in eval_dirs]
  if len(dirs) < 2:
    raise CompareError("give the main evaluation and at least one control evaluation")
  if labels:
    if len(labels) != len(dirs) or len(set(labels)) != len(labels):
      raise CompareError(f"--labels needs {len(dirs)} distinct names, one per evaluation")
  elif len({d.name for d in dirs}) != len(dirs):
    raise CompareError("the evaluations' directory names clash: name them with --labels")
  labels = list(labels) if labels else [d.name for d in dirs]
  results = [_results(d) for d in dirs]
  boot = results[0].get("bootstrap", {})
  resamples = int(boot.get("resamples", stats.RESAMPLES) if resamples is None else resamples)
  seed = int(boot.get("seed", 0) if seed is None else seed)
  if resamples < 1:
    raise CompareError(f"--resamples must be at least 1, got {resamples}")
  common = [t for t in results[0]["tasks"] if all(t in r["tasks"] for r in results[1:])]
  if not common:
    raise CompareError(f"{', '.join(map(str, dirs))}: no task that every evaluation scored")
  out = {"method": method, "labels": labels, "eval_dirs": [str(d) for d in dirs], "tasks": {}}
  out["bootstrap"] = {"resamples": resamples, "seed": seed}
  out["left_out"] = sorted({t for r in results for t in r["tasks"]} - set(common))
  per_track: dict[str, dict[str, list]] = {}
  for task in common:
    info = results[0]["tasks"][task]
    for d, r in zip(dirs[1:], results[1:], strict=True):
      if r["tasks"][task]["metric"] != info["metric"]:
        raise CompareError(
          f"{d}: {task} scored by {r['tasks'][task]['metric']}, not {info['metric']}"
        )
    cells = [
      (_method_cells(d, r, task, method), _method_cells(d, r, task, "base"))
      for d, r in zip(dirs, results, strict=True)
    ]
    ref = cells[0][1][0]
    for mine, base in cells:
      for c in (*mine, *base):
        if not c.same_rows(ref):
          raise CompareError(f"{c.path}: scored other rows than {ref.path} (ids or answers differ)")
    n = ref.outcomes.n
    idx = stats.resample_indices(n, resamples, seed)
    ests = [
      (_estimate(m, info["metric"], idx), _estimate(b, info["metric"], idx)) for m, b in cells
    ]
    entry = {"track": info["track"], "metric": info["metric"], "n": n, "by": {}}
    for label, (est, base) in zip(labels, ests, strict=True):
      entry["by"][label] = {
        **est.to_json(),
        "base": base.score,
        "delta_vs_base": stats.paired_difference(est, base),
      }
    entry["first_minus"] = {
      label: stats.paired_difference(ests[0][0], est)
      for label, (est, _) in zip(labels[1:], ests[1:], strict=True)
    }
    out["tasks"][task] = entry
    track = per_track.setdefault(info["track"], {label: [] for label in labels})
    for label, (est, _) in zip(labels, ests, strict=True):
      track[label].append(est)
  out["tracks"] = {
    track: {
      label: {
        **stats.relative_gain(by[labels[0]], by[label]),
        "mean_delta": stats.mean_difference(by[labels[0]], by[label]),  # metric points
      }
      for label in labels[1:]
    }
    for track, by in per_track.items()
  }
  return out


def table(res: dict) -> list[str]:
  """results.md's lines: per task each evaluation's score, then the first minus each other."""
  first, others = res["labels"][0], res["labels"][1:]
  head = ["task", "metric", *(f"{m} ({res['method']})" for m in res["labels"])]
  head += [f"{first} - {o}" for o in others]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for task, e in res["tasks"].items():
    scores = [f"{e['by'][m]['score']:.3f}" for m in res["labels"]]
    diffs = [suite_report.signed(e["first_minus"][o]) for o in others]
    lines.append("| " + " | ".join([task, e["metric"], *scores, *diffs]) + " |")
  lines.append("")
  for track, by in res["tracks"].items():
    for o, g in by.items():
      d = g["mean_delta"]
      points = f"mean difference {suite_report.signed(d)} points ({d['tasks']} tasks)"
      if not g["tasks"]:  # every task's control scored 0: no relative gain
        lines.append(f"- {track}: {first} over {o}: {points}, relative gain n/a ({o} scores 0)")
        continue
      lines.append(
        f"- {track}: {first} over {o}: {points}, mean relative gain {suite_report.pct(g)}"
      )
  wins = {o: sum(e["first_minus"][o]["ci"][0] > 0 for e in res["tasks"].values()) for o in others}
  losses = {o: sum(e["first_minus"][o]["ci"][1] < 0 for e in res["tasks"].values()) for o in others}
  for o in others:
    lines.append(
      f"- {first} above {o} with the interval above 0 on {wins[o]} of {len(res['tasks'])} "
      f"tasks, below it with the interval below 0 on {losses[o]}"
    )
  if res["left_out"]:
    lines.append(f"- left out (not scored by every evaluation): {', '.join(res['left_out'])}")
  return lines


def plot(res: dict, out: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks, labels = list(res["tasks"]), res["labels"]
  y = np.arange(len(tasks))
  fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(tasks)), sharey=True)

  def bars(ax, series: list[tuple[str, list[dict]]]) -> None:
    h = 0.8 / len(series)
    for i, (name, ds) in enumerate(series):
      mean = np.asarray([d["mean"] for d in ds])
      err = [
        np.maximum(mean - [d["ci"][0] for d in ds], 0),
        np.maximum(np.asarray([d["ci"][1] for d in ds]) - mean, 0),
      ]
      ax.errorbar(
        mean, y + (i - (len(series) - 1) / 2) * h, xerr=err, fmt="o", capsize=3, label=name
      )
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)

  bars(axes[0], [(m, [res["tasks"][t]["by"][m]["delta_vs_base"] for t in tasks]) for m in labels])
  axes[0].set_title(f"{res['method']} minus the base (paired, 95% CI)", fontsize=10)
  bars(
    axes[1],
    [
      (f"{labels[0]} - {o}", [res["tasks"][t]["first_minus"][o] for t in tasks]) for o in labels[1:]
    ],
  )
  axes[1].set_title(
    f"{labels[0]} minus each control ({res['method']}, paired, 95% CI)", fontsize=10
  )
  axes[0].set_yticks(y, [f"{t} ({res['tasks'][t]['metric']})" for t in tasks], fontsize=8)
  axes[0].invert_yaxis()
  for ax in axes:
    ax.set_xlabel("score difference")
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def _finite(x):
  """NaN (a relative gain over a control that scores 0) as null: standard JSON."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite(v) for v in x]
  return None if isinstance(x, float) and not np.isfinite(x) else x


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    prog="python -m mdkif_jax.compare", description=__doc__.split("\n")[0]
  )
  ap.add_argument("eval_dirs", nargs="+", help="the main evaluation workdir, then the controls'")
  ap.add_argument("--labels", nargs="+", help="a name per evaluation (default: the dir names)")
  ap.add_argument("--method", default="gd", help="the method compared (default gd)")
  ap.add_argument(
    "--resamples", type=int, help="bootstrap resamples (default: the first evaluation's)"
  )
  ap.add_argument("--seed", type=int, help="bootstrap seed (default: the first evaluation's)")
  ap.add_argument("--out", required=True, help="the plot (.png); .json and .md go beside it")
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  try:
    if out.suffix != ".png":
      raise CompareError(f"--out {out}: name a .png (the .json and .md go beside it)")
    res = compare(args.eval_dirs, args.labels, args.method, args.resamples, args.seed)
  except CompareError as e:
    print(f"error: CompareError: {e}", file=sys.stderr)
    return 2
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(_finite(res), indent=1) + "\n")
  lines = table(res)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  plot(res, out)
  print("\n".join(lines))
  print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')} and {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
