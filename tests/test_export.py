"""Exports read back by the torch stack on a tiny Llama written by transformers: our skill as a
PEFT AdaLoRA adapter (pruned ranks included), as a plain LoRA, a task router's mixture as ONE
LoRA, a merged transformers checkpoint, and a GGUF base as a transformers directory."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from mdkif_jax import checkpoint
from mdkif_jax import export as ex
from mdkif_jax.errors import SkillsMismatchError
from mdkif_jax.model import loading
from mdkif_jax.peft import adapters, serving
from tests import hf_fixtures

SKILLS, INIT_R, ALPHA = ("qa", "ner", "sum"), 4, 8.0
ROUTER_W = np.array([0.7, 0.0, -0.4], np.float32)  # ner unused: its ranks must not be exported


def write_stage1(workdir, cfg, skills=SKILLS, init_r=INIT_R, seed=0, planned=40) -> dict:
  """A stage-1 checkpoint as train_skills writes it, with trained-looking AdaLoRA skills: E
  nonzero except pruned ranks (about a third, and every rank of layer 0's k_proj)."""
  dims, L = cfg.projection_dims(), cfg.num_hidden_layers
  ad = adapters.init_adalora(jax.random.key(seed), dims, L, init_r, num_skills=len(skills), std=0.2)
  rng = np.random.default_rng(seed)
  for t, leaf in ad.items():
    e = rng.standard_normal(leaf["E"].shape) * (rng.random(leaf["E"].shape) > 0.35)
    if t == "k":
      e[:, 0] = 0  # a module that kept no rank at all (PEFT allows r = 0)
    ad[t] = {**leaf, "E": jnp.asarray(e, jnp.float32)}
  scale = adapters.adapter_scale(ALPHA, init_r)
  meta = checkpoint.run_identity(cfg, skills, adapters.TARGETS, init_r, scale)
  meta.update(
    {"train.steps": planned, "adalora.tinit": 5, "adalora.tfinal": 10, "adalora.delta_t": 2}
  )
  meta["adalora.target_r"] = 2
  mngr = checkpoint.manager(workdir / "checkpoints", 1, False)
  state = {"adapters": ad, "opt_state": {"mu": ad}, "step": jnp.asarray(40, jnp.int32)}
  checkpoint.save(mngr, 40, state, {"skills": {}}, meta)
  mngr.wait_until_finished()
  return ad


def write_router(workdir, cfg, method="cmaes", skills=SKILLS, w=ROUTER_W, **more):
  meta = {"model": checkpoint.model_identity(cfg), "skills": list(skills), "method": method}
  meta |= more
  checkpoint.save_router(workdir, {"weights": np.asarray(w, np.float32)}, meta, {})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  ref = hf_fixtures.write_hf("llama", root / "hf")
  base = loading.load_hf_dir(root / "hf", progress=False)
  stacked = write_stage1(root / "skills", base.cfg)
  write_router(root / "router", base.cfg)
  write_router(root / "gate", base.cfg, method="gate")
  tokens = np.random.default_rng(7).integers(0, 256, (2, 12)).astype(np.int32)
  return dict(root=root, ref=ref, base=base, stacked=stacked, tokens=tokens)


def run_export(tiny, name, *argv):
  out = tiny["root"] / "out" / name
  common = ["--base", str(tiny["root"] / "hf"), "--out", str(out)]
  args = ex.parse_args([*common, *argv])
  return ex.export(args, "python -m mdkif_jax.export " + " ".join([*common, *argv])), out


def torch_logits(tiny, adapter_dir=None, model_dir=None):
  model = AutoModelForCausalLM.from_pretrained(
    str(model_dir or tiny["root"] / "hf"), dtype=torch.float32
  ).eval()
  if adapter_dir is not None:
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
  return hf_fixtures.reference_logits(model, tiny["tokens"])


def our_logits(tiny, leaves=None, ctx=None, params=None):
  graphdef, frozen = nnx.split(tiny["base"])
  return ex.ours(graphdef, params or frozen, tiny["tokens"], leaves, ctx)


def skill(tiny, s):
  return jax.tree.map(lambda x: x[s], tiny["stacked"])


def test_adalora_export_loads_in_peft_with_its_pruned_ranks(tiny):
  report, out = run_export(tiny, "peft", "--from", str(tiny["root"] / "skills"), "--format", "peft")
  scale = adapters.adapter_scale(ALPHA, INIT_R)
  for s, name in enumerate(SKILLS):
    ours = our_logits(tiny, skill(tiny, s), adapters.AdapterCtx(scale))
    assert np.abs(ours - our_logits(tiny)).max() > 1e-2  # the skill really acts
    got = torch_logits(tiny, out / name)
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
    print(f"{name} -> PEFT AdaLoRA -> PeftModel: max |Δlogit| = {np.abs(got - ours).max():.2e}")
  cfg = json.loads((out / "qa" / "adapter_config.json").read_text())
  tensors = load_file(str(out / "qa" / "adapter_model.safetensors"))
  keep = cfg["rank_pattern"]["model.layers.1.mlp.up_proj.lora_E"]
  r_k = sum(keep)
  assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == INIT_R and len(keep) == INIT_R
  assert (cfg["total_step"], cfg["tinit"], cfg["tfinal"], cfg["deltaT"]) == (40, 5, 10, 2)
  assert tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A"].shape == (r_k, 64)
  assert tensors["base_model.model.model.layers.1.mlp.up_proj.lora_E"].shape == (r_k, 1)
  assert tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B"].shape == (96, r_k)
  assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A"].shape == (0, 64)
  assert sum(map(sum, cfg["rank_pattern"].values())) < 2 * 7 * INIT_R  # pruned ranks exist
  assert not [k for k in tensors if "ranknum" in k]
  readme = (out / "README.md").read_text()
  assert "transformers + peft PeftModel" in readme and "--format peft" in readme
  assert max(d for _, _, d in report["checks"]) < 1e-4 and len(report["checks"]) == 6
  assert not (tiny["root"] / "peft.tmp").exists()


def test_plain_lora_export_equals_peft_logits(tiny):
  _, out = run_export(
    tiny, "lora", "--from", str(tiny["root"] / "skills"), "--format", "lora", "--skills", "ner"
  )
  cfg = json.loads((out / "ner" / "adapter_config.json").read_text())
  tensors = load_file(str(out / "ner" / "adapter_model.safetensors"))
  assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] <= INIT_R
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == cfg["r"]
  ours = our_logits(
    tiny, skill(tiny, 1), adapters.AdapterCtx(adapters.adapter_scale(ALPHA, INIT_R))
  )
  got = torch_logits(tiny, out / "ner")
  np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
  print(f"ner -> LoRA -> PeftModel: max |Δlogit| = {np.abs(got - ours).max():.2e}")
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "ner"]


def test_router_mixture_exports_as_one_lora_equal_to_the_merged_mixture(tiny):
  report, out = run_export(
    tiny,
    "mix",
    "--from",
    str(tiny["root"] / "skills"),
    "--router",
    str(tiny["root"] / "router"),
    "--format",
    "lora",
  )
  cfg = json.loads((out / "adapter_config.json").read_text())
  scale = adapters.adapter_scale(ALPHA, INIT_R)
  frozen = nnx.split(tiny["base"])[1]
  merged = serving.merged_params(frozen, tiny["stacked"], jnp.asarray(ROUTER_W), scale)
  want = our_logits(tiny, params=merged)
  got = torch_logits(tiny, out)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  print(
    f"mixture -> one LoRA -> PeftModel vs merged: max |Δlogit| = {np.abs(got - want).max():.2e}"
  )
  kept = sum(int((np.asarray(tiny["stacked"]["up"]["E"][s, 1]) != 0).sum()) for s in (0, 2))
  assert cfg["r"] >= kept and cfg["r"] <= 2 * INIT_R  # qa's and sum's ranks, not ner's
  assert "gate" not in (out / "README.md").read_text()  # a task-level router is what it says
  with pytest.raises(ex.ExportError, match="per row"):
    run_export(
      tiny,
      "gate_out",
      "--from",
      str(tiny["root"] / "skills"),
      "--router",
      str(tiny["root"] / "gate"),
      "--format",
      "lora",
    )


def test_an_unfinished_stage1_exports_only_at_a_named_step(tiny):
  skills_dir = str(tiny["root"] / "running")
  write_stage1(tiny["root"] / "running", tiny["base"].cfg, planned=80)  # at step 40 of 80
  args = ("--from", skills_dir, "--format", "peft", "--skills", "qa")
  with pytest.raises(SkillsMismatchError, match="reached step 40 of 80.*--step 40"):
    run_export(tiny, "running", *args)
  _, out = run_export(tiny, "running", *args, "--step", "40")
  assert (out / "qa" / "adapter_config.json").is_file()
  # a router records the step its skills had; export merges those, not the latest
  write_router(tiny["root"] / "router40", tiny["base"].cfg, skills_step=40)
  mix = ("--from", skills_dir, "--router", str(tiny["root"] / "router40"), "--format", "lora")
  _, out = run_export(tiny, "router40", *mix)
  assert (out / "adapter_config.json").is_file()
  with pytest.raises(ex.ExportError, match="fitted on the skills at step 40; leave --step out"):
    run_export(tiny, "router39", *mix, "--step", "39")


@pytest.mark.parametrize("merged", ["mixture", "sum"])
def test_merged_hf_checkpoint_loads_in_transformers(tiny, merged):
  scale = adapters.adapter_scale(ALPHA, INIT_R)
  if merged == "mixture":
    what = ["--router", str(tiny["root"] / "router")]
    ctx = adapters.AdapterCtx(scale, weights=jnp.tile(jnp.asarray(ROUTER_W)[None], (2, 1)))
    want = our_logits(tiny, tiny["stacked"], ctx)
  else:
    what = ["--skills", merged]
    want = our_logits(tiny, skill(tiny, SKILLS.index(merged)), adapters.AdapterCtx(scale))
  from_ = ["--from", str(tiny["root"] / "skills")]
  _, out = run_export(tiny, f"hf_{merged}", *from_, *what, "--format", "hf")
  got = torch_logits(tiny, model_dir=out)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  print(f"{merged} -> merged HF -> transformers: max |Δlogit| = {np.abs(got - want).max():.2e}")
  assert {"config.json", "model.safetensors", "generation_config.json"} <= {
    p.name for p in out.iterdir()
  }


def test_gguf_base_exports_as_a_transformers_directory(tiny):
  gguf = tiny["root"] / "tiny.gguf"
  hf_fixtures.write_gguf(tiny["ref"], gguf)
  out = tiny["root"] / "gguf_hf"
  ex.export(ex.parse_args(["--base", str(gguf), "--format", "hf", "--out", str(out)]), "cmd")
  ours = ex.ours(*nnx.split(loading.load_gguf(gguf, progress=False)), tiny["tokens"])
  got = torch_logits(tiny, model_dir=out)
  np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
  print(f"GGUF base -> HF -> transformers: max |Δlogit| = {np.abs(got - ours).max():.2e}")
  np.testing.assert_allclose(
    got, hf_fixtures.reference_logits(tiny["ref"], tiny["tokens"]), atol=1e-4
  )
  assert "no tokenizer files" in (out / "README.md").read_text()  # this GGUF carries none


def test_cli_refuses_an_existing_out_in_one_line(tiny, capsys):
  (tiny["root"] / "taken").mkdir()
  argv = [
    "--base",
    str(tiny["root"] / "hf"),
    "--format",
    "hf",
    "--out",
    str(tiny["root"] / "taken"),
  ]
  with pytest.raises(SystemExit) as e:
    ex.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ExportError:") and "--overwrite" in err[0]


def test_export_runs_without_torch(tmp_path):
  """Without torch the export still writes and verifies, with our reader only."""
  script = (
    "import sys; sys.modules['torch'] = None\n"
    "from mdkif_jax import export\n"
    f"export.main(['--base', 'tiny', '--format', 'hf', '--out', {str(tmp_path / 'o')!r}])\n"
    "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
  )
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  readme = (tmp_path / "o" / "README.md").read_text()
  assert "only our reader ran" in readme and "| base | mdkif_jax load_hf_dir | 0.00e+00" in readme


def test_an_evaluation_cell_exports_its_task_level_weights_and_refuses_others(tiny):
  """--router EVAL/cells/TASK/gd.json: the weights the evaluation scored with, over the stack
  of its skills_from, merged as a stage-2 router's are; a gate cell (input-conditioned), a cell
  without weights and another --from than the evaluation's are refused."""
  skills_dir = str(tiny["root"] / "skills")
  ev = tiny["root"] / "eval"
  (ev / "cells" / "demo").mkdir(parents=True)
  (ev / "cells_identity.json").write_text(json.dumps({"skills_from": skills_dir}))
  w = [0.7, -0.2, 0.4]
  for method, weights in (("gd", w), ("gate", w), ("base", None)):
    (ev / "cells" / "demo" / f"{method}.json").write_text(json.dumps({"weights": weights}))
  done, out = run_export(
    tiny, "cell", "--from", skills_dir, "--router", str(ev / "cells/demo/gd.json"), "--format", "hf"
  )
  # a GD mixture is exported as what it is, without a note about gates it was never
  assert not [n for n in done["notes"] if "gate" in n]
  assert "gate" not in (out / "README.md").read_text()
  scale = adapters.adapter_scale(ALPHA, INIT_R)
  merged = serving.merged_params(
    nnx.split(tiny["base"])[1], tiny["stacked"], jnp.asarray(w, jnp.float32), scale
  )
  want = our_logits(tiny, params=merged)
  np.testing.assert_allclose(torch_logits(tiny, model_dir=out), want, atol=1e-4, rtol=0)
  assert "demo/gd.json`: qa=0.7, ner=-0.2" in (out / "README.md").read_text()
  for method, why in (("gate", "input-conditioned"), ("base", "no task-level weights")):
    with pytest.raises(ex.ExportError, match=why):
      run_export(
        tiny,
        method,
        "--from",
        skills_dir,
        "--router",
        str(ev / f"cells/demo/{method}.json"),
        "--format",
        "hf",
      )
  for bad in ("gd.json", str(ev / "cells/demo/gate_k9.json")):
    with pytest.raises(ex.ExportError, match="no router workdir or finished evaluation cell"):
      run_export(tiny, "bad", "--from", skills_dir, "--router", bad, "--format", "hf")
  assert not (ev / "cells" / "demo" / "gate_k9.json").exists()  # nothing was created
  with pytest.raises(FileNotFoundError, match="no router checkpoint"):
    run_export(tiny, "bad", "--from", skills_dir, "--router", str(ev), "--format", "hf")
  assert not (ev / "checkpoints").exists()
  # a learning-curve point's cell: its weights are over the skills at its skills_step
  (ev / "cells_identity.json").write_text(json.dumps({"skills_from": skills_dir, "skills_step": 7}))
  with pytest.raises(SkillsMismatchError, match=r"no checkpoint at step 7 .* holds \[40\]"):
    run_export(
      tiny,
      "step",
      "--from",
      skills_dir,
      "--router",
      str(ev / "cells/demo/gd.json"),
      "--format",
      "hf",
    )
  ident = {"skills_from": skills_dir, "skills_step": 40}
  (ev / "cells_identity.json").write_text(json.dumps(ident))
  _, at40 = run_export(
    tiny, "at40", "--from", skills_dir, "--router", str(ev / "cells/demo/gd.json"), "--format", "hf"
  )
  np.testing.assert_allclose(torch_logits(tiny, model_dir=at40), want, atol=1e-4, rtol=0)
  with pytest.raises(ex.ExportError, match="pass --from"):
    run_export(
      tiny,
      "other",
      "--from",
      str(tiny["root"] / "router"),
      "--router",
      str(ev / "cells/demo/gd.json"),
      "--format",
      "hf",
    )
