"""Stage 2's progress bars and baselines: the run shows one bar over its methods (and inner
bars for fit steps, scoring and generation), `progress=False` shows none, a bar changes no
result (CMA-ES run one generation per call under a bar returns the same theta as one scan),
and `router.baselines` names which methods run beside the router."""

import numpy as np
import pytest

from configs import router as router_config
from mdkif_jax import fit_router, router
from mdkif_jax.model import loading
from tests import router_fixtures as fx
from tests.test_router_run import tiny, write_skills


@pytest.fixture(scope="module")
def base():
  return loading.load_model("tiny_smollm_vocab")


def test_the_run_shows_a_bar_over_its_methods_and_none_when_off(tmp_path, base, capsys):
  write_skills(tmp_path / "skills", "tiny_smollm_vocab")
  over = dict(router__baselines="cheap", cmaes__k_shots=(), cmaes__generations=2)
  out = fit_router.train_and_evaluate(tiny(tmp_path, **over), tmp_path / "on", base=base)
  assert list(out["results"]) == ["cmaes", "base", "uniform"]  # "cheap": the two references
  err = capsys.readouterr().err
  assert "stage 2: 100%" in err and "3/3" in err  # the bar over methods, finished
  for name in out["results"]:
    assert f", {name}]" in err, name  # each method named on the bar while it runs
  assert "cmaes:" in err and "score:" in err and "generate:" in err  # the inner bars
  over["router__baselines"] = "none"
  out = fit_router.train_and_evaluate(
    tiny(tmp_path, progress=False, **over), tmp_path / "off", base=base
  )
  assert list(out["results"]) == ["cmaes"]
  err = capsys.readouterr().err
  assert "%|" not in err and "stage 2:" not in err


def test_baselines_by_name():
  assert router_config.get_config().router.baselines == "cheap"  # the default run stays short
  full = router_config.get_config("full_baselines")
  assert full.router.baselines == "all" and tuple(full.cmaes.k_shots) == (5, 20)
  assert router_config.get_config("tiny").router.baselines == "all"
  with pytest.raises(ValueError, match="router.baselines must be one of"):
    fit_router.check_baselines("some")


def test_a_bar_changes_no_result():
  base, graphdef, frozen = fx.tiny_base()
  stacked = fx.random_skills(base.cfg, 3, seed=1)
  w = np.broadcast_to(np.float32([0.6, 0.3, 0.1]), (fx.B, 3))
  batch = fx.planted(graphdef, frozen, stacked, w, fx.raw_batch(0))
  fit = router.TaskFit(parametrisation="softmax", population=6, generations=5, seed=3, steps=4)

  def run(progress):
    return router.fit_task_cmaes(graphdef, frozen, stacked, fx.SCALE, batch, fit, progress=progress)

  (theta, best), (theta_bar, best_bar) = run(False), run(True)
  np.testing.assert_array_equal(theta_bar, theta)  # one generation per call == one scan
  assert best_bar == best and len(best) == fit.generations
  gd = [
    router.fit_task_gd(graphdef, frozen, stacked, fx.SCALE, [batch], fit, progress=p)
    for p in (False, True)
  ]
  np.testing.assert_array_equal(gd[0][0], gd[1][0])
  assert gd[0][1] == gd[1][1]
