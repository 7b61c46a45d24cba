"""Knowledge-graph converters: Disease Ontology, HPO, Hetionet and PharmacotherapyDB.

They produce the three knowledge skills: Entity Synonymy (term -> other names), Entity
Attribute (term -> definition, type or location) and Entity-Entity Relation (pair ->
relation, or term + relation -> related terms). Every item of one entity shares a group
(its ontology id), so the hash split never trains on half of a term's facts.
"""

from __future__ import annotations

import collections
import itertools
import pathlib
import re
from collections.abc import Iterator

from mdkif_jax.data.example import Example, LoadReport
from mdkif_jax.data.skills import format_list
from mdkif_jax.data.sources._io import read_text_lines, read_tsv_rows

Item = tuple[str, str, Example]

DO = "kg/disease_ontology"
DO_FILES = (
  "doid_2016-09-01.obo",
  "HumanDO.tsv",
  "disease-symptom.tsv",
  "DO-ICDO-anatomy.tsv",
  "DO-subClassOf-anonymous.tsv",
)
HETIONET_FILES = ("hetionet-v1.0-nodes.tsv", "metaedges.tsv", "hetionet-v1.0-edges-5k.sif.gz")
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*(\S*)')
_OBO_TAG = re.compile(r"^[A-Za-z_][\w-]*$")  # Text before the first ":" of a tag-value line.
_RESTRICTION = re.compile(r"^'([^']+)' some '?([^'()]+?)'?$")
PHARMACO_CATEGORIES = {"DM": "disease-modifying", "SYM": "symptomatic", "NOT": "not an indication"}


def obo_terms(path: pathlib.Path, report: LoadReport) -> Iterator[dict[str, list[str]]]:
  """The live [Term] stanzas of an OBO 1.2 file as {tag: [values]} (obsolete ones dropped).

  A term holding a bad line (undecodable, or not `tag: value`) is dropped, as a CoNLL
  sentence is: kept, it would answer with a synonym list missing that line.
  """
  stanza: dict[str, list[str]] | None = None
  bad = False
  for n, text in enumerate(itertools.chain(read_text_lines(path, report), ["[End]"]), start=1):
    if text is None:  # Undecodable bytes, already reported by the reader.
      bad = True
      continue
    text = text.strip()
    if text.startswith("["):
      live = stanza and stanza.get("id") and "true" not in stanza.get("is_obsolete", [])
      if live and not bad:
        yield stanza
      stanza, bad = ({"_line": [str(n)]} if text == "[Term]" else None), False
    elif stanza is not None and text and not text.startswith("!"):
      tag, _, value = text.partition(":")
      if not _OBO_TAG.match(tag.strip()):
        report.skip(str(path), n, f"malformed OBO line: {text[:40]!r} (want tag: value)")
        bad = True
        continue
      stanza.setdefault(tag.strip(), []).append(value.strip())


def _unquote(value: str) -> tuple[str, str] | None:
  """`"text" SCOPE [refs]` -> (text, SCOPE); escapes \\" undone; None if not quoted."""
  m = _QUOTED.match(value)
  return (m.group(1).replace('\\"', '"'), m.group(2)) if m else None


def disease_ontology(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """DO 2016 OBO (ES: exact synonyms; EA: definitions) and the current TSV reports (ER:
  is-a parents, symptoms, ontology restrictions; EA: anatomical location).

  The hierarchy comes from the current HumanDO.tsv rather than the 2016 `is_a` lines, so
  one parent question is asked once, with today's answer.
  """
  src = "disease_ontology"
  obo = root / DO / "doid_2016-09-01.obo"
  for term in obo_terms(obo, report):
    doid, name = term["id"][0], (term.get("name") or [""])[0]
    if not name:
      continue
    synonyms = [_unquote(v) for v in term.get("synonym", [])]
    quoted_def = _unquote(term["def"][0]) if "def" in term else ("", "")
    if quoted_def is None or None in synonyms:  # A cut-off quote, say: the term is unsure.
      reason = f"malformed OBO term: {doid} has a def or synonym that is not a quoted string"
      report.skip(str(obo), int(term["_line"][0]), reason)
      continue
    exact = [t for t, scope in synonyms if scope == "EXACT" and t]
    if exact:
      query = f"What are other names for the disease '{name}'?"
      yield "all", doid, Example("es", "", query, format_list(exact), src, f"{doid}/es")
    definition = quoted_def[0]
    if definition:
      ex = Example("ea", "", f"Define the disease '{name}'.", definition, src, f"{doid}/def")
      yield "all", doid, ex

  def grouped(rel: str, key: str, label: str, value: str) -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    for _line, row in read_tsv_rows(root / DO / rel, report, (key, label)):
      entry = out.setdefault(row[key], (row[label], []))
      if row.get(value) and row[value] not in entry[1]:
        entry[1].append(row[value])
    return out

  for doid, (label, parents) in grouped("HumanDO.tsv", "id", "label", "subClassOf").items():
    if parents:
      query = f"'{label}' is a subtype of which disease?"
      yield "all", doid, Example("er", "", query, format_list(parents), src, f"{doid}/is_a")
  symptoms = grouped("disease-symptom.tsv", "disease_id", "disease_label", "symptom_label")
  for doid, (label, values) in symptoms.items():
    query = f"What symptoms does '{label}' have?"
    yield "all", doid, Example("er", "", query, format_list(values), src, f"{doid}/symptom")
  anatomy = grouped("DO-ICDO-anatomy.tsv", "id", "label", "anatomy_label")
  for doid, (label, values) in anatomy.items():
    if values:
      query = f"Where in the body is '{label}' located?"
      yield "all", doid, Example("ea", "", query, "; ".join(values), src, f"{doid}/anatomy")
  yield from _restrictions(root / DO / "DO-subClassOf-anonymous.tsv", report)


def _restrictions(path: pathlib.Path, report: LoadReport) -> Iterator[Item]:
  """`'has symptom' some 'fever'|...` -> one ER item per (disease, relation); restrictions
  with nested OWL expressions (and/or/only) are not simple facts and are left out."""
  for _line, row in read_tsv_rows(path, report, ("ID", "LABEL")):
    by_rel: dict[str, list[str]] = collections.defaultdict(list)
    for part in str(row.get("SubClass Of [ANON]", "")).split("|"):
      m = _RESTRICTION.match(part.strip())
      if m and m.group(2).strip() not in by_rel[m.group(1)]:
        by_rel[m.group(1)].append(m.group(2).strip())
    for rel, values in by_rel.items():
      query = f"Complete the fact: '{row['LABEL']}' {rel} ..."
      eid = f"{row['ID']}/{rel}"
      ex = Example("er", "", query, format_list(values), "disease_ontology", eid)
      yield "all", row["ID"], ex


def hpo(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """HPO layperson synonyms: ES, clinical label -> lay wordings (identical ones dropped)."""
  path = root / "kg/hpo/layperson-synonyms.tsv"
  terms: dict[str, tuple[str, list[str]]] = {}
  for _line, row in read_tsv_rows(path, report, ("?term", "?term_label", "?layperson")):
    term = row["?term"].strip("<>").rsplit("/", 1)[-1]
    label, lay = row["?term_label"], row["?layperson"]
    entry = terms.setdefault(term, (label, []))
    if lay.strip().lower() != label.strip().lower() and lay not in entry[1]:
      entry[1].append(lay)
  for term, (label, lay) in terms.items():
    if lay:
      query = f"What are lay terms for the clinical phenotype '{label}'?"
      yield "all", term, Example("es", "", query, format_list(lay), "hpo", term)


def hetionet(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """Hetionet: EA (entity -> node kind) and ER (entity pair -> relation verb).

  Only the node kinds and metaedges named in the config are used; by default CtD/CpD are
  left out because PharmacotherapyDB, their source, is converted on its own.
  """
  folder = root / "kg/hetionet"
  kinds = set(opts.get("hetionet_node_kinds", ()))
  names: dict[str, str] = {}
  for _line, row in read_tsv_rows(folder / "hetionet-v1.0-nodes.tsv", report, ("id", "name")):
    names[row["id"]] = row["name"]
    if row.get("kind") in kinds:
      query = f"What kind of biomedical entity is '{row['name']}'?"
      ex = Example("ea", "", query, row["kind"], "hetionet", row["id"])
      yield "all", row["name"].lower(), ex
  verbs = {}
  metaedges = folder / "metaedges.tsv"
  for line, row in read_tsv_rows(metaedges, report, ("metaedge", "abbreviation")):
    # "Disease - presents - Symptom"; directed ones read "Gene > regulates > Gene".
    parts = re.split(r" [->] ", row["metaedge"])
    if len(parts) != 3:
      report.skip(str(metaedges), line, f"malformed metaedge: {row['metaedge'][:60]!r}")
      continue
    verbs[row["abbreviation"]] = parts[1]
  wanted = set(opts.get("hetionet_metaedges", ()))
  edges = folder / "hetionet-v1.0-edges-5k.sif.gz"
  for line, row in read_tsv_rows(edges, report, ("source", "metaedge", "target")):
    if row["metaedge"] not in wanted:
      continue
    head, tail = names.get(row["source"]), names.get(row["target"])
    if head is None or tail is None or row["metaedge"] not in verbs:
      report.skip(str(edges), line, "edge to an unknown node or metaedge")
      continue
    query = f"How is '{head}' related to '{tail}'?"
    pair = "|".join(sorted((head.lower(), tail.lower())))
    eid = f"{row['source']}|{row['metaedge']}|{row['target']}"
    yield "all", pair, Example("er", "", query, verbs[row["metaedge"]], "hetionet", eid)


def pharmacotherapydb(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """PharmacotherapyDB indications: ER, (drug, disease) -> disease-modifying / symptomatic /
  not an indication (the physicians' curated negatives)."""
  path = root / "kg/pharmacotherapydb/indications.tsv"
  need = ("doid_id", "drugbank_id", "disease", "drug", "category")
  for line, row in read_tsv_rows(path, report, need):
    category = PHARMACO_CATEGORIES.get(row["category"])
    if category is None:
      report.skip(str(path), line, f"unknown category: {row['category']!r}")
      continue
    query = (
      f"Is '{row['drug']}' an indication for '{row['disease']}'? "
      "Answer disease-modifying, symptomatic or not an indication."
    )
    eid = f"{row['drugbank_id']}|{row['doid_id']}"
    pair = "|".join(sorted((row["drug"].lower(), row["disease"].lower())))
    yield "all", pair, Example("er", "", query, category, "pharmacotherapydb", eid)
