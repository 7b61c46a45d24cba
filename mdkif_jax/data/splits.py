"""The split registry: which part of which source trains a skill in stage 1, and which is
reserved for downstream evaluation, plus `load_examples`, the one entry point to the data.

Rules, in order of strength:
1. An official split is kept: its training parts train, its test part is reserved.
2. A source its authors mark as test-only (COVID-Dialogue), and few-shot exemplar sets, are
   reserved whole ("unseen data": no skill ever trains on them).
3. A source without a split is split by hash of the group id (a PMID, a document, an ontology
   id): the group is reserved when sha1(source/group) falls below the eval fraction. The
   split does not depend on the seed, the order of the files, or which other sources load.
4. Decontamination: a training example whose normalised context+query equals a reserved
   one's is dropped (short CoNLL sentences such as "Methods ." recur across NER splits), and
   exact duplicates within a split are dropped. Both are counted in the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib

from mdkif_jax.data import demo
from mdkif_jax.data.example import (
  DataError,
  Example,
  LoadReport,
  check_example,
  content_key,
  example_key,
)
from mdkif_jax.data.skills import select_skills
from mdkif_jax.data.sources import SOURCES, hub, select_sources

log = logging.getLogger(__name__)

TRAIN, EVAL, HASH = "train", "eval", "hash"


@dataclasses.dataclass(frozen=True)
class Rule:
  role: str  # TRAIN, EVAL, or HASH (split by group-id hash).
  eval_fraction: float = 0.0  # For HASH: the share of groups reserved.
  track: str = "seen"  # For reserved data: "seen" (a trained source's held-out part) or
  # "unseen" (a dataset no skill trains on: the paper's unseen-data track).


SPLITS: dict[tuple[str, str], Rule] = {
  ("pubmedqa", "labelled"): Rule(TRAIN),
  ("pubmedqa", "test"): Rule(EVAL),  # The official 500 test PMIDs.
  ("medagents_pubmedqa", "train"): Rule(TRAIN),
  ("medagents_pubmedqa", "test"): Rule(EVAL),  # Same 500 PMIDs as pubmedqa/test.
  ("medmcqa", "dev"): Rule(HASH, 0.2),  # MedMCQA train is not available: split its dev set.
  ("mmlu_fewshot", "fewshot"): Rule(EVAL, track="unseen"),  # Few-shot exemplars for MMLU.
  ("bc5cdr_chem", "train"): Rule(TRAIN),
  ("bc5cdr_chem", "devel"): Rule(TRAIN),
  ("bc5cdr_chem", "test"): Rule(EVAL),
  ("bc5cdr_disease", "train"): Rule(TRAIN),
  ("bc5cdr_disease", "devel"): Rule(TRAIN),
  ("bc5cdr_disease", "test"): Rule(EVAL),
  ("ncbi_disease", "train"): Rule(TRAIN),
  ("ncbi_disease", "devel"): Rule(TRAIN),
  ("ncbi_disease", "test"): Rule(EVAL),
  ("chemprot", "train"): Rule(TRAIN),
  ("chemprot", "dev"): Rule(TRAIN),
  ("chemprot", "test"): Rule(EVAL),
  ("hoc", "all"): Rule(HASH, 0.2),
  ("meqsum", "all"): Rule(HASH, 0.2),
  ("rqe", "train"): Rule(TRAIN),
  ("rqe", "test"): Rule(EVAL),
  ("medquad", "all"): Rule(HASH, 0.1),
  ("genmedgpt", "all"): Rule(HASH, 0.1),
  ("covid_dialogue", "all"): Rule(EVAL, track="unseen"),  # The source says: test data only.
  ("disease_ontology", "all"): Rule(HASH, 0.05),
  ("hpo", "all"): Rule(HASH, 0.05),
  ("hetionet", "all"): Rule(HASH, 0.05),
  ("pharmacotherapydb", "all"): Rule(HASH, 0.1),
  ("instruct", "train"): Rule(TRAIN),
  ("instruct", "eval"): Rule(EVAL),
  ("instruct", "all"): Rule(HASH, 0.1),
  ("hub", "train"): Rule(TRAIN),  # data.hub_datasets: the split "train",
  ("hub", "eval"): Rule(EVAL),  # the split "test",
  ("hub", "all"): Rule(HASH, 0.1),  # any other split (see sources/hub.py).
  ("demo", "train"): Rule(TRAIN),
  ("demo", "eval"): Rule(EVAL),
}


def hash_unit(source: str, group: str) -> float:
  """A uniform number in [0, 1) fixed by (source, group): the id-hash split's coin."""
  digest = hashlib.sha1(f"{source}/{group}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def role_of(source: str, part: str, group: str) -> str:
  """TRAIN or EVAL for one item; unknown parts are an error (a registry gap, not bad data)."""
  rule = SPLITS.get((source, part))
  if rule is None:
    raise DataError(f"no split rule for source {source!r} part {part!r}; add it to SPLITS")
  if rule.role == HASH:
    return EVAL if hash_unit(source, group) < rule.eval_fraction else TRAIN
  return rule.role


def _split_name(split: str) -> str:
  if split in ("train", "stage1"):
    return TRAIN
  if split in ("eval", "reserved", "test"):
    return EVAL
  raise ValueError(f"unknown split {split!r}; use 'train' (stage 1) or 'eval' (reserved)")


def _items(cfg, report: LoadReport):
  """(source name, item) for every converted item the config selects.

  The demo corpus loads only when none of `data_dir`, `hub_datasets` and `instruct_files` is
  set; without `data_dir`, `instruct_files` are relative to the working directory.
  """
  hub_specs = hub.parse_specs(cfg.get("hub_datasets", ()))  # Config errors before any loading.
  root = None
  if cfg.get("data_dir") is None:
    if cfg.get("instruct_files"):
      for item in SOURCES["instruct"].convert(pathlib.Path("."), report, cfg):
        yield "instruct", item
    elif not hub_specs:
      for item in demo.items():
        yield "demo", item
  else:
    root = pathlib.Path(cfg.data_dir).expanduser()
    if not root.is_dir():
      raise DataError(f"data.data_dir={str(root)!r} is not a folder (None uses the demo corpus)")
    yield from _file_items(cfg, root, report)
  for spec in hub_specs:
    for item in hub.convert(spec, root, report):
      yield hub.SOURCE, item


def _file_items(cfg, root: pathlib.Path, report: LoadReport):
  names = list(select_sources(cfg.get("sources", "all")))
  if cfg.get("instruct_files") and "instruct" not in names:
    names.append("instruct")
  for name in names:
    source = SOURCES[name]
    missing = [f for f in source.files if not (root / f).exists()]
    if missing:
      msg = f"source {name!r}: {root / missing[0]} is missing"
      if cfg.get("strict", False):
        raise DataError(msg)
      report.note(msg + "; source skipped")
      continue
    for item in source.convert(root, report, cfg):
      yield name, item


def load_all(cfg, report: LoadReport | None = None) -> dict[str, list[Example]]:
  """Both splits, {"train": [...], "eval": [...]}, filtered, deduplicated, decontaminated."""
  report = report if report is not None else LoadReport(strict=bool(cfg.get("strict", False)))
  skills = set(select_skills(cfg.get("skills", "all")))
  out: dict[str, list[Example]] = {TRAIN: [], EVAL: []}
  seen: dict[str, set[str]] = {TRAIN: set(), EVAL: set()}
  for name, (part, group, ex) in _items(cfg, report):
    root = cfg.get("data_dir")
    where = f"{root}/{name}" if root else ("demo corpus" if name == "demo" else name)
    if not check_example(ex, report, where, None) or ex.skill not in skills:
      continue
    role = role_of(name, part, group)
    key = example_key(ex)
    if key in seen[role]:
      report.reasons["duplicate"] += 1
      continue
    seen[role].add(key)
    out[role].append(ex)
  reserved = {content_key(ex) for ex in out[EVAL]}
  before = len(out[TRAIN])
  out[TRAIN] = [ex for ex in out[TRAIN] if content_key(ex) not in reserved]
  if before != len(out[TRAIN]):
    report.reasons["decontaminated"] += before - len(out[TRAIN])
    report.note(f"dropped {before - len(out[TRAIN])} training examples that match reserved ones")
  cap = int(cfg.get("max_per_source", 0) or 0)
  if cap:
    out = {role: _cap(exs, cap) for role, exs in out.items()}
  for role, exs in out.items():
    for ex in exs:
      report.kept[(role, ex.source, ex.skill)] += 1
  return out


def _cap(examples: list[Example], cap: int) -> list[Example]:
  """At most `cap` examples per (source, skill), chosen by id hash (not file order)."""
  groups: dict[tuple[str, str], list[Example]] = {}
  for ex in examples:
    groups.setdefault((ex.source, ex.skill), []).append(ex)
  keep = set()
  for exs in groups.values():
    ranked = sorted(exs, key=lambda e: hash_unit(e.source, e.id))[:cap]
    keep.update(id(e) for e in ranked)
  return [ex for ex in examples if id(ex) in keep]


def load_examples(cfg, split: str, report: LoadReport | None = None) -> list[Example]:
  """Examples of one split: "train" (stage 1) or "eval" (reserved), in source order."""
  return load_all(cfg, report)[_split_name(split)]
