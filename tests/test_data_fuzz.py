"""Fuzz of the JSONL reader and every file converter, deterministic (seeded numpy).

Each source's files are written twice from a few synthetic good records in its own format: a
clean copy, and a fuzzed copy in which bad records are inserted or good ones damaged (random
bytes, printable garbage, truncation, wrong types and column counts, 1 MB fields, non-UTF-8
bytes, unpaired surrogate escapes) among noise that must change nothing (a byte-order mark,
CRLF line ends, blank lines, 1 MB good fields). Pinned for every source: converting the fuzzed
copy raises nothing; each bad record is reported exactly once, at its file:line, in one short
line; the good records come out exactly as from the clean copy; and strict mode raises
DataError with the first of those messages. Bad inputs tried are counted by class and the
totals printed when the module ends.
"""

import codecs
import collections
import dataclasses
import gzip
import json
import logging
import re
import zlib
from xml.sax.saxutils import escape

import numpy as np
import pytest

from mdkif_jax.data import SKILLS, DataError, LoadReport, load_all
from mdkif_jax.data.sources import SOURCES
from mdkif_jax.data.sources.text import CHEMPROT_LABELS, HOC_LABELS
from tests.test_data_fixtures import cfg

MB = 1 << 20
TRIED: collections.Counter = collections.Counter()  # Bad inputs written, by class.
WORDS = ["aspirin", "fever", "cough", "insulin", "renal", "tumour", "dose", "café", "β-blocker"]
GARBAGE = np.frombuffer(b"abcxyz019 {}[]<>&;:,\"'\\#%*=\r", dtype=np.uint8)
BAD_UTF8 = (b"\xff", b"\xe9", b"\xc3(", b"\xed\xa0\x80", b"\x80")  # Latin-1, cut, CESU-8, ...


@pytest.fixture(scope="module", autouse=True)
def _fuzz_env(request, tmp_path_factory):
  """datasets' Arrow cache in a temporary folder (not 1 MB fuzz files in ~/.cache), and the
  totals of bad inputs tried, by class, printed when the module ends."""
  import datasets

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
    yield
  classes = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
  msg = f"data fuzz: {sum(TRIED.values())} bad inputs tried ({classes})"
  reporter = request.config.pluginmanager.get_plugin("terminalreporter")
  capture = request.config.pluginmanager.get_plugin("capturemanager")
  if reporter is None or capture is None:
    print(msg)
    return
  with capture.global_and_fixture_disabled():  # Shown with -q, not as captured output.
    reporter.write_line("")
    reporter.write_line(msg)


@dataclasses.dataclass
class Recorder(LoadReport):
  """A LoadReport that also keeps every (path, line, reason) it is given."""

  max_messages: int = 10**9
  seen: list = dataclasses.field(default_factory=list)

  def skip(self, path, line, reason):
    self.seen.append((str(path), line, reason))
    super().skip(path, line, reason)


# --- Bad input generators ------------------------------------------------------------------


def words(rng, n=5) -> str:
  """A phrase that is unique (it ends in a random serial number)."""
  return " ".join(rng.choice(WORDS, n)) + f" {rng.integers(10**9)}"


def huge_text(rng) -> str:
  return words(rng) + " " + "y" * MB


def huge_junk() -> bytes:
  """A 1 MB line that is no record of any format."""
  return b"<" + b"x" * MB


def random_bytes(rng) -> bytes:
  """8-120 random bytes, without newline (two lines) or tab (a TSV field); never blank."""
  raw = bytes(rng.integers(0, 256, int(rng.integers(8, 120)), dtype=np.uint8))
  raw = raw.replace(b"\n", b"").replace(b"\t", b"")
  return raw if raw.strip() else b"\xff" + raw


def garbage(rng) -> bytes:
  """Printable junk (valid UTF-8) with quotes, brackets, colons and a bare CR; it opens with
  punctuation, so it is no OBO `tag: value` line either."""
  return bytes(rng.choice(np.frombuffer(b"{<#%*", np.uint8), 1)) + bytes(
    rng.choice(GARBAGE, int(rng.integers(10, 60)))
  )


def non_utf8(line: bytes, rng) -> bytes:
  i = int(rng.integers(len(line)))
  return line[:i] + BAD_UTF8[int(rng.integers(len(BAD_UTF8)))] + line[i:]


def cut(line: bytes, rng, lo: int, hi: int) -> bytes:
  """`line` truncated to a random length in [lo, hi)."""
  return line[: int(rng.integers(lo, hi))]


def surrogate(line: bytes, key: str) -> bytes:
  """A JSON line whose string `key` starts with the unpaired escape \\ud800."""
  return line.replace(f'"{key}": "'.encode(), f'"{key}": "\\ud800'.encode(), 1)


# --- Files of records: clean and fuzzed copies ----------------------------------------------


@dataclasses.dataclass
class Unit:
  lines: list[bytes]
  cls: str | None = None  # The bad-input class; None for a good record.
  at: int = 0  # Which of `lines` the report names.


@dataclasses.dataclass
class File:
  units: list[Unit]
  header: tuple[bytes, ...] = ()
  block: bool = False  # Records are blocks of lines, each ended by a blank line (CoNLL, OBO).


def line_file(rng, good, inserts=(), damage=(), huge_good=None, header=(), eligible=None):
  """One record per line: the `good` lines, with `inserts` (class, line) put among them, and
  each `damage` (class, fn) applied to a different good line (in `eligible`), now bad."""
  units = [Unit([line]) for line in good]
  pool = list(range(len(units)) if eligible is None else eligible)
  for (cls, fn), i in zip(damage, rng.choice(pool, len(damage), replace=False), strict=True):
    units[i] = Unit([fn(units[i].lines[0], rng)], cls)
  for cls, line in [*inserts, *([(None, huge_good)] if huge_good else [])]:
    units.insert(int(rng.integers(len(units) + 1)), Unit([line], cls))
  return File(units, tuple(header))


def write(path, f: File, fuzz: bool, rng) -> set[tuple[str, int]]:
  """The clean copy (good units only, plain LF) or the fuzzed one (every unit, a byte-order
  mark, CRLF, blank and blank-looking lines between records); returns where each bad unit's
  report must point, as (path, line)."""
  lines, want = list(f.header), set()
  for u in f.units:
    if u.cls is not None and not fuzz:
      continue
    if u.cls is not None:
      want.add((str(path), len(lines) + u.at + 1))
    lines += u.lines + ([b""] if f.block else [])
    if fuzz and rng.random() < 0.3:
      lines.append(b"" if f.block else b"  ")
  eol = b"\r\n" if fuzz else b"\n"
  data = (codecs.BOM_UTF8 if fuzz else b"") + eol.join(lines) + eol
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
  return want


def convert(name, root, opts=None, strict=False):
  report = Recorder(strict=strict)
  items = SOURCES[name].convert(root, report, cfg(**(opts or {})))
  return [(p, ex.skill, ex.context, ex.query, ex.answer, ex.source) for p, _, ex in items], report


def assert_same(got, expected):
  """Equal lists, with a short message: a 1 MB field must not end up in a diff."""
  assert len(got) == len(expected), (len(got), len(expected))
  for i, (a, b) in enumerate(zip(got, expected, strict=True)):
    assert a == b, f"item {i}: {str(a)[:300]} != {str(b)[:300]}"


def assert_one_line_messages(caplog):
  for rec in caplog.records:
    if rec.name == "mdkif_jax.data.example" and rec.levelno >= logging.WARNING:
      msg = rec.getMessage()
      assert len(msg) < 600 and "\n" not in msg, msg[:300]


def assert_strict(run, report):
  """Strict mode raises on the first bad record that non-strict mode reported, same words."""
  path, line, reason = report.seen[0]
  with pytest.raises(DataError) as err:
    run()
  msg, where = str(err.value), (path if line is None else f"{path}:{line}")
  assert msg.startswith(f"{where}: {reason[:300]}"), (msg[:300], where, reason[:300])
  assert "\n" not in msg and len(msg) < 600


def check(tmp_path, caplog, rng, name, files, opts=None):
  """The contract, for one source: clean and fuzzed copies of `files` ({relative path: File})
  convert to the same good records, and each bad unit is reported once at its line."""
  want = set()
  for rel, f in files.items():
    write(tmp_path / "clean" / rel, f, False, rng)
    want |= write(tmp_path / "fuzz" / rel, f, True, rng)
    TRIED.update(u.cls for u in f.units if u.cls)
  expected, clean_report = convert(name, tmp_path / "clean", opts)
  assert expected and not clean_report.seen, clean_report.seen[:3]
  got, report = convert(name, tmp_path / "fuzz", opts)
  assert_same(got, expected)
  assert sorted((p, n) for p, n, _ in report.seen) == sorted(want)
  assert sum(report.skipped.values()) == len(want)
  assert_one_line_messages(caplog)
  assert_strict(lambda: convert(name, tmp_path / "fuzz", opts, strict=True), report)


# --- JSONL sources --------------------------------------------------------------------------


def jsonl_file(rng, row, same, other, huge, text_key, mixed) -> File:
  """`row(i)` good records; `same` bad records whose fields have the good records' types (so
  `datasets` still reads the file and the per-row checks report); if `mixed`, also `other`
  (class, record or raw line) and every line-level class (so the line scan reports)."""

  def enc(r):
    return r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()

  inserts = [("wrong_type", enc(r)) for r in same]
  damage = []
  if mixed:
    inserts += [(cls, enc(r)) for cls, r in other]
    inserts += [("bad_escape", surrogate(enc(row(900)), text_key))]
    inserts += [("random_bytes", random_bytes(rng)), ("garbage", garbage(rng))]
    inserts += [("huge", huge_junk()), ("wrong_type", b"[1, 2]"), ("wrong_type", b'"text"')]
    damage = [("truncated", lambda s, r: cut(s, r, 1, len(s) - 1)), ("non_utf8", non_utf8)]
  return line_file(rng, [enc(row(i)) for i in range(12)], inserts, damage, enc(huge))


def mcqa_spec(rng, keys, pubmedqa=False, int_id=False):
  def row(i):
    question = words(rng) + "?"
    if pubmedqa:
      question = f"{words(rng, 20)}\n{question}"
    return {
      "realidx": i if int_id else f"q{i}-{rng.integers(10**6)}",
      "question": question,
      "options": {k: words(rng, 2) for k in keys},
      "answer_idx": str(rng.choice(list(keys))),
      "answer": "see answer_idx",
    }

  same = [
    {**row(101), "options": None},
    {**row(102), "answer_idx": "Z"},
    {**row(103), "question": " "},
  ]
  other = [
    ("wrong_type", {**row(104), "options": "A. yes B. no"}),
    ("wrong_type", {**row(105), "answer_idx": 1}),
    ("wrong_type", {**row(106), "options": {k: 1 for k in keys}}),
    ("wrong_type", {**row(107), "question": ["why?"]}),
  ]
  return row, same, other, {**row(108), "question": huge_text(rng)}, "question"


def chemprot_spec(rng):
  def row(i):
    text = f"<< {words(rng, 2)} >> {words(rng)} [[ {words(rng, 1)} ]]"
    return {"text": text, "label": str(rng.choice(CHEMPROT_LABELS)), "metadata": []}

  same = [{**row(101), "label": "MAYBE"}, {**row(102), "text": None}, {**row(103), "label": " "}]
  other = [("wrong_type", {**row(104), "label": 3}), ("wrong_type", {**row(105), "text": ["x"]})]
  huge = {**row(106), "label": "x" * MB}  # Unknown label, quoted in its (cut) message.
  return row, same, [*other, ("huge", huge)], {**row(107), "text": huge_text(rng)}, "text"


def hoc_spec(rng):
  def row(i):
    labels = [str(x) for x in rng.choice(HOC_LABELS, int(rng.integers(3)), replace=False)]
    return {
      "pmid": f"{i}{rng.integers(10**6)}",
      "sentences": [words(rng), words(rng)],
      "labels": labels,
    }

  same = [{**row(101), "labels": ["Not a hallmark"]}, {**row(102), "pmid": None}]
  other = [
    ("wrong_type", {**row(103), "sentences": "one string"}),
    ("wrong_type", {**row(104), "labels": "Cellular energetics"}),
    ("wrong_type", {**row(105), "labels": 5}),
    ("wrong_type", {**row(106), "pmid": ["1"]}),
  ]
  return row, same, other, {**row(107), "sentences": [huge_text(rng)]}, "pmid"


def meqsum_spec(rng):
  def row(i):
    return {
      "File": f"{i}.txt",
      "CHQ": f"SUBJECT: {words(rng)}\nMESSAGE: {words(rng)}",
      "Summary": words(rng),
    }

  same = [{**row(101), "Summary": None}, {**row(102), "CHQ": "  "}]
  other = [("wrong_type", {**row(103), "CHQ": 5}), ("wrong_type", {**row(104), "Summary": ["s"]})]
  return row, same, other, {**row(105), "CHQ": huge_text(rng)}, "Summary"


def genmedgpt_spec(rng):
  def row(i):
    return {"instruction": "If you are a doctor...", "input": words(rng), "output": words(rng)}

  same = [{**row(101), "output": None}, {**row(102), "input": ""}]
  other = [
    ("wrong_type", {**row(103), "input": []}),
    ("wrong_type", {**row(104), "output": {"a": 1}}),
    ("wrong_type", {**row(105), "input": True}),
  ]
  return row, same, other, {**row(106), "output": huge_text(rng)}, "input"


def covid_spec(rng):
  def row(i, doctor=True):
    turns = [{"speaker": "Patient", "utterance": words(rng)}]
    turns += [{"speaker": "Doctor", "utterance": words(rng)}] if doctor else []
    return {"id": i, "description": words(rng), "dialogue": turns}

  same = [row(101, doctor=False), {**row(102), "dialogue": None}]
  other = [
    ("wrong_type", {**row(103), "dialogue": "Patient: hi"}),
    ("wrong_type", {**row(104), "dialogue": ["Patient: hi", "Doctor: hello"]}),
  ]
  huge = row(105)
  huge["dialogue"][1]["utterance"] = huge_text(rng)
  return row, same, other, huge, "description"


JSONL = {
  "medmcqa": (("medagents/medmcqa/test.jsonl",), lambda r: mcqa_spec(r, "ABCD")),
  "medagents_pubmedqa": (
    ("medagents/pubmedqa/train.jsonl", "medagents/pubmedqa/test.jsonl"),
    lambda r: mcqa_spec(r, "ABC", pubmedqa=True),
  ),
  "mmlu_fewshot": (
    ("medagents/mmlu/train.jsonl",),
    lambda r: mcqa_spec(r, "ABCDEFGHIJ", int_id=True),
  ),
  "chemprot": (
    ("chemprot/train.jsonl", "chemprot/dev.jsonl", "chemprot/test.jsonl"),
    chemprot_spec,
  ),
  "hoc": (("hoc/hoc.jsonl",), hoc_spec),
  "meqsum": (("meqsum/meqsum.jsonl",), meqsum_spec),
  "genmedgpt": (("dialogue/genmedgpt_5k.jsonl",), genmedgpt_spec),
  "covid_dialogue": (("dialogue/covid_dialogue_en.jsonl",), covid_spec),
}


@pytest.mark.parametrize("mixed", [False, True], ids=["datasets_reader", "line_scan"])
@pytest.mark.parametrize("name", sorted(JSONL))
def test_jsonl_source_fuzz_reports_each_bad_line_and_keeps_the_good(tmp_path, caplog, name, mixed):
  caplog.set_level(logging.INFO, logger="mdkif_jax.data.sources._io")
  rng = np.random.default_rng([sorted(JSONL).index(name), mixed])
  rels, spec = JSONL[name]
  files = {rel: jsonl_file(rng, *spec(rng), mixed=mixed) for rel in rels}
  check(tmp_path, caplog, rng, name, files)
  # Both readers were exercised: `datasets` for same-typed rows, the line scan otherwise.
  assert ("scanning it line by line" in caplog.text) == mixed


@pytest.mark.parametrize("mixed", [False, True], ids=["datasets_reader", "line_scan"])
def test_instruct_jsonl_fuzz_reports_each_bad_line_and_keeps_every_good_one(
  tmp_path, caplog, mixed
):
  """The user's JSONL files, through `load_all`: kept examples equal the good records written."""
  caplog.set_level(logging.INFO, logger="mdkif_jax.data.sources._io")
  rng = np.random.default_rng([100, mixed])

  def row(i):
    r = {"skill": str(rng.choice(SKILLS)), "query": words(rng) + "?", "answer": words(rng)}
    if i % 2:
      r["context"] = words(rng)
    return {**r, "split": ["train", "eval", None][i % 3], "id": f"r{i}"}

  same = [{**row(101), "answer": None}, {**row(102), "answer": "  "}]
  same += [{**row(103), "skill": "surgery"}, {**row(104), "split": "validation"}]
  same += [{k: v for k, v in row(105).items() if k != "query"}]
  other = [("huge", {**row(106), "skill": "x" * MB})]
  other += [("wrong_type", {**row(200 + i), "answer": v}) for i, v in enumerate((42, ["a"], {}))]
  other += [("wrong_type", {**row(110), "answer": True}), ("wrong_type", {**row(111), "skill": 3})]
  other += [
    ("wrong_type", {**row(112), "context": ["c"]}),
    ("wrong_type", {**row(113), "split": 1}),
  ]
  f = jsonl_file(rng, row, same, other, {**row(114), "answer": huge_text(rng)}, "answer", mixed)
  path = tmp_path / "mine.jsonl"
  want = write(path, f, True, rng)
  TRIED.update(u.cls for u in f.units if u.cls)
  c = cfg(data_dir=str(tmp_path), sources="", instruct_files=(str(path),))
  report = Recorder()
  splits = load_all(c, report)
  kept = sorted((e.skill, e.context, e.query, e.answer) for s in splits.values() for e in s)
  good = [json.loads(u.lines[0]) for u in f.units if u.cls is None]
  written = sorted((r["skill"], r.get("context", ""), r["query"], r["answer"]) for r in good)
  assert_same(kept, written)
  assert sorted((p, n) for p, n, _ in report.seen) == sorted(want)
  assert ("scanning it line by line" in caplog.text) == mixed
  assert_one_line_messages(caplog)
  c.strict = True
  assert_strict(lambda: load_all(c), report)


# --- TSV sources ----------------------------------------------------------------------------


def tsv_file(rng, header, row, wrong, huge_col, eligible=None) -> File:
  """`row(i)` good rows (cells); `wrong` bad rows with the right columns; and every other
  class: extra and missing columns, random bytes, garbage, a 1 MB line, a row cut before its
  last tab, a non-UTF-8 row; a 1 MB good cell (csv's default limit is 128 KiB)."""

  def enc(cells):
    return "\t".join(cells).encode()

  inserts = [("wrong_type", enc(c)) for c in wrong]
  inserts += [("wrong_columns", enc([*row(101), "extra"])), ("wrong_columns", enc(row(102)[:-1]))]
  inserts += [("random_bytes", random_bytes(rng)), ("garbage", garbage(rng)), ("huge", huge_junk())]
  damage = [("truncated", lambda s, r: cut(s, r, 1, s.rindex(b"\t"))), ("non_utf8", non_utf8)]
  big = row(103)
  big[huge_col] = huge_text(rng)
  good = [enc(row(i)) for i in range(12)]
  return line_file(rng, good, inserts, damage, enc(big), (header,), eligible)


def replace(cells, i, value):
  return [*cells[:i], value, *cells[i + 1 :]]


def pharmacotherapydb_files(rng):
  def row(i):
    return [
      f"DOID:{i}",
      f"DB{i:05d}",
      words(rng, 2),
      words(rng, 1),
      str(rng.choice(["DM", "SYM", "NOT"])),
      "1",
      "2",
    ]

  header = b"doid_id\tdrugbank_id\tdisease\tdrug\tcategory\tn_curators\tn_resources"
  wrong = [replace(row(110), 4, "MAYBE"), replace(row(111), 3, "")]
  return {"kg/pharmacotherapydb/indications.tsv": tsv_file(rng, header, row, wrong, 2)}


def hpo_files(rng):
  def row(i):  # Two rows per term; labels and lay terms quoted as in the real file.
    return [
      f"<http://purl.obolibrary.org/obo/HP_{i // 2:07d}>",
      f'"Abnormality {i // 2}"',
      f'"{words(rng, 2)}"',
    ]

  header = b"?term\t?term_label\t?layperson"
  return {
    "kg/hpo/layperson-synonyms.tsv": tsv_file(rng, header, row, [replace(row(110), 2, "")], 2)
  }


def hetionet_files(rng, fuzz=True):
  kinds = ["Disease", "Symptom", "Anatomy"]  # Anatomy nodes have no edges: safe to damage.

  def node(i):
    kind = kinds[min(i // 4, 2)]
    return [f"{kind}::{i}", words(rng, 2), kind]

  def metaedge(i):
    names = [
      "Disease - presents - Symptom",
      "Disease - resembles - Disease",
      "Anatomy - expresses - Gene",
    ]
    names += [f"Gene > regulates{i} > Gene"]
    return [names[min(i, 3)], ["DpS", "DrD", "AeG", f"Gr{i}G"][min(i, 3)], "1", "1", "1", "1"]

  def edge(i):
    return (
      [f"Disease::{i % 4}", "DpS", f"Symptom::{4 + i % 4}"]
      if i % 2
      else ["Disease::0", "DrD", f"Disease::{1 + i % 3}"]
    )

  nodes = tsv_file(rng, b"id\tname\tkind", node, [replace(node(110), 1, "")], 1, range(8, 12))
  bad_meta = [["Gene regulates Gene", "GrG", "1", "1", "1", "1"]]
  metas = tsv_file(
    rng,
    b"metaedge\tabbreviation\tedges\tsource_nodes\ttarget_nodes\tunbiased",
    metaedge,
    bad_meta,
    2,
    range(3, 12),
  )
  edges = tsv_file(
    rng, b"source\tmetaedge\ttarget", edge, [["Disease::0", "DpS", "Symptom::404"]], 1
  )
  if not fuzz:
    for f in (nodes, metas, edges):
      f.units = [u for u in f.units if u.cls is None]
  folder = "kg/hetionet/"
  return {
    folder + "hetionet-v1.0-nodes.tsv": nodes,
    folder + "metaedges.tsv": metas,
    folder + "hetionet-v1.0-edges-5k.sif.gz": edges,
  }


def obo_file(rng) -> File:
  """OBO stanzas; a damaged term (bad line, cut-off quote, bad bytes) must be dropped whole."""
  header = (b"format-version: 1.2", b"default-namespace: disease_ontology", b"")

  def term(i, definition=None):
    d = definition or words(rng)
    lines = [b"[Term]", f"id: DOID:{i}", f"name: {words(rng, 2)}", f'def: "{d}" [url:x]']
    lines += [f'synonym: "{words(rng, 2)}" EXACT []', f'synonym: "{words(rng, 2)}" RELATED []']
    lines += ["is_a: DOID:4 ! disease"]
    return [x if isinstance(x, bytes) else x.encode() for x in lines]

  units = [Unit(term(i)) for i in range(12)]
  units += [Unit(term(50) + [b"is_obsolete: true"]), Unit([b"[Typedef]", b"id: has_symptom"])]
  i_random, i_garbage, i_cut, i_bytes = rng.choice(12, 4, replace=False)
  for i, cls, line in (
    (i_random, "random_bytes", b"\xff" + random_bytes(rng)),
    (i_garbage, "garbage", garbage(rng)),
  ):
    k = int(rng.integers(1, 8))
    units[i] = Unit([*units[i].lines[:k], line, *units[i].lines[k:]], cls, k)
  syn = units[i_cut].lines[4]
  units[i_cut] = Unit(
    replace(units[i_cut].lines, 4, cut(syn, rng, syn.index(b'"') + 1, syn.rindex(b'"'))),
    "truncated",
  )
  units[i_bytes] = Unit(
    replace(units[i_bytes].lines, 2, non_utf8(units[i_bytes].lines[2], rng)), "non_utf8", 2
  )
  units.insert(int(rng.integers(len(units))), Unit(term(60, definition="z" * MB)))
  return File(units, header, block=True)


def disease_ontology_files(rng):
  def human(i):
    return [f'"DOID:{i // 2}"', f'"disease {i // 2}"', f'"{words(rng, 2)}"']

  def symptom(i):
    return [f"DOID:{i // 2}", f"disease {i // 2}", f"SYMP:{i}", words(rng, 2)]

  def anatomy(i):
    return [f"DOID:{i}", f"disease {i}", "", f"UBERON:{i}", words(rng, 1)]

  def anon(i):
    return [
      f"DOID:{i}",
      f"disease {i}",
      f"'has symptom' some '{words(rng, 1)}'|'has material basis in' some 'virus'",
    ]

  do = "kg/disease_ontology/"
  return {
    do + "doid_2016-09-01.obo": obo_file(rng),
    do + "HumanDO.tsv": tsv_file(
      rng, b"id\tlabel\tsubClassOf", human, [replace(human(110), 1, '""')], 2
    ),
    do + "disease-symptom.tsv": tsv_file(
      rng,
      b"disease_id\tdisease_label\tsymptom_id\tsymptom_label",
      symptom,
      [replace(symptom(110), 0, "")],
      3,
    ),
    do + "DO-ICDO-anatomy.tsv": tsv_file(
      rng,
      b"id\tlabel\txrefs\tanatomy_id\tanatomy_label",
      anatomy,
      [replace(anatomy(110), 1, "")],
      4,
    ),
    do + "DO-subClassOf-anonymous.tsv": tsv_file(
      rng, b"ID\tLABEL\tSubClass Of [ANON]", anon, [replace(anon(110), 0, "")], 1
    ),
  }


# --- CoNLL sources --------------------------------------------------------------------------


def conll_file(rng, kind) -> File:
  """Sentences of `token<TAB>tag` lines; a sentence with a bad line must be dropped whole."""

  def sentence():
    tags = rng.choice(["O", "O", f"B-{kind}", f"I-{kind}"], int(rng.integers(3, 8)))
    return [f"{rng.choice(WORDS)}\t{tag}".encode() for tag in tags]

  units = [Unit(sentence()) for _ in range(12)]
  damage = {
    "random_bytes": lambda s: random_bytes(rng),
    "garbage": lambda s: garbage(rng),
    "truncated": lambda s: cut(s, rng, 1, s.index(b"\t") + 2),  # "tok" or "tok<TAB>".
    "non_utf8": lambda s: non_utf8(s, rng),
  }
  for (cls, fn), i in zip(damage.items(), rng.choice(12, 4, replace=False), strict=True):
    k = int(rng.integers(len(units[i].lines)))
    units[i] = Unit(replace(units[i].lines, k, fn(units[i].lines[k])), cls, k)
  for cls, line in (
    ("random_bytes", random_bytes(rng)),
    ("huge", huge_junk()),
    (None, b"z" * MB + b"\tO"),
  ):
    units.insert(int(rng.integers(len(units) + 1)), Unit([line], cls))
  return File(units, block=True)


NER = {"ncbi_disease": "Disease", "bc5cdr_disease": "Disease", "bc5cdr_chem": "Chemical"}
FILES = {
  "pharmacotherapydb": pharmacotherapydb_files,
  "hpo": hpo_files,
  "hetionet": hetionet_files,
  "disease_ontology": disease_ontology_files,
  **{
    name: lambda rng, name=name: {
      f"ner/{name}/{part}.tsv": conll_file(rng, NER[name]) for part in ("train", "devel", "test")
    }
    for name in NER
  },
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_line_source_fuzz_reports_each_bad_record_and_keeps_the_good(tmp_path, caplog, name):
  """TSV, OBO and CoNLL sources: one fuzzed copy of every file the converter reads."""
  rng = np.random.default_rng([10, sorted(FILES).index(name)])
  check(tmp_path, caplog, rng, name, FILES[name](rng))


@pytest.mark.parametrize("damage", ["truncated", "random_bytes"])
def test_damaged_gzip_keeps_the_lines_before_a_cut_and_is_reported_once(tmp_path, damage):
  rng = np.random.default_rng(20)
  files = hetionet_files(rng, fuzz=False)
  edges_rel = "kg/hetionet/hetionet-v1.0-edges-5k.sif.gz"
  for rel, f in files.items():
    write(tmp_path / "fuzz" / rel, f, False, rng)
  path = tmp_path / "fuzz" / edges_rel
  data = path.read_bytes()
  if damage == "truncated":
    data = data[: len(data) * 2 // 3]
    text = zlib.decompressobj(wbits=31).decompress(data)
    survivors = text[: text.rfind(b"\n") + 1].split(b"\n")[1:-1]  # Complete rows, no header.
    want_line = len(survivors) + 2
  else:
    k = len(data) // 2
    data = data[:k] + bytes(rng.integers(0, 256, 16, dtype=np.uint8)) + data[k + 16 :]
    survivors, want_line = [], None
  path.write_bytes(data)
  TRIED[damage] += 1
  edges = files[edges_rel]
  edges.units = [u for u in edges.units if u.lines[0] in survivors]
  assert damage != "truncated" or 0 < len(edges.units) < 12
  for rel, f in files.items():
    write(tmp_path / "clean" / rel, f, False, rng)
  expected, _ = convert("hetionet", tmp_path / "clean")
  got, report = convert("hetionet", tmp_path / "fuzz")
  assert_same(got, expected)
  assert [(p, n) for p, n, _ in report.seen] == [(str(path), want_line)]
  assert report.seen[0][2].startswith("corrupt gzip:")
  assert_strict(lambda: convert("hetionet", tmp_path / "fuzz", strict=True), report)


# --- XML and whole-file JSON sources ---------------------------------------------------------


def xml_lines(root_tag, items) -> list[bytes]:
  """`<?xml ...?>`, then `<root_tag>` around the items' lines."""
  out = ['<?xml version="1.0" encoding="UTF-8"?>', f"<{root_tag}>"]
  for lines in items:
    out += lines
  return [s if isinstance(s, bytes) else s.encode() for s in [*out, f"</{root_tag}>"]]


def break_whole_file(data: bytes, cls: str, rng) -> bytes:
  """A document damaged past recovery: cut, a bad byte, random bytes, or stray markup."""
  k = int(rng.integers(len(data) // 3, 2 * len(data) // 3))
  insert = {"non_utf8": b"\xff", "random_bytes": random_bytes(rng), "garbage": b"<&" + garbage(rng)}
  return data[:k] if cls == "truncated" else data[:k] + insert[cls] + data[k:]


WHOLE = ["truncated", "non_utf8", "random_bytes", "garbage"]


@pytest.mark.parametrize("broken", WHOLE)
def test_rqe_fuzz_names_bad_pairs_by_line_and_a_broken_document_once(tmp_path, caplog, broken):
  rng = np.random.default_rng([30, WHOLE.index(broken)])

  def pair(pid, value="true", chq=None, faq=None):
    chq, faq = (
      escape(chq if chq is not None else words(rng)),
      escape(faq if faq is not None else words(rng)),
    )
    pid = f'<pair pid="{pid}" type="x" value="{value}">'
    return [s.encode() for s in (pid, f"<chq>{chq}</chq>", f"<faq>{faq}</faq>", "</pair>")]

  units = [Unit(pair(i, str(rng.choice(["true", "false"])))) for i in range(10)]
  bad = [pair(90, value="maybe"), pair(91, chq=""), [*pair(92)[:1], *pair(92)[2:]]]
  for lines in bad:
    units.insert(int(rng.integers(len(units) + 1)), Unit(lines, "wrong_type"))
  units.insert(int(rng.integers(len(units) + 1)), Unit(pair(93, chq=huge_text(rng))))
  train = File([*units, Unit([b"</RQE-med-train>"])], tuple(xml_lines("RQE-med-train", [])[:2]))
  train_rel, test_rel = "rqe/RQE_Train_8588_AMIA2016.xml", "rqe/RQE_Test_302_pairs_AMIA2016.xml"
  want = write(tmp_path / "fuzz" / train_rel, train, True, rng)
  write(tmp_path / "clean" / train_rel, train, False, rng)
  (tmp_path / "clean" / test_rel).write_bytes(b"<RQE-med-test>\n</RQE-med-test>\n")
  test = b"\n".join(xml_lines("RQE-med-test", [pair(i) for i in range(5)])) + b"\n"
  (tmp_path / "fuzz" / test_rel).write_bytes(break_whole_file(test, broken, rng))
  TRIED.update(["wrong_type"] * len(bad) + [broken])
  expected, _ = convert("rqe", tmp_path / "clean")
  got, report = convert("rqe", tmp_path / "fuzz")
  assert_same(got, expected)
  assert sorted((p, n) for p, n, _ in report.seen[:-1]) == sorted(want)
  path, line, reason = report.seen[-1]
  assert path == str(tmp_path / "fuzz" / test_rel) and reason.startswith("malformed XML")
  assert 1 <= line <= test.count(b"\n") + 1
  assert_one_line_messages(caplog)
  assert_strict(lambda: convert("rqe", tmp_path / "fuzz", strict=True), report)


@pytest.mark.parametrize("broken", WHOLE)
def test_medquad_fuzz_names_a_bad_pair_by_line_and_each_broken_document_once(
  tmp_path, caplog, broken
):
  rng = np.random.default_rng([40, WHOLE.index(broken)])

  def doc(n_pairs=2, answers=None):
    answers = answers or [words(rng) for _ in range(n_pairs)]
    lines = ['<Document id="1" source="x" url="u">', f"<Focus>{words(rng, 2)}</Focus>"]
    lines += ["<FocusAnnotations>", "\t<Category>Other</Category>", "\t<Synonyms>"]
    lines += [f"\t\t<Synonym>{words(rng, 1)}</Synonym>", "\t</Synonyms>", "</FocusAnnotations>"]
    units = [Unit([s.encode() for s in lines]), Unit([b"<QAPairs>"])]
    for i, answer in enumerate(answers):
      pair = [f'\t<QAPair pid="{i + 1}">', f"\t\t<Question qid='{i}'>{words(rng)}?</Question>"]
      pair += [f"\t\t<Answer>{escape(answer)}</Answer>" if answer else "", "\t</QAPair>"]
      units.append(Unit([s.encode() for s in pair]))
    units += [Unit([b"</QAPairs>", b"</Document>"])]
    return File(units, (b'<?xml version="1.0" encoding="UTF-8"?>',))

  folders = ("4_MPlus_Health_Topics_QA", "9_CDC_QA")
  files = {f"medquad/{folders[i % 2]}/{i:07d}.xml": doc() for i in range(4)}
  files["medquad/9_CDC_QA/0000010.xml"] = doc(answers=[huge_text(rng)])
  record = doc(n_pairs=3)
  record.units[3] = Unit(record.units[3].lines, "wrong_type")  # A QAPair without an answer.
  record.units[3].lines[2] = b""
  files["medquad/4_MPlus_Health_Topics_QA/0000011.xml"] = record
  want = set()
  for rel, f in files.items():
    write(tmp_path / "clean" / rel, f, False, rng)
    want |= write(tmp_path / "fuzz" / rel, f, True, rng)
  broken_path = tmp_path / "fuzz" / "medquad/6_NINDS_QA/0000020.xml"
  whole = doc()
  write(broken_path, whole, False, rng)
  broken_path.write_bytes(break_whole_file(broken_path.read_bytes(), broken, rng))
  TRIED.update(["wrong_type", broken])
  expected, _ = convert("medquad", tmp_path / "clean")
  got, report = convert("medquad", tmp_path / "fuzz")
  assert_same(got, expected)
  whole_file = [(p, n) for p, n, _ in report.seen if p == str(broken_path)]
  assert len(whole_file) == 1 and whole_file[0][1] is not None
  assert sorted((p, n) for p, n, _ in report.seen if p != str(broken_path)) == sorted(want)
  assert_one_line_messages(caplog)
  assert_strict(lambda: convert("medquad", tmp_path / "fuzz", strict=True), report)


def pubmedqa_record(rng, **change):
  rec = {
    "QUESTION": words(rng) + "?",
    "CONTEXTS": [words(rng), words(rng)],
    "LABELS": ["BACKGROUND", "RESULTS"],
    "MESHES": [],
    "YEAR": None,
    "final_decision": str(rng.choice(["yes", "no", "maybe"])),
    "LONG_ANSWER": words(rng),
  }
  return {k: v for k, v in {**rec, **change}.items() if v != "-"}


def test_pubmedqa_fuzz_names_each_bad_record_by_the_line_of_its_pmid(tmp_path, caplog):
  rng = np.random.default_rng(50)
  items = {str(1000 + i): pubmedqa_record(rng) for i in range(10)}
  items["1010"] = pubmedqa_record(rng, LONG_ANSWER=huge_text(rng))
  bad = {
    "2001": "not a record",
    "2002": pubmedqa_record(rng, CONTEXTS="one string"),
    "2003": pubmedqa_record(rng, final_decision="perhaps"),
    "2004": pubmedqa_record(rng, QUESTION="-"),
    "2005": pubmedqa_record(rng, LABELS=5),
    "2006": pubmedqa_record(rng, CONTEXTS=[1, 2]),
    "2007": pubmedqa_record(rng, QUESTION=["why?"]),
  }
  order = rng.permutation(list(items) + list(bad))
  fuzzed = {k: (items | bad)[k] for k in order}
  truth = {k: "yes" for k in list(fuzzed)[::3]}
  clean = {k: v for k, v in fuzzed.items() if k not in bad}
  for copy, obj in (("clean", clean), ("fuzz", fuzzed)):
    folder = tmp_path / copy / "pubmedqa"
    folder.mkdir(parents=True)
    text = json.dumps(obj, indent=4, ensure_ascii=False)
    if copy == "fuzz":
      text = "\ufeff" + text.replace("\n", "\r\n")
    (folder / "ori_pqal.json").write_text(text, encoding="utf-8")
    (folder / "test_ground_truth.json").write_text(json.dumps(truth, indent=4))
  lines = (tmp_path / "fuzz/pubmedqa/ori_pqal.json").read_text(encoding="utf-8").splitlines()
  key_line = {
    m.group(1): n for n, s in enumerate(lines, 1) if (m := re.match(r'^\ufeff?    "(\d+)": ', s))
  }
  TRIED["wrong_type"] += len(bad)
  expected, _ = convert("pubmedqa", tmp_path / "clean")
  got, report = convert("pubmedqa", tmp_path / "fuzz")
  assert_same(got, expected)
  path = str(tmp_path / "fuzz/pubmedqa/ori_pqal.json")
  assert sorted((p, n) for p, n, _ in report.seen) == sorted((path, key_line[k]) for k in bad)
  assert_one_line_messages(caplog)
  assert_strict(lambda: convert("pubmedqa", tmp_path / "fuzz", strict=True), report)


@pytest.mark.parametrize("broken", [*WHOLE, "wrong_type"])
@pytest.mark.parametrize("which", ["ori_pqal.json", "test_ground_truth.json"])
def test_pubmedqa_broken_file_converts_nothing_and_is_reported_once(tmp_path, broken, which):
  """Nothing rather than a part: without the test file's PMIDs a test item would train."""
  rng = np.random.default_rng([60, WHOLE.index(broken) if broken in WHOLE else 9])
  folder = tmp_path / "pubmedqa"
  folder.mkdir()
  items = {str(1000 + i): pubmedqa_record(rng) for i in range(6)}
  files = {"ori_pqal.json": items, "test_ground_truth.json": {k: "yes" for k in list(items)[:2]}}
  for name, obj in files.items():
    data = json.dumps(obj, indent=4).encode()
    if name == which:
      data = b"[1, 2]" if broken == "wrong_type" else break_whole_file(data, broken, rng)
    (folder / name).write_bytes(data)
  TRIED[broken] += 1
  got, report = convert("pubmedqa", tmp_path)
  assert got == [] and len(report.seen) == 1
  path, line, _ = report.seen[0]
  assert path == str(folder / which) and line is not None
  assert_strict(lambda: convert("pubmedqa", tmp_path, strict=True), report)


def test_hub_folder_fuzz_counts_empty_rows_and_a_broken_file_is_one_clear_error(tmp_path):
  """A `data.hub_datasets` local folder: rows without a query or answer are counted as
  `name[split]:row`, the good ones kept; a file `datasets` cannot read at all is a DataError
  naming the dataset (by design: a configured dataset that cannot load is a config error)."""
  rng = np.random.default_rng(70)
  good = [{"q": words(rng) + "?", "a": words(rng)} for _ in range(8)]
  good.append({"q": words(rng) + "?", "a": huge_text(rng)})
  rows = list(good)
  bad = [
    {"q": None, "a": "x"},
    {"q": "", "a": "x"},
    {"q": "why?", "a": None},
    {"q": "why?", "a": " "},
  ]
  for r in bad:
    rows.insert(int(rng.integers(len(rows) + 1)), r)
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  TRIED["wrong_type"] += len(bad)
  report = Recorder()
  splits = load_all(cfg(hub_datasets=(f"{folder}|train|qa||q|a",)), report)
  kept = sorted((e.query, e.answer) for s in splits.values() for e in s)
  assert_same(kept, sorted((r["q"], r["a"]) for r in good))
  label = f"{folder}[train]"
  assert sorted((p, n) for p, n, _ in report.seen) == sorted((label, rows.index(r)) for r in bad)
  (folder / "train.jsonl").write_bytes(b'{"q": "a?", "a": "b"}\n{"q": "broken\n')
  TRIED["truncated"] += 1
  with pytest.raises(DataError, match=r"hub dataset .*mine\[train\]: cannot load it") as err:
    load_all(cfg(hub_datasets=(f"{folder}|train|qa||q|a",)), Recorder())
  assert "\n" not in str(err.value)


@pytest.mark.parametrize(
  "name", ["chemprot", "ncbi_disease", "rqe", "hetionet", "disease_ontology"]
)
def test_half_copied_source_folder_is_a_noted_missing_file_not_a_crash(tmp_path, name):
  """Every file a converter reads is in its `Source.files`: one of them missing skips the
  source with a note (strict mode: a DataError naming it), never a FileNotFoundError."""
  files = SOURCES[name].files
  for rel in files[:-1]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("")
  TRIED["missing_file"] += 1
  report = Recorder()
  assert load_all(cfg(data_dir=str(tmp_path), sources=name), report) == {"train": [], "eval": []}
  assert report.notes == [f"source {name!r}: {tmp_path / files[-1]} is missing; source skipped"]
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / files[-1]} is missing")):
    load_all(cfg(data_dir=str(tmp_path), sources=name, strict=True))
