"""On the real data of the `:paper` suite: a task's scored rows are never its fit rows (by id
or by content), no scored row was a stage-1 training input, and each task scores at least 200
rows where its data has them."""

import pathlib

import pytest

from configs import eval as eval_config
from mdkif_jax.data import splits, suite
from mdkif_jax.data.example import LoadReport, content_key

pytestmark = pytest.mark.slow

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not here")
def test_scored_rows_of_the_paper_suite_are_never_fitted_on_or_trained_on():
  c = eval_config.get_config("paper")
  c.data.data_dir = str(DATA)
  report = LoadReport()
  train_keys = {content_key(ex) for ex in splits.load_examples(c.data, "train", report)}
  assert len(train_keys) > 1000
  for name in c.tasks:
    spec = suite.resolve(name)
    rows = suite.task_rows(spec, c.data, report)
    fit, scored = suite.split_rows(spec, rows, c.fit_fraction, c.max_fit_rows, c.max_scored_rows)
    every = suite.split_rows(spec, rows, c.fit_fraction)[1]
    assert fit and len(scored) >= min(200, len(every)), (name, len(fit), len(scored))
    assert not {r.id for r in fit} & {r.id for r in scored}, name
    scored_keys = {content_key(r) for r in scored}
    assert not scored_keys & {content_key(r) for r in fit}, name
    assert not scored_keys & train_keys, name  # held out from stage 1 too
