"""`python -m mdkif_jax.inspect` on a real tiny stage-1 run: it reports every field, its kept
ranks are the masks restored the slow way, it reads no array of the state but the masks, and a
damaged step is reported in one line with exit status 2; routers and evaluation workdirs too."""

import gc
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx

from mdkif_jax import checkpoint, inspect, reporting, router, suite_report, train
from mdkif_jax.model import loading
from mdkif_jax.model.config import PRESETS
from mdkif_jax.peft import adalora
from tests.test_train import tiny_config

STEPS = 6  # tinit 1, tfinal 2: steps 2-4 budget, the pattern is final from update t=4 on
SKILLS = ("qa", "ner")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, base, train_skills' result, workdir) of a run with checkpoints at steps 3, 6."""
  c = tiny_config(skills="qa+ner", steps=STEPS, checkpoint_every=3, keep_checkpoints=3)
  c.train.async_checkpoint = False
  c.train.eval_rows_per_skill = 0  # no eval step to compile: the checkpoints are what counts
  base = loading.load_model(c.model.source)
  workdir = tmp_path_factory.mktemp("inspect") / "run"
  return c, base, train.train_skills(c, workdir, SKILLS, base=base), workdir


def _inspect(capsys, *argv) -> tuple[int, str, str]:
  rc = inspect.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _restore_the_slow_way(config, base, workdir):
  """(step, state, data) as a resume restores them: every array of the newest intact step."""
  state = train.setup_training(config, SKILLS, base=base).state
  mngr = checkpoint.manager(workdir / "checkpoints", keep=3, async_save=False)
  return checkpoint.restore_latest(mngr, checkpoint.abstract_of(state), {})


def _value_files(state_dir: pathlib.Path) -> dict[str, set[pathlib.Path]]:
  """{array name: the OCDBT data files holding its chunks} (small values live in the index)."""
  base = ts.KvStore.open(f"file://{state_dir}/").result()
  version = ts.ocdbt.dump(base).result()["versions"][-1]
  assert version["root_height"] == 0  # one index node: a tiny checkpoint
  files: dict[str, set[pathlib.Path]] = {}
  for entry in ts.ocdbt.dump(base, version["root"]["location"]).result()["entries"]:
    name = entry["key"].decode().split("/")[0]
    files.setdefault(name, set())
    if "indirect_value" in entry:  # "value:<prefix>:<file>:<offset>:<length>"
      prefix, file = entry["indirect_value"].removeprefix("value:").split(":")[:2]
      files[name].add(state_dir / prefix / file)
  return files


def test_stage1_report_has_every_field_and_the_masks_ranks(run, capsys, tmp_path):
  config, base, result, workdir = run
  rc, text, err = _inspect(capsys, workdir, "--plot", tmp_path / "ranks.png")
  assert rc == 0 and err == ""
  for line in (
    "checkpoint steps: 3, 6 (set aside as damaged: none)",
    "model: llama: 2 layers, hidden 64",
    "skills: qa, ner",
    "adapter targets: q, k, v, o, gate, up, down (init_r 4",
    "AdaLoRA schedule: total_step 6, tinit 1, tfinal 2, delta_t 1; budget per skill 56 -> 28",
    "phase at step 6: final: the pattern was fixed at update t=4 (training done)",
    "scheduled budget 28",
    "optimizer step: 6 updates",
    "data position: qa example 6 of 26 (epoch 0); ner example 6 of 26",
    "bad (non-finite) steps: 0",
    "  qa: mean rank 2.00, kept 28",
    "  state: 117 arrays",
    "opt_state.1.mask",
    "damaged: none",
  ):
    assert line in text, line
  assert (tmp_path / "ranks.png").stat().st_size > 1000  # training's own heat map

  rc, out, _ = _inspect(capsys, workdir, "--json")
  rep = json.loads(out)
  step, state, data = _restore_the_slow_way(config, base, workdir)
  assert rc == 0 and rep["step"] == step == STEPS and rep["steps"] == [3, 6]
  masks = adalora.find_state(state["opt_state"]).mask
  ranks = reporting.rank_table(masks, rep["targets"])  # [S, L, targets]
  assert ranks.min() < ranks.max() and ranks.min() < config.adalora.init_r  # it did prune
  for i, s in enumerate(SKILLS):
    for j, t in enumerate(rep["targets"]):
      assert rep["ranks"][s][t] == ranks[i, :, j].tolist(), (s, t)
    assert rep["mean_rank"][s] == config.adalora.target_r
  assert rep["data_position"] == data == result["data_state"]
  assert rep["optimizer_step"] == int(state["step"])
  arrays = jax.tree.leaves(state)
  assert rep["items"]["state"]["arrays"] == len(arrays)
  assert rep["items"]["state"]["bytes"] == sum(np.asarray(x).nbytes for x in arrays)

  _, out, _ = _inspect(capsys, workdir, "--step", 3, "--json")
  rep3 = json.loads(out)
  assert rep3["phase"]["name"].startswith("budgeting") and rep3["phase"]["scheduled_budget"] > 28


def test_a_relative_path_reads_the_same_as_an_absolute_one(run, capsys, monkeypatch):
  """`inspect runs/x` from the repository (as the docs show it): Orbax refuses relative
  paths, which must not read as damaged checkpoints."""
  workdir = run[3]
  rep = json.loads(_inspect(capsys, workdir, "--json")[1])
  monkeypatch.chdir(workdir.parent)
  rc, out, err = _inspect(capsys, workdir.name, "--json")
  assert rc == 0 and err == "", err
  got = json.loads(out)
  assert got["damaged"] == [] and got["ranks"] == rep["ranks"] and got["items"] == rep["items"]


# the slow way's failed reads end in Orbax's unraisable echoes: this test expects that failure
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_inspect_reads_no_array_of_the_state_but_the_masks(run, capsys, tmp_path):
  config, base, _, workdir = run
  copy = shutil.copytree(workdir, tmp_path / "run")
  state_dir = copy / "checkpoints" / str(STEPS) / "state"
  files = _value_files(state_dir)
  mask_files = set().union(*(f for name, f in files.items() if ".mask." in name))
  unneeded = set().union(*files.values()) - mask_files
  assert unneeded and sum(f.stat().st_size for f in unneeded) > 50_000
  for f in unneeded:  # the adapters' and optimizer moments' bytes: inspect must not need them
    f.unlink()
  _, intact, _ = _inspect(capsys, workdir, "--json")
  rc, out, err = _inspect(capsys, copy, "--json")
  got, want = json.loads(out), json.loads(intact)
  for key in ("ranks", "schedule", "phase", "data_position", "model", "bad_steps"):
    assert got[key] == want[key], key
  assert got["items"]["state"]["leaves"] == want["items"]["state"]["leaves"]
  # the missing files are found from the index and the file sizes alone, and named
  assert rc == 2 and [d["item"] for d in got["damaged"]] == ["state arrays"]
  assert all(str(f.relative_to(state_dir)) in got["damaged"][0]["why"] for f in unneeded)
  # ... while the slow way cannot restore that step: it sets it aside and resumes from step 3
  assert _restore_the_slow_way(config, base, copy)[0] == 3
  gc.collect()  # Orbax's failed reads end as unraisable echoes: here, not in the next test


def _bad_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"model": ')


def _truncated_array_file(step_dir):  # a killed copy, a full disk
  f = max((step_dir / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _no_state_index(step_dir):  # the OCDBT node that indexes every array (and holds the masks)
  for f in (step_dir / "state" / "d").iterdir():
    f.unlink()


@pytest.mark.parametrize(
  "damage, item, still_shown",
  [
    (_bad_meta, "meta", "optimizer step: 6"),
    (_no_state_index, "state", "skills: qa, ner"),
    (_truncated_array_file, "state arrays", "qa: mean rank 2.00"),
  ],
)
def test_a_damaged_step_is_one_line_and_status_2(run, capsys, tmp_path, damage, item, still_shown):
  copy = shutil.copytree(run[3], tmp_path / "run")
  step_dir = copy / "checkpoints" / str(STEPS)
  damage(step_dir)
  rc, out, err = _inspect(capsys, copy)
  assert rc == 2
  assert err.count("\n") == 1 and err.startswith(
    f"error: DamagedCheckpointError: {step_dir}: {item}: "
  )
  assert still_shown in out and "DAMAGED:" in out  # what could be read is still reported
  assert sorted(p.name for p in step_dir.parent.iterdir()) == ["3", "6"]  # nothing set aside


def _allocator_checkpoint(directory: pathlib.Path, r: int) -> None:
  """A stage-1-shaped checkpoint whose masks are large enough for their own data file."""
  cfg = PRESETS["tiny"]
  rng = np.random.default_rng(0)  # random: compressed, still too large for the OCDBT index
  mask = {t: rng.random((1, 2, r)) < 0.5 for t in ("q", "v")}
  alloc = adalora.AdaLoraState(np.int32(4), {}, {}, mask, np.int32(0), optax.EmptyState())
  state = {"opt_state": (optax.EmptyState(), alloc), "step": np.int32(4)}
  meta = checkpoint.run_identity(cfg, ("qa",), ("q", "v"), r, 1.0)
  mngr = checkpoint.manager(directory, keep=1, async_save=False)
  checkpoint.save(mngr, 4, state, {}, meta)
  mngr.wait_until_finished()


R_BIG = 8192


def test_a_damaged_mask_array_is_named(capsys, tmp_path):
  _allocator_checkpoint(tmp_path / "run" / "checkpoints", r=R_BIG)
  state_dir = tmp_path / "run" / "checkpoints" / "4" / "state"
  rc, out, _ = _inspect(capsys, tmp_path / "run", "--json")
  assert rc == 0 and 0 < json.loads(out)["kept"]["qa"] < 2 * 2 * R_BIG
  mask_files = _value_files(state_dir)["opt_state.1.mask.q"]
  assert mask_files
  for f in mask_files:
    f.unlink()
  rc, out, err = _inspect(capsys, tmp_path / "run")
  assert rc == 2 and f"{state_dir.parent}: state (masks): " in err and err.count("\n") == 1
  assert "kept rank per layer x module: unreadable" in out and f"mask  q bool[1,2,{R_BIG}]" in out


@pytest.mark.slow  # a subprocess
def test_the_command_line_prints_no_traceback(run, tmp_path):
  copy = shutil.copytree(run[3], tmp_path / "run")
  _no_state_index(copy / "checkpoints" / str(STEPS))  # Orbax fails many reads at once here
  cli = [sys.executable, "-m", "mdkif_jax.inspect", str(copy), "--json"]
  done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
  assert done.stderr.startswith("error: DamagedCheckpointError: ")
  assert json.loads(done.stdout)["damaged"][0]["item"] == "state"


def test_router_report_has_method_task_weights_gate_layers_and_scores(capsys, tmp_path):
  gate = router.Gate(PRESETS["tiny"].hidden_size, 2, hidden=8, rngs=nnx.Rngs(0))
  weights = np.asarray([0.25, 0.75], np.float32)
  state = {"weights": weights, "gate": nnx.to_pure_dict(nnx.split(gate)[1])}
  meta = {"model": {}, "skills": ["qa", "ner"], "task": "demo", "method": "gate"}
  checkpoint.save_router(tmp_path, state, meta, {"fit_rows": 12, "score_rows": 8})
  writer = reporting.MetricWriter(tmp_path)
  writer.write(1, {"eval/gate/loss": 2.5, "eval/gate/accuracy": 0.5, "eval/base/loss": 3.0})
  writer.close()
  rc, text, _ = _inspect(capsys, tmp_path)
  assert rc == 0
  for line in ("task: demo; method: gate", "fit_rows: 12, score_rows: 8", "  qa       +0.2500"):
    assert line in text, line
  assert "gate layer hidden: kernel [64, 8]" in text and "gate layer out: kernel [8, 2]" in text
  rep = json.loads(_inspect(capsys, tmp_path, "--json")[1])
  assert rep["weights"] == {"qa": 0.25, "ner": 0.75}
  assert set(rep["gate_layers"]["out"]["per_skill"]) == {"qa", "ner"}
  assert rep["scores"] == {"gate": {"loss": 2.5, "accuracy": 0.5}, "base": {"loss": 3.0}}


def _results(n_scored=8) -> dict:
  entry = lambda s: {"score": s, "ci": [s - 0.1, s + 0.1], "n": n_scored}  # noqa: E731
  methods = {"base": entry(0.4), "uniform": entry(0.5)}
  task = {"track": "qa", "metric": "accuracy", "n_fit": 4, "n_scored": n_scored}
  return {
    "model": "tiny",
    "skills": ["qa"],
    "tasks": {"demo": {**task, "methods": methods}},
    "tracks": {"qa": {"uniform": {"mean_relative_gain": 0.25, "ci": [0.1, 0.4]}}},
  }


def test_evaluation_report_is_the_results_table_and_a_damaged_cell_is_named(capsys, tmp_path):
  (tmp_path / "cells" / "demo").mkdir(parents=True)
  (tmp_path / "cells" / "demo" / "base.json").write_text("{}")
  (tmp_path / "results.json").write_text(json.dumps(_results()))
  rc, text, _ = _inspect(capsys, tmp_path)
  assert rc == 0 and "finished cells: 1 (demo: 1)" in text
  assert "\n".join(suite_report.results_table(_results())) in text
  (tmp_path / "cells" / "demo" / "uniform.json").write_text('{"cut')
  rc, _, err = _inspect(capsys, tmp_path)
  assert rc == 2 and "uniform.json: JSONDecodeError" in err


def test_a_running_evaluation_shows_each_finished_cells_headline_metric(capsys, tmp_path):
  out = {"gold": ["A", "B", "C", "A"], "pred": ["A", "A", "C", "B"], "rouge": [-1] * 12}
  out |= {"pred_norm": out["pred"], "counts": [0] * 12}
  (tmp_path / "cells" / "medmcqa").mkdir(parents=True)
  cell = {"scores": {"accuracy": 0.9}, "outcomes": out, "seconds": 150}
  (tmp_path / "cells" / "medmcqa" / "gd.json").write_text(json.dumps(cell))
  (tmp_path / "cells" / "healthfc").mkdir()
  archived = {"scores": {"accuracy": 0.6, "macro_f1": 0.25}, "seconds": 60}  # no gold to score
  (tmp_path / "cells" / "healthfc" / "base.json").write_text(json.dumps(archived))
  odd = {"outcomes": out | {"pred": ["A"]}, "scores": [0.5]}  # JSON, but not a cell's shape
  (tmp_path / "cells" / "medmcqa" / "odd.json").write_text(json.dumps(odd))
  rc, text, _ = _inspect(capsys, tmp_path)
  assert rc == 0 and "results: none yet" in text and "odd" not in text.split("finished")[-1]
  assert "  medmcqa (accuracy): gd 0.500 (2.5)" in text  # from the rows, not the stored 0.9
  assert "  healthfc (macro_f1): base 0.250 (1.0)" in text  # the task's headline metric
  assert "remaining" not in text  # no plan.json: an evaluation started before it was written


def test_a_running_evaluation_shows_the_cells_left_and_their_time_by_method(capsys, tmp_path):
  for task, cell, minutes in (
    ("medmcqa", "gd", 2.5),
    ("healthfc", "base", 1.0),
    ("healthfc", "gd", 4.5),
  ):
    (tmp_path / "cells" / task).mkdir(parents=True, exist_ok=True)
    done = {"scores": {"accuracy": 0.5}, "seconds": 60 * minutes}
    (tmp_path / "cells" / task / f"{cell}.json").write_text(json.dumps(done))
  plan = {"tasks": ["medmcqa", "healthfc", "pubmedqa"], "cells": ["base", "gd", "uniform"]}
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  rc, text, _ = _inspect(capsys, tmp_path)
  assert rc == 0 and "remaining: 6 of 9 cells (medmcqa: 2, healthfc: 1, pubmedqa: 3)" in text
  rep = json.loads(_inspect(capsys, tmp_path, "--json")[1])
  assert rep["remaining"]["cells"]["medmcqa"] == ["base", "uniform"]
  # base 2 x 1.0 and gd 1 x 3.5 by their medians; uniform (none finished) 3 x 2.5, all cells'
  assert rep["remaining"]["minutes"] == pytest.approx(2 * 1.0 + 3.5 + 3 * 2.5)
  started = tmp_path / "started"  # a run that has written its plan, no cell yet
  started.mkdir()
  (started / "plan.json").write_text(json.dumps(plan))
  rc, text, _ = _inspect(capsys, started)
  assert rc == 0 and "remaining: 9 of 9 cells" in text and "about" not in text
  (tmp_path / "plan.json").write_text('{"tasks": ')
  rc, _, err = _inspect(capsys, tmp_path)
  assert rc == 2 and "plan.json: JSONDecodeError" in err


def test_a_path_that_is_no_run_or_a_missing_step_is_one_line(run, capsys, tmp_path):
  rc, _, err = _inspect(capsys, tmp_path)
  assert rc == 2 and err.startswith("error: InspectError: ") and "not a run" in err
  rc, _, err = _inspect(capsys, run[3], "--step", 5)
  assert rc == 2 and "--step=5" in err and "holds steps [3, 6]" in err
  assert ocp.utils.checkpoint_steps(run[3] / "checkpoints")  # nothing was created or moved
