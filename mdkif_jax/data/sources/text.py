"""Converters for annotated-text sources: NER (CoNLL), ChemProt (RE) and HoC (MLDC)."""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Iterator

from mdkif_jax.data.example import Example, LoadReport
from mdkif_jax.data.skills import format_list
from mdkif_jax.data.sources._io import read_json_rows, read_text_lines

Item = tuple[str, str, Example]

NER_PARTS = ("train", "devel", "test")
CHEMPROT_LABELS = (
  "INHIBITOR",
  "SUBSTRATE",
  "INDIRECT-DOWNREGULATOR",
  "INDIRECT-UPREGULATOR",
  "ACTIVATOR",
  "ANTAGONIST",
  "PRODUCT-OF",
  "AGONIST",
  "DOWNREGULATOR",
  "UPREGULATOR",
  "SUBSTRATE_PRODUCT-OF",
  "AGONIST-ACTIVATOR",
  "AGONIST-INHIBITOR",
)
HOC_LABELS = (
  "Activating invasion and metastasis",
  "Avoiding immune destruction",
  "Cellular energetics",
  "Enabling replicative immortality",
  "Evading growth suppressors",
  "Genomic instability and mutation",
  "Inducing angiogenesis",
  "Resisting cell death",
  "Sustaining proliferative signaling",
  "Tumor promoting inflammation",
)


def conll_sentences(
  path: pathlib.Path, report: LoadReport
) -> Iterator[tuple[int, list[str], list[str]]]:
  """(first line, tokens, IOB2 tags) per sentence; a sentence with a bad line is dropped."""
  tokens: list[str] = []
  tags: list[str] = []
  start, bad = 0, False
  lines = read_text_lines(path, report)
  for n, text in enumerate(itertools.chain(lines, [""]), start=1):
    if text is not None and not text.strip():
      if tokens and not bad:
        yield start, tokens, tags
      tokens, tags, bad = [], [], False
      continue
    if not tokens and not bad:
      start = n
    if text is None:  # Undecodable bytes, already reported by the reader.
      bad = True
      continue
    token, sep, tag = text.rstrip("\r").partition("\t")
    if not sep or not (tag == "O" or tag[:2] in ("B-", "I-")):
      report.skip(str(path), n, f"malformed CoNLL line: {text[:40]!r} (want token<TAB>IOB2 tag)")
      bad = True
      continue
    tokens.append(token)
    tags.append(tag)


def iob_spans(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
  """(type, text) per mention. An I- tag that does not continue a mention of its type starts
  one (IOB1 leniency), so a stray tag never drops a mention silently."""
  spans: list[tuple[str, list[str]]] = []
  prev = "O"
  for token, tag in zip(tokens, tags, strict=True):
    if tag != "O":
      kind = tag[2:]
      if tag.startswith("B-") or prev == "O" or prev[2:] != kind:
        spans.append((kind, [token]))
      else:
        spans[-1][1].append(token)
    prev = tag
  return [(k, " ".join(ws)) for k, ws in spans]


def _ner(root: pathlib.Path, report: LoadReport, folder: str, kind: str) -> Iterator[Item]:
  query = f"List the {kind.lower()} mentions in the text."
  for part in NER_PARTS:
    path = root / "ner" / folder / f"{part}.tsv"
    for n, (line, tokens, tags) in enumerate(conll_sentences(path, report)):
      mentions = [text for k, text in iob_spans(tokens, tags) if k == kind]
      eid = f"{part}/{n}"
      ex = Example("ner", " ".join(tokens), query, format_list(mentions), folder, eid)
      yield part, f"{part}/{line}", ex


def bc5cdr_chem(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """BC5CDR chemicals (CoNLL IOB2): NER, answer = the Chemical mentions in order."""
  yield from _ner(root, report, "bc5cdr_chem", "Chemical")


def bc5cdr_disease(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """BC5CDR diseases (CoNLL IOB2): NER, answer = the Disease mentions in order."""
  yield from _ner(root, report, "bc5cdr_disease", "Disease")


def ncbi_disease(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """NCBI-disease (CoNLL IOB2): NER, answer = the Disease mentions in order."""
  yield from _ner(root, report, "ncbi_disease", "Disease")


def chemprot(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """ChemProt (SciBERT's copy): RE between the << >> and [[ ]] marked entities; 13 labels."""
  query = (
    "What is the relation between the entity marked << >> and the entity marked [[ ]]? "
    f"Labels: {'; '.join(CHEMPROT_LABELS)}."
  )
  for part in ("train", "dev", "test"):
    path = root / "chemprot" / f"{part}.jsonl"
    for line, row in read_json_rows(path, report, ("text", "label")):
      label = str(row["label"]).strip()
      if label not in CHEMPROT_LABELS:
        report.skip(str(path), line, f"unknown ChemProt label: {label!r}")
        continue
      eid = f"{part}/{line}"
      yield part, eid, Example("re", str(row["text"]).strip(), query, label, "chemprot", eid)


def hoc(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """Hallmarks of Cancer: MLDC over the 10 top-level hallmarks, document level."""
  query = f"Which hallmarks of cancer does the abstract discuss? Labels: {'; '.join(HOC_LABELS)}."
  path = root / "hoc/hoc.jsonl"
  types = {"pmid": (str, int), "sentences": list}
  for line, row in read_json_rows(path, report, ("pmid", "sentences"), types):
    if not isinstance(row.get("labels") or [], list):
      report.skip(str(path), line, f"wrong type: 'labels' is {type(row['labels']).__name__}")
      continue
    labels = [str(x) for x in (row.get("labels") or [])]
    unknown = [x for x in labels if x not in HOC_LABELS]
    if unknown:
      report.skip(str(path), line, f"unknown HoC label: {unknown[0]!r}")
      continue
    pmid = str(row["pmid"])
    context = " ".join(str(s).strip() for s in row["sentences"])
    yield "all", pmid, Example("mldc", context, query, format_list(labels), "hoc", pmid)
