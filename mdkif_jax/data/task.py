"""A downstream task's rows: which reserved examples fit a router and which score it, and the
padded, length-bucketed batches both stages' scoring and stage 2's fitting run on.

A task is a source with reserved rows in the split registry (`splits.py`), optionally
`source:skill`; its rows are split by a hash of their id, the same on every run and machine.
"""

from __future__ import annotations

import numpy as np

from mdkif_jax import data
from mdkif_jax.data import batches, pipeline, splits
from mdkif_jax.data.tokenize import encode_many, pad_row


class TaskError(ValueError):
  """An unknown downstream task, a task without reserved data, or k larger than the data."""


def task_names() -> list[str]:
  """Sources that can hold reserved (downstream) rows; a task is one, or `source:skill`."""
  return sorted({src for (src, _), rule in splits.SPLITS.items() if rule.role != splits.TRAIN})


def parse_task(task: str) -> tuple[str, str | None]:
  source, _, skill = (task or "").partition(":")
  if source not in task_names() or (skill and skill not in data.SKILLS):
    raise TaskError(
      f"unknown task {task!r}: set --config.task to a source with reserved rows "
      f"({', '.join(task_names())}), optionally ':skill' with a skill from "
      f"{', '.join(data.SKILLS)}"
    )
  return source, skill or None


def task_examples(config) -> tuple[list, list]:
  """(rows that fit the router, rows that score it): the task's reserved examples, split by
  a hash of their id (the same split on every run and machine)."""
  source, skill = parse_task(config.task)
  rows = [
    ex
    for ex in data.load_examples(config.data, "eval")
    if ex.source == source and (skill is None or ex.skill == skill)
  ]
  if not rows:
    raise TaskError(
      f"task {config.task!r} has no reserved examples with data_dir={config.data.data_dir} "
      f"(sources={config.data.sources!r}, skills={config.data.skills!r}): check "
      "--config.task, --config.data.data_dir and --config.data.sources"
    )
  held = [splits.hash_unit("router/" + source, ex.id) < config.eval_fraction for ex in rows]
  fit = [ex for ex, h in zip(rows, held, strict=True) if not h]
  score = [ex for ex, h in zip(rows, held, strict=True) if h]
  if config.max_fit_examples:
    fit = fit[: config.max_fit_examples]
  if config.max_eval_examples:
    score = score[: config.max_eval_examples]
  if not fit or not score:
    raise TaskError(
      f"task {config.task!r}: {len(rows)} reserved examples give {len(fit)} to fit and "
      f"{len(score)} to score the router; change --config.eval_fraction"
    )
  return fit, score


def prepare(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A padded batch (tokens, targets, loss_mask, positions, attention_mask) -> the router's:
  answer positions per row ([B, N]: batches.answer_index with one group per row, as
  router.answer_stats gathers them) and the prompt mask the gate pools over."""
  lm = batch["loss_mask"] > 0
  idx, valid = batches.answer_index(batch["loss_mask"], groups=len(lm))
  prompt = ((np.cumsum(lm, 1) - lm) == 0) & (batch["attention_mask"] > 0)
  keys = ("tokens", "targets", "positions", "attention_mask")
  return {
    **{k: batch[k] for k in keys},
    "answer_idx": idx,
    "answer_valid": valid,
    "prompt_mask": prompt.astype(np.float32),
  }


def encode_rows(examples, tok, data_cfg) -> list:
  """Each example's `Encoded` (None when it cannot fit data.max_len), in order."""
  template = data.Template.from_config(data_cfg.template)
  return encode_many(examples, tok, template, int(data_cfg.max_len))


def pack(
  enc: list,
  tok,
  data_cfg,
  batch_size: int,
  multiple: int = 1,
  by_length: bool = False,
  drop_eos: bool = False,
) -> list[tuple[np.ndarray, dict]]:
  """(row indices into `enc`, prepared batch) pairs: every encoded row once, `batch_size` rows
  a batch (rounded up to `multiple`, the data-parallel device count; filler rows have index -1
  and no answer tokens), padded to a bucket. `by_length` orders rows by length first (less
  padding); `drop_eos` leaves the final end-of-turn token out of the answer (candidate scoring)."""
  keep = [i for i, e in enumerate(enc) if e is not None]
  if not keep:
    raise TaskError("no task example fits data.max_len (stage 1's, read from its checkpoint)")
  if by_length:
    keep.sort(key=lambda i: len(enc[i].tokens))
  buckets = pipeline.resolve_buckets(data_cfg.buckets, int(data_cfg.max_len))
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  size = -(-batch_size // multiple) * multiple
  out = []
  for start in range(0, len(keep), batch_size):
    part = keep[start : start + batch_size]
    length = next(b for b in buckets if b >= max(len(enc[i].tokens) for i in part))
    rows = [pad_row(enc[i], length, pad_id) for i in part]
    if drop_eos:
      for r in rows:
        r["loss_mask"][np.flatnonzero(r["loss_mask"])[-1]] = 0.0
    rows += [{**rows[0], "loss_mask": np.zeros(length, np.float32)}] * (size - len(rows))
    idx = np.asarray(part + [-1] * (size - len(part)), np.int64)
    out.append((idx, prepare({k: np.stack([r[k] for r in rows]) for k in rows[0]})))
  return out


def make_batches(examples, tok, data_cfg, batch_size: int, multiple: int = 1) -> list[dict]:
  """Every example once, in order, `batch_size` rows a batch (see `pack`)."""
  enc = encode_rows(examples, tok, data_cfg)
  return [b for _, b in pack(enc, tok, data_cfg, batch_size, multiple)]


def k_shot_rows(pool: list, k: int, seed: int, task: str) -> list:
  if k > len(pool):
    raise TaskError(
      f"--config.cmaes.k_shots asks for k={k} examples but task {task!r} has only {len(pool)} "
      "rows to fit the router; lower k or --config.eval_fraction"
    )
  return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:k]]
