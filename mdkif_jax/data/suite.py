"""The evaluation suite's tasks: which rows each task has, which of them may be fitted on and
which are scored, and the metrics that score it.

A task is a registered name (`TASKS`: the paper's 9, every reserved source of the split
registry, and the unseen-task datasets) or a user's file (`name=path.jsonl`). Its rows are
split once, by a hash of the task name and the row's input, into a fit part (rows that may
fit a router or an adapter, or give in-context examples) and a scored part (never used for
fitting or selection); the split does not depend on the seed, the config or other tasks.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from mdkif_jax.data import splits, unseen
from mdkif_jax.data.example import Example, LoadReport, check_example, content_key
from mdkif_jax.data.sources.qa import format_options

UNSEEN_DATA, UNSEEN_TASK, CUSTOM = "unseen_data", "unseen_task", "custom"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One downstream task of the suite."""

  name: str
  track: str  # UNSEEN_DATA (held-out part of a trained source), UNSEEN_TASK, CUSTOM
  source: str  # a split-registry source, an unseen-task dataset, or a file path (CUSTOM)
  metrics: tuple[str, ...]  # metrics.metric_on names; the first is the task's headline
  skill: str | None = None  # keep only this skill's rows (PubMedQA: the yes/no/maybe ones)


PAPER = (
  TaskSpec("pubmedqa", UNSEEN_DATA, "pubmedqa", ("accuracy", "macro_f1", "acc_norm"), "mrc"),
  TaskSpec("medmcqa", UNSEEN_DATA, "medmcqa", ("accuracy", "acc_norm")),
  TaskSpec("bc5cdr_disease", UNSEEN_DATA, "bc5cdr_disease", ("entity_micro_f1",)),
  TaskSpec("chemprot", UNSEEN_DATA, "chemprot", ("micro_f1", "accuracy", "macro_f1")),
  TaskSpec("meqsum", UNSEEN_DATA, "meqsum", ("rougeL", "rouge1", "rouge2")),
  TaskSpec("healthfc", UNSEEN_TASK, "healthfc", ("macro_f1", "accuracy")),
  TaskSpec("negex", UNSEEN_TASK, "negex", ("accuracy", "f1:negated")),
  TaskSpec("mts_dialog", UNSEEN_TASK, "mts_dialog", ("accuracy", "macro_f1")),
  TaskSpec("ddi", UNSEEN_TASK, "ddi", ("micro_f1_without:false", "accuracy")),
)
OTHERS = (
  TaskSpec("rqe", UNSEEN_DATA, "rqe", ("accuracy", "macro_f1")),
  TaskSpec("hoc", UNSEEN_DATA, "hoc", ("entity_micro_f1",)),
  TaskSpec("ncbi_disease", UNSEEN_DATA, "ncbi_disease", ("entity_micro_f1",)),
  TaskSpec("bc5cdr_chem", UNSEEN_DATA, "bc5cdr_chem", ("entity_micro_f1",)),
  TaskSpec("covid_dialogue", UNSEEN_DATA, "covid_dialogue", ("rougeL", "rouge1", "rouge2")),
  TaskSpec("mediqa_mas", UNSEEN_TASK, "mediqa_mas", ("rougeL", "rouge1", "rouge2")),
  TaskSpec("demo", UNSEEN_DATA, "demo", ("accuracy", "rougeL", "entity_micro_f1")),
)
TASKS = {t.name: t for t in PAPER + OTHERS}


class SuiteError(ValueError):
  """An unknown task name or an unreadable task file."""


def resolve(entry: str) -> TaskSpec:
  """A config entry: a registered task name, or `name=path.jsonl` (a user's file)."""
  name, sep, path = entry.partition("=")
  name = name.strip()
  if sep:
    return TaskSpec(name, CUSTOM, path.strip(), ("accuracy", "acc_norm", "rougeL"))
  if name not in TASKS:
    raise SuiteError(
      f"unknown task {name!r} in --config.tasks: use one of {', '.join(TASKS)}, or "
      "name=path.jsonl for a file of your own"
    )
  return TASKS[name]


def task_rows(spec: TaskSpec, data_cfg, report: LoadReport) -> list[Example]:
  """Every row of a task, in a stable order (unseen-task datasets and files: as read)."""
  if spec.track == CUSTOM:
    return read_task_file(pathlib.Path(spec.source), report)
  if spec.source in unseen.UNSEEN:
    return unseen.load_unseen(spec.source, data_cfg.data_dir or ".", report)
  rows = splits.load_examples(data_cfg, "eval", report)
  return [r for r in rows if r.source == spec.source and spec.skill in (None, r.skill)]


def split_rows(
  spec: TaskSpec, rows: list[Example], fit_fraction: float, max_fit: int = 0, max_scored: int = 0
) -> tuple[list[Example], list[Example]]:
  """(fit rows, scored rows), by a hash of (task, the row's model-visible input): a row's part
  never changes, and rows with the same input (ChemProt repeats sentences under several ids)
  always share a part, so no scored input is ever fitted on."""
  fit, scored = [], []
  for ex in rows:
    part = fit if splits.hash_unit("suite/" + spec.name, content_key(ex)) < fit_fraction else scored
    part.append(ex)
  return fit[: max_fit or None], scored[: max_scored or None]


# ---- a user's task file ------------------------------------------------------------------------
def _from_record(rec: dict) -> Example:
  """One JSONL record in any of the three layouts (raises KeyError / TypeError / ValueError)."""
  if "skill" in rec:  # our Example layout
    return Example(
      str(rec["skill"]),
      str(rec.get("context") or ""),
      str(rec["query"]),
      str(rec["answer"]),
      "custom",
      str(rec.get("id", "")),
    )
  if "options" in rec:  # MedQA: question, options {"A": ...}, answer_idx
    options = {str(k): str(v) for k, v in dict(rec["options"]).items() if v is not None}
    answer = str(rec["answer_idx"])
    if answer not in options:
      raise ValueError(f"answer_idx {answer!r} is not an option")
    return Example("mcqa", "", format_options(str(rec["question"]), options), answer, "custom", "")
  if "opa" in rec:  # MedMCQA: question, opa..opd, cop (1-4 or 0-3)
    letters = "ABCD"
    options = {k: str(rec[f"op{k.lower()}"]) for k in letters}
    cop = int(rec["cop"])
    index = cop - 1 if 1 <= cop <= 4 else cop
    if not 0 <= index < 4:
      raise ValueError(f"cop {rec['cop']!r} is not an option")
    query = format_options(str(rec["question"]), options)
    return Example("mcqa", "", query, letters[index], "custom", "")
  raise KeyError(
    "none of the layouts: want skill/query/answer, question/options/answer_idx or "
    "question/opa..opd/cop"
  )


def read_task_file(path: pathlib.Path, report: LoadReport) -> list[Example]:
  """A user's task: JSONL in our Example layout, the MedQA layout or the MedMCQA layout (one
  record per line, layouts may mix). A bad line is counted with file:line and skipped."""
  if not path.is_file():
    raise SuiteError(f"task file {path} does not exist")
  out = []
  raw = path.read_bytes().split(b"\n")
  for line, data in enumerate(raw, 1):
    if not data.strip():
      continue
    try:
      rec = json.loads(data.decode("utf-8"))
      if not isinstance(rec, dict):
        raise TypeError(f"a JSON {type(rec).__name__}, want an object")
      ex = _from_record(rec)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      report.skip(str(path), line, f"bad record: {type(e).__name__}: {e}")
      continue
    ex = dataclasses.replace(ex, id=ex.id or f"{path.name}:{line}")
    if check_example(ex, report, str(path), line):
      report.kept[str(path)] += 1
      out.append(ex)
  return out
