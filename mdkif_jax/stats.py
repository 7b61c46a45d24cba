"""Bootstrap statistics of an evaluation: a metric's 95% interval over scored rows, the paired
difference of two methods on the same rows, and a track's gain over the base (the mean of
per-task relative gains, the relative gain of the mean score, the mean difference in points).

Every metric here is a function of per-row records (a row's gold and prediction, or its
per-row score), so one resample of row indices serves every metric: a corpus metric (macro-F1,
micro-F1) is recomputed on the resampled rows, not averaged per row. Resamples are seeded, so
the same rows give the same interval on every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
  """[resamples, n] row indices drawn with replacement (the same for every method of a task,
  which makes the paired difference paired)."""
  return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
  """The percentile interval of bootstrap values."""
  lo, hi = np.quantile(np.asarray(values, np.float64), [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A metric on the scored rows, its interval and the bootstrap values behind it."""

  score: float
  ci: tuple[float, float]
  n: int
  boot: np.ndarray  # [resamples], for paired differences and track means

  def to_json(self) -> dict:
    return {"score": self.score, "ci": list(self.ci), "n": self.n}


def bootstrap(
  metric: Callable[[np.ndarray], float], n: int, idx: np.ndarray, level: float = LEVEL
) -> Estimate:
  """metric(row indices) -> value, on all rows and on every resample `idx` [R, n]."""
  score = float(metric(np.arange(n)))
  boot = np.asarray([metric(row) for row in idx], np.float64)
  return Estimate(score, interval(boot, level), n, boot)


def paired_difference(method: Estimate, base: Estimate, level: float = LEVEL) -> dict:
  """method - base on the same resamples: mean, interval and the share of resamples <= 0
  (a one-sided bootstrap p-value that the method is no better)."""
  diff = method.boot - base.boot
  return {
    "mean": method.score - base.score,
    "ci": list(interval(diff, level)),
    "p_le_0": float(np.mean(diff <= 0)),
  }


def relative_gain(
  methods: Sequence[Estimate], bases: Sequence[Estimate], level: float = LEVEL
) -> dict:
  """The mean over tasks of (method - base) / base (the paper's "+x% over the base"), with
  its interval from the tasks' bootstrap values resampled together. Tasks whose base scores
  0 are left out (their relative gain is undefined), and so are the resamples in which a task's
  base scores 0: with a base near 0 the interval is conditional on the base being above 0
  (`resamples` says how many were used; gain_of_means and mean_difference use them all)."""
  pairs = [(m, b) for m, b in zip(methods, bases, strict=True) if b.score > 0]
  if not pairs:
    return {"mean_relative_gain": float("nan"), "ci": [float("nan")] * 2, "tasks": 0}
  gain = np.mean([(m.score - b.score) / b.score for m, b in pairs])
  with np.errstate(divide="ignore", invalid="ignore"):
    boot = np.mean([(m.boot - b.boot) / np.where(b.boot > 0, b.boot, np.nan) for m, b in pairs], 0)
  used = boot[np.isfinite(boot)]  # a resample in which a task's base scores 0 has no gain
  return {
    "mean_relative_gain": float(gain),
    "ci": list(interval(used, level)),
    "tasks": len(pairs),
    "resamples": [int(used.size), int(boot.size)],  # [with a gain, in all]
  }


def gain_of_means(
  methods: Sequence[Estimate], bases: Sequence[Estimate], level: float = LEVEL
) -> dict:
  """The track's mean score over the base's mean score, minus 1, with its interval from the
  tasks' bootstrap values resampled together. The mean of per-task relative gains is dominated
  by any task whose base scores near 0 (BC5CDR's 0.003 -> 0.37 is +12,000%); this one weighs a
  task by its base score, so such a task counts by its points, as in mean_difference."""
  base = float(np.sum([b.score for b in bases]))
  if base <= 0:
    return {"gain": float("nan"), "ci": [float("nan")] * 2, "tasks": len(bases)}
  gain = float(np.sum([m.score for m in methods])) / base - 1.0
  with np.errstate(divide="ignore", invalid="ignore"):
    boot = np.sum([m.boot for m in methods], 0) / np.sum([b.boot for b in bases], 0) - 1.0
  boot = boot[np.isfinite(boot)]
  return {"gain": gain, "ci": list(interval(boot, level)), "tasks": len(bases)}


def mean_difference(
  methods: Sequence[Estimate], bases: Sequence[Estimate], level: float = LEVEL
) -> dict:
  """The mean over tasks of method - base in metric points, with its interval from the tasks'
  paired bootstrap values resampled together. Unlike the relative gain it stays readable when
  a base scores near 0 (a list task the base cannot format: 0.003 -> 0.37 is +12,000%)."""
  diff = np.mean([m.boot - b.boot for m, b in zip(methods, bases, strict=True)], 0)
  mean = float(np.mean([m.score - b.score for m, b in zip(methods, bases, strict=True)]))
  return {"mean": mean, "ci": list(interval(diff, level)), "tasks": len(methods)}
