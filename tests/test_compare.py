"""`python -m mdkif_jax.compare`: the main evaluation against the controls' on the same rows,
task by task (paired differences) and per track (mean relative gain), as a table and a plot;
evaluations of other rows are refused. Cells here are written by hand with planted outcomes,
so every number below is known without running a model."""

import json

import pytest

from mdkif_jax import compare

N = 40


def _cell(correct: int, ids=None) -> dict:
  """An accuracy cell of N rows (gold "A"), the first `correct` of them answered right."""
  pred = ["A"] * correct + ["B"] * (N - correct)
  ids = ids or [f"r{i}" for i in range(N)]
  return {
    "outcomes": {
      "gold": ["A"] * N,
      "pred": pred,
      "pred_norm": pred,
      "rouge": [[-1.0] * 3] * N,
      "counts": [[0.0] * 3] * N,
    },
    "predictions": [
      {"id": i, "kind": "choice", "prediction": p, "answer": "A"}
      for i, p in zip(ids, pred, strict=True)
    ],
  }


def _eval_dir(root, name, cells: dict[str, dict[str, dict]], track="unseen_data"):
  """cells: {task: {cell name: cell}}; results.json names each task's track, metric and
  methods (a seeded method, gd_s<i>, by its seeds' cells)."""
  d = root / name
  tasks = {}
  for task, by in cells.items():
    (d / "cells" / task).mkdir(parents=True)
    methods = {}
    for cell, data in by.items():
      (d / "cells" / task / f"{cell}.json").write_text(json.dumps(data))
      method, _, seed = cell.partition("_s")
      methods.setdefault(method, {})
      if seed:
        methods[method].setdefault("seeds", {})[cell] = 0.0
    tasks[task] = {"track": track, "metric": "accuracy", "methods": methods}
  (d / "results.json").write_text(json.dumps({"tasks": tasks}))
  return d


@pytest.fixture
def evals(tmp_path):
  main = _eval_dir(
    tmp_path,
    "eval",
    {
      "t1": {"base": _cell(10), "gd": _cell(40)},
      "t2": {"base": _cell(20), "gd": _cell(20)},
      "only_main": {"base": _cell(1), "gd": _cell(2)},
    },
  )
  # the union control: seeded cells are averaged (40 and 0 right: 0.5)
  union = _eval_dir(
    tmp_path,
    "eval_union",
    {
      "t1": {"base": _cell(10), "gd_s0": _cell(40), "gd_s1": _cell(0)},
      "t2": {"base": _cell(20), "gd": _cell(30)},
    },
  )
  return main, union


def test_the_main_evaluation_is_paired_with_each_control_row_by_row(evals, tmp_path, capsys):
  main, union = evals
  out = tmp_path / "plots" / "controls.png"
  assert (
    compare.main([str(main), str(union), "--labels", "skills", "union", "--out", str(out)]) == 0
  )
  res = json.loads(out.with_suffix(".json").read_text())
  t1, t2 = res["tasks"]["t1"], res["tasks"]["t2"]
  assert t1["by"]["skills"]["score"] == 1.0 and t1["by"]["union"]["score"] == 0.5
  assert t1["by"]["skills"]["delta_vs_base"]["mean"] == pytest.approx(0.75)
  d = t1["first_minus"]["union"]
  assert d["mean"] == pytest.approx(0.5) and d["ci"][0] > 0  # every resample: +0.5 exactly
  assert t2["first_minus"]["union"]["mean"] == pytest.approx(-0.25)
  assert t2["first_minus"]["union"]["ci"][1] < 0
  # mean over tasks of (skills - union) / union: (1.0 / 0.5 - 1 + 0.5 / 0.75 - 1) / 2
  gain = res["tracks"]["unseen_data"]["union"]
  assert gain["mean_relative_gain"] == pytest.approx((1.0 - 1 / 3) / 2) and gain["tasks"] == 2
  assert gain["mean_delta"]["mean"] == pytest.approx((0.5 - 0.25) / 2)
  assert res["left_out"] == ["only_main"]
  md = out.with_suffix(".md").read_text()
  assert "| t1 | accuracy | 1.000 | 0.500 | +0.500 [+0.500, +0.500] |" in md
  assert "skills above union with the interval above 0 on 1 of 2 tasks" in md
  assert "below it with the interval below 0 on 1" in md and "left out" in md
  assert out.stat().st_size > 10000
  assert "wrote" in capsys.readouterr().out


def test_a_control_that_scored_other_rows_is_refused_naming_it(evals, capsys):
  main, union = evals
  other = _cell(30, ids=[f"r{i}" for i in range(N - 1)] + ["elsewhere"])
  (union / "cells" / "t2" / "gd.json").write_text(json.dumps(other))
  assert compare.main([str(main), str(union), "--out", str(main / "c.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "eval_union/cells/t2/gd.json: scored other rows than" in err[0]
  assert not (main / "c.png").exists()


def test_a_cell_whose_outcomes_are_in_another_row_order_is_refused(evals, capsys):
  """The statistics index the outcomes: equal predictions with reordered outcomes (a task
  of choice and generated rows interleaved otherwise) would pair other rows."""
  main, union = evals
  cell = _cell(30)
  cell["outcomes"]["gold"][0] = "B"
  (union / "cells" / "t2" / "gd.json").write_text(json.dumps(cell))
  assert compare.main([str(main), str(union), "--out", str(main / "c.png")]) == 2
  assert "eval_union/cells/t2/gd.json: scored other rows" in capsys.readouterr().err
  cell = _cell(30)
  cell["predictions"][3]["answer"] = "C"
  (union / "cells" / "t2" / "gd.json").write_text(json.dumps(cell))
  assert compare.main([str(main), str(union), "--out", str(main / "c.png")]) == 2
  assert "scored other rows" in capsys.readouterr().err


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda d: (d / "cells" / "t2" / "gd.json").unlink(), "eval_union/cells/t2/gd.json: missing"),
    (
      lambda d: (d / "results.json").write_text('{"tasks": '),
      "eval_union/results.json:1: not JSON",
    ),
    (lambda d: (d / "results.json").write_text("[1, 2]"), "not an evaluation's results.json"),
    (
      lambda d: (d / "cells" / "t2" / "gd.json").write_text('{"outcomes": {}}'),
      "eval_union/cells/t2/gd.json: not an evaluation cell (KeyError",
    ),
    (
      lambda d: (d / "cells" / "t2" / "gd.json").write_text('{"outcomes": {"gold_digest": []}}'),
      "eval_union/cells/t2/gd.json: an archived cell (no reference answers",
    ),
    (
      lambda d: (d / "cells" / "t2" / "gd.json").write_text(
        json.dumps(_cell(30) | {"predictions": _cell(30)["predictions"] * 2})
      ),
      "80 predictions for 40 scored rows",
    ),
  ],
)
def test_damaged_input_is_one_line_naming_the_file(evals, capsys, damage, message):
  main, union = evals
  damage(union)
  assert compare.main([str(main), str(union), "--out", str(main / "c.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


def test_bad_arguments_are_one_line(evals, tmp_path, capsys):
  main, union = evals
  cases = [
    ([str(main)], "at least one control"),
    ([str(main), str(main / "results.json")], "results.json/results.json: missing"),
    ([str(main), str(union), "--resamples", "0"], "--resamples must be at least 1"),
    ([str(main), str(tmp_path / "x" / "eval")], "directory names clash: name them with --labels"),
    ([str(main), str(union), "--labels", "a"], "--labels needs 2 distinct names"),
    ([str(main), str(union), "--method", "gate"], "t1 has no 'gate' (it has: base, gd)"),
  ]
  for args, message in cases:
    assert compare.main([*args, "--out", str(tmp_path / "c.png")]) == 2, args
    assert message in capsys.readouterr().err, args
  assert compare.main([str(main), str(union), "--out", str(tmp_path / "c.pdf")]) == 2
  assert "name a .png" in capsys.readouterr().err


def test_a_control_that_scores_0_everywhere_has_no_relative_gain(tmp_path, capsys):
  main = _eval_dir(tmp_path, "eval", {"t": {"base": _cell(10), "gd": _cell(20)}})
  zero = _eval_dir(tmp_path, "zero", {"t": {"base": _cell(10), "gd": _cell(0)}})
  out = tmp_path / "c.png"
  assert compare.main([str(main), str(zero), "--out", str(out)]) == 0
  assert (
    json.loads(out.with_suffix(".json").read_text())["tracks"]["unseen_data"]["zero"][
      "mean_relative_gain"
    ]
    is None
  )
  assert "relative gain n/a (zero scores 0)" in out.with_suffix(".md").read_text()
  assert "eval over zero: mean difference +0.500 [" in out.with_suffix(".md").read_text()
