"""Sequence packing: several examples per row, each attending only to itself, train exactly
what the same examples train one per row; the packed stream keeps order, resumes, and splits
over hosts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax import data, train
from mdkif_jax.data import Template, batches, load_examples, make_iterator
from mdkif_jax.data.tokenize import encode_many, pack_row, pad_row
from tests.test_data_fixtures import char_tokenizer, smol  # noqa: F401 - fixture
from tests.test_data_pipeline import ccfg, demo_train  # noqa: F401 - fixture
from tests.test_train import _close, tiny_config


def _segments(batch):
  """[(row, token ids, targets, loss_mask, positions)] of every packed example, in order."""
  out = []
  for r, seg_row in enumerate(batch["attention_mask"]):
    for s in range(1, seg_row.max() + 1):
      at = np.flatnonzero(seg_row == s)
      assert (np.diff(at) == 1).all()  # contiguous
      out.append((r, *(batch[k][r, at] for k in ("tokens", "targets", "loss_mask", "positions"))))
  return out


def test_pack_row_keeps_each_example_its_own_targets_mask_and_positions():
  tok = char_tokenizer()
  exs = [
    data.Example("qa", "", "Why?", "Because.", "train", "1"),
    data.Example("qa", "", "How?", "Slowly.", "train", "2"),
  ]
  enc = encode_many(exs, tok, Template(chat=False), 1000)
  n0, n1 = len(enc[0].tokens), len(enc[1].tokens)
  row = pack_row(enc, n0 + n1 + 5, tok.pad_token_id)
  np.testing.assert_array_equal(row["attention_mask"], [1] * n0 + [2] * n1 + [0] * 5)
  np.testing.assert_array_equal(row["positions"][: n0 + n1], [*range(n0), *range(n1)])
  for k in ("tokens", "targets", "loss_mask"):
    alone = [pad_row(e, n, tok.pad_token_id)[k] for e, n in ((enc[0], n0), (enc[1], n1))]
    np.testing.assert_array_equal(row[k][: n0 + n1], np.concatenate(alone))
  # the last token of the first example predicts nothing (never the next example's first)
  assert row["loss_mask"][n0 - 1] == 0 and row["loss_mask"].sum() == 9 + 8
  with pytest.raises(ValueError, match="does not fit"):
    pack_row(enc, n0 + n1 - 1, tok.pad_token_id)


def test_packed_stream_keeps_order_fills_rows_and_holds_one_skill_per_row(demo_train):  # noqa: F811
  tok = char_tokenizer()
  c = ccfg(max_len=600, buckets=(600,), batch_size=4, pack=True)
  two = [e for e in demo_train if e.skill in ("ea", "es")]  # 52 short rows of two skills
  it = make_iterator(two, tok, c)
  stream = make_iterator(two, tok, ccfg(max_len=600, buckets=(600,), batch_size=1))
  n_rows = n_examples = 0
  for _ in range(10):  # crosses epoch boundaries
    batch = next(it)
    assert batch["tokens"].shape == (4, 600)
    segs = _segments(batch)
    for r, tokens, targets, loss_mask, positions in segs:
      ref = next(stream)  # the same example, alone in its own row
      n = len(tokens)
      np.testing.assert_array_equal(tokens, ref["tokens"][0, :n])
      np.testing.assert_array_equal(targets[:-1], ref["targets"][0, : n - 1])
      np.testing.assert_array_equal(loss_mask, ref["loss_mask"][0, :n])
      np.testing.assert_array_equal(positions, np.arange(n))
      assert batch["skill_ids"][r] == ref["skill_ids"][0]  # one skill per row
    # a row ends only when the next example does not fit or is another skill's
    used = (batch["attention_mask"] > 0).sum(1)
    for (r, *_), (r2, t2, *_) in zip(segs, segs[1:], strict=False):
      if r2 != r:
        assert used[r] + len(t2) > 600 or batch["skill_ids"][r2] != batch["skill_ids"][r]
    n_rows += 4
    n_examples += len(segs)
  assert it.position == n_examples and n_examples > 1.5 * n_rows, (n_examples, n_rows)  # it packed


def test_packed_stream_resumes_and_splits_over_hosts(demo_train):  # noqa: F811
  tok = char_tokenizer()
  c = ccfg(max_len=600, buckets=(600,), batch_size=4, pack=True)
  it = make_iterator(demo_train, tok, c)
  [next(it) for _ in range(20)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  fresh = make_iterator(demo_train, tok, c)
  fresh.set_state(state)
  for a in expected:
    b = next(fresh)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="pack"):
    make_iterator(demo_train, tok, ccfg(max_len=600, buckets=(600,), batch_size=4)).set_state(state)
  c2 = ccfg(max_len=600, buckets=(600,), batch_size=2, pack=True)
  hosts = [make_iterator(demo_train, tok, c2, process_index=p, process_count=2) for p in (0, 1)]
  whole = make_iterator(demo_train, tok, c)
  for _ in range(5):
    a, h0, h1 = next(whole), next(hosts[0]), next(hosts[1])
    for k in a:
      np.testing.assert_array_equal(a[k], np.concatenate([h0[k], h1[k]]))


def _batch(encs_per_row, skills_per_row, length, pad_id):
  rows = [pack_row(e, length, pad_id) for e in encs_per_row]
  b = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  b["skill_ids"] = np.asarray([data.skill_id(s) for s in skills_per_row], np.int32)
  b["answer_idx"], b["answer_valid"] = batches.answer_index(b["loss_mask"], at_least=64)
  return b


def test_packed_training_step_equals_one_example_per_row(smol):  # noqa: F811
  """Two rows of two examples each == four rows of one: same losses, same updated adapters;
  and ignoring the segments (one attention span per row) would change the loss."""
  c = tiny_config(skills="qa+ner", steps=6)
  # no warm-up: the first step's learning rate is the peak (1e-3), not 0, so the adapters move
  c.optimizer.warmup_steps = 0
  run = train.setup_training(c, ("qa", "ner"))
  # non-zero E, so the adapters act in the forward pass as well
  ad = run.state["adapters"]
  keys = iter(jax.random.split(jax.random.key(1), 100))
  ad = {t: {**leaf, "E": jax.random.normal(next(keys), leaf["E"].shape)} for t, leaf in ad.items()}
  state = {**run.state, "adapters": ad}
  examples = load_examples(c.data, "train")
  pick = [e for s in ("qa", "ner") for e in [e for e in examples if e.skill == s][:2]]
  enc = encode_many(pick, smol, Template.from_config(c.data.template), 128)
  pad = smol.pad_token_id
  packed = _batch([enc[:2], enc[2:]], ["qa", "ner"], 256, pad)
  single = _batch([[e] for e in enc], ["qa", "qa", "ner", "ner"], 128, pad)
  assert (packed["attention_mask"] == 2).any()
  out = []
  for b in (packed, single):
    s = jax.tree.map(jnp.copy, state)
    new, m = run.fns.train_step(s, run.frozen, batches.to_global(b, run.mesh))
    out.append((new, m))
  np.testing.assert_allclose(out[0][1]["loss_S"], out[1][1]["loss_S"], rtol=1e-5)
  np.testing.assert_allclose(out[0][1]["tokens_S"], out[1][1]["tokens_S"])
  _close(out[0][0]["adapters"], out[1][0]["adapters"], atol=1e-6)
  # the step really moved the adapters on both sides (Adam's first step is ~lr = 1e-3 a weight)
  for new, _ in out:
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new["adapters"], ad)
    assert min(jax.tree.leaves(moved)) > 5e-4, moved
  unsegmented = {**packed, "attention_mask": (packed["attention_mask"] > 0).astype(np.int32)}
  loss, _ = run.fns.eval_step(ad, run.frozen, batches.to_global(unsegmented, run.mesh))
  assert np.abs(np.asarray(loss) - np.asarray(out[0][1]["loss_S"])).max() > 1e-3


def test_packed_training_resumes_like_uninterrupted(tmp_path):
  c = tiny_config(skills="ea", steps=4, checkpoint_every=2)
  c.data.pack, c.data.buckets, c.data.max_len = True, (256,), 256
  full = train.train_skills(c, tmp_path / "full", ("ea",))
  # Entity Attribute rows are short: several share each row
  assert full["data_state"]["ea"]["position"] > 2 * full["data_state"]["ea"]["step"]
  train.train_skills(c, tmp_path / "resumed", ("ea",), stop_after=2)
  resumed = train.train_skills(c, tmp_path / "resumed", ("ea",))
  assert [h["step"] for h in resumed["history"]] == [3, 4]
  _close(full["adapters"], resumed["adapters"], atol=0)
  assert resumed["data_state"] == full["data_state"]


def test_version_1_states_resume_unpacked_and_newer_states_are_refused(demo_train):  # noqa: F811
  tok = char_tokenizer()
  c = ccfg(batch_size=4)
  it = make_iterator(demo_train, tok, c)
  [next(it) for _ in range(3)]
  v1 = {k: v for k, v in it.get_state().items() if k not in ("position", "pack")}
  v1["version"] = 1  # what checkpoints written before packing hold
  fresh = make_iterator(demo_train, tok, c)
  fresh.set_state(v1)
  a, b = next(it), next(fresh)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="pack"):
    make_iterator(demo_train, tok, ccfg(batch_size=4, pack=True)).set_state(v1)
  with pytest.raises(ValueError, match="newer"):
    fresh.set_state({**it.get_state(), "version": 99})
