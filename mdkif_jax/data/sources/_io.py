"""Readers for the local files the converters use.

JSON/JSONL, CSV/TSV and plain text go through `datasets.load_dataset` (it caches Arrow tables,
so a second load is fast). When `datasets` rejects a file (malformed line, non-UTF-8 bytes,
a row with the wrong number of fields) it names no line, so we re-read that one file with the
stdlib, line by line, to report exactly which lines are bad, and keep the good ones (or stop at
the first bad one in strict mode). XML has no `datasets` reader: ElementTree parses it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import logging
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence

from mdkif_jax.data.example import DataError, LoadReport

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


def _open_bytes(path: pathlib.Path) -> bytes:
  data = path.read_bytes()
  return gzip.decompress(data) if path.suffix == ".gz" else data


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
  for i, raw in enumerate(_open_bytes(path).split(b"\n")):
    try:
      yield i + 1, raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      report.skip(str(path), i + 1, f"non-UTF-8 bytes: at column {e.start + 1}")
      yield i + 1, None


def _check_fields(
  row: Row, required: Sequence[str], path: pathlib.Path, line: int | None, report: LoadReport
) -> bool:
  for key in required:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
      what = "missing" if value is None else "empty"
      report.skip(str(path), line, f"{what} field: {key!r}")
      return False
  return True


def read_json_rows(
  path: pathlib.Path, report: LoadReport, required: Sequence[str] = ()
) -> Iterator[tuple[int | None, Row]]:
  """(line, record) for each good record of a JSONL (or JSON array) file."""
  path = pathlib.Path(path)
  ds = _quiet_datasets()
  try:
    table = _rows(ds.load_dataset("json", data_files=str(path), split="train"))
  except Exception as e:  # noqa: BLE001 - any reader failure means: find the bad lines.
    log.info("datasets could not read %s (%s); scanning it line by line", path, e)
    yield from _scan_jsonl(path, report, required)
    return
  for i, row in enumerate(table):
    line = row_line(path, i)
    if _check_fields(row, required, path, line, report):
      yield line, row


def _scan_jsonl(
  path: pathlib.Path, report: LoadReport, required: Sequence[str]
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
    if _check_fields(row, required, path, line, report):
      yield line, row


def read_json_object(path: pathlib.Path) -> dict:
  """A whole-file JSON object keyed by id (PubMedQA's layout, which `datasets` reads as one
  row with a column per id, so the stdlib reads it)."""
  try:
    return json.loads(pathlib.Path(path).read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: cannot read JSON: {e}") from e


def read_tsv_rows(
  path: pathlib.Path, report: LoadReport, required: Sequence[str] = ()
) -> Iterator[tuple[int | None, Row]]:
  """(line, row) for each good row of a tab-separated file with a header (.gz allowed).

  All cells are strings; empty cells stay "" (no NaN guessing, so a gene called NA survives).
  """
  path = pathlib.Path(path)
  ds = _quiet_datasets()
  try:
    table = ds.load_dataset(
      "csv",
      data_files=str(path),
      sep="\t",
      na_filter=False,
      keep_default_na=False,
      split="train",
    )
    table = _rows(table)
  except Exception as e:  # noqa: BLE001
    log.info("datasets could not read %s (%s); scanning it line by line", path, e)
    yield from _scan_tsv(path, report, required)
    return
  for i, row in enumerate(table):
    row = {k: "" if v is None else str(v) for k, v in row.items()}
    line = row_line(path, i, header=1)
    if _check_fields(row, required, path, line, report):
      yield line, row


def _scan_tsv(
  path: pathlib.Path, report: LoadReport, required: Sequence[str]
) -> Iterator[tuple[int, Row]]:
  header: list[str] | None = None
  for line, text in _decode_lines(path, report):
    if text is None or not text.strip():
      continue
    cells = next(csv.reader(io.StringIO(text), delimiter="\t"))
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
  return iter(table.data.column("text").to_pylist())


def read_xml(path: pathlib.Path, report: LoadReport) -> ET.Element | None:
  """The root element, or None (reported with its line) when the file is not well-formed."""
  try:
    return ET.parse(path).getroot()
  except ET.ParseError as e:
    line = e.position[0] if e.position else None
    report.skip(str(path), line, f"malformed XML: {e}")
    return None
