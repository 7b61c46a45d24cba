"""The stage-2 run end to end on the tiny model and the demo corpus, and its bad inputs: skills
of another base model, an unknown task, a task without reserved rows, k larger than the data."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import router as router_config
from configs import skill as skill_config
from mdkif_jax import checkpoint, fit_router, optimizer, sharding, train
from mdkif_jax.data import task
from mdkif_jax.model import loading
from mdkif_jax.model.config import PRESETS
from mdkif_jax.peft import adapters


def write_skills(workdir, model_name: str, skills=("qa", "ner"), init_r=4, seed=0, data=None):
  """A stage-1 checkpoint exactly as train_skills writes it (checkpoint.save of
  {adapters, opt_state, step} with its run identity and, given `data`, how it prompted),
  with random nonzero adapters."""
  cfg = PRESETS[model_name]
  targets = adapters.TARGETS
  ad = adapters.init_adalora(
    jax.random.key(seed),
    cfg.projection_dims(),
    cfg.num_hidden_layers,
    init_r,
    num_skills=len(skills),
    std=0.1,
  )
  ad = {t: {**leaf, "E": jnp.ones_like(leaf["E"])} for t, leaf in ad.items()}
  state = {"adapters": ad, "opt_state": {"mu": ad}, "step": jnp.asarray(3, jnp.int32)}
  acfg = optimizer.adalora_config(skill_config.get_config("tiny"), 10)
  scale = adapters.adapter_scale(acfg.lora_alpha, init_r, acfg.scale_convention)
  meta = checkpoint.run_identity(cfg, skills, targets, init_r, scale)
  if data is not None:
    meta["serving"] = checkpoint.serving_meta(data)
  mngr = checkpoint.manager(workdir / "checkpoints", 1, False)
  checkpoint.save(mngr, 3, state, {"skills": {}}, meta)
  mngr.wait_until_finished()
  return ad


def tiny(tmp_path, **over):
  c = router_config.get_config("tiny")
  c.skills_from = str(tmp_path / "skills")
  c.mesh.shape = (1, 1, 1)
  c.max_fit_examples, c.max_eval_examples = 12, 8
  c.plot = True
  c.cmaes.k_shots, c.cmaes.seeds = (4,), (0,)
  for k, v in over.items():
    section, _, field = k.rpartition("__")
    setattr(c[section] if section else c, field, v)
  return c


@pytest.fixture(scope="module")
def base():
  return loading.load_model("tiny_smollm_vocab")


def test_route_end_to_end(tmp_path, base, capsys):
  ad = write_skills(tmp_path / "skills", "tiny_smollm_vocab")
  cfg = tiny(tmp_path)
  out = fit_router.train_and_evaluate(cfg, tmp_path / "run", base=base)
  assert out["method"] == "cmaes"  # 12 rows < cmaes_threshold: the paper's few-shot choice
  assert out["skills"] == ("qa", "ner") and out["fit_rows"] == 12 and out["score_rows"] == 8
  res = out["results"]
  for name in ("base", "skill_qa", "skill_ner", "uniform", "gd", "cmaes", "gate", "cmaes_k4_s0"):
    assert np.isfinite(res[name]["loss"]) and 0 <= res[name]["exact"] <= 1, name
    # the demo task's standard metrics: MCQA rows by choice, TS/MC rows by ROUGE, MLDC by F1
    for key in ("accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "example_f1", "micro_f1"):
      assert 0 <= res[name][key] <= 1, (name, key)
    assert res[name]["seconds"] > 0
  assert res["skill_qa"]["loss"] != res["base"]["loss"]  # the loaded skills act
  assert out["history"]["cmaes"][-1] <= out["history"]["cmaes"][0]  # CMA-ES keeps its best
  assert len(out["history"]["gd"]) == cfg.router.steps
  rows = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  final = rows[-1]
  assert final["eval/base/loss"] == pytest.approx(res["base"]["loss"])
  assert final["eval/gate/accuracy"] == pytest.approx(res["gate"]["accuracy"])
  assert final["eval/cmaes_k4_s0/rougeL"] == pytest.approx(res["cmaes_k4_s0"]["rougeL"])
  assert {"weights/cmaes/qa", "weights/gd/ner", "weights/gate/qa"} <= set(final)
  assert (tmp_path / "run" / "router_weights.png").stat().st_size > 1000
  preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
  assert {p["method"] for p in preds} == set(res)  # every scored method, its rows
  by_method = {m: [p for p in preds if p["method"] == m] for m in res}
  assert len({len(v) for v in by_method.values()}) == 1 and by_method["base"]
  for p in preds:
    assert p["source"] == "demo" and p["answer"] and isinstance(p["prediction"], str)
  assert {p["kind"] for p in preds} == {"choice", "generated"}
  # choice rows: the prediction is one of the row's candidates, and accuracy counts them
  exact = [p["prediction"] == p["answer"] for p in by_method["gate"] if p["kind"] == "choice"]
  assert exact and res["gate"]["accuracy"] == pytest.approx(np.mean(exact))
  table = capsys.readouterr().out
  assert "accuracy" in table and "rougeL" in table and "cmaes_k4_s0" in table
  state, meta = checkpoint.load_router(tmp_path / "run")
  np.testing.assert_allclose(state["weights"], out["weights"]["cmaes"])
  assert meta["skills"] == ["qa", "ner"] and meta["method"] == "cmaes"
  # the skills were loaded as written (not re-initialised)
  stacked, skills, _ = checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  np.testing.assert_array_equal(stacked["q"]["A"], ad["q"]["A"])
  # a 13th skill from a later stage-1 run joins: qa, ner from one workdir + es from another
  write_skills(tmp_path / "skill13", "tiny_smollm_vocab", skills=("es",), init_r=2, seed=5)
  cfg.skills_from = f"{tmp_path / 'skills'},{tmp_path / 'skill13'}"
  grown, names, _ = checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  assert names == ("qa", "ner", "es") and grown["q"]["A"].shape[0] == 3
  np.testing.assert_array_equal(grown["q"]["A"][:2], ad["q"]["A"])


def test_answer_positions_are_per_row():
  lm = np.zeros((3, 40), np.float32)
  lm[0, 5:8], lm[1, 30:39], lm[2, 0] = 1, 1, 1
  ones = np.ones((3, 40), np.int32)
  b = task.prepare(
    {"tokens": ones, "targets": ones, "positions": ones, "attention_mask": ones, "loss_mask": lm}
  )
  assert b["answer_idx"].shape == (3, 16)  # [B, N], N a power of two, positions within the row
  np.testing.assert_array_equal(b["answer_idx"][1, :9], np.arange(30, 39))
  np.testing.assert_array_equal(b["answer_valid"].sum(1), [3, 9, 1])
  np.testing.assert_array_equal(b["prompt_mask"][0], np.arange(40) <= 5)


def test_skills_of_another_base_model_are_refused(tmp_path, base):
  write_skills(tmp_path / "skills", "tiny")  # trained on the 512-token tiny model
  with pytest.raises(checkpoint.SkillsMismatchError, match="another base model.*vocab_size"):
    fit_router.train_and_evaluate(tiny(tmp_path), tmp_path / "run", base=base)
  with pytest.raises(checkpoint.SkillsMismatchError, match="no stage-1 checkpoint"):
    fit_router.train_and_evaluate(
      tiny(tmp_path, skills_from=str(tmp_path)), tmp_path / "run", base=base
    )
  with pytest.raises(checkpoint.SkillsMismatchError, match="skills_from is not set"):
    fit_router.train_and_evaluate(tiny(tmp_path, skills_from=None), tmp_path / "run", base=base)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_task_and_k_larger_than_the_data(tmp_path, base):
  write_skills(tmp_path / "skills", "tiny_smollm_vocab")
  for name in ("nope", "demo:nope", ""):
    with pytest.raises(task.TaskError, match="unknown task"):
      fit_router.train_and_evaluate(tiny(tmp_path, task=name), tmp_path / "run", base=base)
  with pytest.raises(task.TaskError, match="no reserved examples"):
    fit_router.train_and_evaluate(tiny(tmp_path, task="pubmedqa"), tmp_path / "run", base=base)
  with pytest.raises(task.TaskError, match="k=100 .* only 12 rows"):
    fit_router.train_and_evaluate(
      tiny(tmp_path, cmaes__k_shots=(4, 100)), tmp_path / "run", base=base
    )
  with pytest.raises(ValueError, match="metric must be"):
    fit_router.train_and_evaluate(tiny(tmp_path, metric="bleu"), tmp_path / "run", base=base)
  with pytest.raises(ValueError, match="router.method"):
    fit_router.train_and_evaluate(
      tiny(tmp_path, router__method="lora"), tmp_path / "run", base=base
    )
  assert "demo" in task.task_names() and "covid_dialogue" in task.task_names()


def test_a_real_stage1_checkpoint_loads_as_trained(tmp_path, base):
  from tests.test_train import tiny_config

  stage1_cfg = tiny_config(skills="qa+ner", steps=4, checkpoint_every=2, keep_checkpoints=2)
  stage1 = train.train_skills(stage1_cfg, tmp_path / "skills", ("qa", "ner"), base=base)
  cfg = tiny(tmp_path)
  stacked, names, scale = checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  assert names == ("qa", "ner")
  assert scale == pytest.approx(adapters.adapter_scale(stage1_cfg.adalora.lora_alpha, 4))
  jax.tree.map(np.testing.assert_array_equal, stacked, jax.tree.map(np.asarray, stage1["adapters"]))
  assert float(jnp.abs(stacked["q"]["E"]).sum()) > 0  # trained, not the E = 0 init
  # stage 1 records how it prompted, for stage 2
  loaded = checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  assert loaded.serving == checkpoint.serving_meta(stage1_cfg.data)
  # an unfinished run (its last step gone: still training, or killed) is not taken silently
  shutil.rmtree(tmp_path / "skills" / "checkpoints" / "4")
  with pytest.raises(checkpoint.SkillsMismatchError, match="reached step 2 of 4.*skills_step=2"):
    checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  cfg.skills_step = 2  # asked for by step: loads
  assert checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1))).names == names


def test_router_config_presets():
  assert router_config.get_config().stage == "router"
  c = router_config.get_config("shared,fewshot,task=covid_dialogue")
  assert c.task == "covid_dialogue" and c.data.data_dir == "../shared/data"
  assert c.router.method == "cmaes" and tuple(c.cmaes.k_shots) == (5, 20, 100)
  assert router_config.get_config("tiny").model.source == "tiny_smollm_vocab"
  assert router_config.get_config("gate").router.method == "gate"
  assert router_config.get_config().metric == "auto"
  with pytest.raises(ValueError, match="unknown preset"):
    router_config.get_config("huge")


def test_stage2_builds_rows_with_the_template_and_max_len_stage1_recorded(tmp_path, base):
  stage1 = skill_config.get_config("tiny").data
  stage1.template.chat = False
  stage1.template.query_header = "Q:"
  stage1.max_len = 96
  write_skills(tmp_path / "skills", "tiny_smollm_vocab", data=stage1)
  cfg = tiny(tmp_path)
  assert cfg.data.template.chat and cfg.data.max_len != 96  # the router config's defaults
  skills = checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
  used = fit_router.with_stage1_prompting(cfg, skills.serving)
  assert used.data.template.to_dict() == stage1.template.to_dict() and used.data.max_len == 96
  assert cfg.data.template.chat  # the caller's config is not modified
  # two stage-1 runs prompted differently cannot be stacked
  other = skill_config.get_config("tiny").data
  write_skills(tmp_path / "es", "tiny_smollm_vocab", skills=("es",), data=other)
  cfg.skills_from = f"{tmp_path / 'skills'},{tmp_path / 'es'}"
  with pytest.raises(checkpoint.SkillsMismatchError, match="different prompt templates"):
    checkpoint.load_skills(cfg, base.cfg, sharding.make_mesh((1, 1, 1)))
