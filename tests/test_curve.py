"""The learning curve's inputs: train.keep_period keeps the curve's checkpoints, and
`python -m mdkif_jax.curve` reads each point's examples from its checkpoint's data position."""

import json

import pytest

from mdkif_jax import curve, train
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def skill_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("curve") / "skill"
  cfg = tiny_config(steps=6, checkpoint_every=2, keep_checkpoints=1, keep_period=4)
  cfg.train.async_checkpoint = False
  train.train_skills(cfg, workdir, ("qa", "ner"))
  return workdir


def _eval_dir(root, name, skills_from, step, gain, delta=True, resamples=None):
  d = root / name
  d.mkdir()
  (d / "cells_identity.json").write_text(
    json.dumps({"skills_from": str(skills_from), "skills_step": step})
  )
  track = {
    "base": {"mean_relative_gain": 0.0, "ci": [0.0, 0.0], "tasks": 1},
    "gd": {"mean_relative_gain": gain, "ci": [gain - 0.1, gain + 0.1], "tasks": 1},
  }
  if resamples is not None:
    track["gd"]["resamples"] = resamples
  if delta:  # a tenth of the relative gain, in points
    for g in track.values():
      g["mean_delta"] = {"mean": g["mean_relative_gain"] / 10, "ci": [0.0, 0.02], "tasks": 1}
  gd = {"score": 0.6, "delta_vs_base": {"mean": gain, "ci": [gain - 0.05, gain + 0.05]}}
  task = {"track": "unseen_data", "methods": {"base": {"score": 0.5}, "gd": gd}}
  (d / "results.json").write_text(
    json.dumps({"tracks": {"unseen_data": track}, "tasks": {"t": task}})
  )
  return d


def test_keep_period_keeps_the_curve_checkpoints(skill_run):
  steps = sorted(int(p.name) for p in (skill_run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [4, 6]  # 2 is deleted (keep 1), 4 is a multiple of keep_period, 6 the newest


def test_curve_points_carry_each_checkpoints_examples(skill_run, tmp_path, capsys):
  early = _eval_dir(tmp_path, "e4", skill_run, 4, 0.05)
  final = _eval_dir(tmp_path, "e6", skill_run, None, 0.12)
  out = tmp_path / "plots" / "curve.png"
  assert curve.main([str(skill_run), str(final), str(early), "--out", str(out)]) == 0
  points = json.loads(out.with_suffix(".json").read_text())
  assert [p["step"] for p in points] == [4, 6]
  # one unpacked row per skill per step: the data position is the step
  assert [p["examples_per_skill"]["qa"] for p in points] == [4, 6]
  assert [p["gain"]["gd"]["mean"] for p in points] == [0.05, 0.12]
  assert [p["delta"]["gd"]["mean"] for p in points] == pytest.approx([0.005, 0.012])
  assert out.stat().st_size > 5000
  assert "step     4" in capsys.readouterr().out


def test_a_curve_draws_each_tasks_difference_to_the_base(skill_run, tmp_path, capsys):
  early = _eval_dir(tmp_path, "e4", skill_run, 4, -0.1)  # one task falls, then rises
  final = _eval_dir(tmp_path, "e6", skill_run, None, 0.2)
  out = tmp_path / "c.png"
  assert curve.main([str(skill_run), str(early), str(final), "--out", str(out)]) == 0
  points = json.loads(out.with_suffix(".json").read_text())
  assert [p["task_delta"]["t"]["gd"]["mean"] for p in points] == [-0.1, 0.2]
  lines = capsys.readouterr().out.splitlines()
  assert "gd minus base per task: t -0.100 [-0.150, -0.050]" in lines[1]
  assert "gd minus base per task: t +0.200 [+0.150, +0.250]" in lines[3]
  two_panels = out.stat().st_size
  assert curve.main([str(skill_run), str(final), "--out", str(out), "--per-task", "none"]) == 0
  assert "per task" not in capsys.readouterr().out
  assert out.stat().st_size < two_panels  # one panel


def test_curve_refuses_an_evaluation_of_other_skills(skill_run, tmp_path, capsys):
  other = _eval_dir(tmp_path, "other", tmp_path / "elsewhere", None, 0.1)
  assert curve.main([str(skill_run), str(other), "--out", str(tmp_path / "c.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "CurveError" in err[0] and "elsewhere" in err[0]
  assert not (tmp_path / "c.png").exists()


def test_a_curve_in_points_needs_results_with_the_mean_difference(skill_run, tmp_path, capsys):
  old = _eval_dir(tmp_path, "old", skill_run, None, 0.1, delta=False)
  out = tmp_path / "c.png"
  assert curve.main([str(skill_run), str(old), "--out", str(out)]) == 2
  assert "has no mean_delta (rerun its evaluation): use --measure gain" in capsys.readouterr().err
  assert curve.main([str(skill_run), str(old), "--out", str(out), "--measure", "gain"]) == 0
  assert out.stat().st_size > 5000


def test_a_curve_says_on_how_many_resamples_a_gain_interval_stands(skill_run, tmp_path, capsys):
  # a task whose base resampled to 0 leaves resamples without a relative gain
  partial = _eval_dir(tmp_path, "p", skill_run, None, 0.1, resamples=[950, 1000])
  full = _eval_dir(tmp_path, "f", skill_run, 4, 0.1, resamples=[1000, 1000])
  out = tmp_path / "c.png"
  assert curve.main([str(skill_run), str(partial), str(full), "--out", str(out)]) == 0
  points = json.loads(out.with_suffix(".json").read_text())
  assert [p["gain"]["gd"]["resamples"] for p in points] == [[1000, 1000], [950, 1000]]
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
  assert "(on 950 of 1000 resamples)" in lines[1] and "resamples" not in lines[0]
  assert curve.main([str(skill_run), str(partial), "--out", str(out), "--measure", "gain"]) == 0
