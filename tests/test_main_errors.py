"""What a user sees when the input is wrong: `python -m mdkif_jax.main` prints one line naming
what to change and exits with status 2 (a traceback only with --verbose); a second run on a
busy workdir refuses at start, and a killed run does not leave the workdir locked."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from mdkif_jax import main, train
from tests.test_train import tiny_config
from tests.test_train_kill import REPO, subprocess_env

pytestmark = pytest.mark.slow


def run_main(*flags, workdir, timeout=240):
  cmd = [sys.executable, "-m", "mdkif_jax.main", f"--workdir={workdir}", *flags]
  return subprocess.run(
    cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
  )


def assert_one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


TINY = (
  "--config=configs/skill.py:tiny",
  "--config.train.progress=False",
  "--config.mesh.shape=(1,1,1)",
)


def test_unknown_skill_is_one_line_naming_the_flag_and_verbose_shows_the_traceback(tmp_path):
  proc = run_main(*TINY, "--config.skills=surgery", workdir=tmp_path / "w")
  assert_one_line_error(proc, "ConfigError", "--config.skills=surgery", "unknown skill 'surgery'")
  proc = run_main(*TINY, "--config.skills=surgery", "--verbose", workdir=tmp_path / "w")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize(
  "flags, needles",
  [
    (
      ("--config=configs/skill.py:papr",),
      ("--config=configs/skill.py:papr", "unknown preset 'papr'"),
    ),
    (
      (*TINY, "--config.train.stepz=3"),
      ("--config.train.stepz=3", "'stepz'", 'Did you mean "steps"'),
    ),
    ((*TINY, "--config.train.steps=abc"), ("--config.train.steps=abc", "invalid literal")),
    (("--config=configs/nope.py",), ("--config=configs/nope.py", "No such file")),
    ((*TINY, "--config.stage=foo"), ("ConfigError", "--config.stage='foo'")),
  ],
  ids=["unknown-preset", "unknown-field", "wrong-type", "missing-file", "unknown-stage"],
)
def test_a_flag_that_cannot_be_parsed_is_one_line_naming_it(tmp_path, flags, needles):
  proc = run_main(*flags, workdir=tmp_path / "w")
  assert_one_line_error(proc, *needles)
  assert "FATAL" not in proc.stderr, proc.stderr[-3000:]


def test_the_data_stats_tool_reports_a_bad_flag_the_same_way():
  cmd = [sys.executable, "-m", "mdkif_jax.data", "stats", "--config=configs/skill.py:tiny"]
  proc = subprocess.run(
    [*cmd, "--config.data.nope=1"],
    env=subprocess_env(),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert_one_line_error(proc, "FlagError", "--config.data.nope=1", "'nope'")


def test_a_random_weight_preset_without_tokenizer_fails_before_building_the_model(tmp_path):
  start = time.monotonic()
  proc = run_main("--config=configs/skill.py:llama2_7b,skills=ner+re", workdir=tmp_path / "w")
  assert_one_line_error(proc, "--config.model.tokenizer", "llama2_7b")
  assert time.monotonic() - start < 60  # nothing 7B-sized was built


def test_router_unknown_task_is_one_line(tmp_path):
  proc = run_main(
    "--config=configs/router.py:tiny",
    "--config.task=nope",
    "--config.skills_from=x",
    workdir=tmp_path,
  )
  assert_one_line_error(proc, "TaskError", "unknown task 'nope'")


def test_strict_data_error_is_one_line_with_file_and_line(tmp_path):
  bad = tmp_path / "mine.jsonl"
  bad.write_text('{"skill": "qa", "query": "q", "answer": "a"}\n{"skill": "qa", "query": \n')
  proc = run_main(
    *TINY,
    f"--config.data.data_dir={tmp_path}",
    "--config.data.sources=instruct",
    "--config.data.instruct_files=('mine.jsonl',)",
    "--config.data.strict=True",
    workdir=tmp_path / "w",
  )
  assert_one_line_error(proc, "DataError", "mine.jsonl:2", "--config.data.strict=False")


def test_a_foreign_checkpoint_and_a_changed_schedule_are_one_line(tmp_path):
  workdir = tmp_path / "w"
  train.train_skills(tiny_config(skills="qa", steps=4, checkpoint_every=2), workdir, ("qa",))
  steps = ("--config.train.steps=4", "--config.adalora.tinit=1", "--config.adalora.tfinal=2")
  common = (*TINY, "--config.adalora.delta_t=1", "--config.train.checkpoint_every=2")
  proc = run_main(*common, *steps, "--config.skills=ner", workdir=workdir)
  assert_one_line_error(proc, "CheckpointMismatchError", "skills", "--workdir")
  proc = run_main(
    *common, *steps[1:], "--config.train.steps=5", "--config.skills=qa", workdir=workdir
  )
  assert_one_line_error(proc, "CheckpointMismatchError", "train.steps: checkpoint has 4")


def test_every_input_error_type_is_handled():
  from mdkif_jax.data.task import TaskError

  assert {train.NonFiniteError, TaskError} <= set(main.user_errors())


def test_a_busy_workdir_refuses_and_a_killed_run_leaves_no_lock(tmp_path):
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "mdkif_jax.main", f"--workdir={workdir}", *TINY]
  cmd += ["--config.train.steps=400", "--config.skills=qa"]
  first = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stderr=subprocess.DEVNULL)
  try:
    lock = pathlib.Path(workdir) / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
      assert first.poll() is None and time.monotonic() < deadline, "the first run never locked"
      time.sleep(0.1)
    second = run_main(*TINY, "--config.skills=qa", workdir=workdir)
    assert_one_line_error(second, "WorkdirBusyError", "in use by another run", str(first.pid))
  finally:
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
  # the killed run's lock died with it: the next run gets past the lock (to its own error)
  third = run_main(*TINY, "--config.skills=surgery", workdir=workdir)
  assert_one_line_error(third, "ConfigError")
