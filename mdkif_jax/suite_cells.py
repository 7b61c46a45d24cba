"""An evaluation workdir's cells (`cells/<task>/<cell>.json`): written atomically, read back,
and what a rerun, a reuse of another evaluation's skill-free cells (--config.reuse_cells_from)
or a restore from an archive (--config.restore_cells_from, cells_archive.py) must match: the
config fields a cell depends on (cells_identity.json), the rows' prompting (prompting.json)
and the skills (skills.json)."""

from __future__ import annotations

import json
import pathlib

import jax

from mdkif_jax import cells_archive, checkpoint, reporting
from mdkif_jax.errors import ConfigError


def write_json(path: pathlib.Path, obj) -> None:
  """Atomically (reporting.write_lines): a killed run leaves the old file or the new one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  reporting.write_lines(path, [json.dumps(obj, ensure_ascii=False)])


def read_cells(workdir: pathlib.Path, specs, cells) -> dict[tuple[str, str], dict]:
  """Every finished cell, read once: {(task, cell): its JSON}."""
  return {
    (spec.name, cell): json.loads((workdir / "cells" / spec.name / f"{cell}.json").read_text())
    for spec in specs
    for cell, _, _ in cells
  }


# Fields that only choose which cells exist or how they are assembled: a rerun may change them
# (add a task or a method, more bootstrap resamples) and keep the finished cells.
NOT_IN_CELLS = (
  "stage",
  "tasks",
  "methods",
  "progress",
  "bootstrap",
  "reuse_cells_from",
  "restore_cells_from",
)
# What may differ between a run and the evaluation it copies skill-free cells from.
REUSE_MAY_DIFFER = ("skills_from", "skills_step")


def cell_identity(config) -> dict:
  """Every config field a cell's numbers depend on, flattened to dotted keys."""
  flat = {}

  def walk(prefix: str, d: dict) -> None:
    for k, v in d.items():
      if isinstance(v, dict):
        walk(f"{prefix}{k}.", v)
      elif f"{prefix}{k}".split(".")[0] not in NOT_IN_CELLS:
        flat[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))

  walk("", config.copy_and_resolve_references().to_dict())
  return flat


def check_cells_identity(workdir: pathlib.Path, config) -> None:
  """Refuse to resume cells computed under another config (naming the fields); record it."""
  path, want = workdir / "cells_identity.json", cell_identity(config)
  if path.exists():
    detail = cells_archive.identity_diff(json.loads(path.read_text()), want)
    if detail:
      raise checkpoint.CheckpointMismatchError(
        f"{workdir}: its finished cells were computed under another config ({detail}); use "
        f"another --workdir, or delete {workdir / 'cells'} to start over"
      )
  elif jax.process_index() == 0:
    write_json(path, want)


def skill_free(cell: str) -> bool:
  """A cell whose numbers do not depend on the skills: the base, with or without examples."""
  return cell == "base" or (cell.startswith("base_k") and cell[6:].isdigit())


def reuse_source(config) -> pathlib.Path | None:
  """The evaluation --config.reuse_cells_from names, once its config is checked to equal this
  one but for REUSE_MAY_DIFFER (None when not set)."""
  if not config.get("reuse_cells_from"):
    return None
  src = pathlib.Path(config.reuse_cells_from)
  path = src / "cells_identity.json"
  if not path.exists():
    raise ConfigError(f"--config.reuse_cells_from={str(src)!r}: no evaluation ({path} missing)")
  detail = cells_archive.identity_diff(
    json.loads(path.read_text()), cell_identity(config), REUSE_MAY_DIFFER
  )
  if detail:
    raise checkpoint.CheckpointMismatchError(
      f"--config.reuse_cells_from={str(src)!r}: its cells were computed under another config "
      f"({detail}); only {' and '.join(REUSE_MAY_DIFFER)} may differ"
    )
  return src


def prompting_of(run_config) -> dict:
  """prompting.json's content: the template and max_len the rows are built with."""
  prompting = {"template": run_config.data.template.to_dict(), "max_len": run_config.data.max_len}
  return json.loads(json.dumps(prompting))


def record_prompting(workdir: pathlib.Path, run_config, src: pathlib.Path | None) -> None:
  """prompting.json: the template and max_len this workdir's rows are built with (stage 1's,
  read from the skills' checkpoint), written by its first run and checked by every later one
  (the config alone does not pin it); with a reuse source, refuse one that prompted otherwise
  (another stage-1 template makes other base prompts)."""
  ours = prompting_of(run_config)
  path = workdir / "prompting.json"
  if path.exists():
    if detail := cells_archive.identity_diff(json.loads(path.read_text()), ours):
      raise checkpoint.CheckpointMismatchError(
        f"{workdir}: its cells were prompted otherwise ({detail}; stage 1's template or max_len "
        "changed); use another --workdir"
      )
  elif jax.process_index() == 0:
    write_json(path, ours)
  if src is None:
    return
  theirs = src / "prompting.json"
  if not theirs.exists():
    raise ConfigError(
      f"--config.reuse_cells_from={str(src)!r}: {theirs} is missing (an evaluation from before "
      "prompting.json: rerun it once, its finished cells are kept, or drop reuse_cells_from)"
    )
  if detail := cells_archive.identity_diff(json.loads(theirs.read_text()), ours):
    raise checkpoint.CheckpointMismatchError(
      f"--config.reuse_cells_from={str(src)!r}: its rows were prompted otherwise ({detail}); "
      "its base cells are not this run's: drop reuse_cells_from"
    )


def record_skills(workdir: pathlib.Path, fingerprint: dict) -> None:
  """skills.json: the fingerprint of the skills this workdir's cells were computed with,
  written by its first run and checked by every later one (skills_from names a directory;
  a stage 1 retrained there to other weights would otherwise mix into the finished cells)."""
  path = workdir / "skills.json"
  if path.exists():
    saved = json.loads(path.read_text())
    if saved != fingerprint:
      what = sorted(k for k in {*saved, *fingerprint} if saved.get(k) != fingerprint.get(k))
      raise checkpoint.CheckpointMismatchError(
        f"{workdir}: its cells were computed with other skills ({', '.join(what)} differ from "
        f"{path}: was stage 1 retrained?); use another --workdir, or delete {workdir / 'cells'} "
        f"and {path} to start over"
      )
  elif jax.process_index() == 0:
    write_json(path, fingerprint)


def restore_source(config, run_config, fingerprint: dict) -> pathlib.Path | None:
  """The archive --config.restore_cells_from names, once its identity, prompting (run_config:
  the config with stage 1's prompting) and skills are checked to equal this run's (None when
  not set)."""
  if not config.get("restore_cells_from"):
    return None
  src = pathlib.Path(config.restore_cells_from)
  ours = {
    "cells_identity.json": cell_identity(config),
    "prompting.json": prompting_of(run_config),
    "skills.json": fingerprint,
  }
  cells_archive.check_source(src, ours)
  return src


def copy_cell(src: pathlib.Path, spec, cell: str, score_rows) -> dict | None:
  """A skill-free cell of the reuse source, checked to have scored exactly these rows with
  these answers (the data on disk may have changed since); None when it has no such cell."""
  path = src / "cells" / spec.name / f"{cell}.json"
  if not skill_free(cell) or not path.exists():
    return None
  theirs = json.loads(path.read_text())
  got = sorted((p["id"], p["answer"]) for p in theirs["predictions"])
  ours = cells_archive.rows_digest(score_rows)
  in_order = theirs.get("rows_digest", ours) == ours  # (cells from before it: the ids only)
  if not in_order or got != sorted((r.id, r.answer) for r in score_rows):
    raise checkpoint.CheckpointMismatchError(
      f"--config.reuse_cells_from: {path} scored other rows (or in another order) than this "
      f"run's {len(score_rows)} of task {spec.name!r} (the data changed?); drop reuse_cells_from"
    )
  return {"reused_from": str(src)} | theirs  # the first source of a chain of copies wins
