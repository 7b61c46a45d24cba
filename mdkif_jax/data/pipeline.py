"""The batch iterator: static length buckets, deterministic order, resumable, host-sharded.

Order: an endless stream of epochs, each a permutation of the examples drawn from
`np.random.default_rng([seed, epoch])`. Unpacked, global batch k is stream positions
[k*G, (k+1)*G) with G = batch_size * process_count, and host p takes its rows
[p*B, (p+1)*B). So the state is the global step (and the stream position it implies), every
host agrees on it, and a resumed run sees exactly the batches an uninterrupted one would have.

Shapes: every example is encoded once up front (over-long ones are skipped and counted), so
each host knows every row's length. A global batch is padded to the smallest bucket that
holds its longest row over all hosts, so jit sees at most len(buckets) shapes and all hosts
agree on the shape of each step.

Packing (`pack=True`): a row holds consecutive examples of the stream, as many as fit in
`max_len` tokens and all of one skill, each attending only to itself (`tokenize.pack_row`).
A global batch is its G rows filled in stream order, so it takes a variable number of stream
positions and the state records the position too. Order, determinism, resumption and the
host split are as above; padding shrinks to the tail of each row.
"""

from __future__ import annotations

import bisect
import collections
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from mdkif_jax.data.example import Example
from mdkif_jax.data.skills import skill_id
from mdkif_jax.data.template import Template
from mdkif_jax.data.tokenize import Encoded, encode_many, pack_row

log = logging.getLogger(__name__)

_STATE_VERSION = 2  # 2 added "position" and "pack"


def resolve_buckets(buckets: Sequence[int], max_len: int) -> tuple[int, ...]:
  """Sorted bucket lengths, capped by and always including `max_len`."""
  if max_len <= 1:
    raise ValueError(f"data.max_len must be > 1, got {max_len}")
  out = sorted({int(b) for b in buckets if 1 < int(b) <= max_len} | {int(max_len)})
  return tuple(out)


class Batches(Iterator[dict[str, np.ndarray]]):
  """Endless iterator of padded batches (see the module docstring); `get_state`/`set_state`
  save and restore the position as a small JSON-able dict."""

  def __init__(
    self,
    examples: Sequence[Example],
    tokenizer,
    cfg,
    *,
    batch_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    encoded: Sequence[Encoded | None] | None = None,
  ):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size is None:
      batch_size = cfg.get("batch_size")
    if batch_size is None:
      raise ValueError("rows per batch: pass batch_size= (or set batch_size in the config)")
    self.batch_size = int(batch_size)
    self.seed = int(cfg.seed)
    self.max_len = int(cfg.max_len)
    self.pack = bool(cfg.get("pack", False))
    self.buckets = resolve_buckets(cfg.buckets, self.max_len)
    self.process_index, self.process_count = process_index, process_count
    self.pad_id = tokenizer.pad_token_id
    if self.pad_id is None:
      self.pad_id = tokenizer.eos_token_id
    if encoded is None:
      template = Template.from_config(cfg.template)
      encoded = encode_many(examples, tokenizer, template, self.max_len)
    keep = [i for i, e in enumerate(encoded) if e is not None]
    self.too_long = collections.Counter(
      (examples[i].source, examples[i].skill) for i, e in enumerate(encoded) if e is None
    )
    if self.too_long:
      log.warning(
        "skipped %d examples longer than max_len=%d even without context: %s",
        sum(self.too_long.values()),
        self.max_len,
        dict(self.too_long),
      )
    if not keep:
      if not examples:
        raise ValueError("no examples to batch (the example list is empty)")
      raise ValueError(
        f"none of the {len(examples)} examples fits data.max_len={self.max_len} even with its "
        f"context cut (per source and skill: {dict(self.too_long)}); raise data.max_len (and "
        "data.buckets) or drop that skill"
      )
    self.rows = [encoded[i] for i in keep]
    self.skill_ids = np.asarray([skill_id(examples[i].skill) for i in keep], np.int32)
    self.lengths = np.asarray([len(e.tokens) for e in self.rows], np.int64)
    self.truncated = sum(e.truncated for e in self.rows)
    self.step = 0
    self.position = 0  # stream position of the next global batch's first example
    self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

  @property
  def num_examples(self) -> int:
    return len(self.rows)

  @property
  def global_batch(self) -> int:
    return self.batch_size * self.process_count

  def _index(self, position: int) -> int:
    epoch, i = divmod(position, self.num_examples)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      self._perm_epoch = epoch
    return int(self._perm[i])

  def _global_rows(self) -> list[list[int]]:
    """The next global batch's rows as example indices; advances the stream position."""
    p = self.position
    if not self.pack:
      self.position += self.global_batch
      return [[self._index(q)] for q in range(p, p + self.global_batch)]
    rows: list[list[int]] = [[]]
    used = 0
    while True:
      i = self._index(p)
      # a row holds one skill (its adapter is picked per row): a full row or another skill's
      # example starts the next row
      full = used + self.lengths[i] > self.max_len
      if rows[-1] and (full or self.skill_ids[i] != self.skill_ids[rows[-1][0]]):
        if len(rows) == self.global_batch:
          break
        rows.append([])
        used = 0
      rows[-1].append(i)
      used += int(self.lengths[i])
      p += 1
    self.position = p
    return rows

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self._global_rows()
    self.step += 1
    longest = max(int(self.lengths[r].sum()) for r in rows)
    length = self.buckets[bisect.bisect_left(self.buckets, longest)]
    mine = rows[self.process_index * self.batch_size : (self.process_index + 1) * self.batch_size]
    packed = [pack_row([self.rows[i] for i in r], length, self.pad_id) for r in mine]
    batch = {k: np.stack([r[k] for r in packed]) for k in packed[0]}
    batch["skill_ids"] = self.skill_ids[[r[0] for r in mine]]
    return batch

  def get_state(self) -> dict[str, int]:
    """The position as a JSON-able dict (store it with the checkpoint)."""
    return {
      "version": _STATE_VERSION,
      "step": self.step,
      "position": self.position,
      "pack": self.pack,
      "seed": self.seed,
      "num_examples": self.num_examples,
      "global_batch": self.global_batch,
    }

  def set_state(self, state: dict) -> None:
    """Resume at a saved position; refuses a state from a different data stream."""
    if int(state.get("version", 1)) > _STATE_VERSION:
      raise ValueError(
        f"iterator state version {state['version']} is newer than this code's "
        f"({_STATE_VERSION}): update mdkif_jax"
      )
    state = {"pack": False, **state}  # version 1 states: never packed
    for key in ("seed", "num_examples", "global_batch", "pack"):
      if int(state[key]) != int(getattr(self, key)):
        raise ValueError(
          f"iterator state has {key}={state[key]} but this iterator has {getattr(self, key)}: "
          "the data, seed, batch size, packing or host count changed since it was saved"
        )
    self.step = int(state["step"])
    self.position = int(state.get("position", self.step * self.global_batch))


def make_iterator(
  examples: Sequence[Example],
  tokenizer,
  cfg,
  *,
  batch_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Batches:
  """Batches of `batch_size` rows (default: the config's `batch_size`) of `examples` for this
  host: `process_index`/`process_count` default (None) to jax.process_index() /
  jax.process_count(); pass them to build another host's view."""
  if process_index is None or process_count is None:
    import jax  # Lazily: the data layer imports without JAX.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return Batches(
    examples,
    tokenizer,
    cfg,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
  )
