"""SIGKILL the real trainer (`python -m mdkif_jax.main`) at the worst moments, rerun the same
command, and check that nothing is corrupt and the result equals an uninterrupted run.

Kill 1 lands right after the first checkpoint directory appears; kill 2 lands inside a save:
the test-only hook `checkpoint.KILL_IN_SAVE_ENV` makes the trainer SIGKILL itself right after
the save of step 6 has started, and the test requires Orbax's `<step>.orbax-checkpoint-tmp`
directory (a save begun, not committed) to be on disk afterwards.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mdkif_jax import checkpoint

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
TMP_MARK = "orbax-checkpoint-tmp"
RUN_TIMEOUT_S = 300


def trainer_command(workdir: pathlib.Path, *flags: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "mdkif_jax.main",
    "--config=configs/skill.py:tiny",
    f"--workdir={workdir}",
    f"--config.train.steps={STEPS}",
    "--config.skills=qa+ner",
    "--config.train.checkpoint_every=2",
    "--config.train.progress=False",
    "--config.train.plot=False",
    "--config.mesh.shape=(1,1,1)",
    *flags,
  ]


def subprocess_env(**extra: str) -> dict[str, str]:
  """os.environ without conftest's 8 forced devices (one device compiles faster)."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


def tail(path: pathlib.Path, n: int = 3000) -> str:
  return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def run_to_end(cmd, env, log: pathlib.Path) -> None:
  with open(log, "a") as out:
    rc = subprocess.run(
      cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S
    ).returncode
  assert rc == 0, f"{' '.join(cmd)} exited with {rc}:\n{tail(log)}"


def run_and_kill(cmd, env, log: pathlib.Path, ckpt_dir: pathlib.Path, trigger) -> tuple[str, set]:
  """Start `cmd`, SIGKILL it the moment `trigger(names in ckpt_dir)` returns a name.

  Returns (that name, the directory listing right after the kill).
  """
  with open(log, "a") as out:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
      while proc.poll() is None and time.monotonic() < deadline:
        names = set(os.listdir(ckpt_dir)) if ckpt_dir.is_dir() else set()
        hit = trigger(names)
        if hit is not None:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          assert proc.returncode == -signal.SIGKILL
          return hit, set(os.listdir(ckpt_dir))
        time.sleep(0.005)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  pytest.fail(f"the trainer ended (rc={proc.returncode}) before the kill point:\n{tail(log)}")


def restore_numpy(ckpt_dir: pathlib.Path, step: int) -> tuple[dict, dict]:
  """(state, data-iterator state) of one checkpoint step, as host numpy arrays."""
  ckpt_dir = pathlib.Path(ckpt_dir).absolute()
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(ckpt_dir / str(step) / "state").item_metadata.tree
  numpy_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "data", "meta")) as mngr:
    out = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=numpy_args), data=ocp.args.JsonRestore()
      ),
    )
  return out["state"], out["data"]


def finished_steps(ckpt_dir: pathlib.Path) -> list[int]:
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def final_metrics(workdir: pathlib.Path) -> dict[str, float]:
  """Every loss and rank metrics.jsonl holds for the last step (later writes win)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record["step"] == STEPS:
      out.update({k: v for k, v in record.items() if "loss/" in k or k.startswith("rank/")})
  return out


def test_sigkill_at_checkpoint_and_during_save_then_rerun_equals_uninterrupted(tmp_path):
  # compiled programs are shared through a persistent cache: the killed runs and the rerun
  # skip most of the compile time (same programs, so the same results)
  env = subprocess_env(
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
  ckpt = run_dir / "checkpoints"
  log = tmp_path / "killed.log"
  t0 = time.monotonic()
  run_to_end(trainer_command(ref_dir), env, tmp_path / "uninterrupted.log")
  t_ref = time.monotonic() - t0

  # kill 1: the moment the first finished step directory shows up
  first, after1 = run_and_kill(
    trainer_command(run_dir),
    env,
    log,
    ckpt,
    lambda names: min((n for n in names if n.isdigit()), key=int, default=None),
  )
  assert first == "2", f"first checkpoint should be step 2, saw {sorted(after1)}"

  # kill 2: inside the save of step 6 (the trainer kills itself there; see the docstring)
  kill_env = {**env, checkpoint.KILL_IN_SAVE_ENV: "6"}
  with open(log, "a") as out:
    rc = subprocess.run(
      trainer_command(run_dir),
      env=kill_env,
      cwd=REPO,
      stdout=out,
      stderr=subprocess.STDOUT,
      timeout=RUN_TIMEOUT_S,
    ).returncode
  assert rc == -signal.SIGKILL, f"the trainer was not killed in the save (rc={rc}):\n{tail(log)}"
  after2 = set(os.listdir(ckpt))
  assert any(n.startswith("6.") and TMP_MARK in n for n in after2), sorted(after2)  # mid-save
  assert "6" not in after2  # step 6 was never committed
  resume_from = max(finished_steps(ckpt))
  assert resume_from >= 2

  # the rerun of the same command resumes and finishes
  n_before = len(log.read_text().splitlines())
  run_to_end(trainer_command(run_dir), env, log)
  rerun_log = "\n".join(log.read_text().splitlines()[n_before:])
  assert f"at step {resume_from}" in rerun_log, rerun_log[-3000:]
  t_all = time.monotonic() - t0
  print(f"uninterrupted run {t_ref:.1f}s; all four runs {t_all:.1f}s")

  # no corrupt checkpoint: no temporary directory left, every kept step restores, latest = end
  names = set(os.listdir(ckpt))
  assert not [n for n in names if TMP_MARK in n], sorted(names)
  assert finished_steps(ckpt)[-1] == STEPS
  for step in finished_steps(ckpt):
    restore_numpy(ckpt, step)
  with ocp.CheckpointManager(ckpt, item_names=("state", "data", "meta")) as mngr:
    assert mngr.latest_step() == STEPS

  # the result is the uninterrupted run's, bit for bit (adapters, Adam + allocator state, data)
  want, want_data = restore_numpy(ref_dir / "checkpoints", STEPS)
  got, got_data = restore_numpy(ckpt, STEPS)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  jax.tree.map(np.testing.assert_array_equal, want["adapters"], got["adapters"])
  jax.tree.map(np.testing.assert_array_equal, want, got)
  assert want_data == got_data and got_data["qa"]["step"] == STEPS
  want_m = final_metrics(ref_dir)
  assert {"loss/qa", "loss/ner", "rank/qa", "rank/ner"} <= set(want_m)
  assert final_metrics(run_dir) == want_m
