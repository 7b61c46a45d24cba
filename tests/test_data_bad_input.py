"""Bad input: each case names file and line, is counted per file, and strict mode aborts."""

import json
import logging
import shutil
import xml.etree.ElementTree as ET

import pytest

from mdkif_jax.data import DataError, LoadReport, load_all, load_examples
from tests.test_data_fixtures import cfg

GOOD = {"skill": "qa", "query": "What is aspirin?", "answer": "A painkiller."}


def write_jsonl(path, lines: list[bytes]) -> str:
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def rec(**kw) -> bytes:
  return json.dumps({**GOOD, **kw}).encode()


CASES = {
  "malformed": (b'{"skill": "qa", "query": "broken', "malformed JSON"),
  "missing": (
    json.dumps({"skill": "qa", "query": "No answer?"}).encode(),
    "missing field: 'answer'",
  ),
  "empty": (rec(answer="  "), "empty field: 'answer'"),
  "bytes": (b'{"skill": "qa", "query": "caf\xe9?", "answer": "x"}', "non-UTF-8 bytes"),
  "skill": (rec(skill="surgery"), "unknown skill: 'surgery'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_jsonl_record_is_named_counted_and_strict_aborts(tmp_path, caplog, case):
  bad, message = CASES[case]
  # Line 1 good, line 2 blank, line 3 good, line 4 bad, line 5 good.
  path = write_jsonl(
    tmp_path / f"{case}.jsonl",
    [rec(id="a"), b"", rec(id="b", query="Q2?"), bad, rec(id="c", query="Q3?")],
  )
  c = cfg(data_dir=str(tmp_path), sources="", instruct_files=(path,))
  report = LoadReport()
  with caplog.at_level(logging.WARNING):
    splits = load_all(c, report)
  assert sorted(e.id for s in splits.values() for e in s) == ["a", "b", "c"]
  assert report.skipped == {path: 1}
  assert f"{path}:4: {message}" in caplog.text
  c.strict = True
  with pytest.raises(DataError, match=f"{path}:4: {message}"):
    load_all(c)


def test_unknown_skill_and_source_in_config(tmp_path):
  with pytest.raises(KeyError, match="unknown skill 'surgery'"):
    load_examples(cfg(skills="surgery"), "train")
  with pytest.raises(KeyError, match="unknown data source"):
    load_examples(cfg(data_dir=str(tmp_path), sources="pubmedqa,mystery"), "train")
  with pytest.raises(DataError, match="is not a folder"):
    load_examples(cfg(data_dir=str(tmp_path / "absent")), "train")


def test_missing_source_file_is_noted_or_fatal_in_strict_mode(tmp_path):
  report = LoadReport()
  assert load_all(cfg(data_dir=str(tmp_path), sources="hoc"), report) == {"train": [], "eval": []}
  assert "hoc/hoc.jsonl is missing" in report.notes[0]
  with pytest.raises(DataError, match="hoc.jsonl is missing"):
    load_all(cfg(data_dir=str(tmp_path), sources="hoc", strict=True))


def test_bad_tsv_row_names_its_line(tmp_path, shared_data, caplog):
  folder = tmp_path / "kg/pharmacotherapydb"
  folder.mkdir(parents=True)
  lines = (shared_data / "kg/pharmacotherapydb/indications.tsv").read_text().splitlines()[:6]
  lines[3] = lines[3] + "\textra"  # Line 4: one field too many.
  cells = lines[5].split("\t")
  lines[5] = "\t".join(cells[:4] + ["MAYBE"] + cells[5:])  # Line 6: unknown category.
  (folder / "indications.tsv").write_text("\n".join(lines) + "\n")
  report = LoadReport()
  with caplog.at_level(logging.WARNING):
    splits = load_all(cfg(data_dir=str(tmp_path), sources="pharmacotherapydb"), report)
  assert sum(len(s) for s in splits.values()) == 3
  path = str(folder / "indications.tsv")
  assert report.skipped == {path: 2}
  assert f"{path}:4: malformed row: 8 fields, header has 7" in caplog.text
  assert f"{path}:6: unknown category: 'MAYBE'" in caplog.text


def test_bad_conll_and_xml(tmp_path, shared_data):
  ner = tmp_path / "ner/ncbi_disease"
  ner.mkdir(parents=True)
  for part in ("train", "devel", "test"):
    shutil.copy(shared_data / f"ner/ncbi_disease/{part}.tsv", ner / f"{part}.tsv")
  clean = load_all(cfg(data_dir=str(tmp_path), sources="ncbi_disease"))["train"]
  n_devel = sum(e.id.startswith("devel/") for e in clean)
  raw = (ner / "devel.tsv").read_bytes().split(b"\n")
  raw[1] = b"token-without-a-tag"
  raw[2] = raw[2][:1] + b"\xff" + raw[2][1:]
  (ner / "devel.tsv").write_bytes(b"\n".join(raw))
  report = LoadReport()
  splits = load_all(cfg(data_dir=str(tmp_path), sources="ncbi_disease"), report)
  assert report.skipped == {str(ner / "devel.tsv"): 2}
  devel = [e for e in splits["train"] if e.id.startswith("devel/")]
  assert len(devel) == n_devel - 1  # The sentence holding the bad lines is dropped.
  with pytest.raises(DataError, match=r"devel.tsv:2: malformed CoNLL line"):
    load_all(cfg(data_dir=str(tmp_path), sources="ncbi_disease", strict=True))

  rqe = tmp_path / "rqe"
  rqe.mkdir()
  shutil.copy(shared_data / "rqe/RQE_Test_302_pairs_AMIA2016.xml", rqe)
  (rqe / "RQE_Train_8588_AMIA2016.xml").write_text(
    '<RQE-med-train>\n<pair pid="1">\n<chq>x</faq>\n'
  )
  report = LoadReport()
  splits = load_all(cfg(data_dir=str(tmp_path), sources="rqe"), report)
  pairs = ET.parse(rqe / "RQE_Test_302_pairs_AMIA2016.xml").getroot().iter("pair")
  distinct = {(p.findtext("chq").strip(), p.findtext("faq").strip(), p.get("value")) for p in pairs}
  assert len(splits["eval"]) == len(distinct) and not splits["train"]  # Exact repeats dropped.
  assert report.skipped == {str(rqe / "RQE_Train_8588_AMIA2016.xml"): 1}
  with pytest.raises(DataError, match=r"RQE_Train_8588_AMIA2016.xml:3: malformed XML"):
    load_all(cfg(data_dir=str(tmp_path), sources="rqe", strict=True))


def test_instruct_files_without_data_dir_load_instead_of_the_demo(tmp_path, monkeypatch):
  path = write_jsonl(tmp_path / "mine.jsonl", [rec(id="a"), rec(id="b", query="Q2?")])
  splits = load_all(cfg(instruct_files=(path,)))  # absolute, no data_dir
  assert sorted(e.id for s in splits.values() for e in s) == ["a", "b"]
  monkeypatch.chdir(tmp_path)  # relative: to the working directory
  splits = load_all(cfg(instruct_files=("mine.jsonl",)))
  assert {e.source for s in splits.values() for e in s} == {"instruct"}
  with pytest.raises(DataError, match="data.instruct_files: absent.jsonl is not a file"):
    load_all(cfg(instruct_files=("absent.jsonl",)))
