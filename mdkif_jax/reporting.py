"""What a run leaves for people: a JSONL metrics file, TensorBoard events, a rank plot."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def write_lines(path: pathlib.Path, lines: list[str]) -> None:
  """All lines at once, through a temporary file: a killed run leaves no half-written file."""
  tmp = path.with_suffix(path.suffix + ".tmp")
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
        line for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= resume_step
      ]  # fmt: skip
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
    im = ax.imshow(ranks_SLT[i], aspect="auto", cmap="viridis", vmin=0, vmax=init_r,
                   interpolation="nearest")  # fmt: skip
    ax.set_title(f"{skills[i]} (mean {ranks_SLT[i].mean():.1f})", fontsize=9)
    ax.set_xticks(range(T), targets, fontsize=7, rotation=45)
    ax.set_yticks(range(0, L, max(1, L // 8)))
    ax.set_ylabel("layer", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
  fig.colorbar(im, ax=axes, shrink=0.8, label="kept rank")
  fig.suptitle("AdaLoRA rank allocation per layer and module")
  fig.savefig(path, dpi=110)
  plt.close(fig)
