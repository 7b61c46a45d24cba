"""PEFT adapters trained a few steps in torch join as skills (`skills_from=peft:PATH`, mixed with
a stage-1 workdir) and give PeftModel's logits; adapters of another base or with parts we
cannot represent are refused, naming the fields."""

import json
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from mdkif_jax import checkpoint, sharding
from mdkif_jax import export as ex
from mdkif_jax.model import loading
from mdkif_jax.model.config import PRESETS
from mdkif_jax.peft import adapters, import_peft
from tests import hf_fixtures
from tests.test_export import write_stage1

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_peft(hf_dir, out, config, steps: int, allocate: bool = False):
  """A PEFT adapter trained `steps` AdamW steps on random tokens, saved as PEFT saves it."""
  torch.manual_seed(0)
  model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf_dir)), config)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
  rng = np.random.default_rng(1)
  for t in range(steps):
    x = torch.tensor(rng.integers(0, 256, (2, 12)))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    if allocate:
      model.base_model.update_and_allocate(t)  # AdaLoRA's allocator, after the step
    opt.zero_grad()
  model.save_pretrained(str(out))
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("import")
  hf_fixtures.write_hf("llama", root / "hf")
  lora = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj"],
    rank_pattern={"down_proj": 2},  # per-module ranks and alphas: their own scales
    alpha_pattern={"v_proj": 16},
  )
  ada = AdaLoraConfig(
    init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, target_modules=ALL
  )
  base = loading.load_hf_dir(root / "hf", progress=False)
  write_stage1(root / "ours", base.cfg, skills=("qa",))
  return dict(
    root=root,
    base=base,
    lora=train_peft(root / "hf", root / "lora_skill", lora, steps=3),
    ada=train_peft(root / "hf", root / "ada_skill", ada, steps=8, allocate=True),
    tokens=np.random.default_rng(7).integers(0, 256, (2, 12)).astype(np.int32),
  )


def peft_logits(trained, adapter_dir):
  model = AutoModelForCausalLM.from_pretrained(str(trained["root"] / "hf"), dtype=torch.float32)
  model = PeftModel.from_pretrained(model.eval(), str(adapter_dir)).eval()
  return hf_fixtures.reference_logits(model, trained["tokens"])


def load(trained, skills_from, base_cfg=None):
  cfg = types.SimpleNamespace(skills_from=skills_from, skills_step=None)
  mesh = sharding.make_mesh((1, 1, 1))
  return checkpoint.load_skills(cfg, base_cfg or trained["base"].cfg, mesh)


def test_peft_lora_and_adalora_join_as_skills_with_peft_logits(trained):
  ada_cfg = json.loads((trained["ada"] / "adapter_config.json").read_text())
  kept = [sum(v) for v in ada_cfg["rank_pattern"].values()]
  assert min(kept) < 6  # the allocator pruned: the saved tensors are sliced
  entries = f"peft:{trained['lora']},{trained['root'] / 'ours'},peft:{trained['ada']}"
  skills = load(trained, entries)
  assert skills.names == ("lora_skill", "qa", "ada_skill")
  assert set(skills.stacked) == set(adapters.TARGETS)  # LoRA's q, v, down: others zero-filled
  graphdef, frozen = nnx.split(trained["base"])
  for s, directory in ((0, trained["lora"]), (2, trained["ada"])):
    ctx = adapters.AdapterCtx(skills.scale, skill_ids=jnp.full((2,), s, jnp.int32))
    ours = ex.ours(graphdef, frozen, trained["tokens"], skills.stacked, ctx)
    want = peft_logits(trained, directory)
    assert np.abs(want - ex.ours(graphdef, frozen, trained["tokens"])).max() > 1e-3  # it acts
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
    print(f"PEFT {directory.name} -> our skill: max |Δlogit| = {np.abs(ours - want).max():.2e}")
  own = load(trained, str(trained["root"] / "ours"))  # the stage-1 skill is unchanged
  ratio = own.scale / skills.scale  # folded into B: one scale serves the whole stack
  np.testing.assert_allclose(
    skills.stacked["q"]["B"][1, :, :, :4], own.stacked["q"]["B"][0] * ratio
  )


def test_adapter_of_another_base_is_refused_naming_the_fields(trained):
  tiny512 = PRESETS["tiny"]  # same q/v shapes, but intermediate_size 128, not 96
  with pytest.raises(
    import_peft.PeftImportError, match="another base.*down_proj.*intermediate_size=128"
  ):
    load(trained, f"peft:{trained['lora']}", tiny512)


def test_adapter_with_parts_we_cannot_represent_is_refused(trained, tmp_path):
  bad = shutil.copytree(trained["lora"], tmp_path / "bad")
  cfg = json.loads((bad / "adapter_config.json").read_text())
  cfg.update(modules_to_save=["lm_head"], target_modules=["q_proj", "embed_tokens"])
  (bad / "adapter_config.json").write_text(json.dumps(cfg))
  with pytest.raises(import_peft.PeftImportError, match="modules_to_save.*target_modules"):
    load(trained, f"peft:{bad}")
