"""Standard metrics: accuracy / macro-F1 / set F1 and ROUGE on hand-made cases, ROUGE equal to
rouge-score's, the source table, and candidate scoring and generation on the tiny model
(the one-forward path equals a candidate-per-row pass and a naive full forward)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import router as router_config
from mdkif_jax import data, evaluate, metrics
from mdkif_jax.data import task
from mdkif_jax.data.example import Example
from mdkif_jax.model import generate, loading, tokenizer


def ex(answer, source="rqe", skill="nli", query="q", context="c", rid="0"):
  return Example(skill, context, query, answer, source, rid)


def test_accuracy_and_macro_f1_by_hand():
  gold, pred = ["a", "a", "b", "c"], ["a", "b", "b", "a"]
  assert metrics.accuracy(gold, pred) == 0.5
  # a: 2*1/(2+1+1) = 0.5, b: 2/(2+1) = 2/3, c: 0 (never predicted) -> mean 7/18
  assert metrics.macro_f1(gold, pred) == pytest.approx(7 / 18)
  assert metrics.macro_f1(["yes", "no"], ["yes", "no"]) == 1.0
  # a label only predicted (never gold) counts too, as sklearn's default does
  assert metrics.macro_f1(["yes", "yes"], ["yes", "maybe"]) == pytest.approx((2 / 3 + 0) / 2)
  assert metrics.accuracy([], []) == 0.0 and metrics.macro_f1([], []) == 0.0


def test_ties_go_to_the_first_candidate():
  assert metrics.pick([[-1.0, -1.0], [-2.0, -1.0], [-3.0, -3.0, -3.0]]) == [0, 1, 0]
  plan = metrics.plan([ex("no"), ex("yes")], [ex("yes"), ex("no")])
  assert plan.choices[0] == ("yes", "no")  # RQE's fixed label order
  out = plan.finish({0: [-1.0, -1.0], 1: [-1.0, -1.0]}, {})
  assert out["accuracy"] == 0.5  # both predict "yes" on the tie
  assert out["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_lean_pools_the_label_rows_of_every_seed():
  def out(gold, pred):
    n = len(gold)
    return metrics.Outcomes(gold, pred, pred, np.full((n, 3), np.nan), np.zeros((n, 3)))

  a = out(("yes", "no", ""), ("yes", "yes", ""))  # the third row is generated: not counted
  b = out(("yes", "no", ""), ("no", "yes", ""))
  assert metrics.lean([a, b]) == {"answer": "yes", "share": 0.75}
  assert metrics.lean([a], of="gold") == {"answer": "yes", "share": 0.5}
  assert metrics.lean([out(("",), ("",))]) is None


def test_set_f1_by_hand():
  out = metrics.set_f1(["A\nB", "none", "x"], ["a\nc", "none", "y\nz"])
  # row 1: {a, b} vs {a, c} -> 1/2; row 2: both empty -> 1; row 3: 0
  assert out["example_f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert out["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 3))


def test_rouge_by_hand_from_the_definitions():
  # ROUGE-1/2: F1 of the clipped n-gram overlap; ROUGE-L: F1 of the longest common subsequence.
  # Text is lower-cased, split at non-alphanumerics, words over 3 letters Porter-stemmed.
  cases = [
    # 6 words each. Unigrams shared: the (x2), cat, on, mat = 5: P = R = F = 5/6. Bigrams (5
    # each) shared: "the cat", "on the", "the mat" = 3: 3/5. LCS "the cat on the mat" = 5: 5/6.
    ("The cat sat on the mat.", "the cat lay on the mat", 5 / 6, 3 / 5, 5 / 6),
    # 4 vs 5 words; "dogs" stems to "dog". Unigrams shared: big, dog: P = 2/4, R = 2/5,
    # F = 2PR / (P + R) = 0.4 / 0.9 = 4/9 (2/9 unstemmed). No shared bigram: 0. LCS "big dog":
    # 4/9.
    ("a big red dogs", "the big dog ran far", 4 / 9, 0.0, 4 / 9),
    # The same three words in another order: ROUGE-1 = 1, no bigram shared: 0, LCS of one
    # word: P = R = F = 1/3.
    ("dog bit man", "man bit dog", 1.0, 0.0, 1 / 3),
  ]
  keys = ("rouge1", "rouge2", "rougeL")
  for pred, ref, *want in cases:
    got = metrics.rouge([pred], [ref])
    assert [got[k] for k in keys] == pytest.approx(want, abs=1e-12), (pred, ref)
  # several rows: the mean of their F-measures
  both = metrics.rouge([c[0] for c in cases], [c[1] for c in cases])
  for i, k in enumerate(keys):
    assert both[k] == pytest.approx(np.mean([c[2 + i] for c in cases]), abs=1e-12)


def test_rouge_equals_rouge_score():
  from rouge_score import rouge_scorer

  preds = ["The patients were treated with daily aspirin.", "no symptoms", ""]
  refs = ["Patients received daily aspirin treatment.", "What are the symptoms of flu?", "x"]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  ours = metrics.rouge(preds, refs)
  for key in ("rouge1", "rouge2", "rougeL"):
    want = np.mean([scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs, strict=True)])
    assert ours[key] == pytest.approx(want, abs=1e-12)
  assert ours["rouge1"] > ours["rouge2"] > 0


def test_the_source_table():
  assert metrics.kind_of(ex("yes", "pubmedqa", "mrc")) == "choice"
  assert metrics.kind_of(ex("long", "pubmedqa", "qa")) == "rouge"
  assert metrics.kind_of(ex("A", "medmcqa", "mcqa")) == "choice"
  assert metrics.kind_of(ex("s", "meqsum", "ts")) == "rouge"
  assert metrics.kind_of(ex("x", "hoc", "mldc")) == "sets"
  assert metrics.kind_of(ex("x", "hpo", "es")) == "exact"  # not in the table
  assert metrics.kind_of(ex("x", "demo", "mcqa")) == "choice"  # mixed corpus: by skill
  assert metrics.kind_of(ex("x", "demo", "ts")) == "rouge"
  assert metrics.kind_of(ex("x", "meqsum", "ts"), "exact") == "exact"
  with pytest.raises(ValueError, match="metric must be"):
    metrics.kind_of(ex("x"), "bleu")


def test_candidates():
  q = "Which drug?\nA. one\nB. two\nC. three"
  assert metrics.candidates(ex("B", "medmcqa", "mcqa", query=q), {}) == ("A", "B", "C")
  rows = [ex(a, "demo", "re", rid=str(i)) for i, a in enumerate(["treats", "causes", "treats"])]
  plan = metrics.plan(rows[:1], rows)
  assert plan.choices[0] == ("causes", "treats")  # the task's distinct answers, sorted
  many = [ex(f"summary {i}", "meqsum", "ts", rid=str(i)) for i in range(40)]
  with pytest.raises(ValueError, match="not a label task"):
    metrics.plan(many[:1], many, "choice")


# ---- on the tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
  cfg = router_config.get_config("tiny")
  cfg.mesh.shape = (1, 1, 1)
  base = loading.load_model(cfg.model.source)
  tok = tokenizer.load_tokenizer(cfg.model.tokenizer)
  rows = data.load_examples(cfg.data, "eval")
  return cfg, base, tok, rows


def _scorer(cfg, tok, rows, task_rows, fast=True):
  put = functools.partial(jax.tree.map, jnp.asarray)
  return evaluate.TaskScorer(rows, task_rows, tok, cfg, put, one_token_fast=fast)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def _naive(base, tok, cfg, row, cand):
  """Σ log p(candidate tokens | prompt) from one plain forward of prompt + candidate (right
  padding to max_len changes nothing before it: attention is causal)."""
  e = task.encode_rows([dataclasses.replace(row, answer=cand)], tok, cfg.data)[0]
  tokens = np.zeros((1, cfg.data.max_len), np.int32)
  tokens[0, : len(e.tokens)] = e.tokens
  logp = jax.nn.log_softmax(_forward(*nnx.split(base), tokens)[0].astype(jnp.float32), -1)
  ans = range(e.answer_start, len(e.tokens) - 1)  # the end-of-turn token is not scored
  return float(sum(logp[t - 1, e.tokens[t]] for t in ans))


def test_choice_scoring_picks_the_planted_answer(tiny):
  cfg, base, tok, rows = tiny
  graphdef, params = nnx.split(base)
  stats_fn = functools.partial(evaluate.merged_stats, params, graphdef=graphdef)
  label = [
    r
    for s, n in (("mcqa", 2), ("nli", 2), ("re", 1))
    for r in [r for r in rows if r.skill == s][:n]
  ]
  probe = _scorer(cfg, tok, label, rows)
  assert probe.fast and probe.slow  # letters / yes-no: one pass; relations: one row each
  probe(stats_fn)
  naive = {
    i: [_naive(base, tok, cfg, label[i], c) for c in probe.plan.choices[i]]
    for i in range(len(label))
  }
  slow = _scorer(cfg, tok, label, rows, fast=False)
  slow(stats_fn)
  # the method's decoder: each prompt once, its candidates after it in the same pass
  cached = _scorer(cfg, tok, label, rows, fast=False)
  cached(stats_fn, evaluate.Decoder(tok, cfg, base))
  assert len(cached.groups) == len(label)  # no truncation here: one prompt per row
  for i in range(len(label)):
    np.testing.assert_allclose(probe.last["choice"][i], naive[i], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(slow.last["choice"][i], naive[i], rtol=1e-4, atol=1e-4)
    # tight: a candidate one position off moves the tiny model's log-likelihood by ~3e-4
    np.testing.assert_allclose(cached.last["choice"][i], naive[i], rtol=0, atol=5e-5)
  # plant the model's favourite candidate as the gold answer: accuracy 1; the runner-up: 0
  best = [probe.plan.choices[i][int(np.argmax(naive[i]))] for i in range(len(label))]
  worst = [probe.plan.choices[i][int(np.argmin(naive[i]))] for i in range(len(label))]
  for gold, want in ((best, 1.0), (worst, 0.0)):
    planted = [dataclasses.replace(r, answer=a) for r, a in zip(label, gold, strict=True)]
    out = _scorer(cfg, tok, planted, rows + planted)(stats_fn)
    assert out["accuracy"] == want, gold
    assert out["macro_f1"] == want
  assert np.isfinite(out["loss"]) and "rouge1" not in out


def test_cached_candidates_keep_each_candidates_own_truncated_prompt(tiny):
  """A context longer than max_len is cut to make room for the answer, so candidates of
  different lengths see different prompts: each (row, prompt) is its own cached group and every
  candidate scores what the row with it as the answer scores."""
  cfg, base, tok, rows = tiny
  graphdef, params = nnx.split(base)
  stats_fn = functools.partial(evaluate.merged_stats, params, graphdef=graphdef)
  re_row = next(r for r in rows if r.skill == "re")
  long = [dataclasses.replace(re_row, context=" ".join([re_row.context] * 40))]
  # a label of many more tokens than the others joins the candidates
  odd = dataclasses.replace(re_row, answer="no relation stated between these two entities")
  scorer = _scorer(cfg, tok, long, rows + long + [odd], fast=False)
  scorer(stats_fn, evaluate.Decoder(tok, cfg, base))
  assert len(scorer.groups) > 1 and {g.row for g in scorer.groups} == {0}
  naive = [_naive(base, tok, cfg, long[0], c) for c in scorer.plan.choices[0]]
  np.testing.assert_allclose(scorer.last["choice"][0], naive, rtol=0, atol=5e-5)


def test_label_rows_answer_stats_from_the_candidate_pass_equal_the_answer_pass(tiny):
  """With merged kernels a multi-token label row's gold answer (EOS included) rides along with
  its candidates and the answer pass skips the row: the same loss, token accuracy and exact
  match as the answer pass over every row, beside generated rows that still take it, and for a
  truncated row whose gold has a prompt of its own."""
  cfg, base, tok, rows = tiny
  graphdef, params = nnx.split(base)
  stats_fn = functools.partial(evaluate.merged_stats, params, graphdef=graphdef)
  label = [r for s in ("mcqa", "nli", "re") for r in [r for r in rows if r.skill == s][:2]]
  re_row = next(r for r in rows if r.skill == "re")
  long = dataclasses.replace(re_row, context=" ".join([re_row.context] * 40))
  odd = dataclasses.replace(re_row, answer="no relation stated between these two entities")
  gen = [r for r in rows if r.skill == "ts"][:2]
  scored = label + [long] + gen
  task_rows = rows + [long, odd]
  answer_pass = _scorer(cfg, tok, scored, task_rows, fast=False)
  want = answer_pass(stats_fn)
  folded = _scorer(cfg, tok, scored, task_rows, fast=False)
  got = folded(stats_fn, evaluate.Decoder(tok, cfg, base))
  assert folded.folded == set(range(len(label) + 1))  # every label row, the truncated one too
  assert sum(int(np.sum(idx >= 0)) for idx, _ in folded.unfolded) == len(gen)
  for k in ("loss", "token_acc", "exact"):
    assert got[k] == pytest.approx(want[k], abs=1e-5), k
  assert got["accuracy"] == want["accuracy"]


def test_generated_rows_are_greedy_decodings(tiny):
  cfg, base, tok, rows = tiny
  graphdef, params = nnx.split(base)
  gen_rows = [r for s in ("ts", "mc", "ner") for r in [r for r in rows if r.skill == s][:2]][:5]
  scorer = _scorer(cfg, tok, gen_rows, rows)
  cfg.gen.batch_size = 2  # 5 prompts: 3 calls, the last padded
  out = scorer(
    functools.partial(evaluate.merged_stats, params, graphdef=graphdef),
    evaluate.Decoder(tok, cfg, base),
  )
  texts = scorer.last["texts"]
  assert sorted(texts) == list(range(5))
  for i, prompt in scorer.prompts.items():
    ids = generate.generate(base, [prompt], max_new_tokens=cfg.gen.max_new_tokens, eos_ids=(2,))[0]
    assert texts[i] == tok.decode(ids, skip_special_tokens=True).strip()
  rouge_rows = [i for i in range(5) if gen_rows[i].skill != "ner"]
  want = metrics.rouge([texts[i] for i in rouge_rows], [gen_rows[i].answer for i in rouge_rows])
  assert out["rouge1"] == pytest.approx(want["rouge1"]) and "example_f1" in out
