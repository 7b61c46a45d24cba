"""Converters for question answering, conversation, summarisation and entailment sources.

Each converter yields `(part, group, Example)`: `part` names the official piece of the source
("train", "test", ...; "all" where there is none) and `group` the unit the hash split keeps
together (a PMID, a document), so no question is split from its own context. `splits.py`
decides from (source, part, group) whether an item trains a skill or is reserved.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

from mdkif_jax.data.example import Example, LoadReport
from mdkif_jax.data.skills import format_list
from mdkif_jax.data.sources._io import read_json_object, read_json_rows, read_xml

Item = tuple[str, str, Example]

RQE_FILES = {
  "train": "rqe/RQE_Train_8588_AMIA2016.xml",
  "test": "rqe/RQE_Test_302_pairs_AMIA2016.xml",
}
MEDQUAD_FOLDERS = ("4_MPlus_Health_Topics_QA", "6_NINDS_QA", "7_SeniorHealth_QA", "9_CDC_QA")


def squash(text: str) -> str:
  """Collapse whitespace runs: several sources wrap text with newlines and tab indents."""
  return " ".join(str(text).split())


def format_options(question: str, options: dict) -> str:
  """The MCQA query: the question, then one `X. option` line per non-empty option."""
  lines = [squash(question)]
  lines += [f"{k}. {squash(v)}" for k, v in sorted(options.items()) if v is not None]
  return "\n".join(lines)


def pubmedqa(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """PubMedQA PQA-L: MRC (abstract + question -> yes/no/maybe) and QA (question -> long answer).

  The 500 PMIDs of `test_ground_truth.json` are the official test split (part "test"); if
  that file cannot be read nothing is converted, since a test item would otherwise train.
  """
  truth = read_json_object(root / "pubmedqa/test_ground_truth.json", report)
  loaded = read_json_object(root / "pubmedqa/ori_pqal.json", report)
  if truth is None or loaded is None:
    return
  test, (items, lines) = truth[0], loaded
  path = str(root / "pubmedqa/ori_pqal.json")
  for pmid, rec in items.items():
    part = "test" if pmid in test else "labelled"
    problem = _pubmedqa_problem(rec)
    if problem:
      report.skip(path, lines.get(pmid), f"{problem} (PMID {pmid})")
      continue
    decision = rec["final_decision"].strip()
    sections = zip(rec.get("LABELS") or [""] * len(rec["CONTEXTS"]), rec["CONTEXTS"], strict=False)
    context = "\n".join(f"{lab.title()}: {squash(c)}" if lab else squash(c) for lab, c in sections)
    question = squash(rec["QUESTION"])
    query = f"{question} Answer yes, no or maybe."
    yield part, pmid, Example("mrc", context, query, decision, "pubmedqa", f"{pmid}/mrc")
    long_answer = squash(rec.get("LONG_ANSWER") or "")
    yield part, pmid, Example("qa", "", question, long_answer, "pubmedqa", f"{pmid}/qa")


def _pubmedqa_problem(rec) -> str | None:
  """Why a PQA-L record cannot be converted (a reason for `LoadReport.skip`), or None."""
  if not isinstance(rec, dict):
    return f"wrong type: the record is {type(rec).__name__}, want dict"
  if str(rec.get("final_decision") or "").strip() not in ("yes", "no", "maybe"):
    return "missing field: no final_decision yes, no or maybe"
  for key, want in (("QUESTION", str), ("CONTEXTS", list), ("LABELS", list), ("LONG_ANSWER", str)):
    value, optional = rec.get(key), key in ("LABELS", "LONG_ANSWER")
    if value is None:
      if optional:
        continue
      return f"missing field: {key!r}"
    if not isinstance(value, want) or not (value or optional):
      return f"wrong type: {key!r} is {type(value).__name__}, want a non-empty {want.__name__}"
  if not all(isinstance(x, str) for x in rec["CONTEXTS"] + (rec.get("LABELS") or [])):
    return "wrong type: CONTEXTS and LABELS must hold strings"
  return None


def _medagents(root: pathlib.Path, report: LoadReport, rel: str, source: str, part: str):
  path = root / rel
  need = ("question", "options", "answer_idx")
  for _line, row in read_json_rows(path, report, need, types={"options": dict}):
    rid = str(row.get("realidx", _line))
    options = {k: v for k, v in row["options"].items() if v is not None}
    if not all(isinstance(v, str) for v in options.values()):
      report.skip(str(path), _line, "wrong type: an option is not a string")
      continue
    if row["answer_idx"] not in options:
      report.skip(str(path), _line, f"unknown answer_idx: {row['answer_idx']!r} is not an option")
      continue
    question = str(row["question"])
    context = ""
    if source == "medagents_pubmedqa":
      # medagents packs "abstract\nquestion" into one field; split it back so the abstract
      # is the context (and is what gets truncated when too long).
      context, _, question = question.rpartition("\n")
    query = format_options(question, options)
    yield part, rid, Example("mcqa", squash(context), query, str(row["answer_idx"]), source, rid)


def medmcqa(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """MedMCQA (medagents' copy of the official dev set): MCQA, answer = option letter."""
  yield from _medagents(root, report, "medagents/medmcqa/test.jsonl", "medmcqa", "dev")


def medagents_pubmedqa(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """PubMedQA as 3-option MCQA (medagents): train 450, test 500 (= the official test PMIDs)."""
  for part in ("train", "test"):
    rel = f"medagents/pubmedqa/{part}.jsonl"
    yield from _medagents(root, report, rel, "medagents_pubmedqa", part)


def mmlu_fewshot(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """The 5 MMLU-Pro-style few-shot exemplars (10 options): MCQA, reserved for evaluation."""
  yield from _medagents(root, report, "medagents/mmlu/train.jsonl", "mmlu_fewshot", "fewshot")


def meqsum(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """MeQSum: consumer health question -> one-line summary question (TS)."""
  for _line, row in read_json_rows(root / "meqsum/meqsum.jsonl", report, ("CHQ", "Summary")):
    fid = str(row.get("File") or _line)
    query = "Summarize this consumer health question as one short question."
    chq = "\n".join(squash(part) for part in str(row["CHQ"]).split("\n"))
    yield "all", fid, Example("ts", chq, query, squash(row["Summary"]), "meqsum", fid)


def rqe(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """RQE (question entailment, the MedNLI stand-in): NLI with yes/no answers."""
  query = "Does an answer to question B also fully or partially answer question A?"
  for part, rel in RQE_FILES.items():
    parsed = read_xml(root / rel, report)
    if parsed is None:
      continue
    root_el, lines = parsed
    for pair in root_el.iter("pair"):
      pid, value = pair.get("pid", ""), (pair.get("value") or "").strip().lower()
      chq, faq = squash(pair.findtext("chq") or ""), squash(pair.findtext("faq") or "")
      if value not in ("true", "false") or not chq or not faq:
        reason = f"missing field: pair pid={pid} has no chq, faq or value"
        report.skip(str(root / rel), lines.get(pair), reason)
        continue
      context = f"Question A: {chq}\nQuestion B: {faq}"
      answer = "yes" if value == "true" else "no"
      yield part, f"{part}/{pid}", Example("nli", context, query, answer, "rqe", f"{part}/{pid}")


def _lower_tags(el) -> None:
  """MedQuAD mixes <Document>/<QAPair> with <doc>/<pair>: compare tag names in lower case."""
  for node in el.iter():
    node.tag = node.tag.lower()


def medquad(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """MedQuAD: QA pairs (QA), focus synonyms (ES), focus category / semantic group (EA)."""
  from tqdm import tqdm

  files = [f for d in MEDQUAD_FOLDERS for f in sorted((root / "medquad" / d).glob("*.xml"))]
  for path in tqdm(files, desc="medquad", unit="file", leave=False, disable=len(files) < 200):
    parsed = read_xml(path, report)
    if parsed is None:
      continue
    doc, lines = parsed
    _lower_tags(doc)
    doc_id = f"{path.parent.name}/{path.stem}"
    focus = squash(doc.findtext(".//focus") or doc.findtext(".//doctitle-focus") or "")
    for n, pair in enumerate(p for p in doc.iter() if p.tag in ("qapair", "pair")):
      question, answer = (
        squash(pair.findtext("question") or ""),
        squash(pair.findtext("answer") or ""),
      )
      if not question or not answer:
        reason = f"empty answer: QA pair {n + 1} has no question or answer"
        report.skip(str(path), lines.get(pair), reason)
        continue
      yield "all", doc_id, Example("qa", "", question, answer, "medquad", f"{doc_id}/{n + 1}")
    if not focus:
      continue
    synonyms = [squash(s.text or "") for s in doc.iter("synonym") if (s.text or "").strip()]
    if synonyms:
      query = f"What are other names for '{focus}'?"
      answer = format_list(synonyms)
      yield "all", doc_id, Example("es", "", query, answer, "medquad", f"{doc_id}/es")
    category = squash(doc.findtext(".//category") or "")
    group = squash(doc.findtext(".//semanticgroup") or "")
    for attr, value in (("health-topic category", category), ("UMLS semantic group", group)):
      if value:
        query = f"What is the {attr} of '{focus}'?"
        eid = f"{doc_id}/ea/{attr.split()[0].lower()}"
        yield "all", doc_id, Example("ea", "", query, value, "medquad", eid)


def genmedgpt(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """GenMedGPT-5k (ChatGPT-generated, single turn): MC, patient message -> doctor reply.

  The fixed `instruction` field is dropped: the skill's own instruction replaces it.
  """
  path = root / "dialogue/genmedgpt_5k.jsonl"
  for line, row in read_json_rows(path, report, ("input", "output")):
    query, answer = squash(row["input"]), squash(row["output"])
    # No ids in the file; the patient text is the group, so repeated messages stay together.
    yield "all", query.lower(), Example("mc", "", query, answer, "genmedgpt", f"line{line}")


def covid_dialogue(root: pathlib.Path, report: LoadReport, opts) -> Iterator[Item]:
  """COVID-Dialogue (real consultations): MC, earlier turns as context, the last doctor turn
  as the answer. The source says "use only as test data", so splits.py reserves all of it."""
  path = root / "dialogue/covid_dialogue_en.jsonl"
  for line, row in read_json_rows(path, report, ("dialogue",), types={"dialogue": list}):
    if not all(isinstance(t, dict) for t in row["dialogue"]):
      report.skip(str(path), line, "wrong type: a dialogue turn is not an object")
      continue
    turns = [(t.get("speaker"), squash(t.get("utterance") or "")) for t in row["dialogue"]]
    last_doctor = max((i for i, (s, _) in enumerate(turns) if s == "Doctor"), default=-1)
    if last_doctor < 1 or not turns[last_doctor][1]:
      report.skip(str(path), line, "no doctor reply after a patient turn")
      continue
    history = [f"{s}: {u}" for s, u in turns[: last_doctor - 1]]
    query = turns[last_doctor - 1][1]
    rid = str(row.get("id", line))
    ex = Example("mc", "\n".join(history), query, turns[last_doctor][1], "covid_dialogue", rid)
    yield "all", rid, ex
