"""Multi-host training for real: 2 CPU processes on localhost joined by jax.distributed
(launch/local_multiprocess.sh), data parallel across both, give the adapters of one process
with the same global batch; and the launch scripts are valid bash."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import skill
from mdkif_jax import train
from tests.test_train_kill import restore_numpy, subprocess_env, tail

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
STEPS = 4
PROCESSES = 2


def tiny_overrides(steps: int) -> dict[str, object]:
  """The tiny preset shortened to `steps` (AdaLoRA warm-up, pruning and final phase kept)."""
  return {
    "skills": "qa+ner",
    "train.steps": steps,
    "train.checkpoint_every": 2,
    "train.progress": False,
    "train.plot": False,
    "adalora.tinit": 1,
    "adalora.tfinal": 1,
    "adalora.delta_t": 1,
  }


def metric_records(workdir: pathlib.Path) -> dict[tuple[int, tuple[str, ...]], dict]:
  """metrics.jsonl as {(step, its keys): record}; a later record with the same keys wins."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out[record["step"], tuple(sorted(record))] = record
  return out


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
  over = tiny_overrides(STEPS)
  workdir, logs = tmp_path / "two_processes", tmp_path / "logs"
  cmd = [
    "bash",
    str(LAUNCH / "local_multiprocess.sh"),
    str(PROCESSES),
    "--config=configs/skill.py:tiny",
    f"--workdir={workdir}",
    "--config.mesh.shape=(-1,1,1)",  # data parallel over both processes' devices
    *(f"--config.{k}={v}" for k, v in over.items()),
  ]
  env = subprocess_env(PYTHON=sys.executable, DEVICES_PER_PROCESS="2", LOG_DIR=str(logs))
  log0 = tmp_path / "process_0.log"
  with open(log0, "w") as out:
    proc = subprocess.Popen(
      cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
      # meanwhile, the single-process reference: one process sees the whole global batch,
      # rows_per_skill * process_count rows of each skill
      cfg = skill.get_config("tiny")
      for key, value in over.items():
        section, _, field = key.rpartition(".")
        setattr(cfg[section] if section else cfg, field, value)
      cfg.train.rows_per_skill = PROCESSES
      cfg.mesh.shape = (1, 1, 1)
      single = train.train_skills(cfg, tmp_path / "one_process", ("qa", "ner"))
      rc = proc.wait(timeout=400)
    finally:
      if proc.poll() is None:  # a hang in a collective: stop the launcher and its processes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  detail = f"process 0:\n{tail(log0)}\nprocess 1:\n{tail(logs / 'process_1.log')}"
  assert rc == 0, detail
  assert "process 0/2, 2 local / 4 global devices" in log0.read_text(), detail
  assert "process 1/2, 2 local / 4 global devices" in (logs / "process_1.log").read_text()

  # process 0 wrote the metrics (training and any evaluation records), finite and equal to
  # the ones the single process wrote at the same steps
  got, want = metric_records(workdir), metric_records(tmp_path / "one_process")
  assert sorted(got) == sorted(want)
  assert sorted(step for step, keys in got if "loss/qa" in keys) == [2, STEPS]
  for key, record in got.items():
    losses = {k: v for k, v in record.items() if "loss/" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), record
    for k, v in losses.items():
      assert v == pytest.approx(want[key][k], abs=1e-5), (key, k)

  # both processes saved one Orbax checkpoint into the shared directory; it restores, holds
  # the global data position, and its adapters and rank masks are the single process's
  state, data_state = restore_numpy(workdir / "checkpoints", STEPS)
  assert data_state["qa"]["step"] == STEPS and data_state["qa"]["global_batch"] == PROCESSES
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, np.asarray(b), atol=1e-5),
    state["adapters"],
    single["adapters"],
  )
  masks = allocator_masks(state["opt_state"])  # the allocator's state (grad_accum_steps = 1)
  for t, m in single["masks"].items():
    np.testing.assert_array_equal(masks[t], m)


def allocator_masks(opt_state):
  """The AdaLoRA allocator's masks in a restored optimizer state (a dict with a "mask" key,
  wherever optax's chain put it)."""
  if isinstance(opt_state, dict):
    if "mask" in opt_state and "budget" in opt_state:
      return opt_state["mask"]
    opt_state = list(opt_state.values())
  if isinstance(opt_state, (list, tuple)):
    for part in opt_state:
      found = allocator_masks(part)
      if found is not None:
        return found
  return None


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launch_scripts_are_valid_bash(script):
  path = LAUNCH / script
  assert path.read_text().startswith("#!/usr/bin/env bash\n"), script
  result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def _stub(path: pathlib.Path, body: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


# prints what main would be started with: working directory, JAX/XLA variables, arguments
FAKE_PYTHON = (
  'echo "cwd=$PWD"; env | grep -E "^(JAX_|LIBTPU|XLA_)" | sort; printf "arg=%s\\n" "$@"\n'
)
MAIN_ARGS = ["--config=configs/skill.py:llama2_7b,skills=ner+re", "--workdir=/shared/runs/a b"]


def _started(out: str) -> list[dict]:
  """One {name: value} (args as a list) per fake `python` started, from FAKE_PYTHON's output."""
  runs = []
  for line in out.splitlines():
    key, sep, value = line.partition("=")
    if key == "cwd":
      runs.append({"args": []})
    if sep and runs:
      runs[-1]["args"].append(value) if key == "arg" else runs[-1].setdefault(key, value)
  return runs


def test_tpu_pod_script_starts_main_on_every_worker_with_metadata_coordinates(tmp_path):
  """gcloud and the metadata server are stand-ins: 3 workers, this one is number 2."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  _stub(
    bin_dir / "gcloud",
    f"""
echo "gcloud $*" >> {tmp_path}/gcloud.log
for a in "$@"; do
  case $a in
    --command=*) (cd {home} && bash -c "${{a#--command=}}") || exit $? ;;
    /*.tar.gz) cp "$a" {home}/mdkif_jax.tar.gz ;;
  esac
done
""",
  )
  _stub(
    bin_dir / "curl",
    """case "${@: -1}" in
  */worker-network-endpoints) printf 'w-0:x:10.1.0.5,w-1:x:10.1.0.6,w-2:x:10.1.0.7' ;;
  */agent-worker-number) printf 2 ;;
  *) exit 22 ;;
esac
""",
  )
  _stub(home / "mdkif_jax" / ".venv" / "bin" / "pip", f'echo "pip $*" >> {tmp_path}/pip.log\n')
  _stub(home / "mdkif_jax" / ".venv" / "bin" / "python", FAKE_PYTHON)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="z")
  env.pop("XLA_FLAGS", None)
  env.pop("LIBTPU_INIT_ARGS", None)
  result = subprocess.run(
    ["bash", str(LAUNCH / "tpu_pod.sh"), *MAIN_ARGS],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  (run,) = _started(result.stdout)
  assert run["cwd"] == str(home / "mdkif_jax")
  assert run["args"] == ["-m", "mdkif_jax.main", *MAIN_ARGS]
  assert run["JAX_COORDINATOR_ADDRESS"] == "10.1.0.5:8476"
  assert (run["JAX_NUM_PROCESSES"], run["JAX_PROCESS_ID"]) == ("3", "2")
  assert "--xla_tpu_enable_async_collective_fusion=true" in run["LIBTPU_INIT_ARGS"]
  calls = (tmp_path / "gcloud.log").read_text()
  assert calls.count("--worker=all") == 4  # copy, unpack, install, run: all on every worker
  assert (home / "mdkif_jax" / "mdkif_jax" / "main.py").is_file()  # the checkout arrived
  pip = (tmp_path / "pip.log").read_text()
  assert "-r requirements.txt" in pip and "jax[tpu]==" in pip and "[cuda" not in pip


def test_slurm_script_runs_one_process_per_node_with_all_its_gpus(tmp_path):
  """srun is a stand-in that starts the task command for 2 nodes with 4 GPUs each."""
  bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
  _stub(
    bin_dir / "srun",
    f"""echo "srun $*" > {tmp_path}/srun.log
while [[ $1 == --* ]]; do shift; done
for rank in 0 1; do
  SLURM_NTASKS=2 SLURM_PROCID=$rank SLURM_LOCALID=0 SLURM_GPUS_ON_NODE=4 "$@" || exit $?
done
""",
  )
  _stub(venv / "bin" / "python", FAKE_PYTHON)
  env = dict(
    os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(venv), SLURM_SUBMIT_DIR=str(REPO)
  )
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
    ["bash", str(LAUNCH / "slurm_gpu.sbatch"), *MAIN_ARGS],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  runs = _started(result.stdout)
  assert len(runs) == 2
  for run in runs:
    assert run["cwd"] == str(REPO)
    assert run["args"] == ["-m", "mdkif_jax.main", *MAIN_ARGS]
    assert run["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"  # every GPU, not JAX's one-per-process
    assert run["JAX_PLATFORMS"] == "cuda"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in run["XLA_FLAGS"]
    assert "JAX_COORDINATOR_ADDRESS" not in run  # SLURM's own detection in main.py
  assert "--ntasks-per-node=1" in (tmp_path / "srun.log").read_text()
