"""Bootstrap intervals, paired differences and relative gains against hand-computed cases, and
the per-row metrics the evaluation resamples (DDI's micro-F1 without its negative class, the
F1 of one label, acc_norm)."""

import numpy as np
import pytest

from mdkif_jax import metrics, stats
from mdkif_jax.data.example import Example


def _outcomes(gold, pred, pred_norm=None):
  n = len(gold)
  return metrics.Outcomes(
    tuple(gold), tuple(pred), tuple(pred_norm or pred), np.full((n, 3), np.nan), np.zeros((n, 3))
  )


def test_bootstrap_on_given_resamples_matches_the_hand_computed_values():
  out = _outcomes(["a", "b", "a", "b"], ["a", "a", "a", "b"])  # correct: 1, 0, 1, 1
  idx = np.asarray([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 2, 3], [1, 1, 2, 3]])
  est = stats.bootstrap(lambda i: metrics.metric_on("accuracy", out, i), 4, idx, level=0.5)
  assert est.score == 0.75
  np.testing.assert_allclose(est.boot, [1.0, 0.0, 0.75, 0.5])
  # the 25% and 75% quantiles of {0, 0.5, 0.75, 1} (linear interpolation): 0.375, 0.8125
  assert est.ci == pytest.approx((0.375, 0.8125))


def test_paired_difference_uses_the_same_resamples():
  base = stats.Estimate(0.5, (0, 1), 4, np.asarray([0.5, 0.25, 0.75, 0.5]))
  method = stats.Estimate(0.75, (0, 1), 4, np.asarray([0.75, 0.25, 1.0, 0.25]))
  d = stats.paired_difference(method, base, level=0.5)
  # differences: 0.25, 0, 0.25, -0.25 -> mean of the scores 0.25; <= 0 in 2 of 4
  assert d["mean"] == 0.25 and d["p_le_0"] == 0.5
  assert d["ci"] == pytest.approx([np.quantile([0.25, 0, 0.25, -0.25], 0.25), 0.25])


def test_relative_gain_is_the_mean_over_tasks_and_skips_a_zero_base():
  b1 = stats.Estimate(0.5, (0, 1), 2, np.asarray([0.5, 0.4]))
  m1 = stats.Estimate(0.6, (0, 1), 2, np.asarray([0.6, 0.6]))
  b2 = stats.Estimate(0.2, (0, 1), 2, np.asarray([0.2, 0.2]))
  m2 = stats.Estimate(0.3, (0, 1), 2, np.asarray([0.3, 0.2]))
  zero = stats.Estimate(0.0, (0, 0), 2, np.asarray([0.0, 0.0]))
  g = stats.relative_gain([m1, m2, m1], [b1, b2, zero], level=0.5)
  # task gains: 0.1 / 0.5 = 0.2 and 0.1 / 0.2 = 0.5 -> mean 0.35; the zero base is left out
  assert g["mean_relative_gain"] == pytest.approx(0.35) and g["tasks"] == 2
  # per resample: (0.2 + 0.5) / 2 = 0.35 and (0.5 + 0) / 2 = 0.25
  assert g["ci"] == pytest.approx([0.275, 0.325]) and g["resamples"] == [2, 2]
  # a base near 0 that resamples to 0: that resample has no gain and is counted out
  near = stats.Estimate(0.1, (0, 1), 2, np.asarray([0.1, 0.0]))
  g = stats.relative_gain([m1, m2], [b1, near], level=0.5)
  assert g["resamples"] == [1, 2] and g["ci"] == pytest.approx([(0.2 + 2.0) / 2] * 2)


def test_mean_difference_is_in_points_and_keeps_a_near_zero_base():
  b1 = stats.Estimate(0.5, (0, 1), 2, np.asarray([0.5, 0.4]))
  m1 = stats.Estimate(0.6, (0, 1), 2, np.asarray([0.6, 0.6]))
  b2 = stats.Estimate(0.003, (0, 1), 2, np.asarray([0.0, 0.01]))
  m2 = stats.Estimate(0.373, (0, 1), 2, np.asarray([0.3, 0.4]))
  d = stats.mean_difference([m1, m2], [b1, b2], level=0.5)
  assert d["mean"] == pytest.approx((0.1 + 0.37) / 2) and d["tasks"] == 2
  # per resample: (0.1 + 0.3) / 2 = 0.2 and (0.2 + 0.39) / 2 = 0.295
  assert d["ci"] == pytest.approx([0.2 + 0.25 * 0.095, 0.2 + 0.75 * 0.095])


def test_micro_f1_without_the_negative_class_and_the_f1_of_one_label():
  gold = ["false", "effect", "advise", "false", "effect"]
  pred = ["effect", "effect", "false", "false", "mechanism"]
  # tp: row 1; fp: row 0 (a negative called effect), row 4 (mechanism); fn: rows 2 and 4
  # -> 2 * 1 / (2 + 2 + 2) = 1/3
  assert metrics.positive_micro_f1(gold, pred, "false") == pytest.approx(1 / 3)
  out = _outcomes(gold, pred)
  assert metrics.metric_on("micro_f1_without:false", out, np.arange(5)) == pytest.approx(1 / 3)
  # "false" as a label: tp row 3, fp row 2, fn row 0 -> 2 / (2 + 1 + 1) = 0.5
  assert metrics.metric_on("f1:false", out, np.arange(5)) == pytest.approx(0.5)


def test_acc_norm_divides_the_log_likelihood_by_the_candidate_length():
  row = Example("nli", "", "q", "not enough information", "healthfc", "1")
  plan = metrics.Plan((row,), ("choice",), {0: ("supported", "not enough information")})
  # -4.0 over 9 characters beats -6.0 over 22 for acc, the reverse for acc_norm
  out = metrics.outcomes(plan, {0: [-4.0, -6.0]}, {})
  assert out.pred == ("supported",) and out.pred_norm == ("not enough information",)
  assert metrics.metric_on("accuracy", out, [0]) == 0.0
  assert metrics.metric_on("acc_norm", out, [0]) == 1.0


def test_label_metrics_count_only_the_label_rows_of_a_mixed_task():
  # rows 0-1 are label rows, row 2 a generated one (gold ""): accuracy is over rows 0-1
  out = _outcomes(["yes", "no", ""], ["yes", "yes", ""])
  assert metrics.metric_on("accuracy", out, np.arange(3)) == 0.5
  assert metrics.metric_on("accuracy", out, np.asarray([2, 2, 0])) == 1.0


def test_the_gain_of_the_mean_score_weighs_each_task_by_its_base_score():
  b1 = stats.Estimate(0.5, (0, 1), 2, np.asarray([0.5, 0.4]))
  m1 = stats.Estimate(0.6, (0, 1), 2, np.asarray([0.6, 0.6]))
  b2 = stats.Estimate(0.003, (0, 1), 2, np.asarray([0.0, 0.01]))
  m2 = stats.Estimate(0.373, (0, 1), 2, np.asarray([0.3, 0.4]))
  g = stats.gain_of_means([m1, m2], [b1, b2])
  assert g["gain"] == pytest.approx((0.6 + 0.373) / (0.5 + 0.003) - 1) and g["tasks"] == 2
  # the mean of per-task gains is +6,150% here, carried by the near-zero base
  assert stats.relative_gain([m1, m2], [b1, b2])["mean_relative_gain"] > 60
  boot = [(0.6 + 0.3) / 0.5 - 1, (0.6 + 0.4) / 0.41 - 1]  # both tasks resampled together
  assert g["ci"] == pytest.approx(list(stats.interval(np.asarray(boot))))
  zero = stats.Estimate(0.0, (0, 0), 2, np.asarray([0.0, 0.0]))
  assert np.isnan(stats.gain_of_means([m1], [zero])["gain"])
