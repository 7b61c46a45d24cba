"""train.mode=separate trains each skill in `<workdir>/<skill>/` on the same seeded base, and
stage 2 reads that workdir as it reads a joint run's."""

import jax
import numpy as np
import pytest

from configs import router as router_config
from mdkif_jax import checkpoint, sharding, train
from mdkif_jax.model import loading
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow


def test_stage2_reads_the_per_skill_runs_of_a_separate_stage1(tmp_path):
  c = tiny_config(skills="qa+ner", steps=4, checkpoint_every=4)
  c.train.mode = "separate"
  out = train.train_and_evaluate(c, str(tmp_path / "skill"))
  assert sorted(out) == ["ner", "qa"]
  assert (tmp_path / "skill" / "qa" / "checkpoints").is_dir()
  cfg = router_config.get_config("tiny")
  cfg.skills_from = str(tmp_path / "skill")
  base = loading.load_model(c.model.source, seed=c.model.seed)
  loaded = checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  assert loaded.names == ("qa", "ner")  # registry order
  for i, s in enumerate(("qa", "ner")):
    jax.tree.map(
      np.testing.assert_array_equal,
      jax.tree.map(lambda x, i=i: np.asarray(x[i]), loaded.stacked),
      jax.tree.map(lambda x: np.asarray(x[0]), out[s]["adapters"]),
    )
