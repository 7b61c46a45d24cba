"""What a run leaves for people: a JSONL metrics file, TensorBoard events, tables and plots
(stage 1's rank allocation, stage 2's method table and router weights), and progress bars;
an evaluation's tables and plots are suite_report.py's."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np


def progress_bar(enabled: bool, **kwargs):
  """A tqdm bar, shown only when `enabled` (config.progress) and on process 0 (one bar per
  job, not per host). A disabled bar's calls do nothing: callers need no second code path."""
  from tqdm import tqdm

  return tqdm(disable=not enabled or jax.process_index() != 0, **kwargs)


def write_lines(path: pathlib.Path, lines: list[str]) -> None:
  """All lines at once, through a temporary file: a killed run leaves no half-written file.
  The temporary name is the process's own, so processes writing the same file (every process
  of a multi-process evaluation writes its cells) never move each other's."""
  tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
  tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  tmp.replace(path)


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
  """One JSON object per line, written atomically (`write_lines`)."""
  write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


class MetricWriter:
  """Scalars to metrics.jsonl (one JSON object per write) and TensorBoard (tensorboardX)."""

  def __init__(
    self, workdir: str | pathlib.Path, enabled: bool = True, resume_step: int | None = None
  ):
    """resume_step: the checkpoint step a run resumes from; later rows (written by the
    interrupted run after its last checkpoint, and about to be re-run) are dropped."""
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    if resume_step is not None and path.is_file():
      kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= resume_step
      ]
      write_lines(path, kept)
    self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self.jsonl.flush()
    for k, v in clean.items():
      self.tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def rank_table(masks: dict[str, np.ndarray], targets: list[str]) -> np.ndarray:
  """Kept ranks [S, L, n_targets] from the allocator's boolean masks {target: (S, L, r0)}."""
  return np.stack([np.asarray(masks[t]).sum(-1) for t in targets], axis=-1)


def plot_rank_allocation(
  path: str | pathlib.Path,
  ranks_SLT: np.ndarray,
  skills: list[str],
  targets: list[str],
  init_r: int,
) -> None:
  """One heat map per skill: kept rank of each (layer, module) after the final allocation."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  S, L, T = ranks_SLT.shape
  cols = min(S, 4)
  rows = -(-S // cols)
  fig, axes = plt.subplots(
    rows,
    cols,
    figsize=(2.2 + 1.6 * cols * max(T, 4) / 7, 1.2 + rows * max(2.0, L * 0.16)),
    squeeze=False,
    constrained_layout=True,
  )
  for i in range(rows * cols):
    ax = axes[i // cols][i % cols]
    if i >= S:
      ax.axis("off")
      continue
    im = ax.imshow(
      ranks_SLT[i], aspect="auto", cmap="viridis", vmin=0, vmax=init_r, interpolation="nearest"
    )
    ax.set_title(f"{skills[i]} (mean {ranks_SLT[i].mean():.1f})", fontsize=9)
    ax.set_xticks(range(T), targets, fontsize=7, rotation=45)
    ax.set_yticks(range(0, L, max(1, L // 8)))
    ax.set_ylabel("layer", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
  fig.colorbar(im, ax=axes, shrink=0.8, label="kept rank")
  fig.suptitle("AdaLoRA rank allocation per layer and module")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def eval_change(before: dict, after: dict, start: int, end: int) -> str:
  """Stage 1's reserved-row loss per skill before and after training, one line each."""
  lines = [f"  {k.split('/')[1]:5s} {before[k]:7.3f} -> {after[k]:7.3f}" for k in after]
  return f"eval loss per skill on reserved rows (step {start} -> {end}):\n" + "\n".join(lines)


# ---- stage 2 --------------------------------------------------------------------------------
def write_router_report(workdir, config, skills, method, results, weights, history) -> None:
  """Stage 2's metrics.jsonl (one row per scored method + fit curves), its table on stdout and
  router_weights.png."""
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=-1)
  longest = max((len(h) for h in history.values()), default=0)
  for i in range(0, longest, max(1, longest // 50)):
    writer.write(i + 1, {f"fit/{k}": v[i] for k, v in history.items() if i < len(v)})
  rec = {f"eval/{m}/{k}": v for m, r in results.items() for k, v in r.items()}
  rec.update(
    {f"weights/{m}/{s}": float(w[i]) for m, w in weights.items() for i, s in enumerate(skills)}
  )
  writer.write(longest + 1, rec)
  writer.close()
  if jax.process_index() == 0:
    print(f"stage 2 on {config.task} (router: {method}):\n" + format_table(results))
    if config.plot:
      plot_weights(workdir / "router_weights.png", list(skills), weights, config.task)


COLUMNS = (
  "loss",
  "token_acc",
  "exact",
  "accuracy",
  "macro_f1",
  "rouge1",
  "rouge2",
  "rougeL",
  "example_f1",
  "micro_f1",
  "seconds",
)


def format_table(results: dict[str, dict]) -> str:
  """One line per method: the loss, token accuracy, exact match, the standard metric(s) the
  task has and the seconds the method took (fit + score)."""
  cols = [c for c in COLUMNS if any(c in r for r in results.values())]
  lines = ["  " + f"{'method':22s}" + "".join(f"{c:>11s}" for c in cols)]
  for m, r in results.items():
    cells = "".join(f"{r[c]:11.3f}" if c in r else f"{'-':>11s}" for c in cols)
    lines.append(f"  {m:22s}" + cells)
  return "\n".join(lines)


def plot_weights(path, skills: list[str], weights: dict[str, np.ndarray], task: str) -> None:
  """Grouped bars: the weight each router gives each skill (the gate: mean over scored rows)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(weights)
  S, M = len(skills), len(names)
  fig, ax = plt.subplots(figsize=(2 + 0.5 * S * max(1, M / 3), 3.5), constrained_layout=True)
  width = 0.8 / max(M, 1)
  for j, m in enumerate(names):
    label = f"{m} (mean over rows)" if m == "gate" else m
    ax.bar(np.arange(S) + (j - (M - 1) / 2) * width, weights[m], width, label=label)
  ax.axhline(0, color="k", lw=0.5)
  ax.set_xticks(range(S), skills, rotation=45)
  ax.set_ylabel("weight")
  ax.set_title(f"router weights per skill, task {task}")
  ax.legend(fontsize=7, ncol=max(1, M // 6))
  fig.savefig(path, dpi=110)
  plt.close(fig)
