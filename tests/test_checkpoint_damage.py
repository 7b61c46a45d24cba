"""A damaged latest checkpoint never ends a run: the rerun resumes from the newest intact step
(with a warning naming the damaged step and what was wrong) and ends exactly where an
uninterrupted run ends; with no intact step, one clear error."""

import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest

from mdkif_jax import checkpoint, train
from mdkif_jax.model import loading
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow

STEPS = 6


def _config():
  c = tiny_config(skills="qa", steps=STEPS, checkpoint_every=2, keep_checkpoints=3)
  c.train.async_checkpoint = False
  return c


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):  # a file cut short (a killed copy, a full disk)
  f = _largest_array_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_array(step_dir):  # a missing array file
  _largest_array_file(step_dir).unlink()


def _bad_metadata(step_dir):  # metadata that is not what Orbax wrote
  (step_dir / "meta" / "metadata").write_text('{"model": ')


DAMAGES = {"truncated": _truncate, "missing_array": _delete_array, "bad_metadata": _bad_metadata}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(base, uninterrupted result, a run directory stopped at step 4 with steps 2 and 4)."""
  root = tmp_path_factory.mktemp("damage")
  base = loading.load_model("tiny_smollm_vocab")
  full = train.train_skills(_config(), root / "full", ("qa",), base=base)
  train.train_skills(_config(), root / "stopped", ("qa",), base=base, stop_after=4)
  steps = sorted(int(p.name) for p in (root / "stopped" / "checkpoints").iterdir())
  assert steps == [2, 4]
  return base, full, root / "stopped"


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_step_resumes_from_the_one_before(runs, damage, tmp_path, caplog):
  base, full, stopped = runs
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  ckpt = workdir / "checkpoints"
  DAMAGES[damage](ckpt / "4")
  with caplog.at_level(logging.WARNING, logger="mdkif_jax.checkpoint"):
    resumed = train.train_skills(_config(), workdir, ("qa",), base=base)
  warning = " ".join(r.getMessage() for r in caplog.records)
  assert "checkpoint step 4 is damaged" in warning and "resuming from step 2" in warning
  assert [h["step"] for h in resumed["history"]] == [3, 4, 5, 6]  # resumed after step 2
  assert (ckpt / "4.damaged").is_dir()  # kept for inspection, out of Orbax's way
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2", "4", "6"]
  # exactly the uninterrupted run's result
  jax.tree.map(np.testing.assert_array_equal, full["adapters"], resumed["adapters"])
  assert resumed["data_state"] == full["data_state"]


def test_every_step_damaged_is_one_clear_error(runs, tmp_path):
  base, _, stopped = runs
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  _truncate(workdir / "checkpoints" / "4")
  _bad_metadata(workdir / "checkpoints" / "2")
  with pytest.raises(checkpoint.DamagedCheckpointError, match="every checkpoint step is damaged"):
    train.train_skills(_config(), workdir, ("qa",), base=base)
  # the damaged steps are set aside, so the same command now starts over
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert names == ["2.damaged", "4.damaged"]


def test_a_changed_schedule_is_refused_naming_the_fields(runs, tmp_path):
  base, _, stopped = runs
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  c = _config()
  c.train.steps, c.adalora.tinit = STEPS + 4, 0
  with pytest.raises(checkpoint.CheckpointMismatchError, match="train.steps.*adalora.tinit"):
    train.train_skills(c, workdir, ("qa",), base=base)
