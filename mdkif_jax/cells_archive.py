"""An evaluation's finished cells without the data's text: what is published beside a results
table, and what a new workdir restores instead of recomputing.

A cell (evaluate_suite.run_cell) keeps each scored row's reference answer, and each generated
row's text, which may copy the data (a NER list is spans of the input, a summary can repeat
the question, majority answers with a fit row's answer). The project never copies the shared
datasets, and some of their licences forbid redistributing modified copies (HealthFC: CC
BY-NC-ND). So the evaluation also writes, per row, a digest of its answer keyed with the row's
own input (`row_digest`: with a label task's few answers an unkeyed digest would give the label
away to anyone who hashes each label), and an archived cell keeps only those: no reference
answer and no generated text (a restored cell's generated predictions are null; nothing the
tables read needs them: the ROUGE and list scores are per-row numbers in the outcomes). The
chosen labels stay: they are the task's label names, not the data. `rejoin` puts the answers
back from the user's own copy of the data and refuses a row whose digest, or whose place in
the scored rows, differs. The archive carries the evaluation's cells_identity.json,
prompting.json and skills.json; evaluate_suite restores from it (--config.restore_cells_from)
only when they equal the run's.

  python -m mdkif_jax.cells_archive runs/paper/eval docs/results/paper/eval

copies every finished cell of the workdir (stripped) into DEST/cells/, beside the three
identity files; cells already there are replaced, none is deleted, and a DEST holding another
evaluation's cells is refused.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pathlib
import shutil
import sys

from mdkif_jax import reporting
from mdkif_jax.errors import CheckpointMismatchError, ConfigError

# What a restore checks against the run, each written by the evaluation into its workdir.
IDENTITY_FILES = ("cells_identity.json", "prompting.json", "skills.json")
# Identity fields that name where things are, not what they are: a checkout with the data or
# the stage-1 run elsewhere restores the same cells (skills.json and the row digests check
# what they hold).
MAY_DIFFER = ("skills_from", "data.data_dir")


def _sha(*parts: str) -> str:
  return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]


def row_digest(row, text: str) -> str:
  """`text` (the row's answer) keyed with the row's id and input: tells answers apart without
  holding them, and cannot be reversed without the row itself."""
  return _sha(row.id, row.context, row.query, text)


def rows_digest(rows) -> str:
  """The scored rows' ids in order: a restored cell's row i is this run's row i."""
  return _sha("\n".join(r.id for r in rows))


def with_digests(cell: dict, rows) -> dict:
  """The cell as the evaluation writes it: the scored rows' order, and beside every reference
  answer its row digest (what an archived cell keeps instead)."""
  out = dict(cell, rows_digest=rows_digest(rows))
  o = out["outcomes"] = dict(cell["outcomes"])
  o["gold_digest"] = [row_digest(r, g) if g else "" for r, g in zip(rows, o["gold"], strict=True)]
  by_id = {r.id: r for r in rows}
  out["predictions"] = [
    p | {"answer_digest": row_digest(by_id[p["id"]], p["answer"])} for p in cell["predictions"]
  ]
  return out


def strip(cell: dict, where: str) -> dict:
  """The cell without the data's text: no reference answer, no generated text."""
  if "rows_digest" not in cell or "gold_digest" not in cell["outcomes"]:
    raise ConfigError(
      f"{where}: a cell written before row digests; delete it and rerun the evaluation (it "
      "recomputes only the missing cells)"
    )
  out = copy.deepcopy(cell)
  # where a workdir restored it from is the workdir's business: a restored cell archived again
  # must give the archive's own bytes back
  out.pop("restored_from", None)
  del out["outcomes"]["gold"]
  for p in out["predictions"]:
    del p["answer"]
    if p["kind"] == "generated":
      p["prediction"] = None
  return out


def rejoin(archived: dict, rows, where: str) -> dict:
  """The archived cell with the answers of `rows` (this run's scored rows, in order) put
  back; CheckpointMismatchError naming `where` if they are not the rows it scored."""
  out = copy.deepcopy(archived)
  o = out["outcomes"]
  want = o["gold_digest"]
  if len(want) != len(rows) or out.get("rows_digest") != rows_digest(rows):
    raise CheckpointMismatchError(
      f"{where}: scored other rows, or in another order, than this run's {len(rows)} (the data "
      "or the split changed?); move the archive away to compute the cells"
    )
  gold = []
  for i, (row, d) in enumerate(zip(rows, want, strict=True)):
    if d and row_digest(row, row.answer) != d:
      raise CheckpointMismatchError(
        f"{where}: row {i} ({row.id}) has another answer in this copy of the data; move the "
        "archive away to compute the cells"
      )
    gold.append(row.answer if d else "")
  o["gold"] = gold
  by_id = {r.id: r for r in rows}
  for p in out["predictions"]:
    row = by_id.get(p["id"])
    if row is None or row_digest(row, row.answer) != p["answer_digest"]:
      raise CheckpointMismatchError(
        f"{where}: its prediction for row {p['id']} does not match this run's rows; move the "
        "archive away to compute the cells"
      )
    p["answer"] = row.answer
  return out


def identity_diff(saved, want, ignore=(), values=True) -> str:
  """ "" when two JSON values are equal but for `ignore`d keys, else what differs: each key with
  both values, or (values=False: identity files whose values are long) at most 4 keys' names."""
  if not (isinstance(saved, dict) and isinstance(want, dict)):
    return "" if saved == want else "content"
  changed = sorted(k for k in {*saved, *want} if k not in ignore and saved.get(k) != want.get(k))
  if not values:
    return ", ".join(changed[:4])
  return "; ".join(
    f"{k}: cells have {json.dumps(saved.get(k))}, this run {json.dumps(want.get(k))}"
    for k in changed
  )


def check_source(src: pathlib.Path, ours: dict[str, dict]) -> None:
  """Refuse an archive whose identity files differ from this run's (`ours`: file name ->
  its content, from memory: in a multi-process run only process 0 writes the workdir's)."""
  if not (src / "cells").is_dir():
    raise ConfigError(f"--config.restore_cells_from={str(src)!r}: no archived cells ({src}/cells)")
  for name in IDENTITY_FILES:
    if not (src / name).exists():
      raise ConfigError(f"--config.restore_cells_from={str(src)!r}: {src / name} is missing")
    if keys := identity_diff(
      json.loads((src / name).read_text()), ours[name], MAY_DIFFER, values=False
    ):
      raise CheckpointMismatchError(
        f"--config.restore_cells_from={str(src)!r}: its {name} differs from this run's "
        f"({keys}): its cells are not this evaluation's; move {src} away (launch/"
        "paper_experiment.sh restores from $PUBLISH/NAME whenever it holds cells)"
      )


def restore(src: pathlib.Path, task: str, cell: str, rows) -> dict | None:
  """The archived cell with this run's answers, or None when the archive has none."""
  path = src / "cells" / task / f"{cell}.json"
  if not path.exists():
    return None
  return {"restored_from": str(src)} | rejoin(json.loads(path.read_text()), rows, str(path))


def archive(workdir: pathlib.Path, dest: pathlib.Path) -> int:
  """Every finished cell of `workdir`, stripped, into `dest/cells`; the number archived."""
  if not (workdir / "cells").is_dir():
    raise ConfigError(f"{workdir}: no evaluation cells to archive ({workdir}/cells is missing)")
  for name in IDENTITY_FILES:
    if not (workdir / name).exists():
      raise ConfigError(
        f"{workdir}: {workdir / name} is missing (an evaluation from before it: rerun the "
        "evaluation once with this code; its finished cells are kept)"
      )
    ours = json.loads((workdir / name).read_text())
    if (dest / name).exists() and (
      # the paths may differ, as on restore: the archive of a run made elsewhere goes on
      keys := identity_diff(json.loads((dest / name).read_text()), ours, MAY_DIFFER, values=False)
    ):
      raise CheckpointMismatchError(
        f"{dest} holds the cells of another evaluation (its {name} differs from {workdir}'s: "
        f"{keys}): archive into another directory, or move {dest} away"
      )
  cells = sorted((workdir / "cells").glob("*/*.json"))
  stripped = [(p, strip(json.loads(p.read_text()), str(p))) for p in cells]  # all, or none
  dest.mkdir(parents=True, exist_ok=True)
  for name in IDENTITY_FILES:
    shutil.copyfile(workdir / name, dest / name)
  for path, cell in stripped:
    out = dest / "cells" / path.parent.name / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    # sorted keys and one line: a re-archived cell that did not change gives the same bytes
    reporting.write_lines(out, [json.dumps(cell, ensure_ascii=False, sort_keys=True)])
  return len(stripped)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
    prog="python -m mdkif_jax.cells_archive", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("workdir", type=pathlib.Path, help="an evaluation's --workdir")
  p.add_argument("dest", type=pathlib.Path, help="the archive (cells/ and identity files)")
  args = p.parse_args(argv)
  try:
    n = archive(args.workdir, args.dest)
  except (ConfigError, CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(f"archived {n} cells of {args.workdir} in {args.dest / 'cells'} (without the data's text)")


if __name__ == "__main__":
  main()
