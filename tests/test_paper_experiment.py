"""launch/paper_experiment.sh runs docs/results.md's pieces in order with the right flags,
times each one, publishes only the small outputs and the archived cells, restores those in a
new checkout, and stops at the first failing piece."""

import os
import pathlib
import shutil
import subprocess
import threading
import time

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "launch" / "paper_experiment.sh"

# A stand-in python: logs its arguments, writes what an evaluation leaves in its workdir, and
# fails when the piece's workdir is named in $FAIL_ON.
STUB = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [[ -n ${NICE_LOG:-} ]]; then { nice; cat /proc/self/autogroup; } > "$NICE_LOG"; fi
if [[ $1 == -c ]]; then echo "3 t1 t2 t3"; exit 0; fi  # cells per task, the suite's tasks
for a in "$@"; do
  case $a in --workdir=*) w=${a#--workdir=} ;; esac
done
if [[ -n ${w:-} && -n ${FAIL_ON:-} && $w == *"$FAIL_ON" ]]; then echo boom >&2; exit 3; fi
if [[ -n ${w:-} && $* == *configs/eval.py* ]]; then
  mkdir -p "$w/cells"
  for f in results.{json,md,png} {cells_identity,prompting}.json; do echo "$f" > "$w/$f"; done
  echo big > "$w/cells/${w##*/}.json"
  [[ $w == *curve_75 ]] || echo png > "$w/router_weights.png"  # none: published without it
fi
if [[ $* == *"-m mdkif_jax.cells_archive"* ]]; then  # -m mdkif_jax.cells_archive WORKDIR DEST
  if [[ -n ${FAIL_ON:-} && $3 == *"$FAIL_ON" ]]; then echo refused >&2; exit 2; fi
  mkdir -p "$4/cells" && echo stripped > "$4/cells/cell.json"
  cp "$3"/{cells_identity,prompting}.json "$4/"  # as the real one does
fi
if [[ $* == *"-m mdkif_jax.curve"* || $* == *"-m mdkif_jax.compare"* ]]; then
  for a in "$@"; do last=$a; done
  echo png > "$last"
fi
"""


def _run(tmp_path, pieces=None, fail_on="", **more):
  stub = tmp_path / "python"
  stub.write_text(STUB)
  stub.chmod(0o755)
  env = {
    "PATH": "/usr/bin:/bin",
    "PYTHON": str(stub),
    "CALLS": str(tmp_path / "calls.txt"),
    "RUNS": str(tmp_path / "runs"),
    "PUBLISH": str(tmp_path / "pub"),
    "FAIL_ON": fail_on,
  }
  if pieces is not None:
    env["PIECES"] = pieces
  cmd = (["setsid"] if more.pop("SETSID", None) else []) + ["bash", str(SCRIPT)]
  # bounded: a script stuck waiting (WAIT) fails its test instead of hanging the worker
  proc = subprocess.run(cmd, env=env | more, capture_output=True, text=True, timeout=120)
  log = tmp_path / "calls.txt"
  calls = log.read_text().splitlines() if proc.returncode != 2 and log.exists() else []
  return proc, calls


def test_every_piece_in_order_with_its_flags(tmp_path):
  proc, calls = _run(tmp_path)
  assert proc.returncode == 0, proc.stderr
  runs = tmp_path / "runs"
  pub = tmp_path / "pub"
  want = [
    f"-m mdkif_jax.main --config=configs/skill.py:paper --workdir={runs}/skill",
    f"-m mdkif_jax.main --config=configs/eval.py:paper --config.skills_from={runs}/skill "
    f"--workdir={runs}/eval",
    f"-m mdkif_jax.cells_archive {runs}/eval {pub}/eval",
    f"-m mdkif_jax.main --config=configs/eval.py:paper,curve --config.skills_from={runs}/skill "
    f"--config.skills_step=75 --config.reuse_cells_from={runs}/eval "
    f"--workdir={runs}/curve_75",
    f"-m mdkif_jax.cells_archive {runs}/curve_75 {pub}/curve_75",
    f"-m mdkif_jax.main --config=configs/eval.py:paper,curve --config.skills_from={runs}/skill "
    f"--config.skills_step=150 --config.reuse_cells_from={runs}/eval "
    f"--workdir={runs}/curve_150",
    f"-m mdkif_jax.cells_archive {runs}/curve_150 {pub}/curve_150",
    f"-m mdkif_jax.curve {runs}/skill {runs}/curve_75 {runs}/curve_150 {runs}/eval "
    f"--out {tmp_path}/pub/learning_curve.png",
    f"-m mdkif_jax.main --config=configs/skill.py:paper,union --workdir={runs}/union",
    f"-m mdkif_jax.main --config=configs/skill.py:paper,lora --workdir={runs}/lora",
    f"-m mdkif_jax.main --config=configs/eval.py:paper,control --config.skills_from={runs}/union "
    f"--config.reuse_cells_from={runs}/eval --workdir={runs}/eval_union",
    f"-m mdkif_jax.cells_archive {runs}/eval_union {pub}/eval_union",
    f"-m mdkif_jax.main --config=configs/eval.py:paper,control --config.skills_from={runs}/lora "
    f"--config.reuse_cells_from={runs}/eval --workdir={runs}/eval_lora",
    f"-m mdkif_jax.cells_archive {runs}/eval_lora {pub}/eval_lora",
    f"-m mdkif_jax.compare {runs}/eval {runs}/eval_union {runs}/eval_lora --labels AdaLoRA "
    f"skills union AdaLoRA LoRA skills --out {tmp_path}/pub/controls.png",
  ]
  assert calls == want
  timings = (tmp_path / "pub" / "timings.tsv").read_text().splitlines()
  assert timings[0].split("\t")[:4] == ["piece", "commit", "finished", "wall_s"]
  assert [row.split("\t")[0] for row in timings[1:]] == [
    "skill",
    "eval",
    "curve_75",
    "curve_150",
    "union",
    "lora",
    "eval_union",
    "eval_lora",
    "controls",
  ]
  assert all(len(row.split("\t")) == 6 for row in timings)
  published = sorted(str(p.relative_to(tmp_path / "pub")) for p in (tmp_path / "pub").rglob("*"))
  assert "eval/results.json" in published and "eval_lora/cells_identity.json" in published
  assert "curve_75/prompting.json" in published
  assert "eval/router_weights.png" in published and "curve_75/router_weights.png" not in published
  assert "learning_curve.png" in published and "controls.png" in published
  # the run's cells stay there; what is published is the archive's (without the data's text)
  assert [p for p in published if "cells/" in p] == [
    f"{name}/cells/cell.json"
    for name in ("curve_150", "curve_75", "eval", "eval_lora", "eval_union")
  ]
  assert all(p.read_text() == "stripped\n" for p in (tmp_path / "pub").glob("*/cells/*"))


def test_a_new_checkout_restores_the_archived_cells_and_archive_saves_an_unfinished_run(tmp_path):
  _run(tmp_path, pieces="skill eval")
  shutil.rmtree(tmp_path / "runs")  # a new checkout: $RUNS is not in git, $PUBLISH is
  (tmp_path / "calls.txt").unlink()
  proc, calls = _run(tmp_path, pieces="skill eval")
  assert proc.returncode == 0, proc.stderr
  assert calls[1].endswith(
    f"--workdir={tmp_path}/runs/eval --config.restore_cells_from={tmp_path}/pub/eval"
  )
  for name in ("curve_75", "eval_lora", "eval_part2"):  # pieces cut by a stop
    (tmp_path / "runs" / name / "cells").mkdir(parents=True)
    for f in ("cells_identity.json", "prompting.json"):
      (tmp_path / "runs" / name / f).write_text("{}")
  (tmp_path / "calls.txt").unlink()
  proc, calls = _run(tmp_path, pieces="archive")
  assert proc.returncode == 0, proc.stderr
  assert calls == [
    f"-m mdkif_jax.cells_archive {tmp_path}/runs/{name} {tmp_path}/pub/{name}"
    for name in ("eval", "curve_75", "eval_lora")
  ] + [f"-m mdkif_jax.cells_archive {tmp_path}/runs/eval_part2 {tmp_path}/pub/eval"]
  (tmp_path / "calls.txt").unlink()
  proc, calls = _run(tmp_path, pieces="archive", fail_on="/curve_75")  # one refused: the rest go on
  assert proc.returncode == 1 and "not archived: curve_75" in proc.stderr
  assert len(calls) == 4 and calls[-2].endswith("pub/eval_lora")


def test_a_new_checkout_without_stage_1_rebuilds_eval_from_its_archive_for_the_controls(tmp_path):
  """No stage 1 in $RUNS (PIECES without skill): eval is the archive and the data alone (no
  skills_from), so a control's pieces run without retraining the skills."""
  _run(tmp_path, pieces="skill eval")
  shutil.rmtree(tmp_path / "runs")
  (tmp_path / "calls.txt").unlink()
  proc, calls = _run(tmp_path, pieces="eval union eval_union")
  assert proc.returncode == 0, proc.stderr
  runs, pub = tmp_path / "runs", tmp_path / "pub"
  assert calls[0] == (
    f"-m mdkif_jax.main --config=configs/eval.py:paper "
    f"--config.restore_cells_from={pub}/eval --workdir={runs}/eval"
  )
  assert not [c for c in calls if f"{runs}/skill" in c]
  # the published timings go on: the earlier checkout's rows, then this one's
  timings = (pub / "timings.tsv").read_text().splitlines()
  assert [r.split("\t")[0] for r in timings[1:]] == [
    "skill",
    "eval",
    "eval_archive",
    "union",
    "eval_union",
  ]
  assert calls[2].startswith("-m mdkif_jax.main --config=configs/eval.py:paper,control")
  assert f"--config.reuse_cells_from={runs}/eval" in calls[2]
  # the rebuilt eval is not archived again (its identity would lose the stage-1 path)
  (tmp_path / "calls.txt").unlink()
  proc, calls = _run(tmp_path, pieces="archive")
  assert proc.returncode == 0, proc.stderr
  assert calls == [f"-m mdkif_jax.cells_archive {runs}/eval_union {pub}/eval_union"]


def test_a_rerun_skips_the_finished_pieces(tmp_path):
  _run(tmp_path, pieces="skill eval")
  proc, calls = _run(tmp_path, pieces="skill eval lora")
  assert proc.returncode == 0, proc.stderr
  # the finished eval is not rerun, but published (and archived) again
  assert len(calls) == 5 and calls[-1].endswith("--workdir=" + str(tmp_path / "runs" / "lora"))
  assert calls[-2] == calls[2] and "cells_archive" in calls[2]
  assert "== skill: done" in proc.stderr


def test_a_failing_piece_stops_the_script_naming_its_log(tmp_path):
  proc, calls = _run(tmp_path, pieces="union eval", fail_on="/union")
  assert proc.returncode == 1
  assert "piece union failed" in proc.stderr and "union.log" in proc.stderr
  assert len(calls) == 1  # nothing after it
  assert "boom" in (tmp_path / "runs" / "union.log").read_text()


def test_a_piece_stops_unless_the_pieces_it_builds_on_have_finished(tmp_path):
  # as when a second chain gets ahead of the first: half-trained skills, cells not there yet
  for pieces, missing in (("curve", "eval"), ("eval_union", "union"), ("controls", "eval")):
    proc, calls = _run(tmp_path, pieces=pieces)
    assert proc.returncode == 1 and f"piece {pieces} needs {missing} finished" in proc.stderr
    assert not calls
  _run(tmp_path, pieces="union")
  proc, _ = _run(tmp_path, pieces="eval_union")
  assert proc.returncode == 1 and "needs eval finished" in proc.stderr
  proc, calls = _run(tmp_path, pieces="eval eval_union")
  assert proc.returncode == 0 and calls[-1].endswith("pub/eval_union"), proc.stderr


def test_with_wait_a_piece_waits_for_the_other_chain_instead_of_stopping(tmp_path):
  out = []
  waiting = threading.Thread(
    target=lambda: out.append(_run(tmp_path, pieces="curve", WAIT="1")), daemon=True
  )
  waiting.start()
  time.sleep(4)
  assert waiting.is_alive() and not (tmp_path / "calls.txt").exists()  # nothing run yet
  _run(tmp_path, pieces="eval")  # the other chain finishes what curve builds on
  waiting.join(60)
  proc, calls = out[0]
  assert proc.returncode == 0, proc.stderr
  assert "== curve: waiting for eval to finish" in proc.stderr
  assert any(c.endswith("--workdir=" + str(tmp_path / "runs" / "curve_150")) for c in calls)


def test_an_unknown_piece_is_refused(tmp_path):
  proc, _ = _run(tmp_path, pieces="skill evl")
  assert proc.returncode == 2 and "unknown piece evl" in proc.stderr


def test_eval_procs_splits_the_suite_over_processes_then_assembles_their_cells(tmp_path):
  (tmp_path / "runs" / "eval" / "cells").mkdir(parents=True)
  kept = tmp_path / "runs" / "eval" / "cells" / "eval_part1.json"
  kept.write_text("there before")  # a cell the workdir already has is kept, and no error
  proc, calls = _run(tmp_path, pieces="eval", EVAL_PROCS="2")
  assert proc.returncode == 0, proc.stderr
  runs = tmp_path / "runs"
  head = f"-m mdkif_jax.main --config=configs/eval.py:paper --config.skills_from={runs}/skill "
  # the suite's own cells (from a run with fewer processes) are archived before the deal
  assert calls[0] == f"-m mdkif_jax.cells_archive {runs}/eval {tmp_path}/pub/eval"
  assert calls[1].startswith("-c ")
  restored = f" --config.restore_cells_from={tmp_path}/pub/eval"
  assert sorted(calls[2:4]) == [
    head + f"--workdir={runs}/eval_part1 --config.tasks=('t1','t3',)" + restored,
    head + f"--workdir={runs}/eval_part2 --config.tasks=('t2',)" + restored,
  ]
  assert calls[4] == head + f"--workdir={runs}/eval" + restored
  assert sorted(p.name for p in (runs / "eval" / "cells").iterdir()) == [
    "eval.json",
    "eval_part1.json",
    "eval_part2.json",
  ]
  assert kept.read_text() == "there before"
  pieces = [r.split("\t")[0] for r in (tmp_path / "pub" / "timings.tsv").read_text().splitlines()]
  assert sorted(pieces[1:3]) == ["eval_part1", "eval_part2"] and pieces[3:] == ["eval"]

  (tmp_path / "m").mkdir()
  proc, calls = _run(tmp_path / "m", pieces="eval", EVAL_PROCS="4")
  assert proc.returncode == 0, proc.stderr  # more processes than tasks: one per task
  assert sorted(c.split("--config.tasks=")[1] for c in calls if "eval_part" in c) == [
    "('t1',)",
    "('t2',)",
    "('t3',)",
  ]

  (tmp_path / "f").mkdir()
  proc, calls = _run(tmp_path / "f", pieces="eval", EVAL_PROCS="2", fail_on="/eval_part2")
  assert proc.returncode == 1 and "piece eval_part2 failed" in proc.stderr
  assert not any(c.endswith("--workdir=" + str(tmp_path / "f" / "runs" / "eval")) for c in calls)


def test_eval_procs_deals_the_tasks_by_the_cells_they_have_left(tmp_path):
  runs, pub = tmp_path / "runs", tmp_path / "pub"
  for task, n in (("t1", 3), ("t2", 1)):  # archived: t1 finished, t2 1 of 3, t3 none
    (pub / "eval" / "cells" / task).mkdir(parents=True)
    for i in range(n):
      (pub / "eval" / "cells" / task / f"c{i}.json").write_text("{}")
  (runs / "eval_part1" / "cells").mkdir(parents=True)  # a part of an earlier session
  (runs / "skill").mkdir()  # its stage 1 (without one, eval is the archive alone)
  (runs / ".done_eval_part2").touch()  # finished its tasks then; they are dealt afresh now
  proc, calls = _run(tmp_path, pieces="eval", EVAL_PROCS="2")
  assert proc.returncode == 0, proc.stderr
  # the earlier part's cells are archived before the deal (a task may change parts)
  assert f"-m mdkif_jax.cells_archive {runs}/eval_part1 {pub}/eval" in calls[0]
  parts = sorted(
    c.split("--workdir=")[1] for c in calls if "--workdir=" + str(runs) + "/eval_part" in c
  )
  restored = f" --config.restore_cells_from={pub}/eval"
  # most left first, each to the part with the fewest: t3 (3) -> 1, t2 (2) -> 2, t1 (0) -> 2
  assert parts == [
    f"{runs}/eval_part1 --config.tasks=('t3',)" + restored,
    f"{runs}/eval_part2 --config.tasks=('t2','t1',)" + restored,
  ]


def test_a_nice_chain_started_as_its_own_session_also_renices_its_autogroup(tmp_path):
  """Linux's autogroups share the CPU between sessions first: a nice 19 chain started with
  setsid would still take a core from a chain beside it unless its autogroup is reniced."""
  log = tmp_path / "nice.txt"
  proc, _ = _run(tmp_path, pieces="skill", NICE="7", SETSID="1", NICE_LOG=str(log))
  assert proc.returncode == 0, proc.stderr
  niceness, *group = log.read_text().splitlines()
  assert int(niceness) == min(19, os.nice(0) + 7)  # (the tests may run reniced themselves)
  if pathlib.Path("/proc/self/autogroup").exists():  # a kernel with autogroups
    assert group and group[0].endswith("nice 7"), group
