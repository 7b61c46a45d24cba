"""The batch iterator: shapes and buckets, determinism, resume, host sharding."""

import json

import numpy as np
import pytest

from mdkif_jax.data import SKILLS, load_examples, make_iterator
from tests.test_data_fixtures import cfg, char_tokenizer, smol  # noqa: F401 - fixture


def ccfg(**overrides):
  """Config for the character tokenizer: plain template (rows of 105-501 characters)."""
  c = cfg(**overrides)
  c.template.chat = False
  return c


@pytest.fixture(scope="module")
def demo_train():
  return load_examples(cfg(), "train")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_batches_have_static_bucket_shapes_and_dtypes(demo_train):
  c = ccfg(max_len=512, buckets=(160, 240, 320), batch_size=4)
  it = make_iterator(demo_train, char_tokenizer(), c)
  shapes = set()
  for batch in _take(it, 40):
    B, T = batch["tokens"].shape
    shapes.add(T)
    assert B == 4 and T in (160, 240, 320, 512)
    assert batch["tokens"].dtype == batch["targets"].dtype == np.int32
    assert batch["positions"].dtype == batch["attention_mask"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and batch["skill_ids"].dtype == np.int32
    assert batch["skill_ids"].shape == (4,)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() > {160: 0, 240: 160, 320: 240, 512: 320}[T]  # Smallest fitting bucket.
    # Right padding: the mask is a prefix of ones, and the loss sits inside it.
    assert all(
      (row[:n] == 1).all() and row[n:].sum() == 0
      for row, n in zip(batch["attention_mask"], lengths, strict=True)
    )
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()
  assert len(shapes) >= 3


def test_skill_ids_match_the_examples():
  examples = load_examples(cfg(skills="ner,es"), "train")
  assert {e.skill for e in examples} == {"ner", "es"}
  it = make_iterator(examples, char_tokenizer(), ccfg(batch_size=8))
  ids = np.concatenate([b["skill_ids"] for b in _take(it, 10)])
  assert set(ids.tolist()) == {SKILLS.index("ner"), SKILLS.index("es")}


def test_one_epoch_visits_every_example_once(demo_train):
  n = len(demo_train)
  assert n == 12 * 26  # 26 training examples per skill in the demo corpus.
  it = make_iterator(demo_train, char_tokenizer(), ccfg(batch_size=8))
  assert n % 8 == 0
  seen = [tuple(row[row > 0]) for b in _take(it, n // 8) for row in b["tokens"]]
  assert len(set(seen)) == n


def test_deterministic_for_a_seed(demo_train):
  tok = char_tokenizer()
  a = _take(make_iterator(demo_train, tok, ccfg(seed=3)), 5)
  b = _take(make_iterator(demo_train, tok, ccfg(seed=3)), 5)
  c = _take(make_iterator(demo_train, tok, ccfg(seed=4)), 5)
  for x, y in zip(a, b, strict=True):
    _same(x, y)
  assert any(
    x["tokens"].shape != z["tokens"].shape or (x["tokens"] != z["tokens"]).any()
    for x, z in zip(a, c, strict=True)
  )


def test_resume_from_saved_state(demo_train):
  tok = char_tokenizer()
  c = ccfg(batch_size=8)
  it = make_iterator(demo_train, tok, c)
  _take(it, 50)  # Crosses an epoch boundary (39 steps per epoch).
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 7)
  fresh = make_iterator(demo_train, tok, c)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 7), strict=True):
    _same(x, y)
  with pytest.raises(ValueError, match="seed"):
    make_iterator(demo_train, tok, ccfg(batch_size=8, seed=1)).set_state(state)
  with pytest.raises(ValueError, match="global_batch"):
    make_iterator(demo_train, tok, ccfg(batch_size=8), process_count=2).set_state(state)


def test_hosts_split_the_global_batch(demo_train):
  tok = char_tokenizer()
  single = _take(make_iterator(demo_train, tok, ccfg(batch_size=8)), 6)
  hosts = [
    _take(make_iterator(demo_train, tok, ccfg(batch_size=4), process_index=p, process_count=2), 6)
    for p in (0, 1)
  ]
  for step, whole in enumerate(single):
    joined = {k: np.concatenate([hosts[0][step][k], hosts[1][step][k]]) for k in whole}
    _same(whole, joined)
  with pytest.raises(ValueError, match="process_index"):
    make_iterator(demo_train, tok, ccfg(), process_index=2, process_count=2)


def test_default_shard_is_this_hosts(demo_train, monkeypatch):
  """Without process_index/process_count the iterator asks JAX which host it is."""
  import jax

  tok = char_tokenizer()
  it = make_iterator(demo_train, tok, ccfg(batch_size=4))
  assert (it.process_index, it.process_count) == (jax.process_index(), jax.process_count())
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  host1 = make_iterator(demo_train, tok, ccfg(batch_size=4))
  assert (host1.process_index, host1.global_batch) == (1, 8)
  explicit = make_iterator(demo_train, tok, ccfg(batch_size=4), process_index=1, process_count=2)
  _same(next(host1), next(explicit))
  assert make_iterator(demo_train, tok, ccfg(), process_index=0, process_count=1).process_count == 1


def test_too_long_examples_are_counted_not_batched(demo_train):
  it = make_iterator(demo_train, char_tokenizer(), ccfg(max_len=250, buckets=(200,)))
  assert sum(it.too_long.values()) > 0 and it.num_examples + sum(it.too_long.values()) == len(
    demo_train
  )
  assert it.truncated > 0
  assert {b["tokens"].shape[1] for b in _take(it, 20)} <= {200, 250}


def test_smollm2_batches(smol):  # noqa: F811
  examples = load_examples(cfg(), "eval")
  it = make_iterator(examples, smol, cfg(batch_size=4))
  batch = next(it)
  assert batch["tokens"].shape[1] == 128  # Demo prompts are < 128 SmolLM2 tokens.
  for row in range(4):
    answer = batch["targets"][row][batch["loss_mask"][row] == 1]
    assert smol.decode(answer.tolist()).endswith("<|im_end|>")


def test_no_example_fitting_max_len_is_an_error_naming_the_limit_and_the_skills(demo_train):
  tiny = ccfg(max_len=8, buckets=(8,))
  with pytest.raises(ValueError, match=r"none of the \d+ examples fits data.max_len=8") as err:
    make_iterator(demo_train[:5], char_tokenizer(), tiny)
  assert demo_train[0].skill in str(err.value) and "raise data.max_len" in str(err.value)
  with pytest.raises(ValueError, match="example list is empty"):
    make_iterator([], char_tokenizer(), ccfg())
