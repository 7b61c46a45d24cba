"""train.mode=separate trains each skill in `<workdir>/<skill>/` on the same seeded base, and
stage 2 reads that workdir as it reads a joint run's."""

import json

import jax
import numpy as np
import pytest

from configs import router as router_config
from mdkif_jax import checkpoint, sharding, train
from mdkif_jax import inspect as inspect_run
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
  # a planned skill that has not started is refused, not left out of the stack
  plan = json.loads((tmp_path / "skill" / checkpoint.SEPARATE_PLAN).read_text())
  assert plan == {"skills": ["ner", "qa"]}  # written by stage 1 before its first skill
  checkpoint.plan_separate(tmp_path / "skill", ("qa", "ner", "mc"))
  with pytest.raises(checkpoint.SkillsMismatchError, match=r"skills \['mc'\] .* no checkpoint"):
    checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  assert (tmp_path / "skill" / "qa" / "checkpoints").is_dir()  # nothing was touched
  rep = inspect_run.inspect(tmp_path / "skill")  # inspecting a stage 1 in progress still works
  assert [r["skills"] for r in rep["runs"]] == [["qa"], ["ner"]]
