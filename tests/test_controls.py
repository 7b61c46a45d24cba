"""The two controls of docs/results.md on a tiny model: one multi-task adapter trained on the
union of the skills' data (train.union) and plain LoRA skills (train.adapter="lora")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mdkif_jax import checkpoint, optimizer, sharding, train
from mdkif_jax import inspect as inspect_run
from mdkif_jax.data import skill_id
from mdkif_jax.data.batches import make_batches, to_global
from mdkif_jax.errors import ConfigError
from mdkif_jax.model import loading, tokenizer
from mdkif_jax.peft import adapters
from tests.test_train import tiny_config

SKILLS = ("qa", "ner")


def _first_batch_answer_tokens(cfg) -> dict[str, int]:
  """Answer tokens of each skill in the first training batch (the same rows in both runs)."""
  tok = tokenizer.load_tokenizer(tokenizer.tokenizer_source(cfg.model))
  batch = next(make_batches(cfg, SKILLS, tok))
  T = batch["tokens"].shape[1]
  skill_of_pos = np.asarray(batch["skill_ids"]).reshape(-1)[np.asarray(batch["answer_idx"]) // T]
  valid = np.asarray(batch["answer_valid"]) > 0
  ids = {s: skill_id(s) for s in SKILLS}
  return {s: int((valid & (skill_of_pos == ids[s])).sum()) for s in SKILLS}


def test_union_trains_one_adapter_on_every_skills_rows(tmp_path):
  per_skill = train.train_skills(tiny_config(steps=4), tmp_path / "skills", SKILLS)
  union_cfg = tiny_config(steps=4, union=True)
  union = train.train_skills(union_cfg, tmp_path / "union", SKILLS)
  assert union["skills"] == ("union",)
  assert all(leaf["A"].shape[0] == 1 for leaf in union["adapters"].values())
  # the same data streams, advanced by the same rows
  assert union["data_state"] == per_skill["data_state"]
  # step 1 sees the initial adapters (E = 0: the base) on the same rows, so the union's loss is
  # the answer-token-weighted mean of the per-skill losses: every skill's rows reach adapter 0
  tokens = _first_batch_answer_tokens(union_cfg)
  first = per_skill["history"][0]
  expected = sum(first[f"loss/{s}"] * tokens[s] for s in SKILLS) / sum(tokens.values())
  np.testing.assert_allclose(union["history"][0]["loss/union"], expected, rtol=1e-5)
  # the evaluation stage reads it as one skill
  mesh = sharding.make_mesh((1, 1, 1))
  base = loading.load_model(union_cfg.model.source, mesh=mesh, seed=union_cfg.model.seed)
  skills, meta, scale = checkpoint.load_one(tmp_path / "union", base.cfg, mesh)
  assert meta["skills"] == ["union"] and meta["union_of"] == list(SKILLS)
  assert all(leaf["A"].shape[0] == 1 for leaf in skills.values())
  # union_budget="all_skills": both skills' ranks in one adapter, at a skill's scale
  _, per_meta, per_scale = checkpoint.load_one(tmp_path / "skills", base.cfg, mesh)
  assert meta["init_r"] == len(SKILLS) * per_meta["init_r"]
  # and its target rank: what inspect's schedule and a PEFT export's target_r say
  r = len(SKILLS) * union_cfg.adalora.target_r
  assert checkpoint.trained_target_r(meta) == r
  assert checkpoint.trained_target_r(per_meta) == union_cfg.adalora.target_r
  report = inspect_run.inspect(tmp_path / "union")
  assert report["schedule"]["target_r"] == r, report["schedule"]
  np.testing.assert_allclose(scale, per_scale, rtol=1e-4)  # alpha / (init_r + 1e-5)
  assert all(leaf["E"].shape[-1] == meta["init_r"] for leaf in skills.values())


def test_a_union_adapter_of_one_skills_budget_keeps_the_configs_target_rank():
  meta = {"adalora.target_r": 2, "union_of": ["qa", "ner"], "union_budget": "one_skill"}
  assert checkpoint.trained_target_r(meta) == 2
  assert checkpoint.trained_target_r({"union_of": ["qa"]}) is None  # not recorded


def test_lora_control_is_plain_lora_at_the_target_rank(tmp_path):
  cfg = tiny_config(steps=4, adapter="lora")
  cfg.optimizer.weight_decay = 0.1  # would shrink E if E were not frozen
  out = train.train_skills(cfg, tmp_path / "lora", SKILLS)
  r = cfg.adalora.target_r
  for t, leaf in out["adapters"].items():
    assert leaf["A"].shape[-2] == r and leaf["B"].shape[-1] == r, t
    np.testing.assert_array_equal(np.asarray(leaf["E"]), 1.0)  # B·diag(1)·A = B·A
    assert np.abs(np.asarray(leaf["B"])).max() > 0, t  # B starts at 0 and trains
    assert out["masks"][t].all(), t  # the budget is every rank: nothing is pruned
  mesh = sharding.make_mesh((1, 1, 1))
  base = loading.load_model(cfg.model.source, mesh=mesh, seed=cfg.model.seed)
  _, meta, scale = checkpoint.load_one(tmp_path / "lora", base.cfg, mesh)
  assert meta["adapter"] == "lora" and meta["init_r"] == r
  np.testing.assert_allclose(scale, cfg.adalora.lora_alpha / r, rtol=1e-5)  # PEFT's alpha / r


def test_lora_steps_equal_adamw_on_b_times_a():
  """Three steps of the control == three steps of clipped AdamW on the plain-LoRA loss of B·A
  (leaves without E, no allocator, no orthogonal term), written out here with optax alone."""
  cfg = tiny_config(steps=20, adapter="lora")
  cfg.optimizer.warmup_steps = 0  # a non-zero first step
  cfg.optimizer.weight_decay = 0.01
  mesh = sharding.make_mesh((1, 1, 1))
  base = train.load_base(cfg, mesh)
  graphdef, frozen = nnx.split(base)
  run = train.setup_training(cfg, ("qa",), base=base)
  stream = make_batches(cfg, ("qa",), run.tok)
  host = [next(stream) for _ in range(3)]
  plain = {t: {"A": leaf["A"], "B": leaf["B"]} for t, leaf in run.state["adapters"].items()}
  plain = jax.tree.map(np.array, plain)  # the state is donated below

  def loss(p, b):
    model = nnx.merge(graphdef, frozen)
    ctx = adapters.AdapterCtx(scale=run.scale, skill_ids=jnp.zeros(len(b["tokens"]), jnp.int32))
    h, _ = model.hidden(
      b["tokens"],
      positions_BT=b["positions"],
      mask_BT=b["attention_mask"],
      adapters=p,
      adapter_ctx=ctx,
    )
    idx = b["answer_idx"][0]  # one data shard: row * T + t
    logp = jax.nn.log_softmax(model.logits(h).reshape(-1, model.cfg.vocab_size))
    nll = -logp[idx, b["targets"].reshape(-1)[idx]]
    w = b["answer_valid"][0].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.sum(w)

  tx = optax.chain(
    optax.clip_by_global_norm(cfg.optimizer.clip_norm),
    optax.adamw(
      optimizer.learning_rate_schedule(cfg.optimizer, cfg.train.steps),
      b1=cfg.optimizer.b1,
      b2=cfg.optimizer.b2,
      eps=cfg.optimizer.eps,
      weight_decay=cfg.optimizer.weight_decay,
    ),
  )
  opt = tx.init(plain)
  state = run.state
  for b in host:
    state, _ = run.fns.train_step(state, run.frozen, to_global(b, mesh))
    g = jax.grad(loss)(plain, jax.tree.map(jnp.asarray, b))
    upd, opt = tx.update(g, opt, plain)
    plain = optax.apply_updates(plain, upd)
  for t, leaf in plain.items():
    for k in ("A", "B"):
      np.testing.assert_allclose(
        np.asarray(state["adapters"][t][k]), np.asarray(leaf[k]), atol=2e-6, err_msg=f"{t}.{k}"
      )


def test_union_and_separate_mode_are_refused(tmp_path):
  cfg = tiny_config(union=True)
  cfg.train.mode = "separate"
  with pytest.raises(ConfigError, match="union"):
    train.train_and_evaluate(cfg, str(tmp_path))


def test_unknown_adapter_kind_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="train.adapter"):
    train.train_skills(tiny_config(adapter="dora"), tmp_path, SKILLS)
