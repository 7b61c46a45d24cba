"""Entry point: `python -m mdkif_jax.main --config=configs/skill.py --workdir=runs/skill`.

Parses flags, starts multi-host JAX when the environment describes several processes, logs
the devices, then hands over to the stage's `train_and_evaluate(config, workdir)`.
"""

from __future__ import annotations

import logging as logging_std
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Stage config file (and :preset).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots.")
flags.mark_flags_as_required(["config"])


def _multi_process() -> bool:
  """True when a launcher (SLURM, TPU pod, our launch/ scripts) describes several processes."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
    return True
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def main(argv):
  del argv
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
  workdir = FLAGS.workdir or os.path.join("runs", config.stage)
  if config.stage == "router":
    from mdkif_jax import fit_router

    fit_router.train_and_evaluate(config, workdir)
  elif config.stage == "skill":
    from mdkif_jax import train

    train.train_and_evaluate(config, workdir)
  else:
    raise app.UsageError(
      f"config.stage={config.stage!r} is not implemented (only 'skill' or 'router')"
    )


if __name__ == "__main__":
  app.run(main)
