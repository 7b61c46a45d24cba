"""Readers for the local files the converters use.

JSON/JSONL and plain text go through `datasets.load_dataset` (it caches Arrow tables, so a
second load is fast). When `datasets` rejects a file (malformed line, non-UTF-8 bytes, mixed
types) or reads a different number of rows than the file has lines, it names no line, so we
re-read that one file with the stdlib, line by line, to report exactly which lines are bad, and
keep the good ones (or stop at the first bad one in strict mode). TSV is always read with the
stdlib (see `read_tsv_rows`). XML is parsed by expat into ElementTree elements, each with its
line, so a bad record is named by file:line like everywhere else.
"""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import json
import logging
import pathlib
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator, Mapping, Sequence
from xml.parsers import expat

from mdkif_jax.data.example import LoadReport

log = logging.getLogger(__name__)

Row = dict[str, object]


def _quiet_datasets():
  import datasets

  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  return datasets


def _rows(dataset) -> list[Row]:
  """All rows of a `datasets.Dataset` as dicts, read from its Arrow table in one go."""
  return dataset.data.to_pylist()


def _open_bytes(path: pathlib.Path, report: LoadReport | None = None) -> bytes:
  """The file's bytes, gunzipped for .gz. A damaged .gz is a reported problem, not a crash:
  a truncated one keeps its complete lines (deflate output before the cut is exact); any other
  damage (bad CRC, invalid data) loses the whole file, since no line of it can be trusted."""
  data = path.read_bytes()
  if path.suffix != ".gz":
    return data
  try:
    return gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    truncated, out = isinstance(e, EOFError), b""
    if truncated:
      out = zlib.decompressobj(wbits=31).decompress(data)
      out = out[: out.rfind(b"\n") + 1]
    if report is not None:
      lost = "the rest of the file is lost" if truncated else "the whole file is lost"
      line = out.count(b"\n") + 1 if truncated else None
      report.skip(str(path), line, f"corrupt gzip: {e}; {lost}")
    return out


@functools.lru_cache(maxsize=64)
def _nonblank_line_numbers(path: str) -> tuple[int, ...]:
  """1-based numbers of the non-blank lines: row i of a JSONL/TSV table is on line [i]."""
  lines = _open_bytes(pathlib.Path(path)).split(b"\n")
  return tuple(i + 1 for i, b in enumerate(lines) if b.strip())


def row_line(path: pathlib.Path, row: int, header: int = 0) -> int | None:
  """The file line of table row `row` (0-based, after `header` header lines)."""
  numbers = _nonblank_line_numbers(str(path))
  i = row + header
  return numbers[i] if i < len(numbers) else None


def _decode_lines(path: pathlib.Path, report: LoadReport) -> Iterator[tuple[int, str | None]]:
  """(line number, text) for every line; text None where the bytes are not UTF-8."""
  data = _open_bytes(path, report)
  if data.startswith(codecs.BOM_UTF8):  # An editor's byte-order mark is not text of line 1.
    data = data[len(codecs.BOM_UTF8) :]
  for i, raw in enumerate(data.split(b"\n")):
    try:
      yield i + 1, raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      report.skip(str(path), i + 1, f"non-UTF-8 bytes: at column {e.start + 1}")
      yield i + 1, None


def _check_fields(
  row: Row,
  required: Sequence[str],
  path: pathlib.Path,
  line: int | None,
  report: LoadReport,
  types: Mapping[str, type | tuple[type, ...]] | None = None,
) -> bool:
  """Each required field present, non-empty and of its type (`types`, else a string): a
  number or list where text belongs is a bad record, not something to `str()` into text."""
  for key in required:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
      what = "missing" if value is None else "empty"
      report.skip(str(path), line, f"{what} field: {key!r}")
      return False
    want = (types or {}).get(key, str)
    if not isinstance(value, want):
      names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
      report.skip(str(path), line, f"wrong type: {key!r} is {type(value).__name__}, want {names}")
      return False
  return True


def read_json_rows(
  path: pathlib.Path,
  report: LoadReport,
  required: Sequence[str] = (),
  types: Mapping[str, type | tuple[type, ...]] | None = None,
) -> Iterator[tuple[int | None, Row]]:
  """(line, record) for each good record of a JSONL (or JSON array) file; `types` as in
  `_check_fields`."""
  path = pathlib.Path(path)
  ds = _quiet_datasets()
  try:
    # on_mixed_types=None: by default datasets JSON-encodes a column whose rows differ in type,
    # so one `"answer": 42` turned every good answer "a" into '"a"'. Now such a file is
    # scanned line by line and the odd row is the bad record.
    dataset = ds.load_dataset("json", data_files=str(path), split="train", on_mixed_types=None)
    table = _rows(dataset)
  except Exception as e:  # noqa: BLE001 - any reader failure means: find the bad lines.
    log.info("datasets could not read %s (%s); scanning it line by line", path, e)
    yield from _scan_jsonl(path, report, required, types)
    return
  lines = _nonblank_line_numbers(str(path))
  if len(table) != len(lines) and not _is_json_array(path):
    # pyarrow also ends a record at a lone "\r", reads two objects on one line and one object
    # over several lines: row i is then not on line i, so let the line scan name them.
    log.info("%s: %d rows on %d lines; scanning it line by line", path, len(table), len(lines))
    yield from _scan_jsonl(path, report, required, types)
    return
  for i, row in enumerate(table):
    line = row_line(path, i)
    if _check_fields(row, required, path, line, report, types):
      yield line, row


def _is_json_array(path: pathlib.Path) -> bool:
  data = _open_bytes(path)
  return data.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


def _scan_jsonl(
  path: pathlib.Path,
  report: LoadReport,
  required: Sequence[str],
  types: Mapping[str, type | tuple[type, ...]] | None = None,
) -> Iterator[tuple[int, Row]]:
  for line, text in _decode_lines(path, report):
    if text is None or not text.strip():
      continue
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      report.skip(str(path), line, f"malformed JSON: {e.msg} at column {e.colno}")
      continue
    if not isinstance(row, dict):
      report.skip(str(path), line, f"malformed JSON: not an object but {type(row).__name__}")
      continue
    if not _is_utf8(row):
      report.skip(str(path), line, "malformed JSON: an unpaired surrogate escape (\\ud800-\\udfff)")
      continue
    if _check_fields(row, required, path, line, report, types):
      yield line, row


def _is_utf8(value) -> bool:
  """False if the stdlib JSON decoder produced a lone surrogate ("\\ud800"), which pyarrow
  rejects and which would crash the first `.encode()` downstream (the example hashes)."""
  try:
    json.dumps(value, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def read_json_object(path: pathlib.Path, report: LoadReport) -> tuple[dict, dict[str, int]] | None:
  """A whole-file JSON object keyed by id (PubMedQA's layout, which `datasets` reads as one
  row with a column per id, so the stdlib reads it), with the line of each top-level key.

  A file that does not parse loses all its records: that is one reported problem at the line
  where parsing stopped (a DataError in strict mode), and None.
  """
  path = pathlib.Path(path)
  data = path.read_bytes()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8) :]
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    report.skip(str(path), line, "non-UTF-8 bytes: the whole file is lost")
    return None
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    report.skip(str(path), e.lineno, f"malformed JSON: {e.msg}; the whole file is lost")
    return None
  if not isinstance(obj, dict) or not _is_utf8(obj):
    what = "an unpaired surrogate escape" if isinstance(obj, dict) else type(obj).__name__
    report.skip(str(path), 1, f"malformed JSON: want an object keyed by id, got {what}")
    return None
  lines, pos, line = {}, 0, 1
  for key in obj:  # json.loads keeps the file's key order: each key is found after the last.
    i = text.find(json.dumps(key, ensure_ascii=False), pos)
    if i >= 0:
      line += text.count("\n", pos, i)
      pos, lines[key] = i, line
  return obj, lines


def read_tsv_rows(
  path: pathlib.Path, report: LoadReport, required: Sequence[str] = ()
) -> Iterator[tuple[int | None, Row]]:
  """(line, row) for each good row of a tab-separated file with a header (.gz allowed).

  All cells are strings; empty cells stay "" (no NaN guessing, so a gene called NA survives).
  Read with the stdlib, one row per line: the pandas reader behind `datasets` silently pads a
  short row with "", joins lines across an unbalanced quote, splits a line at a lone "\r" and
  turns "007" into 7, so whether a row was kept and what it said depended on whether some
  other line of the file was bad. The stdlib scan is as fast on these files.
  """
  yield from _scan_tsv(pathlib.Path(path), report, required)


def _scan_tsv(
  path: pathlib.Path, report: LoadReport, required: Sequence[str]
) -> Iterator[tuple[int, Row]]:
  header: list[str] | None = None
  for line, text in _decode_lines(path, report):
    if text is None or not text.strip():
      continue
    # A cell may be as long as its line (csv's default limit, 128 KiB, raised on a huge cell).
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
      cells = next(csv.reader([text], delimiter="\t"))
    except csv.Error as e:  # A "\r" inside the line, say.
      report.skip(str(path), line, f"malformed row: {e}")
      continue
    if header is None:
      header = cells
      continue
    if len(cells) != len(header):
      report.skip(str(path), line, f"malformed row: {len(cells)} fields, header has {len(header)}")
      continue
    row = dict(zip(header, cells, strict=True))
    if _check_fields(row, required, path, line, report):
      yield line, row


def read_text_lines(path: pathlib.Path, report: LoadReport) -> Iterator[str | None]:
  """Every line of a text file, blank ones included (CoNLL and OBO need them).

  An entry is None where the line was not UTF-8 (reported when the parser reaches it, so
  strict mode stops at the first bad line in file order); parsers drop the record holding it.
  """
  path = pathlib.Path(path)
  ds = _quiet_datasets()
  try:
    table = ds.load_dataset("text", data_files=str(path), split="train")
  except Exception as e:  # noqa: BLE001
    log.info("datasets could not read %s (%s); scanning it line by line", path, e)
    return (text for _, text in _decode_lines(path, report))
  # Straight from Arrow: `Dataset.__getitem__` formats row by row, 100x slower here.
  lines = table.data.column("text").to_pylist()
  raw = _open_bytes(path)
  if len(lines) != raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0):
    # datasets also ends a line at a lone "\r" (universal newlines): parsers count lines to
    # name them, so read the file as split at "\n" only.
    return (text for _, text in _decode_lines(path, report))
  if lines and lines[0].startswith("\ufeff"):  # datasets keeps a byte-order mark as text.
    lines[0] = lines[0][1:]
  return iter(lines)


def read_xml(
  path: pathlib.Path, report: LoadReport
) -> tuple[ET.Element, dict[ET.Element, int]] | None:
  """The root element and the line of each element's start tag, or None (reported with its
  line) when the file is not well-formed. Parsed with expat directly, as ElementTree does,
  because ElementTree keeps no line numbers and bad records are named by file:line."""
  builder, parser = ET.TreeBuilder(), expat.ParserCreate()
  lines: dict[ET.Element, int] = {}

  def start(tag, attrs):
    lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

  parser.buffer_text = True
  parser.StartElementHandler = start
  parser.EndElementHandler = builder.end
  parser.CharacterDataHandler = builder.data
  try:
    parser.Parse(pathlib.Path(path).read_bytes(), True)
  except expat.ExpatError as e:
    where = f"{expat.ErrorString(e.code)}: line {e.lineno}, column {e.offset}"
    report.skip(str(path), e.lineno, f"malformed XML: {where}")
    return None
  return builder.close(), lines
