"""The one record type of the data layer, and the bookkeeping for bad input.

Every converter yields `Example(skill, context, query, answer, source, id)`; nothing
downstream knows which dataset a row came from except through `source` and `id`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import unicodedata

from mdkif_jax.data.skills import SKILLS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Example:
  """One instruction example. `context` may be empty; `answer` never is."""

  skill: str
  context: str
  query: str
  answer: str
  source: str  # Registry name of the converter ("pubmedqa", "demo", ...).
  id: str  # Stable id within the source; the hash split and reports use it.

  def to_dict(self) -> dict[str, str]:
    return dataclasses.asdict(self)


def normalize(text: str) -> str:
  """NFKC, lower case, single spaces: two texts that differ only in layout compare equal."""
  return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def content_key(ex: Example) -> str:
  """Hash of the model-visible input (context + query), skill-independent.

  Train/eval disjointness is checked on this key, so the same question cannot be trained
  under one skill's wording and scored under another's.
  """
  raw = normalize(ex.context) + "\x1f" + normalize(ex.query)
  return hashlib.sha1(raw.encode("utf-8")).hexdigest()


def example_key(ex: Example) -> str:
  """Hash of the whole normalised example (skill, input and answer): exact duplicates."""
  raw = "\x1f".join((ex.skill, normalize(ex.context), normalize(ex.query), normalize(ex.answer)))
  return hashlib.sha1(raw.encode("utf-8")).hexdigest()


class DataError(ValueError):
  """A bad record in strict mode, or input that cannot be read at all."""


@dataclasses.dataclass
class LoadReport:
  """Counts of what loading kept and dropped, per file, for the stats tool and the logs.

  `skip` logs `file:line: reason`; in strict mode it raises instead, on the first bad record.
  """

  strict: bool = False
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  notes: list[str] = dataclasses.field(default_factory=list)
  max_messages: int = 20  # Per file; the counts stay exact beyond it.

  def skip(self, path: str, line: int | None, reason: str) -> None:
    if len(reason) > 300:  # A reason quoting a 1 MB field would be a 1 MB log line.
      reason = reason[:300] + "..."
    where = f"{path}:{line}" if line is not None else str(path)
    msg = f"{where}: {reason}"
    if self.strict:
      raise DataError(msg + " (strict mode: set data.strict=False to skip bad records)")
    self.skipped[str(path)] += 1
    self.reasons[reason.split(":")[0]] += 1  # Messages read "kind: detail".
    if self.skipped[str(path)] <= self.max_messages:
      log.warning("skipping %s", msg)

  def note(self, msg: str) -> None:
    self.notes.append(msg)
    log.info("%s", msg)


def check_example(ex: Example, report: LoadReport, path: str, line: int | None) -> bool:
  """Reject examples no template can train on: unknown skill, empty query or answer."""
  if ex.skill not in SKILLS:
    report.skip(path, line, f"unknown skill: {ex.skill!r} (known skills are {', '.join(SKILLS)})")
    return False
  if not ex.answer.strip():
    report.skip(path, line, "empty answer")
    return False
  if not ex.query.strip():
    report.skip(path, line, "empty query")
    return False
  return True
