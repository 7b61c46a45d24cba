"""Datasets named in the config (`data.hub_datasets`): a Hugging Face hub name, or a local
dataset folder, loaded with `datasets.load_dataset(name_or_path, config, split=split)` and
mapped field by field onto (skill, context, query, answer[, id]).

An entry is a string `"name_or_path[:config]|split|skill|context|query|answer[|id]"` (the
last five are column names; an empty `context` means none) or a mapping with the keys
`path, split, skill, context, query, answer` and optional `id`, `config`. A local folder is
read exactly as a hub repository without a loading script (e.g. `data/train-*.jsonl`,
`*.parquet`, `*.csv`); a relative path is looked up under `data.data_dir` first.

Split roles (source "hub" in `splits.SPLITS`): the split "train" trains, "test" is reserved
for evaluation, any other split (validation, a slice like "train[:1000]", "train+test") is
split by id hash. Each row is checked like every other record: a missing or empty query or
answer is reported as `name[split]:row` (0-based row index) and skipped, or aborts in strict
mode. A column the dataset does not have is a config error and always raises.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator

from mdkif_jax.data.example import DataError, Example, LoadReport, check_example, content_key
from mdkif_jax.data.skills import SKILLS, format_list
from mdkif_jax.data.sources._io import _check_fields, _quiet_datasets

SOURCE = "hub"  # The registry name of every configured dataset (its rules in SPLITS).
_KEYS = ("path", "split", "skill", "context", "query", "answer", "id", "config")


@dataclasses.dataclass(frozen=True)
class HubSpec:
  """One `data.hub_datasets` entry."""

  path: str  # Hub name ("org/name") or a local dataset folder.
  split: str  # Passed to load_dataset as is ("train", "test", "train[:1000]", ...).
  skill: str  # Every row of this entry trains this skill.
  context: str  # Column of the context, or "" for none.
  query: str  # Column of the query.
  answer: str  # Column of the answer.
  id: str = ""  # Column of a stable row id; "" = "<split>/<row index>" (and the hash split
  # groups rows by content instead).
  config: str | None = None  # The dataset's config (subset) name, if it has several.

  @property
  def label(self) -> str:
    """`name[split]`, the place named in messages."""
    name = f"{self.path}:{self.config}" if self.config else self.path
    return f"{name}[{self.split}]"

  @property
  def part(self) -> str:
    """The `SPLITS` part: "train" trains, "eval" is reserved, "all" is hash-split."""
    return {"train": "train", "test": "eval"}.get(self.split.strip(), "all")


def parse_spec(entry) -> HubSpec:
  """A `HubSpec` from a config entry (string or mapping); config errors raise `DataError`."""
  if isinstance(entry, str):
    fields = [f.strip() for f in entry.split("|")]
    if len(fields) not in (6, 7):
      raise DataError(
        f"data.hub_datasets entry {entry!r}: expected 6 or 7 '|'-separated fields "
        f"name_or_path[:config]|split|skill|context|query|answer[|id], got {len(fields)}"
      )
    path, config = fields[0], None
    if ":" in path:
      path, config = path.rsplit(":", 1)
    spec = HubSpec(path, *fields[1:], config=config or None)
  else:
    entry = dict(entry)
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
      raise DataError(f"data.hub_datasets entry {entry}: unknown keys {unknown}")
    try:
      spec = HubSpec(**{k: v if v is not None or k == "config" else "" for k, v in entry.items()})
    except TypeError as e:
      raise DataError(f"data.hub_datasets entry {entry}: {e}") from e
  where = f"data.hub_datasets entry {spec.label}"
  for key in ("path", "split", "query", "answer"):
    if not str(getattr(spec, key)).strip():
      raise DataError(f"{where}: the {key!r} field is empty")
  if spec.skill not in SKILLS:
    raise DataError(f"{where}: unknown skill {spec.skill!r} (known skills: {', '.join(SKILLS)})")
  return spec


def parse_specs(entries) -> tuple[HubSpec, ...]:
  if isinstance(entries, str):  # One entry given on its own.
    entries = (entries,)
  return tuple(parse_spec(e) for e in entries or ())


def _offline() -> bool:
  flags = (os.environ.get(k, "").strip().lower() for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
  return any(f in ("1", "on", "yes", "true") for f in flags)


def _load(spec: HubSpec, root: pathlib.Path | None):
  ds = _quiet_datasets()
  target = spec.path
  local = pathlib.Path(target).expanduser()
  if root is not None and not local.is_absolute() and (root / local).exists():
    local = root / local
  if local.exists():
    target = str(local)
  elif target.startswith((".", "/", "~")):
    raise DataError(f"hub dataset {spec.label}: {local} does not exist")
  try:
    return ds.load_dataset(target, spec.config, split=spec.split)
  except Exception as e:  # noqa: BLE001 - the reader's own message goes into ours.
    msg = f"hub dataset {spec.label}: cannot load it ({type(e).__name__}: {e})"
    if local.exists():
      msg += "; check the folder's layout and the split name"
    elif _offline():
      msg += (
        "; HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set, so a hub dataset loads only from the "
        "cache: run once with network access to cache it, or give a local dataset folder"
      )
    else:
      msg += (
        "; check the name, config and split, and that this machine has network access to "
        "the hub (or give a local dataset folder)"
      )
    raise DataError(msg) from e


def _converter(feature):
  """value -> text for one column: class labels by name, lists one item per line."""
  import datasets

  inner = getattr(feature, "feature", None)  # Sequence / List of something.
  if isinstance(feature, datasets.ClassLabel):
    return lambda v: None if v is None else feature.int2str(int(v))
  if isinstance(feature, list) or inner is not None:
    item = _converter(inner if inner is not None else feature[0])
    return lambda v: None if v is None else format_list([str(item(x)) for x in v])
  if isinstance(feature, dict):
    return lambda v: None if v is None else json.dumps(v, ensure_ascii=False)
  return lambda v: v if v is None or isinstance(v, str) else str(v)


def convert(spec: HubSpec, root: pathlib.Path | None, report: LoadReport) -> Iterator:
  """(part, group, Example) for every good row of one configured dataset."""
  table = _load(spec, root)
  columns = {"query": spec.query, "answer": spec.answer}
  columns.update({k: getattr(spec, k) for k in ("context", "id") if getattr(spec, k)})
  for role, col in columns.items():
    if col not in table.column_names:
      raise DataError(
        f"hub dataset {spec.label}: no column {col!r} (the {role} field); "
        f"its columns are {', '.join(table.column_names)}"
      )
  names = list(dict.fromkeys(columns.values()))
  table = table.select_columns(names)
  text = {c: _converter(table.features[c]) for c in names}
  data = table[:]  # Column -> values, in one read (respects slices and index mappings).
  source = f"{SOURCE}:{spec.label.rsplit('[', 1)[0]}"
  for row in range(table.num_rows):
    raw = {col: text[col](data[col][row]) for col in names}
    if not _check_fields(raw, (spec.query, spec.answer), spec.label, row, report):
      continue
    rid = f"{spec.split}/{row}" if not spec.id or raw[spec.id] in (None, "") else str(raw[spec.id])
    ex = Example(
      skill=spec.skill,
      context=(raw[spec.context] or "") if spec.context else "",
      query=raw[spec.query],
      answer=raw[spec.answer],
      source=source,
      id=rid,
    )
    if check_example(ex, report, spec.label, row):
      # The hash-split group: the id, else the content (so row order never moves a row).
      yield spec.part, f"{source}/{rid if spec.id else content_key(ex)}", ex
