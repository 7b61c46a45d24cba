"""The split registry: stage-1 training data and reserved evaluation data never meet."""

import collections
import hashlib
import json
import unicodedata

import pytest

from mdkif_jax.data import SKILLS, LoadReport, load_all, load_examples
from mdkif_jax.data.sources import SOURCES
from mdkif_jax.data.splits import SPLITS, hash_unit, role_of
from tests.test_data_fixtures import cfg


def fingerprint(text: str) -> str:
  """The test's own normalisation (NFKC, case-folded, whitespace-collapsed), then sha256."""
  norm = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
  return hashlib.sha256(norm.encode()).hexdigest()


@pytest.fixture(scope="module")
def everything(shared_data):
  report = LoadReport()
  return load_all(cfg(data_dir=str(shared_data)), report), report


def test_train_and_reserved_sets_are_disjoint(everything):
  splits, report = everything
  train, reserved = splits["train"], splits["eval"]
  assert len(train) > 100_000 and len(reserved) > 20_000
  inputs = {s: {fingerprint(e.context + "\n" + e.query) for e in splits[s]} for s in splits}
  assert not inputs["train"] & inputs["eval"]
  whole = {
    s: {fingerprint("\n".join((e.skill, e.context, e.query, e.answer))) for e in splits[s]}
    for s in splits
  }
  assert not whole["train"] & whole["eval"]

  # A question is never trained under one skill's wording and scored under another's: the
  # question of QA-like items (first line, up to its last "?") is disjoint too.
  def question(e):
    line = e.query.splitlines()[0]
    return fingerprint(line[: line.rindex("?") + 1] if "?" in line else line)

  asked = {
    s: {question(e) for e in splits[s] if e.skill in ("qa", "mcqa", "mc", "mrc")} for s in splits
  }
  assert not asked["train"] & asked["eval"]
  # Decontamination really had work to do on these corpora (recurring short sentences).
  assert report.reasons["decontaminated"] > 0


def test_official_test_splits_are_reserved_whole(everything, shared_data):
  splits, _ = everything
  truth = json.loads((shared_data / "pubmedqa/test_ground_truth.json").read_text())
  by = {s: collections.Counter(e.source for e in splits[s]) for s in splits}
  assert by["train"]["covid_dialogue"] == 0 and by["eval"]["covid_dialogue"] > 590
  assert by["train"]["mmlu_fewshot"] == 0 and by["eval"]["mmlu_fewshot"] == 5
  eval_pmids = {e.id.split("/")[0] for e in splits["eval"] if e.source == "pubmedqa"}
  train_pmids = {e.id.split("/")[0] for e in splits["train"] if "pubmedqa" in e.source}
  assert eval_pmids == set(truth) and not train_pmids & set(truth)
  assert {e.id.split("/")[0] for e in splits["eval"] if e.source == "chemprot"} == {"test"}
  ner_eval_parts = {e.id.split("/")[0] for e in splits["eval"] if e.skill == "ner"}
  assert ner_eval_parts == {"test"}
  assert {e.skill for e in splits["train"]} == set(SKILLS)  # Stage 1 has every skill.


def test_hash_split_is_stable_and_near_its_fraction(everything):
  splits, _ = everything
  for source, fraction in (("hoc", 0.2), ("meqsum", 0.2), ("medmcqa", 0.2), ("hpo", 0.05)):
    n_eval = sum(e.source == source for e in splits["eval"])
    n_all = n_eval + sum(e.source == source for e in splits["train"])
    assert abs(n_eval / n_all - fraction) < 0.04, (source, n_eval, n_all)
  assert hash_unit("hoc", "11724768") == hash_unit("hoc", "11724768")
  assert role_of("hoc", "all", "11724768") == role_of("hoc", "all", "11724768")
  assert hash_unit("hoc", "1") != hash_unit("meqsum", "1")


def test_every_source_part_has_a_rule():
  assert {s for s, _ in SPLITS} >= set(SOURCES) | {"demo"}
  with pytest.raises(ValueError, match="no split rule"):
    role_of("hoc", "nonexistent", "x")
  with pytest.raises(ValueError, match="unknown split"):
    load_examples(cfg(), "validation")


def test_demo_corpus_covers_all_skills_and_is_not_copied(everything):
  demo = load_all(cfg())
  for split, per_skill in (("train", 26), ("eval", 6)):
    assert collections.Counter(e.skill for e in demo[split]) == {s: per_skill for s in SKILLS}
  splits, _ = everything
  # Our own query wordings recur (both use "What are other names for ...?"), so compare
  # the item text: contexts and long answers.
  real = {fingerprint(t) for s in splits.values() for e in s for t in (e.context, e.answer)}
  demo_texts = [t for e in demo["train"] + demo["eval"] for t in (e.context, e.answer)]
  assert not {fingerprint(t) for t in demo_texts if len(t) > 30} & real


def test_selection_and_cap(shared_data):
  c = cfg(data_dir=str(shared_data), sources="hoc,meqsum", skills="ts", max_per_source=50)
  exs = load_examples(c, "train")
  assert len(exs) == 50 and {(e.source, e.skill) for e in exs} == {("meqsum", "ts")}
  assert [e.id for e in load_examples(c, "train")] == [e.id for e in exs]
  with pytest.raises(KeyError, match="unknown skill 'surgery'"):
    load_examples(cfg(skills="qa,surgery"), "train")
