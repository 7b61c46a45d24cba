"""The registry of medical skills: one entry per skill, in skill-id order.

A skill's id is its index in `SKILLS`; stage 1 trains one adapter per id and the router of
stage 2 weights them in this order, so the order is part of every checkpoint: append new
skills at the end, never reorder. Adding a 13th skill is appending one `Skill` to `_REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

NONE_ANSWER = "none"  # How an empty list is written, so the model is never asked for "".
LIST_SEP = "\n"  # List answers put one item per line: entity names can hold ";" or ",".


def parse_text(answer: str) -> str:
  """Free text: whitespace-normalised."""
  return " ".join(answer.split())


def parse_label(answer: str) -> str:
  """One label: lower-cased first line, without trailing punctuation."""
  first = answer.strip().splitlines()[0] if answer.strip() else ""
  return first.strip().rstrip(".").lower()


def parse_option(answer: str) -> str:
  """An option letter A-J; '' when the answer starts with none."""
  m = re.match(r"\s*\(?([A-J])\b", answer)
  return m.group(1) if m else ""


def parse_list(answer: str) -> list[str]:
  """One item per line; `none` is the empty list. Duplicates dropped, order kept."""
  text = answer.strip()
  if text.lower() in ("", NONE_ANSWER):
    return []
  seen: dict[str, None] = {}
  for item in text.split(LIST_SEP):
    item = " ".join(item.split())
    if item:
      seen.setdefault(item, None)
  return list(seen)


def format_list(items: list[str]) -> str:
  """Inverse of `parse_list` (the writers use it so answers always parse back)."""
  return LIST_SEP.join(items) if items else NONE_ANSWER


@dataclasses.dataclass(frozen=True)
class Skill:
  """One skill: its key, the instruction the template shows, and how its answers look."""

  name: str  # Stable key used in configs and data files.
  title: str  # The paper's name.
  description: str
  instruction: str  # First line of every prompt of this skill.
  answer_format: str  # "text", "option", "label" or "list"; `parse` reads it back.
  parse: Callable[[str], object]


_PARSERS = {"text": parse_text, "option": parse_option, "label": parse_label, "list": parse_list}


def _skill(name: str, title: str, description: str, instruction: str, fmt: str) -> Skill:
  return Skill(name, title, description, instruction, fmt, _PARSERS[fmt])


_REGISTRY: tuple[Skill, ...] = (
  _skill(
    "qa",
    "Question Answering",
    "Answer a medical question from knowledge, in free text.",
    "Answer the medical question.",
    "text",
  ),
  _skill(
    "mcqa",
    "Multiple-Choice QA",
    "Pick the correct option of a medical multiple-choice question.",
    "Answer the multiple-choice question with the letter of the correct option.",
    "option",
  ),
  _skill(
    "mc",
    "Medical Conversation",
    "Reply as a doctor to a patient's message.",
    "You are a doctor. Reply to the patient.",
    "text",
  ),
  _skill(
    "mldc",
    "Multi-Label Document Classification",
    "Assign every applicable label of a closed set to a document.",
    "Classify the document. List every label that applies, one per line, or 'none'.",
    "list",
  ),
  _skill(
    "mrc",
    "Machine Reading Comprehension",
    "Answer a question about a given passage.",
    "Read the passage and answer the question about it.",
    "text",
  ),
  _skill(
    "nli",
    "Natural Language Inference",
    "Decide whether one text entails another.",
    "Decide whether the statement follows from the text. Answer yes or no.",
    "label",
  ),
  _skill(
    "ts",
    "Text Summarization",
    "Summarise a medical text briefly.",
    "Summarize the text.",
    "text",
  ),
  _skill(
    "ner",
    "Named Entity Recognition",
    "List the entity mentions of a given type in a text.",
    "List the requested entities exactly as written in the text, one per line, or 'none'.",
    "list",
  ),
  _skill(
    "re",
    "Relation Extraction",
    "Name the relation between two marked entities in a text.",
    "Name the relation between the marked entities, using one of the given labels.",
    "label",
  ),
  _skill(
    "ea",
    "Entity Attribute",
    "State an attribute of a medical entity (definition, type, location, ...).",
    "State the requested attribute of the medical entity.",
    "text",
  ),
  _skill(
    "es",
    "Entity Synonymy",
    "List other names of a medical entity.",
    "List other names for the medical term, one per line.",
    "list",
  ),
  _skill(
    "er",
    "Entity-Entity Relation",
    "Name how two medical entities are related, or which entities relate to one.",
    "Answer the question about how medical entities are related; put several one per line.",
    "list",
  ),
)

SKILLS: tuple[str, ...] = tuple(s.name for s in _REGISTRY)
SKILL_SPECS: dict[str, Skill] = {s.name: s for s in _REGISTRY}


def skill_id(name: str) -> int:
  """The index of a skill; a clear error for unknown names."""
  try:
    return SKILLS.index(name)
  except ValueError:
    raise KeyError(f"unknown skill {name!r}; known skills: {', '.join(SKILLS)}") from None


def get_skill(name: str) -> Skill:
  skill_id(name)  # Same error message for unknown names.
  return SKILL_SPECS[name]


def select_skills(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
  """Resolve a config's skill selection ("all" or names) in registry order."""
  if isinstance(names, str):
    names = SKILLS if names == "all" else tuple(n.strip() for n in names.split(",") if n.strip())
  for n in names:
    skill_id(n)
  return tuple(s for s in SKILLS if s in set(names))
