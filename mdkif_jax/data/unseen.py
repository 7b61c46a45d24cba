"""The unseen-task datasets of `../shared/data/unseen/` as Examples: evaluation only.

No skill trained on these task types or sources, so they are reserved whole: nothing here is
in the split registry or ever reaches stage 1 (`load_unseen` is called by the evaluation stage
alone). Each converter reads its files unchanged, in memory (HealthFC is CC BY-NC-ND: no
modified copy of its file is ever written; DDI is CC BY-NC); a bad record is counted in the
LoadReport with file:line and skipped.

The `skill` of an unseen row only tags its answer format for the metric and the prompt (a
label task takes "nli" or "re", whose answers are one label); every router still mixes all
skills. Ids are `<file>:<line or key>`, stable across runs.
"""

from __future__ import annotations

import csv
import io
import pathlib
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable

from mdkif_jax.data.example import DataError, Example, LoadReport, check_example

HEALTHFC_LABELS = {"0": "supported", "1": "not enough information", "2": "refuted"}
NEGEX_LABELS = ("affirmed", "negated")
DDI_LABELS = ("mechanism", "effect", "advise", "int", "false")  # "false": no interaction
MTS_HEADERS = (
  "GENHX",
  "FAM/SOCHX",
  "PASTMEDICALHX",
  "CC",
  "PASTSURGICAL",
  "ALLERGY",
  "ROS",
  "MEDICATIONS",
  "ASSESSMENT",
  "EXAM",
  "DIAGNOSIS",
  "DISPOSITION",
  "PLAN",
  "EDCOURSE",
  "IMMUNIZATIONS",
  "IMAGING",
  "GYNHX",
  "PROCEDURES",
  "OTHER_HISTORY",
  "LABS",
)


def _csv_rows(path: pathlib.Path, report: LoadReport, **kw):
  """(line number, row dict) of a CSV read whole in memory (BOM-tolerant)."""
  text = path.read_bytes().decode("utf-8-sig", errors="strict")
  reader = csv.DictReader(io.StringIO(text, newline=""), **kw)
  for row in reader:
    if None in row or any(v is None for v in row.values()):
      report.skip(str(path), reader.line_num, "bad row: wrong number of fields")
      continue
    yield reader.line_num, row


def _keep(ex: Example, report: LoadReport, path: pathlib.Path, line, out: list) -> None:
  if check_example(ex, report, str(path), line):
    out.append(ex)
    report.kept[str(path)] += 1


def healthfc(root: pathlib.Path, report: LoadReport) -> list[Example]:
  """750 health claims with their evidence sentences -> supported / not enough information /
  refuted (macro-F1)."""
  path, out = root / "healthfc" / "Datensatz.csv", []
  for line, row in _csv_rows(path, report):
    label = HEALTHFC_LABELS.get(row["label"].strip())
    if label is None:
      report.skip(str(path), line, f"bad label: {row['label']!r}")
      continue
    query = (
      f"Claim: {row['en_claim'].strip()}\nIs this claim supported, refuted, or is there not "
      "enough information in the evidence?"
    )
    ex = Example("nli", row["en_top_sentences"].strip(), query, label, "healthfc", f"{line}")
    _keep(ex, report, path, line, out)
  return out


def negex(root: pathlib.Path, report: LoadReport) -> list[Example]:
  """2,376 sentence-concept pairs -> affirmed / negated (accuracy, F1 of "negated")."""
  path, out = root / "negex" / "negex.python" / "Annotations-1-120.txt", []
  for line, row in _csv_rows(path, report, delimiter="\t"):
    label = row["Negation"].strip().lower()
    if label not in NEGEX_LABELS:
      report.skip(str(path), line, f"bad label: {row['Negation']!r}")
      continue
    query = f"Is the concept '{row['Concept'].strip()}' affirmed or negated in this sentence?"
    ex = Example("nli", row["Sentence"].strip(), query, label, "negex", f"{line}")
    _keep(ex, report, path, line, out)
  return out


def mts_dialog(root: pathlib.Path, report: LoadReport) -> list[Example]:
  """The two official test sets' dialogues -> their clinical-note section header (20 classes,
  accuracy). The validation set is left for in-context examples of a user's own."""
  out = []
  for name in (
    "MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv",
    "MTS-Dialog-TestSet-2-MEDIQA-Sum-2023.csv",
  ):
    path = root / "mts_dialog" / name
    for line, row in _csv_rows(path, report):
      header = row["section_header"].strip().upper()
      if header not in MTS_HEADERS:
        report.skip(str(path), line, f"bad label: {row['section_header']!r}")
        continue
      query = (
        "Which section of the clinical note does this conversation belong to? Answer with "
        f"one of: {', '.join(MTS_HEADERS)}."
      )
      ex = Example("re", row["dialogue"].strip(), query, header, "mts_dialog", f"{name}:{line}")
      _keep(ex, report, path, line, out)
  return out


def _ddi_pairs(xml_bytes: bytes):
  """(pair id, sentence text with the pair's two drugs marked, label) of one DDI document."""
  for sentence in ET.fromstring(xml_bytes).iter("sentence"):
    text = sentence.get("text", "")
    names = {e.get("id"): e.get("text", "") for e in sentence.iter("entity")}
    for pair in sentence.iter("pair"):
      e1, e2 = names.get(pair.get("e1")), names.get(pair.get("e2"))
      if e1 is None or e2 is None:
        raise ValueError(f"pair {pair.get('id')} names an entity the sentence does not have")
      label = pair.get("type") if pair.get("ddi") == "true" else "false"
      yield pair.get("id"), text, e1, e2, label


def ddi(root: pathlib.Path, report: LoadReport) -> list[Example]:
  """The DDI Extraction test sets: every drug pair of a sentence -> mechanism / effect /
  advise / int / false (micro-F1 over the 4 interaction types, negatives included as rows)."""
  path, out = root / "ddi_corpus" / "DDICorpus-2013.zip", []
  with zipfile.ZipFile(path) as z:
    names = sorted(n for n in z.namelist() if "Test for DDI Extraction task" in n)
    for name in (n for n in names if n.endswith(".xml")):
      where = f"{path}!{name}"
      try:
        pairs = list(_ddi_pairs(z.read(name)))
      except (ET.ParseError, ValueError) as e:
        report.skip(where, None, f"bad document: {e}")
        continue
      for pid, text, e1, e2, label in pairs:
        if label not in DDI_LABELS:
          report.skip(where, None, f"bad label: {label!r} ({pid})")
          continue
        query = (
          f"What is the interaction between the drugs '{e1}' and '{e2}' in this sentence? "
          "Answer with one of: mechanism, effect, advise, int, false (no interaction)."
        )
        _keep(Example("re", text, query, label, "ddi", pid), report, pathlib.Path(where), None, out)
  return out


def _id_lines(path: pathlib.Path, report: LoadReport) -> dict[str, str]:
  out = {}
  for line, raw in enumerate(path.read_bytes().decode("utf-8-sig").splitlines(), 1):
    qid, sep, text = raw.partition("||")
    if not sep or not text.strip():
      if raw.strip():
        report.skip(str(path), line, "bad line: expected 'id||text'")
      continue
    out[qid.strip()] = text.strip()
  return out


def mediqa_mas(root: pathlib.Path, report: LoadReport) -> list[Example]:
  """MEDIQA 2021 multi-answer summarisation (test + validation): the question and its answers
  -> the abstractive summary (ROUGE)."""
  import json

  out = []
  files = (
    (
      "Test",
      "MAS_TestSet_shortQuestions",
      "TestSet_MultiAbstrativeSummaries",
      "MAS_TestSet_Answers",
    ),
    (
      "Validation",
      "VAlidationSet_ShortQuestions",
      "ValidationSet_MultiAbstrativeSummaries",
      "ValidationSet_Answers",
    ),
  )
  for split, q, sm, a in files:
    q_name, s_name = f"MEDIQA2021_Task2_{q}.txt", f"MEDIQA2021_Task2_{sm}.txt"
    a_name = f"MEDIQA2021_Task2_{a}.jsonl"
    base = root / "mediqa_mas" / split
    questions = _id_lines(base / q_name, report)
    summaries = _id_lines(base / s_name, report)
    answers: dict[str, list[str]] = {}
    a_path = base / a_name
    for line, raw in enumerate(a_path.read_text(encoding="utf-8").splitlines(), 1):
      try:
        rec = json.loads(raw)
        qid = str(rec.get("question_id", rec.get("QuestionID"))).strip()
        answers.setdefault(qid, []).append(str(rec["Answer"]).strip())
      except (json.JSONDecodeError, KeyError, AttributeError) as e:
        report.skip(str(a_path), line, f"bad record: {e}")
    for qid, question in questions.items():
      if qid not in summaries or qid not in answers:
        report.skip(str(base / q_name), None, f"question {qid}: no summary or no answers")
        continue
      context = "\n\n".join(f"Answer {k + 1}: {a}" for k, a in enumerate(answers[qid]))
      query = f"{question}\nSummarise the answers above in a few sentences."
      ex = Example("ts", context, query, summaries[qid], "mediqa_mas", f"{split}:{qid}")
      _keep(ex, report, base / q_name, None, out)
  return out


UNSEEN: dict[str, Callable[[pathlib.Path, LoadReport], list[Example]]] = {
  "healthfc": healthfc,
  "negex": negex,
  "mts_dialog": mts_dialog,
  "ddi": ddi,
  "mediqa_mas": mediqa_mas,
}


def load_unseen(name: str, data_dir: str | pathlib.Path, report: LoadReport) -> list[Example]:
  """The rows of one unseen-task dataset under `<data_dir>/unseen/`."""
  root = pathlib.Path(data_dir) / "unseen"
  if name not in UNSEEN:
    raise KeyError(f"unknown unseen-task dataset {name!r}; known: {', '.join(UNSEEN)}")
  try:
    return UNSEEN[name](root, report)
  except (OSError, UnicodeDecodeError, zipfile.BadZipFile, csv.Error, KeyError) as e:
    raise DataError(f"unseen-task dataset {name!r} under {root}: {type(e).__name__}: {e}") from e
