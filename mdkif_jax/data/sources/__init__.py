"""The converter registry: one `Source` per dataset folder under `data.data_dir`.

A converter is `fn(root, report, opts) -> Iterator[(part, group, Example)]`; `opts` is the
data config (for source-specific fields such as `hetionet_metaedges`). Adding a dataset is
writing one converter and one `Source` line here and one entry in `splits.SPLITS`.

Datasets given by a hub name or a local dataset folder in `data.hub_datasets` need no
converter: `sources/hub.py` maps their columns onto the example fields (source "hub").
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator

from mdkif_jax.data.example import DataError, Example, LoadReport, check_example
from mdkif_jax.data.sources import kg, qa, text
from mdkif_jax.data.sources._io import read_json_rows

Item = tuple[str, str, Example]
Converter = Callable[[pathlib.Path, LoadReport, object], Iterator[Item]]


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  convert: Converter
  skills: tuple[str, ...]  # The skills its examples train.
  # Paths under data_dir it reads: every file, so a half-copied folder is a noted missing file
  # rather than a FileNotFoundError mid-load (MedQuAD, a folder of XML files, is globbed).
  files: tuple[str, ...]


def instruct(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """The user's own JSONL files (`data.instruct_files`, relative to data_dir or absolute):
  one `{"skill", "query", "answer", "context"?, "id"?, "split"?}` object per line.

  `split` may be "train" or "eval" to place a record; without it the id-hash split applies.
  """
  for rel in opts.get("instruct_files", ()) or ():
    path = pathlib.Path(rel) if pathlib.Path(rel).is_absolute() else root / rel
    if not path.is_file():  # a typo in the config, not a bad record: never skipped
      raise DataError(f"data.instruct_files: {path} is not a file")
    for line, row in read_json_rows(path, report, ("skill", "query", "answer")):
      # Checked here, not left to `str()` or to `splits.role_of`: a list context would become
      # its repr, and an unknown split would abort the whole load instead of skipping a line.
      if not isinstance(row.get("context", ""), str | None):
        report.skip(str(path), line, f"wrong type: 'context' is {type(row['context']).__name__}")
        continue
      if row.get("split") not in (None, "", "train", "eval", "all"):
        report.skip(str(path), line, f"unknown split: {row['split']!r} (want 'train' or 'eval')")
        continue
      rid = str(row.get("id") or f"{path.name}:{line}")
      ex = Example(
        skill=str(row["skill"]).strip(),
        context=str(row.get("context") or ""),
        query=str(row["query"]),
        answer=str(row["answer"]),
        source="instruct",
        id=rid,
      )
      if check_example(ex, report, str(path), line):  # Unknown skill names, named by line.
        yield str(row.get("split") or "all"), rid, ex


_KG = "kg/"
_NER = tuple(f"{part}.tsv" for part in text.NER_PARTS)
_CHEMPROT = ("train.jsonl", "dev.jsonl", "test.jsonl")


def _in(folder: str, names: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(f"{folder}/{name}" for name in names)


SOURCES: dict[str, Source] = {
  s.name: s
  for s in (
    Source(
      "pubmedqa",
      qa.pubmedqa,
      ("mrc", "qa"),
      ("pubmedqa/ori_pqal.json", "pubmedqa/test_ground_truth.json"),
    ),
    Source(
      "medagents_pubmedqa",
      qa.medagents_pubmedqa,
      ("mcqa",),
      ("medagents/pubmedqa/train.jsonl", "medagents/pubmedqa/test.jsonl"),
    ),
    Source("medmcqa", qa.medmcqa, ("mcqa",), ("medagents/medmcqa/test.jsonl",)),
    Source("mmlu_fewshot", qa.mmlu_fewshot, ("mcqa",), ("medagents/mmlu/train.jsonl",)),
    Source("bc5cdr_chem", text.bc5cdr_chem, ("ner",), _in("ner/bc5cdr_chem", _NER)),
    Source("bc5cdr_disease", text.bc5cdr_disease, ("ner",), _in("ner/bc5cdr_disease", _NER)),
    Source("ncbi_disease", text.ncbi_disease, ("ner",), _in("ner/ncbi_disease", _NER)),
    Source("chemprot", text.chemprot, ("re",), _in("chemprot", _CHEMPROT)),
    Source("hoc", text.hoc, ("mldc",), ("hoc/hoc.jsonl",)),
    Source("meqsum", qa.meqsum, ("ts",), ("meqsum/meqsum.jsonl",)),
    Source("rqe", qa.rqe, ("nli",), tuple(qa.RQE_FILES.values())),
    Source("medquad", qa.medquad, ("qa", "es", "ea"), ("medquad",)),
    Source("genmedgpt", qa.genmedgpt, ("mc",), ("dialogue/genmedgpt_5k.jsonl",)),
    Source("covid_dialogue", qa.covid_dialogue, ("mc",), ("dialogue/covid_dialogue_en.jsonl",)),
    Source("disease_ontology", kg.disease_ontology, ("es", "ea", "er"), _in(kg.DO, kg.DO_FILES)),
    Source("hpo", kg.hpo, ("es",), (_KG + "hpo/layperson-synonyms.tsv",)),
    Source("hetionet", kg.hetionet, ("ea", "er"), _in(_KG + "hetionet", kg.HETIONET_FILES)),
    Source(
      "pharmacotherapydb",
      kg.pharmacotherapydb,
      ("er",),
      (_KG + "pharmacotherapydb/indications.tsv",),
    ),
    Source("instruct", instruct, (), ()),
  )
}


def select_sources(names) -> tuple[str, ...]:
  """Resolve a config's source selection ("all", a comma string or names), in registry order.

  "all" means every dataset source; the user-file source `instruct` is added only when named
  or when `instruct_files` is set (see `splits.load_examples`).
  """
  if isinstance(names, str):
    if names == "all":
      return tuple(n for n in SOURCES if n != "instruct")
    names = tuple(n.strip() for n in names.split(",") if n.strip())
  unknown = [n for n in names if n not in SOURCES]
  if unknown:
    raise KeyError(f"unknown data source {unknown[0]!r}; known sources: {', '.join(SOURCES)}")
  return tuple(n for n in SOURCES if n in set(names))
