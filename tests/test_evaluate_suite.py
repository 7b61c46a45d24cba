"""The evaluation stage end to end on the tiny model: two tasks (the demo corpus's label and
generated rows, and a user's MCQA file with bad lines) x every method -> results.json with
intervals and paired differences, results.md, results.png, predictions.jsonl; a rerun skips
finished cells, also after a SIGKILL of the real entry point; scored rows are never fitted
on."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import eval as eval_config
from mdkif_jax import cells_archive, evaluate_suite, inspect
from mdkif_jax.checkpoint import CheckpointMismatchError
from mdkif_jax.data import suite
from mdkif_jax.data.example import LoadReport
from mdkif_jax.errors import ConfigError
from mdkif_jax.model import loading
from tests.test_router_run import write_skills
from tests.test_train_kill import REPO, RUN_TIMEOUT_S, subprocess_env, tail

pytestmark = pytest.mark.slow


def mcqa_file(path):
  """A MedQA-layout and a MedMCQA-layout row of each of 12 questions, plus 3 bad lines."""
  lines = []
  for i in range(12):
    opts = {"A": f"alpha {i}", "B": f"beta {i}", "C": f"gamma {i}", "D": f"delta {i}"}
    lines.append(
      json.dumps({"question": f"Which {i}?", "options": opts, "answer_idx": "ABCD"[i % 4]})
    )
    row = {
      "question": f"What {i}?",
      "opa": "a",
      "opb": "b",
      "opc": "c",
      "opd": "d",
      "cop": 1 + i % 4,
    }
    lines.append(json.dumps(row))
  lines.insert(3, '{"question": "cut off",')  # truncated JSON
  lines.insert(7, json.dumps({"question": "q", "options": {"A": "x"}, "answer_idx": "E"}))
  lines.insert(11, json.dumps([1, 2, 3]))  # not an object
  path.write_text("\n".join(lines) + "\n")
  return path


def test_bad_lines_of_a_task_file_are_counted_with_file_and_line(tmp_path):
  path = mcqa_file(tmp_path / "mine.jsonl")
  report = LoadReport()
  rows = suite.read_task_file(path, report)
  assert len(rows) == 24 and report.skipped[str(path)] == 3
  assert {r.answer for r in rows} == set("ABCD")
  assert rows[0].query.splitlines()[1:] == ["A. alpha 0", "B. beta 0", "C. gamma 0", "D. delta 0"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  write_skills(root / "skills", "tiny_smollm_vocab")
  c = eval_config.get_config("tiny")
  c.skills_from = str(root / "skills")
  c.mesh.shape = (1, 1, 1)
  c.tasks = ("demo", f"mine={mcqa_file(root / 'mine.jsonl')}")
  c.max_fit_rows, c.max_scored_rows, c.fit_fraction = 12, 10, 0.5
  c.gen.max_new_tokens = 4  # generation is exercised, not measured: keep it short
  c.router.steps = c.gate.steps = 6  # also the task adapter's budget
  base = loading.load_model("tiny_smollm_vocab")
  results = evaluate_suite.train_and_evaluate(c, root / "run", base=base)
  return c, base, root, results


def test_every_task_and_method_has_a_score_an_interval_and_a_paired_difference(evaluated):
  c, _, root, results = evaluated
  want = {"base", "base_k2", "uniform", "best_single", "gd", "cmaes_k4", "gate", "adalora_task"}
  want.add("majority")
  assert set(results["tasks"]) == {"demo", "mine"}
  for name, t in results["tasks"].items():
    assert set(t["methods"]) == want, name
    assert t["n_scored"] == 10 and 4 <= t["n_fit"] <= 12
    for m, e in t["methods"].items():
      assert e["ci"][0] <= e["score"] <= e["ci"][1], (name, m, e)
      assert e["n"] == 10 and e["seconds"] > 0 and e["cpu_seconds"] > 0
      d = e["delta_vs_base"]
      assert d["ci"][0] <= d["mean"] <= d["ci"][1] and 0 <= d["p_le_0"] <= 1
    assert t["methods"]["base"]["delta_vs_base"]["mean"] == 0
    assert set(t["methods"]["cmaes_k4"]["seeds"]) == {"cmaes_k4_s0", "cmaes_k4_s1"}
    assert t["methods"]["best_single"]["chosen"] in ("qa", "ner")
  assert results["tasks"]["mine"]["track"] == "custom"
  assert "gd" in results["tracks"]["custom"]
  for track, by in results["tracks"].items():  # the mean Δ in points: the tasks' Δ averaged
    deltas = [t["methods"]["gd"]["delta_vs_base"]["mean"] for t in results["tasks"].values()]
    deltas = [
      d for t, d in zip(results["tasks"].values(), deltas, strict=True) if t["track"] == track
    ]
    assert by["gd"]["mean_delta"]["mean"] == pytest.approx(np.mean(deltas))
    assert by["gd"]["mean_delta"]["ci"][0] <= by["gd"]["mean_delta"]["ci"][1]
  on_disk = json.loads((root / "run" / "results.json").read_text())
  assert (
    on_disk["tasks"]["mine"]["methods"]["gd"]["score"]
    == results["tasks"]["mine"]["methods"]["gd"]["score"]
  )
  table = (root / "run" / "results.md").read_text()
  assert "adalora_task" in table and "**" in table and "Δ" in table
  assert (root / "run" / "results.png").stat().st_size > 0
  preds = [json.loads(x) for x in (root / "run" / "predictions.jsonl").read_text().splitlines()]
  assert {p["method"] for p in preds} >= {"base", "cmaes_k4_s1"} and {p["task"] for p in preds} == {
    "demo",
    "mine",
  }


def test_the_router_is_compared_row_by_row_with_each_reference(evaluated):
  _, _, root, results = evaluated
  gains = 0
  for track in ("custom", "unseen_data"):
    tasks = [t for t in results["tasks"].values() if t["track"] == track]
    vs = results["router_vs"][track]
    assert set(vs) == {"uniform", "best_single", "adalora_task"}
    for ref, g in vs.items():
      gd = [t["methods"]["gd"]["score"] for t in tasks]
      other = [t["methods"][ref]["score"] for t in tasks]
      rel = [(a - b) / b for a, b in zip(gd, other, strict=True) if b > 0]
      assert g["tasks"] == len(rel)
      if rel:
        np.testing.assert_allclose(g["mean_relative_gain"], np.mean(rel), rtol=1e-9)
      for t in tasks:
        d = t["methods"]["gd"]["delta_vs"][ref]
        np.testing.assert_allclose(
          d["mean"], t["methods"]["gd"]["score"] - t["methods"][ref]["score"], atol=1e-12
        )
        assert d["ci"][0] <= d["mean"] <= d["ci"][1]
    base = [t["methods"]["base"]["score"] for t in tasks]
    g = results["tracks"][track]["gd"]["gain_of_means"]
    if sum(base) > 0:
      np.testing.assert_allclose(g["gain"], sum(gd) / sum(base) - 1, rtol=1e-9)
      gains += 1
    else:  # the tiny model's base can score 0 on a track: no relative gain
      assert np.isnan(g["gain"])
  assert gains  # a track with a relative gain of the mean score
  # over all tasks (the bar): the router's mean Δ to the base and to each reference
  every, tasks = results["all_tasks"], list(results["tasks"].values())
  assert every["tasks"] == 2 and set(every["router_vs"]) == {
    "uniform",
    "best_single",
    "adalora_task",
  }
  np.testing.assert_allclose(
    every["gd"]["mean_delta"]["mean"],
    np.mean([t["methods"]["gd"]["delta_vs_base"]["mean"] for t in tasks]),
    atol=1e-12,
  )
  for ref, g in every["router_vs"].items():
    d = [t["methods"]["gd"]["delta_vs"][ref]["mean"] for t in tasks]
    np.testing.assert_allclose(g["mean_delta"]["mean"], np.mean(d), atol=1e-12)
    assert g["mean_delta"]["ci"][0] <= g["mean_delta"]["mean"] <= g["mean_delta"]["ci"][1]
    ref_scores = sum(t["methods"][ref]["score"] for t in tasks)
    if ref_scores > 0:
      gd_scores = sum(t["methods"]["gd"]["score"] for t in tasks)
      np.testing.assert_allclose(g["gain_of_means"]["gain"], gd_scores / ref_scores - 1, rtol=1e-9)
  table = (root / "run" / "results.md").read_text()
  assert table.count("| gd minus |") == 2 and "gd vs base: higher on" in table
  assert "| gd above best_single on average | mean Δ " in table
  d = [results["tasks"][n]["methods"]["gd"]["delta_vs_base"] for n in ("demo", "mine")]
  wins, sure = sum(x["mean"] > 0 for x in d), sum(x["ci"][0] > 0 for x in d)
  overall = f"All 2 tasks: gd higher than the base on {wins}, the Δ interval above 0 on {sure}."
  assert overall in table
  seeds = results["tasks"]["mine"]["methods"]["cmaes_k4"]["seeds"]
  assert len(seeds) == 2 and results["tasks"]["mine"]["methods"]["cmaes_k4"]["score"] == (
    pytest.approx(np.mean(list(seeds.values())))
  )
  spread = f"{min(seeds.values()):.3f}-{max(seeds.values()):.3f} (2 seeds) |"
  assert f"| cmaes_k4 | {spread}" in table
  entries = [e for t in results["tasks"].values() for e in t["methods"].values()]
  wall, cpu = (sum(e[k] for e in entries) / 3600 for k in ("seconds", "cpu_seconds"))
  n = len(entries)
  assert f"{wall:.2f} h wall, {cpu:.2f} h CPU ({n} of {n} methods)." in table


def test_each_fitted_methods_skill_weights_are_recorded_seeds_averaged(evaluated):
  _, _, root, results = evaluated
  skills = results["skills"]
  for name, t in results["tasks"].items():
    cells = root / "run" / "cells" / name
    for m in ("gd", "gate", "best_single"):
      cell = json.loads((cells / f"{m}.json").read_text())["weights"]
      assert t["methods"][m]["weights"] == dict(zip(skills, cell, strict=True)), (name, m)
    seeds = [json.loads((cells / f"cmaes_k4_s{s}.json").read_text())["weights"] for s in (0, 1)]
    got = [t["methods"]["cmaes_k4"]["weights"][s] for s in skills]
    np.testing.assert_allclose(got, np.mean(seeds, axis=0), rtol=1e-12)
    for m in ("base", "uniform", "majority", "adalora_task"):  # nothing mixes the skills
      assert "weights" not in t["methods"][m], (name, m)
  assert (root / "run" / "router_weights.png").stat().st_size > 0
  assert "| largest skill weights |" in (root / "run" / "results.md").read_text()


def test_majority_answers_the_fit_parts_most_frequent_label_everywhere(evaluated):
  c, base, root, results = evaluated
  specs = [suite.resolve(t) for t in c.tasks]
  fit, scored = evaluate_suite.load_rows(c, specs, LoadReport())["mine"]
  counts = {a: sum(ex.answer == a for ex in fit) for a in "ABCD"}
  top = max("ABCD", key=counts.get)  # ties to the first, as the candidates are ordered
  cell = json.loads((root / "run" / "cells" / "mine" / "majority.json").read_text())
  assert [p["id"] for p in cell["predictions"]] == [ex.id for ex in scored]  # the same split
  assert {p["prediction"] for p in cell["predictions"]} == {top}
  want = sum(ex.answer == top for ex in scored) / len(scored)
  assert results["tasks"]["mine"]["methods"]["majority"]["score"] == pytest.approx(want)
  assert results["tasks"]["mine"]["methods"]["majority"]["lean"] == {"answer": top, "share": 1.0}
  assert "answer_nll" not in results["tasks"]["mine"]["methods"]["majority"]  # no model
  for m in ("gd", "cmaes_k4"):
    cells = [json.loads(p.read_text()) for p in (root / "run" / "cells" / "mine").glob(f"{m}*")]
    want = np.mean([c["scores"]["loss"] for c in cells])
    assert results["tasks"]["mine"]["methods"][m]["answer_nll"] == pytest.approx(want)
  most = max(sum(ex.answer == a for ex in scored) for a in "ABCD")
  gold = results["tasks"]["mine"]["gold_lean"]  # ties: the first in row order
  assert gold["share"] == most / len(scored)
  assert sum(ex.answer == gold["answer"] for ex in scored) == most


def test_compare_pairs_the_same_rows_as_the_evaluation_stage(evaluated, tmp_path):
  """mdkif_jax.compare recomputes each method's difference to its base from the cells with
  the stage's resamples: it equals results.json's, seeded methods included."""
  from mdkif_jax import compare

  c, _, root, results = evaluated
  twin = tmp_path / "twin"
  shutil.copytree(root / "run", twin)
  for method in ("gd", "cmaes_k4"):
    res = compare.compare([root / "run", twin], None, method)  # results.json's resamples
    assert res["bootstrap"] == {"resamples": c.bootstrap.resamples, "seed": c.bootstrap.seed}
    for name, t in results["tasks"].items():
      got = res["tasks"][name]["by"]["run"]
      assert got["score"] == pytest.approx(t["methods"][method]["score"], abs=1e-12)
      want = t["methods"][method]["delta_vs_base"]
      assert got["delta_vs_base"]["ci"] == pytest.approx(want["ci"], abs=1e-12), (name, method)
      assert res["tasks"][name]["first_minus"]["twin"]["ci"] == [0.0, 0.0]


def test_a_rerun_recomputes_only_the_missing_cells(evaluated):
  c, base, root, results = evaluated
  cells = root / "run" / "cells"
  kept = {p: p.stat().st_mtime_ns for p in cells.rglob("*.json")}
  (cells / "mine" / "gd.json").unlink()
  # what `inspect` says is left comes from the plan the run wrote when it started
  left = inspect.evaluation(root / "run")["remaining"]
  assert left["cells"] == {"mine": ["gd"]} and left["of"] == len(kept) and left["minutes"] > 0
  again = evaluate_suite.train_and_evaluate(c, root / "run", base=base)
  for p, t in kept.items():
    if p.name != "gd.json" or p.parent.name != "mine":
      assert p.stat().st_mtime_ns == t, p  # never recomputed
  assert (cells / "mine" / "gd.json").exists()
  assert again["tasks"]["demo"] == results["tasks"]["demo"]


def test_the_task_adapters_training_shows_a_progress_bar_over_its_steps(evaluated, tmp_path, capfd):
  c, base, root, _ = evaluated
  shutil.copytree(root / "run", tmp_path / "run")
  (tmp_path / "run" / "cells" / "mine" / "adalora_task.json").unlink()
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.progress = True  # not in the cells' identity: the finished cells are kept
  evaluate_suite.train_and_evaluate(c, tmp_path / "run", base=base)
  err = capfd.readouterr().err
  # a bar over the steps (tqdm redraws at most every 0.1 s and a bar that does not stay
  # clears itself, so the last step it shows depends on timing)
  assert "adalora_task:" in err and f"/{c.router.steps} [" in err


def test_scored_rows_are_never_fit_rows_or_in_context_examples(evaluated):
  c, _, root, _ = evaluated
  rows = evaluate_suite.load_rows(c, [suite.resolve(e) for e in c.tasks], LoadReport())
  for name, (fit, scored) in rows.items():
    assert not {r.id for r in fit} & {r.id for r in scored}, name
  # the in-context examples of base_k2 come from the fit rows
  preds = json.loads((root / "run" / "cells" / "mine" / "base_k2.json").read_text())["predictions"]
  assert len(preds) == 10


def test_sigkill_mid_suite_then_rerun_equals_the_uninterrupted_cells(evaluated, tmp_path):
  """The real entry point is SIGKILLed once two cells are on disk; the rerun (in process, the
  same config) recomputes only the rest, and every cell equals the uninterrupted run's."""
  c, base, root, results = evaluated
  methods = ("base", "uniform", "gd")
  run = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "mdkif_jax.main",
    "--config=configs/eval.py:tiny",
    f"--workdir={run}",
    f"--config.skills_from={c.skills_from}",
    "--config.mesh.shape=(1,1,1)",
    f"--config.tasks={tuple(c.tasks)!r}",
    f"--config.methods={methods!r}",
    f"--config.max_fit_rows={c.max_fit_rows}",
    f"--config.max_scored_rows={c.max_scored_rows}",
    f"--config.fit_fraction={c.fit_fraction}",
    f"--config.gen.max_new_tokens={c.gen.max_new_tokens}",
    f"--config.router.steps={c.router.steps}",
    f"--config.gate.steps={c.gate.steps}",
  ]
  cells = run / "cells"
  done = lambda: sorted(cells.rglob("*.json")) if cells.is_dir() else []  # noqa: E731
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=log, stderr=log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and len(done()) < 2 and time.monotonic() < deadline:
      time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert alive, f"the evaluation ended before the kill:\n{tail(tmp_path / 'killed.log')}"
  kept = {p: p.stat().st_mtime_ns for p in done()}
  assert 2 <= len(kept) < 2 * len(methods), kept

  c2 = c.copy_and_resolve_references()
  c2.methods = methods
  again = evaluate_suite.train_and_evaluate(c2, run, base=base)
  assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # never recomputed
  for task_name in ("demo", "mine"):
    for m in methods:
      ours = json.loads((cells / task_name / f"{m}.json").read_text())
      ref = json.loads((root / "run" / "cells" / task_name / f"{m}.json").read_text())
      assert ours["outcomes"] == ref["outcomes"] and ours["scores"] == ref["scores"], (task_name, m)
      # the router's comparisons cover the references this run has (a subset of the full run's)
      skip = ("seconds", "cpu_seconds", "delta_vs")
      got = {k: v for k, v in again["tasks"][task_name]["methods"][m].items() if k not in skip}
      want = {k: v for k, v in results["tasks"][task_name]["methods"][m].items() if k not in skip}
      assert got == want, (task_name, m)
      vs = again["tasks"][task_name]["methods"][m].get("delta_vs", {})
      full = results["tasks"][task_name]["methods"][m].get("delta_vs", {})
      assert all(vs[r] == full[r] for r in vs), (task_name, m)


def test_scoring_rows_sharded_over_8_devices_equals_one_device(evaluated, tmp_path):
  """The scored rows are split over the mesh's data axis (padded to a multiple of 8): the
  same choices, generations and scores as the one-device run."""
  c, _, root, _ = evaluated
  c8 = c.copy_and_resolve_references()
  c8.mesh.shape = (8, 1, 1)
  c8.methods = ("base", "uniform")
  evaluate_suite.train_and_evaluate(c8, tmp_path / "run")  # loads its base on the 8-device mesh
  for task_name in ("demo", "mine"):
    for m in c8.methods:
      ours = json.loads((tmp_path / "run" / "cells" / task_name / f"{m}.json").read_text())
      ref = json.loads((root / "run" / "cells" / task_name / f"{m}.json").read_text())
      assert ours["outcomes"] == ref["outcomes"], (task_name, m)
      assert ours["predictions"] == ref["predictions"], (task_name, m)
      for k, v in ref["scores"].items():
        assert ours["scores"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task_name, m, k)


def test_a_rerun_under_another_config_is_refused_naming_the_field(evaluated):
  c, base, root, _ = evaluated
  changed = c.copy_and_resolve_references()
  changed.router.steps = c.router.steps + 1
  with pytest.raises(CheckpointMismatchError, match=r"router\.steps: cells have 6, this run 7"):
    evaluate_suite.train_and_evaluate(changed, root / "run", base=base)


def test_base_cells_are_copied_from_another_evaluation_of_the_same_prompting(evaluated, tmp_path):
  """reuse_cells_from copies base and base_k<k> (they do not depend on the skills) from an
  evaluation whose config differs only in the skills, and computes the rest; another config
  or another prompting is refused, naming what differs."""
  c, base, root, _ = evaluated
  src = tmp_path / "src"
  shutil.copytree(root / "run", src)
  ident = json.loads((src / "cells_identity.json").read_text())
  (src / "cells_identity.json").write_text(json.dumps(ident | {"skills_from": "elsewhere"}))
  marked = src / "cells" / "mine" / "base.json"
  cell = json.loads(marked.read_text())
  cell["scores"]["accuracy"] = 0.123456  # a value no computation gives: proves the copy
  marked.write_text(json.dumps(cell))
  (src / "cells" / "demo" / "base_k2.json").unlink()  # missing there: computed here
  c2 = c.copy_and_resolve_references()
  c2.methods = ("base", "base_k2", "uniform")
  c2.reuse_cells_from = str(src)
  evaluate_suite.train_and_evaluate(c2, tmp_path / "run", base=base)
  ours = tmp_path / "run" / "cells" / "mine"
  got = json.loads((ours / "base.json").read_text())
  assert got["scores"]["accuracy"] == 0.123456 and got["reused_from"] == str(src)
  assert json.loads((ours / "base_k2.json").read_text())["reused_from"] == str(src)
  demo_k2 = json.loads((tmp_path / "run" / "cells" / "demo" / "base_k2.json").read_text())
  want_k2 = json.loads((root / "run" / "cells" / "demo" / "base_k2.json").read_text())
  assert "reused_from" not in demo_k2
  assert demo_k2["scores"] == pytest.approx(want_k2["scores"], rel=1e-5, abs=1e-6)
  uniform = json.loads((ours / "uniform.json").read_text())
  assert "reused_from" not in uniform  # a cell with skills is computed here
  want = json.loads((root / "run" / "cells" / "mine" / "uniform.json").read_text())
  assert uniform["scores"] == pytest.approx(want["scores"], rel=1e-5, abs=1e-6)

  other = c2.copy_and_resolve_references()
  other.max_scored_rows = c.max_scored_rows + 1
  with pytest.raises(CheckpointMismatchError, match=r"max_scored_rows: cells have 10, this run 11"):
    evaluate_suite.train_and_evaluate(other, tmp_path / "other", base=base)
  cell["predictions"][0]["answer"] = "not this row's answer"
  marked.write_text(json.dumps(cell))
  with pytest.raises(CheckpointMismatchError, match=r"mine/base.json scored other rows"):
    evaluate_suite.train_and_evaluate(c2, tmp_path / "fourth", base=base)
  prompting = json.loads((src / "prompting.json").read_text())
  (src / "prompting.json").write_text(json.dumps(prompting | {"max_len": 7}))
  with pytest.raises(CheckpointMismatchError, match=r"prompted otherwise \(max_len: cells have 7"):
    evaluate_suite.train_and_evaluate(c2, tmp_path / "third", base=base)
  (src / "prompting.json").unlink()
  with pytest.raises(ConfigError, match=r"prompting.json is missing"):
    evaluate_suite.train_and_evaluate(c2, tmp_path / "third", base=base)
  # the workdir's own prompting is pinned by its first run
  c3 = c.copy_and_resolve_references()
  mine = json.loads((tmp_path / "run" / "prompting.json").read_text())
  (tmp_path / "run" / "prompting.json").write_text(json.dumps(mine | {"max_len": 9}))
  with pytest.raises(CheckpointMismatchError, match=r"run: its cells were prompted otherwise"):
    evaluate_suite.train_and_evaluate(c3, tmp_path / "run", base=base)


def test_every_archived_cell_is_restored_before_any_cell_is_computed(
  evaluated, tmp_path, monkeypatch
):
  """A run restores all its archive holds before it computes a cell, whatever the tasks'
  order: the progress bar and `inspect` on the workdir then count only the cells left."""
  c, base, root, _ = evaluated
  arch = tmp_path / "arch"
  cells_archive.main([str(root / "run"), str(arch)])
  first = sorted((arch / "cells").iterdir())[0]
  missing = first.relative_to(arch) / "base.json"
  (arch / missing).unlink()  # the first task's one cell to compute; every later one restored
  archived = {p.relative_to(arch) for p in (arch / "cells").rglob("*.json")}
  assert len({p.parts[1] for p in archived}) >= 2
  work, seen = tmp_path / "run", []
  computing = evaluate_suite.run_cell

  def watched(t, run):
    seen.append({p.relative_to(work) for p in (work / "cells").rglob("*.json")})
    assert inspect.evaluation(work)["remaining"]["count"] == 1  # what a user watching sees
    return computing(t, run)

  monkeypatch.setattr(evaluate_suite, "run_cell", watched)
  c2 = c.copy_and_resolve_references()
  c2.restore_cells_from = str(arch)
  evaluate_suite.train_and_evaluate(c2, work, base=base)
  assert seen == [archived]  # one cell computed, after all the others were in place
  assert "restored_from" not in json.loads((work / missing).read_text())
  assert inspect.evaluation(work)["remaining"]["count"] == 0


def test_an_archive_without_the_datas_text_restores_every_cell(evaluated, tmp_path):
  """cells_archive publishes the cells with row-keyed digests in place of the reference
  answers and without generated text; a new workdir restores them all (answers re-joined from
  the data, generated predictions null) and assembles the same table; an archive of other
  rows, answers, skills or config is refused, naming what differs."""
  c, base, root, results = evaluated
  arch = tmp_path / "arch"
  cells_archive.main([str(root / "run"), str(arch)])
  originals = {p.relative_to(root / "run"): p for p in (root / "run" / "cells").rglob("*.json")}
  assert {p.relative_to(arch) for p in (arch / "cells").rglob("*.json")} == set(originals)
  cells = {rel: json.loads(p.read_text()) for rel, p in originals.items()}
  answers = {p["answer"] for cell in cells.values() for p in cell["predictions"]}
  texts = {
    p["prediction"]
    for cell in cells.values()
    for p in cell["predictions"]
    if p["kind"] == "generated"
  }
  assert len(answers) > 4 and len(texts) > 4
  plain = {hashlib.sha256(a.encode()).hexdigest()[:16] for a in answers}  # a label's digest
  for path in (arch / "cells").rglob("*.json"):
    text = path.read_text()
    assert '"answer"' not in text and '"gold"' not in text, path
    leaked = [a for a in answers | texts if len(a) > 3 and json.dumps(a)[1:-1] in text]
    assert not leaked and not [d for d in plain if d in text], (path, leaked)
  marked = arch / "cells" / "mine" / "gd.json"
  cell = json.loads(marked.read_text())
  cell["scores"]["accuracy"] = 0.123456  # a value no computation gives: proves the restore
  marked.write_text(json.dumps(cell))

  c2 = c.copy_and_resolve_references()
  c2.restore_cells_from = str(arch)
  again = evaluate_suite.train_and_evaluate(c2, tmp_path / "run", base=base)
  for rel, want in cells.items():
    got = json.loads((tmp_path / "run" / rel).read_text())
    assert got.pop("restored_from") == str(arch), rel
    if rel.parts[-2:] == ("mine", "gd.json"):
      want["scores"]["accuracy"] = 0.123456
    for p in want["predictions"]:
      if p["kind"] == "generated":
        p["prediction"] = None  # the one thing an archive does not give back
    assert got == want, rel
  assert again["tasks"]["demo"] == results["tasks"]["demo"]
  # the restored cells archived again: the archive's cells, no trace of the restore
  before = {p: json.loads(p.read_text()) for p in (arch / "cells").rglob("*.json")}
  cells_archive.archive(tmp_path / "run", arch)
  assert {p: json.loads(p.read_text()) for p in (arch / "cells").rglob("*.json")} == before
  # re-archiving over an archive made where the stage-1 run had another path goes on
  ident = json.loads((arch / "cells_identity.json").read_text())
  (arch / "cells_identity.json").write_text(json.dumps(ident | {"skills_from": "/elsewhere"}))
  cells_archive.archive(root / "run", arch)
  assert json.loads((arch / "cells_identity.json").read_text()) == ident

  demo = next((arch / "cells" / "demo").glob("*.json"))
  good = demo.read_text()
  cell = json.loads(good)
  i = next(i for i, d in enumerate(cell["outcomes"]["gold_digest"]) if d)
  cell["outcomes"]["gold_digest"][i] = "0" * 16
  demo.write_text(json.dumps(cell))
  with pytest.raises(CheckpointMismatchError, match=rf"row {i} \(.*\) has another answer"):
    evaluate_suite.train_and_evaluate(c2, tmp_path / "second", base=base)
  demo.write_text(json.dumps(json.loads(good) | {"rows_digest": "0" * 16}))
  with pytest.raises(CheckpointMismatchError, match=r"or in another order, than this run's 10"):
    evaluate_suite.train_and_evaluate(c2, tmp_path / "third", base=base)
  demo.write_text(good)
  skills = json.loads((arch / "skills.json").read_text())
  (arch / "skills.json").write_text(json.dumps(skills | {"sha256": "0" * 64}))
  with pytest.raises(CheckpointMismatchError, match=r"its skills.json differs .*\(sha256\)"):
    evaluate_suite.train_and_evaluate(c2, tmp_path / "fourth", base=base)
  with pytest.raises(CheckpointMismatchError, match=r"holds the cells of another evaluation"):
    cells_archive.archive(root / "run", arch)
  # the workdir's own cells are pinned to its skills by its first run
  (tmp_path / "run" / "skills.json").write_text(json.dumps(skills | {"scale": 2.0}))
  with pytest.raises(CheckpointMismatchError, match=r"computed with other skills \(scale differ"):
    evaluate_suite.train_and_evaluate(c, tmp_path / "run", base=base)


def test_without_skills_an_archive_alone_rebuilds_its_table_and_loads_no_model(
  evaluated, tmp_path, monkeypatch
):
  """With no skills_from, restore_cells_from's archive and the data are all there is: the
  same results.json with no model or checkpoint loaded (a new checkout compares published
  evaluations); a cell the archive lacks is one line naming it, and nothing is written."""
  c, _, root, _ = evaluated
  arch = tmp_path / "arch"
  cells_archive.main([str(root / "run"), str(arch)])
  # the table of the cells archived (another test may have recomputed one since the fixture)
  results = json.loads((root / "run" / "results.json").read_text())

  def no_model(*a, **k):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(loading, "load_model", no_model)
  monkeypatch.setattr(evaluate_suite.checkpoint, "load_skills", no_model)
  c2 = c.copy_and_resolve_references()
  c2.skills_from, c2.restore_cells_from = None, str(arch)
  again = evaluate_suite.train_and_evaluate(c2, tmp_path / "run", base=None)
  same = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731 (NaN, a base-0 gain, != NaN)
  assert same(again) == same(results)
  for name in ("skills.json", "prompting.json"):
    assert (tmp_path / "run" / name).read_text() == (root / "run" / name).read_text()
  # a cell the archive lacks: named, and the new workdir gets no cell
  (arch / "cells" / "mine" / "gd.json").unlink()
  with pytest.raises(
    ConfigError, match=r"has no cell mine/gd: computing a cell needs the skills"
  ) as e:
    evaluate_suite.train_and_evaluate(c2, tmp_path / "second", base=None)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "second").exists()  # no identity file to block a run with the skills
  # an answer that no longer matches the data: refused before any cell or identity is written
  demo = arch / "cells" / "demo" / "uniform.json"  # after demo/base in the order restored
  cell = json.loads(demo.read_text())
  i = next(i for i, d in enumerate(cell["outcomes"]["gold_digest"]) if d)
  cell["outcomes"]["gold_digest"][i] = "0" * 16
  demo.write_text(json.dumps(cell))
  c4 = c2.copy_and_resolve_references()
  c4.methods = tuple(m for m in c4.methods if m != "gd")
  with pytest.raises(CheckpointMismatchError, match=rf"row {i} \(.*\) has another answer"):
    evaluate_suite.train_and_evaluate(c4, tmp_path / "fifth", base=None)
  assert not (tmp_path / "fifth").exists()
  c4.reuse_cells_from = str(root / "run")  # nothing is computed: nothing to reuse cells for
  with pytest.raises(ConfigError, match=r"drop --config.reuse_cells_from"):
    evaluate_suite.train_and_evaluate(c4, tmp_path / "fifth", base=None)
  # an archive of another config is refused as with skills
  c3 = c2.copy_and_resolve_references()
  c3.max_scored_rows += 1
  c3.methods = tuple(m for m in c3.methods if m != "gd")
  with pytest.raises(CheckpointMismatchError, match=r"cells_identity.json differs"):
    evaluate_suite.train_and_evaluate(c3, tmp_path / "third", base=None)
  (arch / "skills.json").unlink()
  with pytest.raises(ConfigError, match=r"skills.json: No such file"):
    evaluate_suite.train_and_evaluate(c2, tmp_path / "fourth", base=None)
