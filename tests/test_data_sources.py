"""Every converter on the real files in ../shared/data: counts and parsed fields vs the files.

Expected numbers come from ../shared/data/README.md or are recounted here from the raw files
with the stdlib (independently of the converters' `datasets`-based readers).
"""

import collections
import csv
import gzip
import json
import pathlib

import pytest
from ml_collections import ConfigDict

from configs.common import data_config
from mdkif_jax.data import SKILL_SPECS, SKILLS, LoadReport
from mdkif_jax.data.sources import SOURCES, select_sources


def convert(shared_data, name, **overrides):
  cfg = data_config()
  cfg.update(overrides)
  report = LoadReport()
  items = list(SOURCES[name].convert(shared_data, report, cfg))
  return items, report


def by_part(items):
  out = collections.defaultdict(list)
  for part, _group, ex in items:
    out[part].append(ex)
  return out


def test_every_example_parses_back_with_its_skill_format(shared_data):
  """A cheap sweep over the small sources: answers are non-empty and parse with the skill's
  parser (an MCQA answer parses to its letter, a list answer to a non-empty list or [])."""
  for name in ("medmcqa", "medagents_pubmedqa", "hoc", "pharmacotherapydb", "meqsum"):
    items, report = convert(shared_data, name)
    assert items and not report.skipped
    for _part, _group, ex in items:
      assert ex.answer.strip() and ex.skill in SKILLS and ex.source == name
      parsed = SKILL_SPECS[ex.skill].parse(ex.answer)
      if ex.skill == "mcqa":
        assert parsed == ex.answer


def test_pubmedqa(shared_data):
  items, report = convert(shared_data, "pubmedqa")
  truth = json.loads((shared_data / "pubmedqa/test_ground_truth.json").read_text())
  raw = json.loads((shared_data / "pubmedqa/ori_pqal.json").read_text())
  parts = by_part(items)
  assert len(items) == 2000 and not report.skipped
  assert len(parts["test"]) == 1000 and len(parts["labelled"]) == 1000
  mrc = [ex for ex in parts["test"] if ex.skill == "mrc"]
  assert {ex.id.split("/")[0]: ex.answer for ex in mrc} == truth
  decisions = collections.Counter(ex.answer for _, _, ex in items if ex.skill == "mrc")
  assert decisions == {"yes": 552, "no": 338, "maybe": 110}  # README
  pmid = "21645374"
  qa = next(ex for _, _, ex in items if ex.id == f"{pmid}/qa")
  assert qa.query == raw[pmid]["QUESTION"] and qa.answer.startswith("Results depicted")
  assert not qa.context
  ctx = next(ex for _, _, ex in items if ex.id == f"{pmid}/mrc").context
  assert ctx.startswith("Background: Programmed cell death (PCD)")


def test_medagents_mcqa_sources(shared_data):
  items, _ = convert(shared_data, "medmcqa")
  first = json.loads((shared_data / "medagents/medmcqa/test.jsonl").open().readline())
  assert len(items) == 2816 and {p for p, _, _ in items} == {"dev"}
  ex = items[0][2]
  assert ex.id == first["realidx"] and ex.answer == first["answer_idx"]
  assert ex.query.splitlines()[0] == " ".join(first["question"].split())
  assert ex.query.splitlines()[1] == f"A. {' '.join(first['options']['A'].split())}"

  items, _ = convert(shared_data, "medagents_pubmedqa")
  parts = by_part(items)
  assert len(parts["train"]) == 450 and len(parts["test"]) == 500
  truth = json.loads((shared_data / "pubmedqa/test_ground_truth.json").read_text())
  assert {ex.id for ex in parts["test"]} == set(truth)
  letter = {"yes": "A", "no": "B", "maybe": "C"}
  assert all(letter[truth[ex.id]] == ex.answer for ex in parts["test"])
  assert all(ex.context and ex.query.endswith("C. maybe") for ex in parts["test"])

  items, _ = convert(shared_data, "mmlu_fewshot")
  assert len(items) == 5 and all("J. " in ex.query for _, _, ex in items)
  assert items[0][2].answer == "J"  # "Cranial", option J of the first exemplar.


def _conll_counts(path):
  sentences = mentions = 0
  in_sentence = False
  for line in path.read_text().split("\n"):
    if line.strip():
      sentences += not in_sentence
      in_sentence = True
      mentions += line.split("\t")[1].startswith("B-")
    else:
      in_sentence = False
  return sentences, mentions


@pytest.mark.parametrize(
  "name,sizes",
  [
    ("bc5cdr_chem", {"train": (4560, 5203), "devel": (4581, 5347), "test": (4797, 5385)}),
    ("bc5cdr_disease", {"train": (4560, 4182), "devel": (4581, 4246), "test": (4797, 4424)}),
    ("ncbi_disease", {"train": (5424, 5134), "devel": (923, 787), "test": (940, 960)}),
  ],
)
def test_ner(shared_data, name, sizes):
  items, report = convert(shared_data, name)
  assert not report.skipped
  parts = by_part(items)
  for part, (n_sentences, n_mentions) in sizes.items():
    exs = parts[part]
    assert (len(exs), n_mentions) == (n_sentences, n_mentions)  # README table
    assert _conll_counts(shared_data / "ner" / name / f"{part}.tsv") == (n_sentences, n_mentions)
    found = sum(len(ex.answer.split("\n")) for ex in exs if ex.answer != "none")
    assert found == n_mentions
  first = parts["train"][0]
  tokens = [ln.split("\t")[0] for ln in (shared_data / "ner" / name / "train.tsv").open()]
  assert first.context.split(" ")[:3] == [t.strip() for t in tokens[:3]]


def test_ner_spans_are_in_the_sentence(shared_data):
  items, _ = convert(shared_data, "ncbi_disease")
  ex = next(ex for _, _, ex in items if ex.answer != "none")
  for mention in SKILL_SPECS["ner"].parse(ex.answer):
    assert mention in ex.context


def test_chemprot(shared_data):
  items, report = convert(shared_data, "chemprot")
  parts = by_part(items)
  assert {k: len(v) for k, v in parts.items()} == {"train": 4169, "dev": 2427, "test": 3469}
  assert not report.skipped
  raw = [json.loads(x) for x in (shared_data / "chemprot/test.jsonl").open()]
  assert collections.Counter(ex.answer for ex in parts["test"]) == collections.Counter(
    r["label"] for r in raw
  )
  assert parts["test"][0].context == raw[0]["text"].strip()
  assert all("<<" in ex.context and "[[" in ex.context for ex in parts["test"])


def test_hoc(shared_data):
  items, _ = convert(shared_data, "hoc")
  exs = [ex for _, _, ex in items]
  assert len(exs) == 1852
  per_label = collections.Counter(lab for ex in exs for lab in SKILL_SPECS["mldc"].parse(ex.answer))
  assert per_label["Sustaining proliferative signaling"] == 462  # README
  assert per_label["Cellular energetics"] == 105
  per_doc = collections.Counter(len(SKILL_SPECS["mldc"].parse(ex.answer)) for ex in exs)
  assert per_doc == {0: 272, 1: 920, 2: 478, 3: 145, 4: 30, 5: 7}  # README


def test_meqsum_rqe(shared_data):
  items, _ = convert(shared_data, "meqsum")
  first = json.loads((shared_data / "meqsum/meqsum.jsonl").open().readline())
  assert len(items) == 1000 and items[0][2].answer == first["Summary"].strip()
  assert items[0][2].context.startswith("SUBJECT: who and where to get cetirizine")

  items, report = convert(shared_data, "rqe")
  parts = by_part(items)
  # pid 5860 of the train file has an empty <faq>: it is the one skipped record.
  assert sum(report.skipped.values()) == 1 and "RQE_Train" in next(iter(report.skipped))
  assert len(parts["train"]) == 8587 and len(parts["test"]) == 302
  assert collections.Counter(ex.answer for ex in parts["test"]) == {"yes": 129, "no": 173}
  assert collections.Counter(ex.answer for ex in parts["train"]) == {"yes": 4654, "no": 3933}


def test_medquad(shared_data):
  items, report = convert(shared_data, "medquad")
  qa = [ex for _, _, ex in items if ex.skill == "qa"]
  assert len(qa) + sum(report.skipped.values()) == 3124  # README: all QA pairs
  per_folder = collections.Counter(ex.id.split("/")[0] for ex in qa)
  skipped = collections.Counter(pathlib.Path(p).parent.name for p in report.skipped.elements())
  for folder, n in {"4_MPlus_Health_Topics_QA": 981, "6_NINDS_QA": 1104}.items():
    assert per_folder[folder] + skipped[folder] == n  # README
  odd = [ex for ex in qa if ex.id.startswith("6_NINDS_QA/0000007/")]
  assert odd and odd[0].query == "what is holmes-adie syndrome ?"  # a <doc>/<pair> file
  es = next(ex for _, _, ex in items if ex.id == "4_MPlus_Health_Topics_QA/0000001/es")
  assert SKILL_SPECS["es"].parse(es.answer) == ["Glycohemoglobin", "HbA1C", "Hemoglobin A1C test"]
  ea = {
    ex.id: ex.answer
    for _, _, ex in items
    if ex.id.startswith("4_MPlus_Health_Topics_QA/0000002/ea")
  }
  assert sorted(ea.values()) == ["Disease", "Disorders"]


def test_dialogue(shared_data):
  items, _ = convert(shared_data, "genmedgpt")
  first = json.loads((shared_data / "dialogue/genmedgpt_5k.jsonl").open().readline())
  assert len(items) == 5452 and items[0][2].query == " ".join(first["input"].split())
  items, report = convert(shared_data, "covid_dialogue")
  assert len(items) == 604 and not report.skipped
  rows = [json.loads(x) for x in (shared_data / "dialogue/covid_dialogue_en.jsonl").open()]
  long = next(r for r in rows if len(r["dialogue"]) > 2)
  ex = next(ex for _, _, ex in items if ex.id == str(long["id"]))
  last = max(i for i, t in enumerate(long["dialogue"]) if t["speaker"] == "Doctor")
  assert ex.answer == " ".join(long["dialogue"][last]["utterance"].split())
  assert ex.context.startswith("Patient: ")


def test_disease_ontology(shared_data):
  items, report = convert(shared_data, "disease_ontology")
  assert not report.skipped
  ids = collections.Counter(ex.id.split("/", 1)[1] for _, _, ex in items if "/" in ex.id)
  assert ids["def"] == 2765  # README: live terms with a definition
  assert ids["symptom"] == 863  # README: diseases in disease-symptom.tsv
  with (shared_data / "kg/disease_ontology/DO-ICDO-anatomy.tsv").open() as f:
    rows = [r for r in csv.DictReader(f, delimiter="\t") if r["anatomy_label"]]
  assert len(rows) == 758  # README: rows with an anatomy; some diseases have several.
  assert ids["anatomy"] == len({r["id"] for r in rows})
  with (shared_data / "kg/disease_ontology/HumanDO.tsv").open() as f:
    parents = {r["id"] for r in csv.DictReader(f, delimiter="\t") if r["subClassOf"]}
  assert ids["is_a"] == len(parents)
  shrimp = next(ex for _, _, ex in items if ex.id == "DOID:0040001/has allergic trigger")
  assert shrimp.answer == "shrimp food product"
  assert all(group.startswith("DOID:") for _, group, _ in items)


def test_hpo(shared_data):
  items, _ = convert(shared_data, "hpo")
  with (shared_data / "kg/hpo/layperson-synonyms.tsv").open() as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:]
  assert len(rows) == 7186
  lay = collections.defaultdict(set)
  for term, label, layperson in rows:
    if layperson.strip('"').lower() != label.strip('"').lower():
      lay[term].add(layperson.strip('"'))
  assert len(items) == len(lay)
  ex = next(ex for _, _, ex in items if ex.id == "HP_0002648")
  assert "Abnormally shaped skull" in SKILL_SPECS["es"].parse(ex.answer)


def test_hetionet_and_pharmacotherapydb(shared_data):
  items, report = convert(shared_data, "hetionet")
  assert not report.skipped
  kinds = collections.Counter(ex.answer for _, _, ex in items if ex.skill == "ea")
  assert kinds == {
    "Disease": 137,
    "Symptom": 438,
    "Compound": 1552,
    "Anatomy": 402,
    "Side Effect": 5734,
    "Pharmacologic Class": 345,
  }
  with gzip.open(shared_data / "kg/hetionet/hetionet-v1.0-edges-5k.sif.gz", "rt") as f:
    edges = collections.Counter(line.split("\t")[1] for line in f)
  verbs = collections.Counter(ex.answer for _, _, ex in items if ex.skill == "er")
  assert verbs["presents"] == edges["DpS"] == 3357
  assert verbs["localizes"] == edges["DlA"] == 3602
  assert verbs["resembles"] == edges["DrD"] == 543
  items, _ = convert(shared_data, "hetionet", hetionet_metaedges=("CtD",), hetionet_node_kinds=())
  assert len(items) == 755 and {ex.answer for _, _, ex in items} == {"treats"}

  items, _ = convert(shared_data, "pharmacotherapydb")
  answers = collections.Counter(ex.answer for _, _, ex in items)
  assert answers == {"disease-modifying": 755, "symptomatic": 390, "not an indication": 243}
  assert items[0][2].query.startswith("Is 'Donepezil' an indication for 'Alzheimer's disease'?")


def test_every_registered_source_has_a_test_and_files(shared_data):
  names = select_sources("all")
  assert set(names) == set(SOURCES) - {"instruct"}
  for name in names:
    for rel in SOURCES[name].files:
      assert (shared_data / rel).exists(), rel
  with pytest.raises(KeyError, match="unknown data source 'nope'"):
    select_sources("pubmedqa,nope")
  assert ConfigDict(data_config()).sources == "all"
