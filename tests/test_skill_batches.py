"""Packed answer positions: the loss sees every answer token once, and nothing else."""

import numpy as np
import pytest

from mdkif_jax.data.batches import SkillBatches, answer_count, answer_index
from mdkif_jax.errors import CheckpointMismatchError


def _mask(rows):
  """rows: answer spans (start, stop) per row of length 32."""
  m = np.zeros((len(rows), 32), np.float32)
  for b, (lo, hi) in enumerate(rows):
    m[b, lo:hi] = 1.0
  return m


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_packed_positions_are_exactly_the_answer_tokens_of_each_group(groups):
  mask = _mask([(3, 30), (5, 7), (0, 1), (10, 12), (20, 32), (4, 5), (1, 2), (2, 9)])
  idx, w = answer_index(mask, groups)
  B, T = mask.shape
  assert idx.shape[0] == groups and w.shape == idx.shape
  N = idx.shape[1]
  assert N & (N - 1) == 0 and answer_count(mask, groups) <= N  # a power of two, big enough
  for g in range(groups):
    flat = mask.reshape(groups, -1)[g]
    kept = idx[g][w[g] > 0]
    np.testing.assert_array_equal(np.sort(kept), np.flatnonzero(flat))  # each answer once
    assert np.all(kept < B // groups * T)  # never outside the group's own rows
  assert w.sum() == mask.sum()


def test_one_long_answer_no_longer_pads_every_row_to_its_length():
  mask = _mask([(0, 30)] + [(0, 2)] * 11)  # one summary, eleven 2-token labels
  idx, _ = answer_index(mask)
  assert idx.size == 64  # 52 answer tokens -> 64 packed positions (per-row padding: 12 x 32)


def test_at_least_keeps_shapes_equal_across_processes_and_rows_must_split_evenly():
  mask = _mask([(0, 2)] * 4)
  assert answer_index(mask, at_least=40)[0].shape == (1, 64)
  with pytest.raises(ValueError, match="3 equal answer groups"):
    answer_index(mask, groups=3)


def test_resuming_a_data_state_of_other_skills_is_refused_naming_both():
  """A checkpoint's data position belongs to its skills: another skill set is a one-line
  CheckpointMismatchError, not a KeyError half-way through the streams."""
  batches = SkillBatches({"qa": None, "ner": None}, pad_id=0)
  with pytest.raises(
    CheckpointMismatchError, match=r"\['mcqa', 'qa'\], this run trains \['ner', 'qa'\]"
  ):
    batches.set_state({"qa": {}, "mcqa": {}})
