"""An evaluation's finished cells without the data's answers: what is published beside a
results table, and what a new workdir restores instead of recomputing.

A cell (evaluate_suite.run_cell) keeps each scored row's reference answer beside the method's
prediction, and a prediction may itself be a data answer (majority answers every row with
a fit row's; the evaluation marks such predictions `copies_answer`). The project never copies
the shared datasets, and some of their licences forbid redistributing modified copies
(HealthFC: CC BY-NC-ND), so an archived cell keeps a digest of each of these instead; `rejoin`
puts them back from the user's own copy of the data and refuses a row whose answer, or whose
place in the scored rows, differs. The archive carries the
evaluation's cells_identity.json, prompting.json and skills.json; evaluate_suite restores from
it (--config.restore_cells_from) only when all three equal the run's.

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


def digest(text: str) -> str:
  """A short digest that tells answers apart without holding them."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def rows_digest(rows) -> str:
  """The scored rows' ids in order: a restored cell's row i is this run's row i."""
  return digest("\n".join(r.id for r in rows))


def strip(cell: dict) -> dict:
  """The cell with every reference answer, and every prediction that copies one, replaced by
  its digest ("" stays "": a generated row's gold in the outcomes is empty)."""
  out = copy.deepcopy(cell)
  o = out["outcomes"]
  o["gold_digest"] = [digest(g) if g else "" for g in o.pop("gold")]
  for p in out["predictions"]:
    p["answer_digest"] = digest(p.pop("answer"))
    if p.get("copies_answer"):
      p["prediction_digest"] = digest(p.pop("prediction"))
  return out


def rejoin(archived: dict, rows, where: str, fit_rows=()) -> dict:
  """The archived cell with the answers of `rows` (this run's scored rows, in order) put
  back, and the predictions that copy an answer of `rows` or `fit_rows`; CheckpointMismatchError
  naming `where` if they are not the rows it scored."""
  out = copy.deepcopy(archived)
  o = out["outcomes"]
  want = o.pop("gold_digest")
  if len(want) != len(rows) or out.get("rows_digest", rows_digest(rows)) != rows_digest(rows):
    raise CheckpointMismatchError(
      f"{where}: scored other rows than this run's {len(rows)} (the data or the split "
      "changed?); drop restore_cells_from"
    )
  gold = []
  for i, (row, d) in enumerate(zip(rows, want, strict=True)):
    if d and digest(row.answer) != d:
      raise CheckpointMismatchError(
        f"{where}: row {i} ({row.id}) has another answer in this copy of the data; drop "
        "restore_cells_from"
      )
    gold.append(row.answer if d else "")
  o["gold"] = gold
  by_id = {r.id: r for r in rows}
  answers = {digest(r.answer): r.answer for r in (*fit_rows, *rows)}
  for p in out["predictions"]:
    row = by_id.get(p["id"])
    if row is None or digest(row.answer) != p["answer_digest"]:
      raise CheckpointMismatchError(
        f"{where}: its prediction for row {p['id']} does not match this run's rows; drop "
        "restore_cells_from"
      )
    del p["answer_digest"]
    p["answer"] = row.answer
    if "prediction_digest" in p:
      copied = answers.get(p.pop("prediction_digest"))
      if copied is None:
        raise CheckpointMismatchError(
          f"{where}: its prediction for row {p['id']} copies an answer this copy of the data "
          "does not have; drop restore_cells_from"
        )
      p["prediction"] = copied
  return out


def _differing(a: pathlib.Path, b: pathlib.Path) -> str:
  """ "" when the two JSON files are equal, else the keys that differ (at most 4)."""
  x, y = json.loads(a.read_text()), json.loads(b.read_text())
  if x == y:
    return ""
  if not (isinstance(x, dict) and isinstance(y, dict)):
    return "content"
  return ", ".join(sorted(k for k in {*x, *y} if x.get(k) != y.get(k))[:4])


def check_source(src: pathlib.Path, workdir: pathlib.Path) -> None:
  """Refuse an archive whose identity files differ from the workdir's, naming the first."""
  if not (src / "cells").is_dir():
    raise ConfigError(f"--config.restore_cells_from={str(src)!r}: no archived cells ({src}/cells)")
  for name in IDENTITY_FILES:
    if not (src / name).exists():
      raise ConfigError(f"--config.restore_cells_from={str(src)!r}: {src / name} is missing")
    if keys := _differing(src / name, workdir / name):
      raise CheckpointMismatchError(
        f"--config.restore_cells_from={str(src)!r}: its {name} differs from this run's "
        f"({keys}): its cells are not this evaluation's"
      )


def restore(src: pathlib.Path, task: str, cell: str, rows, fit_rows) -> dict | None:
  """The archived cell with this run's answers, or None when the archive has none."""
  path = src / "cells" / task / f"{cell}.json"
  if not path.exists():
    return None
  cell = rejoin(json.loads(path.read_text()), rows, str(path), fit_rows)
  return {"restored_from": str(src)} | cell


def archive(workdir: pathlib.Path, dest: pathlib.Path) -> int:
  """Every finished cell of `workdir`, stripped, into `dest/cells`; the number archived."""
  if not (workdir / "cells").is_dir():
    raise ConfigError(f"{workdir}: no evaluation cells to archive ({workdir}/cells is missing)")
  for name in IDENTITY_FILES:
    if not (workdir / name).exists():
      raise ConfigError(f"{workdir}: {workdir / name} is missing (an evaluation from before it)")
    if (dest / name).exists() and (keys := _differing(dest / name, workdir / name)):
      raise CheckpointMismatchError(
        f"{dest} holds the cells of another evaluation (its {name} differs from {workdir}'s: "
        f"{keys}): archive into another directory"
      )
  dest.mkdir(parents=True, exist_ok=True)
  for name in IDENTITY_FILES:
    shutil.copyfile(workdir / name, dest / name)
  n = 0
  for path in sorted((workdir / "cells").glob("*/*.json")):
    cell = json.loads(path.read_text())
    out = dest / "cells" / path.parent.name / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    # sorted keys and one line: a re-archived cell that did not change gives the same bytes
    reporting.write_lines(out, [json.dumps(strip(cell), ensure_ascii=False, sort_keys=True)])
    n += 1
  return n


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
  print(f"archived {n} cells of {args.workdir} in {args.dest / 'cells'} (answers as digests)")


if __name__ == "__main__":
  main()
