"""Entry point: `python -m mdkif_jax.main --config=configs/skill.py --workdir=runs/skill`.

Parses flags, starts multi-host JAX when the environment describes several processes, logs
the devices, takes the workdir's lock, then hands over to the stage's
`train_and_evaluate(config, workdir)`. An input error (config, data, checkpoint, task) ends
the run with one line on stderr and exit status 2 (`--verbose`: the traceback); so does a flag
that cannot be parsed (flag_errors.py).
"""

from __future__ import annotations

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mdkif_jax import errors, flag_errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Stage config file (and :preset).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots.")
flags.DEFINE_bool("verbose", False, "On an input error, show the traceback, not one line.")
flags.mark_flags_as_required(["config"])


def _multi_process() -> bool:
  """True when a launcher (SLURM, TPU pod, our launch/ scripts) describes several processes."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
    return True
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1


STAGES = {
  "skill": "mdkif_jax.train",
  "router": "mdkif_jax.fit_router",
  "eval": "mdkif_jax.evaluate_suite",
}


def user_errors() -> tuple[type[Exception], ...]:
  """Errors the user fixes by changing input; each message says what and which flag."""
  from mdkif_jax import checkpoint, train
  from mdkif_jax.data import example, suite, task
  from mdkif_jax.model import config, generate, loading

  return (
    errors.ConfigError,
    example.DataError,
    checkpoint.CheckpointMismatchError,
    checkpoint.DamagedCheckpointError,
    checkpoint.WorkdirBusyError,
    task.TaskError,
    suite.SuiteError,
    train.NonFiniteError,
    config.UnsupportedModelError,
    loading.WeightLoadError,
    generate.ContextLengthError,
  )


def _hint(e: Exception, config) -> str:
  from mdkif_jax.data import example

  if isinstance(e, example.DataError) and config.get("data") and config.data.strict:
    return " (--config.data.strict=False skips and counts bad records)"
  return ""


def main(argv):
  del argv
  try:
    run()
  except user_errors() as e:
    if FLAGS.verbose:
      raise
    message = " ".join(str(e).split())  # one line
    print(f"error: {type(e).__name__}: {message}{_hint(e, FLAGS.config)}", file=sys.stderr)
    sys.exit(2)


def run():
  import importlib

  import jax

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # explicit: launch/local_multiprocess.sh, tests
    jax.distributed.initialize(
      os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  elif _multi_process():  # SLURM, GKE TPU pods: JAX detects the cluster itself
    # (on a plain TPU VM slice launch/tpu_pod.sh sets JAX_COORDINATOR_ADDRESS & co. from the
    # VM metadata; under SLURM it sets JAX_LOCAL_DEVICE_IDS so a process sees all its GPUs)
    jax.distributed.initialize()
  logging.info(
    "process %d/%d, %d local / %d global devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[:8],
  )
  # Orbax logs every file operation at INFO through absl's handler: keep its warnings only.
  logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= logging_std.WARNING or "/orbax/" not in r.pathname
  )
  config = FLAGS.config
  if config.stage not in STAGES:
    raise errors.ConfigError(f"--config.stage={config.stage!r}: expected one of {sorted(STAGES)}")
  workdir = FLAGS.workdir or os.path.join("runs", config.stage)
  from mdkif_jax import checkpoint

  with checkpoint.workdir_lock(workdir):
    importlib.import_module(STAGES[config.stage]).train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=flag_errors.parse_flags)
