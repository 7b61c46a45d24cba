"""An evaluation's results for people: results.md (per track the normal and few-shot tables
with intervals and paired differences, seeds, answer leans, NLLs, other metrics, skill
weights, the router against its references and the project's bar, the minutes) and
results.png / router_weights.png."""

from __future__ import annotations

import re

import numpy as np


def signed(d: dict) -> str:
  """A difference and its interval: +0.123 [+0.045, +0.201]."""
  return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def _cell(entry: dict) -> str:
  return f"{entry['score']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"


def track_methods(results: dict, tasks: list[str]) -> list[str]:
  """Every method any of the tasks has, in the order the tasks list them (an interim
  results.json may have a method on some tasks only)."""
  return list(dict.fromkeys(m for n in tasks for m in results["tasks"][n]["methods"]))


def few_shot(method: str) -> bool:
  """A method fitted (or prompted) with k rows: base_k<k>, cmaes_k<k>."""
  return re.fullmatch(r"(base|cmaes)_k\d+", method) is not None


def results_table(results: dict) -> list[str]:
  """results.md: per track, the normal setting's methods (every fit row) and the few-shot
  ones (k rows) in two tables, each with the base: one row per method and one column per
  task (the headline metric with its 95% interval; the table's best per task in bold), the
  paired difference to the base, and the mean relative gain over the base; the seeded
  methods' spread, the labels they lean to, their answer NLL, each task's other metrics and
  the skills the fitted methods weigh most; the GD router against each reference, against
  the base over all tasks, and against the project's bar (BAR_*); the minutes each cell took."""
  lines = [f"# Evaluation of {results['model']} with {len(results['skills'])} skills", ""]
  tracks = sorted({t["track"] for t in results["tasks"].values()})
  for track in tracks:
    tasks = [n for n, t in results["tasks"].items() if t["track"] == track]
    methods = track_methods(results, tasks)
    lines += [f"## {track}", ""]
    base = ["base"] * ("base" in methods)
    rest = [m for m in methods if not few_shot(m) and m != "base"]
    shots = [m for m in methods if few_shot(m)]
    both = bool(rest and shots)
    if rest or not shots:
      lines += ["Every fit row:", ""] * both + _method_table(results, track, tasks, base + rest)
    if shots:
      lines += ["Few-shot (k fit rows):", ""] * both + _method_table(
        results, track, tasks, base + shots
      )
    lines += _seed_lines(results, tasks)
    lines += _lean_lines(results, tasks)
    lines += _nll_lines(results, tasks)
    lines += _metric_lines(results, tasks)
    lines += _weight_lines(results, tasks)
    lines += _router_lines(results, track, tasks)
  lines += _overall_lines(results)
  lines += _bar_lines(results)
  lines += _time_lines(results)
  lines.append("Intervals: 95% bootstrap over scored rows; Δ: the paired difference to the base.")
  return lines


def _method_table(results: dict, track: str, tasks: list[str], methods: list[str]) -> list[str]:
  head = " | ".join(
    f"{n} ({results['tasks'][n]['metric']}, n={results['tasks'][n]['n_scored']})" for n in tasks
  )
  lines = [f"| method | {head} | mean relative gain vs base | mean Δ vs base |"]
  lines.append("|---" * (len(tasks) + 3) + "|")
  best = {
    n: max(
      (
        results["tasks"][n]["methods"][m]["score"]
        for m in methods
        if m in results["tasks"][n]["methods"]
      ),
      default=None,
    )
    for n in tasks
  }
  for m in methods:
    cells = []
    for n in tasks:
      e = results["tasks"][n]["methods"].get(m)
      if e is None:
        cells.append("-")
        continue
      text = _cell(e)
      if e["score"] == best[n]:
        text = f"**{text}**"
      d = e.get("delta_vs_base")
      if d and m != "base":
        text += f"<br>Δ {signed(d)}"
      cells.append(text)
    g = results["tracks"].get(track, {}).get(m)
    gain = "-" if g is None or m == "base" else pct(g)
    d = (g or {}).get("mean_delta")
    delta = "-" if d is None or m == "base" else signed(d)
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {gain} | {delta} |")
  return lines + [""]


def _time_lines(results: dict) -> list[str]:
  """The cells' summed wall time, and CPU time where the cells recorded it; a table of each
  method's minutes per task."""
  entries = [e for t in results["tasks"].values() for e in t["methods"].values()]
  if not all("seconds" in e for e in entries):
    return []
  wall = sum(e["seconds"] for e in entries) / 3600
  cpu = [e["cpu_seconds"] for e in entries if "cpu_seconds" in e]
  line = f"Time in the cells (fitting and scoring, as each cell measured it): {wall:.2f} h wall"
  if cpu:
    line += f", {sum(cpu) / 3600:.2f} h CPU ({len(cpu)} of {len(entries)} methods)"
  lines = [line + ".", ""]
  # Where the time goes, per method and task: what a cheaper suite would drop. CPU time where
  # every cell has it (wall time counts the other jobs sharing the cores), else wall.
  key, unit = ("cpu_seconds", "CPU") if len(cpu) == len(entries) else ("seconds", "wall")
  tasks = list(results["tasks"])
  methods = list(dict.fromkeys(m for t in tasks for m in results["tasks"][t]["methods"]))
  lines += _head(f"{unit} minutes", [*tasks, "all tasks"])
  for m in methods:
    mins = [results["tasks"][t]["methods"].get(m, {}).get(key) for t in tasks]
    cells = ["-" if v is None else f"{v / 60:.1f}" for v in mins]
    lines.append(_row(m, [*cells, f"{sum(v for v in mins if v is not None) / 60:.1f}"]))
  return lines + [""]


def _head(title: str, cols: list[str]) -> list[str]:
  """A small table's header and separator: a row-name column, then `cols`."""
  return [f"| {title} | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]


def _row(name: str, cells: list[str]) -> str:
  return f"| {name} | " + " | ".join(cells) + " |"


def _num(v: float | None) -> str:
  return "-" if v is None else f"{v:.3f}"


def _methods_with(results: dict, tasks: list[str], key: str) -> list[str]:
  """The methods whose entry has `key` on at least one of the tasks."""
  return [
    m
    for m in track_methods(results, tasks)
    if any(key in results["tasks"][n]["methods"].get(m, {}) for n in tasks)
  ]


def _seed_lines(results: dict, tasks: list[str]) -> list[str]:
  """The spread of the methods scored once per seed (cmaes_k<k>: which k rows, CMA-ES's draws):
  the table shows their mean, this their lowest and highest seed."""
  seeded = [
    m
    for m in track_methods(results, tasks)
    if all("seeds" in results["tasks"][n]["methods"].get(m, {}) for n in tasks)
  ]
  if not seeded:
    return []
  out = _head("seeds: lowest-highest", tasks)
  for m in seeded:
    cells = []
    for n in tasks:
      v = list(results["tasks"][n]["methods"][m]["seeds"].values())
      cells.append(f"{min(v):.3f}-{max(v):.3f} ({len(v)} seeds)")
    out.append(_row(m, cells))
  return out + [""]


def _lean_lines(results: dict, tasks: list[str]) -> list[str]:
  """On label tasks, each method's most frequent answer and its share of the rows, beside the
  scored rows' own: a method near the floor often moves which label it leans to, not whether
  it reads the question."""
  label = [n for n in tasks if "gold_lean" in results["tasks"][n]]
  if not label:
    return []
  fmt = lambda x: f"{x['answer']} {x['share']:.2f}" if x else "-"  # noqa: E731
  out = _head("most frequent answer (share)", label)
  out.append(_row("gold", [fmt(results["tasks"][n]["gold_lean"]) for n in label]))
  for m in track_methods(results, label):
    out.append(_row(m, [fmt(results["tasks"][n]["methods"].get(m, {}).get("lean")) for n in label]))
  return out + [""]


def _nll_lines(results: dict, tasks: list[str]) -> list[str]:
  """Each method's answer NLL on the scored rows: the skills can teach a task's answer format
  (a large fall) without changing which answer wins."""
  methods = _methods_with(results, tasks, "answer_nll")
  if not methods:
    return []
  out = _head("answer NLL (teacher-forced, nats/token)", tasks)
  for m in methods:
    vals = [results["tasks"][n]["methods"].get(m, {}).get("answer_nll") for n in tasks]
    out.append(_row(m, [_num(v) for v in vals]))
  return out + [""]


def _metric_lines(results: dict, tasks: list[str]) -> list[str]:
  """Each task's other metrics (after its headline; point values, the seeds' mean): e.g. a
  label task's macro-F1, which a lean towards the majority label does not raise."""
  cols = []
  for n in tasks:
    task = results["tasks"][n]
    names = dict.fromkeys(k for e in task["methods"].values() for k in e.get("metrics", {}))
    cols += [(n, m) for m in names if m != task["metric"]]
  if not cols:
    return []
  out = _head("other metrics", [f"{n} {m}" for n, m in cols])
  for meth in track_methods(results, tasks):
    vals = [results["tasks"][n]["methods"].get(meth, {}).get("metrics", {}).get(m) for n, m in cols]
    out.append(_row(meth, [_num(v) for v in vals]))
  return out + [""]


def _weight_lines(results: dict, tasks: list[str], top: int = 3) -> list[str]:
  """The skills each fitted method leans on most (largest |weight|; CMA-ES's seeds averaged;
  the gate's mean over the scored rows): whether a router finds the skill a task needs."""
  methods = _methods_with(results, tasks, "weights")
  if not methods:
    return []
  out = _head("largest skill weights", tasks)
  for m in methods:
    cells = []
    for n in tasks:
      w = results["tasks"][n]["methods"].get(m, {}).get("weights")
      big = sorted(w.items(), key=lambda kv: -abs(kv[1]))[:top] if w else []
      cells.append(", ".join(f"{s} {v:.2f}" for s, v in big) or "-")
    out.append(_row(m, cells))
  return out + [""]


def plot_suite_weights(path, results: dict, method: str = "gd") -> bool:
  """A heatmap of the weights `method` gives each skill on each task (rows: tasks by track):
  does the router pick the skill the task needs, and what does it mix on unseen tasks?
  Writes nothing (False) when no task has that method's weights."""
  tasks = [n for n, t in results["tasks"].items() if "weights" in t["methods"].get(method, {})]
  if not tasks:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  skills = list(results["skills"])
  tasks.sort(key=lambda n: results["tasks"][n]["track"])  # stable: the tasks' order per track
  w = np.asarray(
    [[results["tasks"][n]["methods"][method]["weights"][s] for s in skills] for n in tasks]
  )
  vmax = float(np.abs(w).max()) or 1.0
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(skills), 1.2 + 0.45 * len(tasks)))
  im = ax.imshow(w, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
  for i, j in np.ndindex(w.shape):
    big = abs(w[i, j]) > 0.6 * vmax
    ax.text(
      j,
      i,
      f"{w[i, j]:.2f}",
      ha="center",
      va="center",
      fontsize=7,
      color="white" if big else "black",
    )
  ax.set_xticks(range(len(skills)), skills, fontsize=8)
  ax.set_yticks(
    range(len(tasks)), [f"{n} ({results['tasks'][n]['track']})" for n in tasks], fontsize=8
  )
  ax.set_title(f"{method} router: weight per skill and task")
  fig.colorbar(im, ax=ax, shrink=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _overall_lines(results: dict) -> list[str]:
  """The GD router against the base over every task of every track (when there are several)."""
  tracks = {t["track"] for t in results["tasks"].values()}
  d = [t["methods"].get("gd", {}).get("delta_vs_base") for t in results["tasks"].values()]
  if len(tracks) < 2 or not all(d):
    return []
  wins, sure = _wins(d)
  return [
    f"All {len(d)} tasks: gd higher than the base on {wins}, the Δ interval above 0 on {sure}.",
    "",
  ]


# The project's bar for the paper's experiment (issue 21): the GD router above the base on
# >= 7 of the 9 tasks with the interval of the difference above 0 on >= 5; a mean relative gain
# over the base >= +10% on each track; on average above the uniform mixture and the best single
# skill, and >= 90% of the task-specific AdaLoRA's score.
BAR_TASKS, BAR_WINS, BAR_SURE, BAR_GAIN, BAR_SHARE = 9, 7, 5, 0.10, 0.90


def pct(g: dict, key: str = "mean_relative_gain") -> str:
  """A relative gain and its interval, in percent; where the interval had to leave resamples
  out (in those a base resampled to 0: no relative gain), how many it holds."""
  used, total = g.get("resamples", (0, 0))
  note = f" (on {used} of {total} resamples)" if used < total else ""
  return f"{g[key]:+.1%} [{g['ci'][0]:+.1%}, {g['ci'][1]:+.1%}]{note}"


def _bar_lines(results: dict) -> list[str]:
  """The GD router against the bar above, each part measured (point estimate and 95%
  interval) and marked met or not by its point estimate, with a note where its interval holds
  the threshold (met or not within noise), where the mean relative gain and the gain of the
  mean score disagree (a base near 0 inflates the first), and the task count where the suite
  is not the bar's 9 tasks; only for results with every reference the bar names."""
  every = results.get("all_tasks", {})
  gd, vs, n = every.get("gd"), every.get("router_vs", {}), every.get("tasks", 0)
  if not gd or set(vs) != {"uniform", "best_single", "adalora_task"}:
    return []  # not the experiment the bar is for (a learning-curve point, a control)
  d = [t["methods"]["gd"]["delta_vs_base"] for t in results["tasks"].values()]
  wins, sure = _wins(d)
  part = [] if n == BAR_TASKS else [f"{n} tasks, not the bar's {BAR_TASKS}"]

  def yes(ok: bool, *notes: str) -> str:
    said = [x for x in notes if x] + part
    return ("yes" if ok else "no") + (f" ({'; '.join(said)})" if said else "")

  def noise(ci: list[float], at: float, shown: str) -> str:
    return f"the interval includes {shown}" if ci[0] < at < ci[1] else ""

  rows = [
    (
      f"gd above the base on >= {BAR_WINS} of {BAR_TASKS} tasks",
      f"{wins} of {n}",
      yes(wins >= BAR_WINS),
    ),
    (f"... the Δ interval above 0 on >= {BAR_SURE}", f"{sure} of {n}", yes(sure >= BAR_SURE)),
  ]
  for track, by in results.get("tracks", {}).items():
    g = by.get("gd")
    if g and g.get("tasks"):
      of_means = pct(g["gain_of_means"], "gain")
      measured = f"{pct(g, 'mean_relative_gain')} (the mean score: {of_means})"
      ok, ok_of_means = g["mean_relative_gain"] >= BAR_GAIN, g["gain_of_means"]["gain"] >= BAR_GAIN
      rows.append(
        (
          f"mean relative gain over the base >= {BAR_GAIN:+.0%}, {track}",
          measured,
          yes(
            ok,
            noise(g["ci"], BAR_GAIN, f"{BAR_GAIN:+.0%}"),
            ""
            if ok == ok_of_means
            else f"by the mean score's gain: {'yes' if ok_of_means else 'no'}",
          ),
        )
      )
  for ref in ("uniform", "best_single"):
    if ref in vs:
      m = vs[ref]["mean_delta"]
      met = yes(m["mean"] > 0, noise(m["ci"], 0.0, "0"))
      rows.append((f"gd above {ref} on average", f"mean Δ {signed(m)}", met))
  if "adalora_task" in vs:
    g = vs["adalora_task"]["gain_of_means"]
    share = f"{1 + g['gain']:.1%} [{1 + g['ci'][0]:.1%}, {1 + g['ci'][1]:.1%}]"
    rows.append(
      (
        f"gd reaches >= {BAR_SHARE:.0%} of adalora_task's mean score",
        share,
        yes(
          1 + g["gain"] >= BAR_SHARE,
          noise([1 + g["ci"][0], 1 + g["ci"][1]], BAR_SHARE, f"{BAR_SHARE:.0%}"),
        ),
      )
    )
  out = ["## Against the bar", "", "| the bar | measured (95% interval) | met |", "|---|---|---|"]
  out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
  overall = (
    f"Over all {n} tasks: gd - base {signed(gd['mean_delta'])} points on average; its mean "
    f"score {pct(gd['gain_of_means'], 'gain')} over the base's."
  )
  return out + ["", overall, ""]


def _wins(deltas: list[dict]) -> tuple[int, int]:
  """(differences above 0, intervals above 0) of paired differences."""
  return sum(x["mean"] > 0 for x in deltas), sum(x["ci"][0] > 0 for x in deltas)


def _router_lines(results: dict, track: str, tasks: list[str]) -> list[str]:
  """The GD router against the base (wins, intervals above 0) and, row by row, against each
  reference it must beat or approach (evaluate_suite.REFERENCES)."""
  gd = {n: results["tasks"][n]["methods"].get("gd") for n in tasks}
  if not all(gd.values()):
    return []
  d = [e.get("delta_vs_base") for e in gd.values()]
  out = []
  if all(d):
    wins, sure = _wins(d)
    line = f"gd vs base: higher on {wins} of {len(d)} tasks, the Δ interval above 0 on {sure}"
    g = results.get("tracks", {}).get(track, {}).get("gd", {}).get("gain_of_means")
    if g and np.isfinite(g["gain"]):
      line += (
        f"; the mean score {g['gain']:+.1%} [{g['ci'][0]:+.1%}, {g['ci'][1]:+.1%}] over the base's"
        " (the relative gain of the mean: a task whose base scores near 0 counts by its points)"
      )
    out += [line + ".", ""]
  vs = results.get("router_vs", {}).get(track, {})
  if not vs:
    return out
  out += [f"| gd minus | {' | '.join(tasks)} | mean relative gain of gd over it |"]
  out.append("|---" * (len(tasks) + 2) + "|")
  for ref, g in vs.items():
    cells = []
    for e in gd.values():
      x = e["delta_vs"][ref]
      cells.append(signed(x))
    gain = pct(g)
    out.append(f"| {ref} | " + " | ".join(cells) + f" | {gain} |")
  return out + [""]


def plot_results(path, results: dict) -> None:
  """Two panels per track: per task a bar per method with its 95% interval, and beside it
  each method's paired difference to the base (the interval that says whether it helps:
  two scores' intervals can overlap while their paired difference excludes 0)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tracks = sorted({t["track"] for t in results["tasks"].values()})
  fig, axes = plt.subplots(
    len(tracks),
    2,
    figsize=(16, 3.8 * len(tracks)),
    squeeze=False,
    constrained_layout=True,
    gridspec_kw={"width_ratios": [3, 2]},
  )
  for (ax, dax), track in zip(axes, tracks, strict=True):
    tasks = [n for n, t in results["tasks"].items() if t["track"] == track]
    methods = track_methods(results, tasks)
    width, drawn = 0.8 / max(len(methods), 1), False
    for j, m in enumerate(methods):
      es = [results["tasks"][n]["methods"].get(m) for n in tasks]
      x = np.arange(len(tasks)) + (j - (len(methods) - 1) / 2) * width
      y = [e["score"] if e else np.nan for e in es]
      err = np.asarray(
        [[e["score"] - e["ci"][0], e["ci"][1] - e["score"]] if e else [0, 0] for e in es]
      ).T
      color = ax.bar(x, y, width, yerr=err, capsize=2, label=m)[0].get_facecolor()
      ds = [e.get("delta_vs_base") if e else None for e in es]
      if m == "base" or not any(ds):
        continue
      d = np.asarray([[q["mean"], *q["ci"]] if q else [np.nan] * 3 for q in ds])
      derr = np.maximum([d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]], 0)
      dax.errorbar(x, d[:, 0], yerr=derr, fmt="o", ms=3, capsize=2, color=color, label=m)
      drawn = True
    labels = [f"{n}\n({results['tasks'][n]['metric']})" for n in tasks]
    for a in (ax, dax):
      a.set_xticks(range(len(tasks)), labels, fontsize=8)
    dax.set_xlim(ax.get_xlim())  # the tasks where the scores panel has them
    dax.axhline(0.0, color="grey", lw=0.8, ls="--")
    if not drawn:  # no paired difference (no base)
      dax.text(0.5, 0.5, "no base to pair with", ha="center", transform=dax.transAxes)
    ax.set_title(track)
    dax.set_title(f"{track}: minus the base (paired)")
    ax.set_ylabel("score")
    dax.set_ylabel("score difference")
    ax.legend(fontsize=7, ncol=max(1, len(methods) // 5))
  fig.savefig(path, dpi=110)
  plt.close(fig)
