"""results.md's tables (suite_report.results_table): per track the normal setting (every fit
row) and the few-shot setting (k rows) apart, each beside the base, the best of each table
in bold."""

from mdkif_jax import suite_report


def _results(methods: dict[str, float]) -> dict:
  def entry(s):
    d = {"mean": s - 0.4, "ci": [s - 0.5, s - 0.3], "p_le_0": 0.5}
    return {"score": s, "ci": [s - 0.1, s + 0.1], "n": 8, "delta_vs_base": d}

  task = {"track": "unseen_data", "metric": "accuracy", "n_fit": 4, "n_scored": 8}
  return {
    "model": "m",
    "skills": ["qa"],
    "tasks": {"t": task | {"methods": {m: entry(s) for m, s in methods.items()}}},
    "tracks": {},
  }


def _rows(lines: list[str], start: str) -> list[str]:
  """The method names of the table after the line `start`."""
  i = lines.index(start) + 4  # blank line, header, separator
  out = []
  while lines[i].startswith("| "):
    out.append(lines[i].split(" | ")[0][2:])
    i += 1
  return out


def test_few_shot_methods_get_their_own_table_beside_the_base():
  scores = {"base": 0.4, "gd": 0.5, "gate": 0.45, "base_k5": 0.6, "cmaes_k5": 0.55}
  lines = suite_report.results_table(_results(scores))
  assert _rows(lines, "Every fit row:") == ["base", "gd", "gate"]
  assert _rows(lines, "Few-shot (k fit rows):") == ["base", "base_k5", "cmaes_k5"]
  bold = [x.split(" | ")[0][2:] for x in lines if "**" in x]
  assert bold == ["gd", "base_k5"]  # each table's best


def test_a_track_without_few_shot_methods_has_one_table():
  lines = suite_report.results_table(_results({"base": 0.4, "gd": 0.5}))
  assert "Every fit row:" not in lines and "Few-shot (k fit rows):" not in lines
  assert sum(x.startswith("| method |") for x in lines) == 1


def test_without_a_base_each_setting_is_one_table_and_none_is_empty():
  lines = suite_report.results_table(_results({"gd": 0.5, "cmaes_k5": 0.55}))
  assert _rows(lines, "Every fit row:") == ["gd"]
  assert _rows(lines, "Few-shot (k fit rows):") == ["cmaes_k5"]
  for methods, rows in (({"cmaes_k5": 0.5}, ["cmaes_k5"]), ({"base": 0.4, "base_k5": 0.5}, None)):
    lines = suite_report.results_table(_results(methods))
    tables = [i for i, x in enumerate(lines) if x.startswith("| method |")]
    assert len(tables) == 1 and "Every fit row:" not in lines
    assert lines[tables[0] + 2].startswith("| " + (rows or ["base"])[0] + " |")


def test_a_method_only_some_tasks_have_still_gets_its_row(tmp_path):
  res = _results({"base": 0.4, "gd": 0.5})
  res["tasks"]["u"] = res["tasks"]["t"] | {
    "methods": res["tasks"]["t"]["methods"] | {"majority": res["tasks"]["t"]["methods"]["gd"]}
  }
  lines = suite_report.results_table(res)
  assert any(x.startswith("| majority | - | ") for x in lines)
  suite_report.plot_results(tmp_path / "r.png", res)  # the missing cell is left blank
  no_base = _results({"gd": 0.5})
  suite_report.plot_results(tmp_path / "n.png", no_base)
  assert (tmp_path / "n.png").stat().st_size > 0


def test_label_tasks_show_which_answer_each_method_leans_to():
  res = _results({"base": 0.4, "gd": 0.5})
  res["tasks"]["t"]["gold_lean"] = {"answer": "yes", "share": 0.527}
  res["tasks"]["t"]["methods"]["gd"]["lean"] = {"answer": "yes", "share": 0.96}
  lines = suite_report.results_table(res)
  i = lines.index("| most frequent answer (share) | t |")
  assert lines[i + 2 : i + 5] == ["| gold | yes 0.53 |", "| base | - |", "| gd | yes 0.96 |"]
  assert "| most frequent answer" not in "\n".join(
    suite_report.results_table(_results({"gd": 0.5}))
  )


def test_each_methods_answer_nll_is_a_table_row():
  res = _results({"base": 0.4, "gd": 0.5, "majority": 0.3})
  res["tasks"]["t"]["methods"]["base"]["answer_nll"] = 3.448
  res["tasks"]["t"]["methods"]["gd"]["answer_nll"] = 0.5128
  lines = suite_report.results_table(res)
  i = lines.index("| answer NLL (teacher-forced, nats/token) | t |")
  assert lines[i + 2 : i + 5] == ["| base | 3.448 |", "| gd | 0.513 |", ""]  # majority: none


def test_the_tracks_mean_difference_in_points_is_a_column():
  res = _results({"base": 0.4, "gd": 0.5})
  gain = {"mean_relative_gain": 0.25, "ci": [0.1, 0.4], "tasks": 1}
  res["tracks"]["unseen_data"] = {
    "gd": gain | {"mean_delta": {"mean": 0.1, "ci": [0.05, 0.15], "tasks": 1}}
  }
  row = next(x for x in suite_report.results_table(res) if x.startswith("| gd |"))
  assert row.endswith("| +25.0% [+10.0%, +40.0%] | +0.100 [+0.050, +0.150] |")


def test_a_relative_gain_over_fewer_resamples_says_how_many_it_holds():
  res = _results({"base": 0.4, "gd": 0.5})
  gain = {"mean_relative_gain": 0.25, "ci": [0.1, 0.4], "tasks": 1}
  for used, note in ((1000, ""), (630, " (on 630 of 1000 resamples)")):
    res["tracks"]["unseen_data"] = {"gd": gain | {"resamples": [used, 1000]}}
    row = next(x for x in suite_report.results_table(res) if x.startswith("| gd |"))
    assert row.endswith(f"| +25.0% [+10.0%, +40.0%]{note} | - |")


def test_each_tasks_other_metrics_are_a_table_beside_the_headline():
  res = _results({"base": 0.4, "gd": 0.5, "majority": 0.6})
  methods = res["tasks"]["t"]["methods"]
  methods["base"]["metrics"] = {"accuracy": 0.4, "macro_f1": 0.25}
  methods["gd"]["metrics"] = {"accuracy": 0.5, "macro_f1": 0.3125}
  lines = suite_report.results_table(res)
  i = lines.index("| other metrics | t macro_f1 |")  # the headline (accuracy) is not repeated
  assert lines[i + 2 : i + 6] == ["| base | 0.250 |", "| gd | 0.312 |", "| majority | - |", ""]


def test_without_other_metrics_there_is_no_such_table():
  res = _results({"base": 0.4})
  res["tasks"]["t"]["methods"]["base"]["metrics"] = {"accuracy": 0.4}
  assert not any(x.startswith("| other metrics") for x in suite_report.results_table(res))


def test_the_skills_each_fitted_method_weighs_most_are_a_table_row():
  res = _results({"base": 0.4, "gd": 0.5, "cmaes_k5": 0.45})
  methods = res["tasks"]["t"]["methods"]
  methods["gd"]["weights"] = {"qa": 0.01, "ner": 1.36, "re": -0.05, "mc": 0.03}
  methods["cmaes_k5"]["weights"] = {"qa": 0.4, "ner": 0.8, "re": -0.9, "mc": 0.0}
  lines = suite_report.results_table(res)
  i = lines.index("| largest skill weights | t |")
  # by |weight|, signs kept; the base has no weights and no row
  assert lines[i + 2 : i + 5] == [
    "| gd | ner 1.36, re -0.05, mc 0.03 |",
    "| cmaes_k5 | re -0.90, ner 0.80, qa 0.40 |",
    "",
  ]


def test_the_weights_heatmap_is_drawn_only_where_a_task_has_the_routers_weights(tmp_path):
  res = _results({"base": 0.4, "gd": 0.5})
  assert not suite_report.plot_suite_weights(tmp_path / "w.png", res)
  assert not (tmp_path / "w.png").exists()
  res["skills"] = ["qa", "ner"]
  res["tasks"]["t"]["methods"]["gd"]["weights"] = {"qa": 0.1, "ner": 1.2}
  assert suite_report.plot_suite_weights(tmp_path / "w.png", res)
  assert (tmp_path / "w.png").stat().st_size > 0


def test_the_router_line_gives_the_gain_of_the_mean_score():
  res = _results({"base": 0.4, "gd": 0.5})
  line = next(x for x in suite_report.results_table(res) if x.startswith("gd vs base"))
  assert line == "gd vs base: higher on 1 of 1 tasks, the Δ interval above 0 on 0."
  gain = {"mean_relative_gain": 0.25, "ci": [0.1, 0.4], "tasks": 1}
  of_means = {"gain": 0.25, "ci": [0.1, 0.4], "tasks": 1}
  res["tracks"]["unseen_data"] = {"gd": gain | {"gain_of_means": of_means}}
  line = next(x for x in suite_report.results_table(res) if x.startswith("gd vs base"))
  assert line.startswith("gd vs base: higher on 1 of 1 tasks, the Δ interval above 0 on 0; the")
  assert "mean score +25.0% [+10.0%, +40.0%] over the base's" in line


def test_the_bar_is_read_part_by_part_from_the_all_task_summaries():
  res = _results({"base": 0.4, "gd": 0.5, "uniform": 0.45, "best_single": 0.52})
  for i in range(8):  # 9 tasks: gd above the base on all, the interval above 0 on 3 (t0-t2)
    t = res["tasks"]["t"]
    gd = t["methods"]["gd"] | {"delta_vs_base": {"mean": 0.1, "ci": [0.02 - (i >= 3), 0.2]}}
    res["tasks"][f"t{i}"] = t | {"methods": t["methods"] | {"gd": gd}}

  def summary(m, lo, hi):
    return {"mean": m, "ci": [lo, hi], "tasks": 9}

  res["tracks"]["unseen_data"] = {
    "gd": {
      "mean_relative_gain": 0.25,
      "ci": [0.1, 0.4],
      "tasks": 9,
      "gain_of_means": {"gain": 0.08, "ci": [0.01, 0.15], "tasks": 9},
    }
  }
  res["all_tasks"] = {
    "tasks": 9,
    "gd": {
      "mean_delta": summary(0.1, 0.05, 0.15),
      "gain_of_means": {"gain": 0.2, "ci": [0.1, 0.3]},
    },
    "router_vs": {
      "uniform": {"mean_delta": summary(0.05, -0.01, 0.1)},
      "best_single": {"mean_delta": summary(-0.02, -0.05, 0.01)},
      "adalora_task": {"gain_of_means": {"gain": -0.12, "ci": [-0.2, -0.05]}},
    },
  }
  lines = suite_report.results_table(res)
  i = lines.index("| the bar | measured (95% interval) | met |")
  assert lines[i + 2 : i + 9] == [
    "| gd above the base on >= 7 of 9 tasks | 9 of 9 | yes |",
    "| ... the Δ interval above 0 on >= 5 | 3 of 9 | no |",
    "| mean relative gain over the base >= +10%, unseen_data | +25.0% [+10.0%, +40.0%] (the mean "
    "score: +8.0% [+1.0%, +15.0%]) | yes (by the mean score's gain: no) |",
    "| gd above uniform on average | mean Δ +0.050 [-0.010, +0.100] | yes (the interval "
    "includes 0) |",
    "| gd above best_single on average | mean Δ -0.020 [-0.050, +0.010] | no (the interval "
    "includes 0) |",
    "| gd reaches >= 90% of adalora_task's mean score | 88.0% [80.0%, 95.0%] | no (the interval "
    "includes 90%) |",
    "",
  ]
  assert "Over all 9 tasks: gd - base +0.100 [+0.050, +0.150] points on average" in lines[i + 9]
  res["all_tasks"]["tasks"] = 4
  lines = suite_report.results_table(res)
  want = "| gd above uniform on average | mean Δ +0.050 [-0.010, +0.100] | yes (the interval"
  assert want + " includes 0; 4 tasks, not the bar's 9) |" in lines
  # an interval clear of the threshold, and both readings of the gain agreeing: no note
  res["tracks"]["unseen_data"]["gd"]["ci"] = [0.15, 0.4]
  res["tracks"]["unseen_data"]["gd"]["gain_of_means"]["gain"] = 0.12
  res["all_tasks"]["tasks"] = 9
  gain = next(x for x in suite_report.results_table(res) if x.startswith("| mean relative gain"))
  assert gain.endswith(") | yes |")
  del res["all_tasks"]["router_vs"]["adalora_task"]  # a control or a curve point: no bar
  assert "## Against the bar" not in suite_report.results_table(res)


def test_the_time_table_gives_each_methods_minutes_per_task_and_in_all():
  res = _results({"base": 0.4, "gd": 0.5})
  res["tasks"]["u"] = res["tasks"]["t"] | {
    "methods": {"gd": dict(res["tasks"]["t"]["methods"]["gd"])}
  }
  for (t, m), (wall, cpu) in {
    ("t", "base"): (60, 30),
    ("t", "gd"): (600, 540),
    ("u", "gd"): (120, 90),
  }.items():
    res["tasks"][t]["methods"][m] |= {"seconds": wall, "cpu_seconds": cpu}
  lines = suite_report.results_table(res)
  i = lines.index("| CPU minutes | t | u | all tasks |")
  assert lines[i + 2 : i + 4] == ["| base | 0.5 | - | 0.5 |", "| gd | 9.0 | 1.5 | 10.5 |"]
  del res["tasks"]["u"]["methods"]["gd"]["cpu_seconds"]  # one cell without CPU time: wall for all
  lines = suite_report.results_table(res)
  i = lines.index("| wall minutes | t | u | all tasks |")
  assert lines[i + 3] == "| gd | 10.0 | 2.0 | 12.0 |"
