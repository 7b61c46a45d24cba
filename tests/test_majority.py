"""The `majority` method (evaluate_suite.majority): no model, each scored row answered with
the most frequent answer of the fit rows of its own (source, skill); rows too long to encode
stay unanswered, as the model methods leave them."""

import types

from mdkif_jax import evaluate_suite, metrics
from mdkif_jax.data.example import Example


def _ex(source, skill, answer, i):
  return Example(skill, "ctx", f"q {i}", answer, source, f"{source}-{i}")


def _task(fit, scored, encoded):
  plan = metrics.plan(scored, fit + scored)
  scorer = types.SimpleNamespace(plan=plan, encoded=frozenset(encoded))
  return types.SimpleNamespace(fit_rows=fit, score_rows=scored, scorer=scorer)


def test_each_source_and_skill_gets_its_own_most_frequent_fit_answer():
  fit = [_ex("pubmedqa", "mrc", a, i) for i, a in enumerate(["no", "yes", "no", "maybe"])]
  fit += [_ex("pubmedqa", "qa", a, 10 + i) for i, a in enumerate(["long b", "long a", "long a"])]
  fit += [_ex("pubmedqa", "mrc", "yes", 20)]  # yes 2, no 2: the tie goes to the first candidate
  scored = [_ex("pubmedqa", "mrc", "no", 30), _ex("pubmedqa", "qa", "long a", 31)]
  scored += [_ex("pubmedqa", "mrc", "yes", 32)]
  out = evaluate_suite.majority(_task(fit, scored, encoded={0, 1}))
  last = out.scorer.last
  cands = out.scorer.plan.choices[0]
  assert cands[int(last["choice"][0].argmax())] == "yes"  # ("yes", "no", "maybe"): yes first
  assert last["texts"] == {1: "long a"}  # the qa rows' own majority, not a label
  assert 2 not in last["choice"]  # too long to encode: unanswered
  assert out.scores["accuracy"] == 0.0  # row 0 (gold no) answered yes, row 2 unanswered


def test_a_skill_without_fit_rows_answers_its_first_candidate_and_no_text():
  scored = [_ex("pubmedqa", "mrc", "no", 1), _ex("pubmedqa", "qa", "text", 2)]
  out = evaluate_suite.majority(_task([], scored, encoded={0, 1}))
  assert out.scorer.last["texts"] == {}
  assert out.scorer.last["choice"][0].argmax() == 0
