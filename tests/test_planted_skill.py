"""The evaluation can see a real effect: a skill trained on a task the base cannot do makes the
router beat the base with an interval that excludes 0, while the uniform mixture does not.

Seven skills are trained with stage 1's own step, each to always answer one letter of an A-D
question: one skill "C", two skills each of the other letters. The task's answer is always
"C", a letter the random base does not pick. Only one skill answers it, and in the uniform
mixture the other letters outweigh it two to one, while a router that finds the "C" skill
scores far above the base. The task reaches the evaluation as a user's MedQA-layout file.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import eval as eval_config
from mdkif_jax import checkpoint, evaluate_suite, train
from mdkif_jax.data import batches, task
from mdkif_jax.data.example import Example
from mdkif_jax.data.skills import skill_id
from mdkif_jax.data.sources.qa import format_options
from mdkif_jax.model import loading, tokenizer

pytestmark = pytest.mark.slow

# stage-1 slots and the letter each always answers: one "C", two of each other letter
PLANTED = {"qa": "C", "mcqa": "A", "mc": "A", "mldc": "B", "mrc": "B", "nli": "D", "ts": "D"}
SKILLS = tuple(PLANTED)
STEPS = 8 * len(SKILLS)  # 8 batches of 16 rows per skill


OPTIONS = {"A": "first", "B": "second", "C": "third", "D": "fourth"}


def query(i: int) -> str:
  return format_options(f"Case {i}: which option?", OPTIONS)


def training_rows(letter: str, n: int) -> list[Example]:
  # every row is an MCQA prompt (its skill field sets the instruction); the slot is set apart
  return [Example("mcqa", "", query(i), letter, "planted", f"t{i}") for i in range(1000, 1000 + n)]


def write_task_file(path, n: int):
  answer = "C"
  rows = [
    {"question": f"Case {i}: which option?", "options": OPTIONS, "answer_idx": answer}
    for i in range(n)
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def train_planted_skills(config, base, tok, workdir):
  """Stage 1's step on the four letters, saved as a stage-1 checkpoint."""
  run = train.setup_training(config, SKILLS, base=base, tok=tok)
  device = []
  for skill, letter in PLANTED.items():
    rows = training_rows(letter, 16)
    for b in task.make_batches(rows, tok, config.data, 16):
      b = {**b, "skill_ids": np.full(len(b["tokens"]), skill_id(skill), np.int32)}
      device.append(batches.to_global(b, run.mesh, per_process=False))
  state, losses = run.state, []
  for i in range(STEPS):
    state, m = run.fns.train_step(state, run.frozen, device[i % len(device)])
    losses.append(float(np.asarray(m["loss_S"])[i % len(SKILLS)]))
  meta = checkpoint.run_identity(base.cfg, SKILLS, run.targets, run.adalora_cfg.init_r, run.scale)
  meta["serving"] = checkpoint.serving_meta(config.data)
  mngr = checkpoint.manager(workdir / "checkpoints", 1, False)
  checkpoint.save(mngr, STEPS, jax.device_get(state), {"skills": {}}, meta)
  mngr.wait_until_finished()
  return losses


def test_a_planted_skill_makes_the_router_beat_the_base_and_the_uniform_mixture_not(tmp_path):
  c = eval_config.get_config("tiny")
  c.mesh.shape = (1, 1, 1)
  c.adalora.target_r = c.adalora.init_r  # no pruning: the skills only have to learn the rule
  c.optimizer.learning_rate = 3e-2
  c.train.steps = STEPS
  base = loading.load_model(c.model.source)
  # the random tiny head gives logit gaps under ~1 whatever the hidden state: sharpen it (as
  # router_fixtures does) so a rank-4 adapter can move the answer
  graphdef, frozen = nnx.split(base)
  frozen["lm_head"] = frozen["lm_head"].replace(frozen["lm_head"][...] * 30)
  nnx.update(base, frozen)
  tok = tokenizer.load_tokenizer(tokenizer.tokenizer_source(c.model))
  losses = train_planted_skills(c, base, tok, tmp_path / "skills")
  n = len(SKILLS)
  assert np.mean(losses[-n:]) < 0.1 * np.mean(losses[:n]), losses  # each learned its letter

  c.skills_from = str(tmp_path / "skills")
  c.tasks = (f"planted={write_task_file(tmp_path / 'planted.jsonl', 120)}",)
  c.methods = ("base", "uniform", "gd")
  c.fit_fraction, c.max_fit_rows, c.max_scored_rows = 0.3, 24, 60
  c.router.steps = 30
  res = evaluate_suite.train_and_evaluate(c, tmp_path / "run", base=base)["tasks"]["planted"]
  m = res["methods"]
  assert res["n_scored"] == 60
  assert m["gd"]["delta_vs_base"]["ci"][0] > 0, m  # the router's gain is not noise
  assert m["gd"]["score"] >= 0.9, m
  assert m["base"]["score"] <= 0.5, m  # the base cannot do the task (else it tests nothing)
  assert m["uniform"]["delta_vs_base"]["ci"][0] <= 0, m  # the other letters outweigh C
