"""Our adapters and base as PEFT and transformers see them: key names, shapes and folds (numpy).

- PEFT AdaLoRA (`adalora_tensors`, `adalora_config`): each module sliced to the ranks it kept
  (E != 0; a pruned triplet contributes exactly 0), keys `base_model.model.<module>.lora_A`
  [r_k, in], `lora_E` [r_k, 1], `lora_B` [out, r_k]. PEFT rebuilds each module at r_k from
  `rank_pattern` before copying, and keeps ranknum = init_r, so the scale is unchanged.
- Plain LoRA (`fold_lora`, `lora_tensors`, `lora_config`): A' = A[kept], B' = B[:, kept]·diag(
  E[kept])·scale·w_s, the skills of a mixture side by side on the rank axis, zero-padded to one
  rank r for the whole export with lora_alpha = r (scale 1). Exact: no SVD, no truncation.
- transformers (`hf_tensors`, `hf_config`, `generation_config`): the inverse of
  `model.loading.HF_NAMES`, and config.json from our ModelConfig.
- `parse_peft_key` reads a PEFT key back (for import_peft).
"""

from __future__ import annotations

import re

import numpy as np

from mdkif_jax.model.config import ModelConfig
from mdkif_jax.model.loading import HF_NAMES
from mdkif_jax.peft.serving import LLAMA_MODULES, peft_rank_pattern, rank_indices

PREFIX = "base_model.model."  # PEFT's prefix of a CausalLM's module paths in adapter files
MODULE_TARGET = {path.split(".")[-1]: t for t, path in LLAMA_MODULES.items()}  # q_proj -> q
KEY_RE = re.compile(
  r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([ABE])(\.weight)?"
)
VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
}


def module_name(layer: int, target: str) -> str:
  """HF module path of one adapted projection, e.g. model.layers.0.self_attn.q_proj."""
  return f"model.layers.{layer}.{LLAMA_MODULES[target]}"


def peft_key(layer: int, target: str, part: str, lora: bool = False) -> str:
  """The adapter-file key of A, E or B; plain LoRA's A and B are nn.Linear (`.weight`)."""
  return f"{PREFIX}{module_name(layer, target)}.lora_{part}" + (".weight" if lora else "")


def parse_peft_key(key: str) -> tuple[int, str, str] | None:
  """(layer, our target, "A"|"B"|"E") of a PEFT adapter key, None for anything else."""
  m = KEY_RE.fullmatch(key)
  if m is None or m.group(2) not in MODULE_TARGET:
    return None
  return int(m.group(1)), MODULE_TARGET[m.group(2)], m.group(3)


def target_modules(targets) -> list[str]:
  """PEFT target_modules (projection names) of our targets."""
  return [LLAMA_MODULES[t].split(".")[-1] for t in targets]


def kept(leaf: dict) -> np.ndarray:
  """The ranks a skill's module kept, ([S,] L, r) bool: E != 0 (AdaLoRA zeroes pruned E)."""
  return np.asarray(leaf["E"]) != 0


# ---- PEFT AdaLoRA ----------------------------------------------------------------------------
def adalora_tensors(skill: dict) -> tuple[dict[str, np.ndarray], dict]:
  """(adapter_model tensors, rank_pattern) of one skill ({target: {A: (L, r, in), E: (L, r),
  B: (L, out, r)}}), every module sliced to its kept ranks in their original order."""
  tensors, pattern = {}, {}
  for t in sorted(skill):
    leaf = {k: np.asarray(v, np.float32) for k, v in skill[t].items()}
    pattern[t] = kept(leaf)
    for i, keep in enumerate(pattern[t]):
      tensors[peft_key(i, t, "A")] = np.ascontiguousarray(leaf["A"][i][keep])
      tensors[peft_key(i, t, "E")] = np.ascontiguousarray(leaf["E"][i][keep][:, None])
      tensors[peft_key(i, t, "B")] = np.ascontiguousarray(leaf["B"][i][:, keep])
  return tensors, peft_rank_pattern(pattern)


def adalora_config(
  targets,
  init_r: int,
  scale: float,
  rank_pattern: dict,
  schedule: dict,
  base: str | None = None,
) -> dict:
  """adapter_config.json of an AdaLoRA export. lora_alpha = scale·(init_r + 1e-5) gives PEFT's
  lora_alpha / (ranknum + 1e-5) exactly our scale, whatever convention trained the skill.
  `schedule` holds total_step, tinit, tfinal, deltaT, target_r (PEFT validates them on load)."""
  return {
    "peft_type": "ADALORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base,
    "inference_mode": True,
    "init_r": int(init_r),
    "lora_alpha": float(scale) * (int(init_r) + 1e-5),
    "lora_dropout": 0.0,
    "target_modules": target_modules(targets),
    "bias": "none",
    "rank_pattern": rank_pattern,
    **schedule,
  }


# ---- plain LoRA ------------------------------------------------------------------------------
def fold_lora(stacked: dict, weights_S, scale: float) -> tuple[dict, int]:
  """({target: {"A": (L, r, in), "B": (L, out, r)}}, r): Σ_s w_s·scale·ΔW_s of skill-stacked
  adapters ([S, L, ...]) as one LoRA of scale 1. Each skill with w_s != 0 brings its kept
  ranks (E folded into B, with w_s and the scale); r is the most any module needs (at least 1),
  other modules are zero-padded."""
  w_S = np.asarray(weights_S, np.float64)
  out, most = {}, 1
  for t in sorted(stacked):
    a = np.asarray(stacked[t]["A"], np.float64)  # (S, L, r, in)
    e = np.asarray(stacked[t]["E"], np.float64)  # (S, L, r)
    b = np.asarray(stacked[t]["B"], np.float64)  # (S, L, out, r)
    S, L, r, _ = a.shape
    mask = (e != 0) & (w_S != 0)[:, None, None]
    b = b * (e * w_S[:, None, None] * scale)[:, :, None, :]
    flat_a = np.moveaxis(a, 0, 1).reshape(L, S * r, -1)  # rank s·r + i is rank i of skill s
    flat_b = np.moveaxis(b, 0, 2).reshape(L, b.shape[2], S * r)
    idx, valid = rank_indices(np.moveaxis(mask, 0, 1).reshape(L, S * r), bucket=1)
    a_k = np.take_along_axis(flat_a, idx[..., None], axis=1) * valid[..., None]
    b_k = np.take_along_axis(flat_b, idx[:, None, :], axis=2) * valid[:, None, :]
    out[t] = {"A": a_k, "B": b_k}
    most = max(most, idx.shape[-1])
  for leaf in out.values():  # one rank for the export: vLLM and LoRAX take one r per adapter
    pad = most - leaf["A"].shape[1]
    leaf["A"] = np.pad(leaf["A"], ((0, 0), (0, pad), (0, 0))).astype(np.float32)
    leaf["B"] = np.pad(leaf["B"], ((0, 0), (0, 0), (0, pad))).astype(np.float32)
  return out, most


def lora_tensors(folded: dict) -> dict[str, np.ndarray]:
  """adapter_model tensors of a folded LoRA (`fold_lora`), PEFT LoRA key names."""
  tensors = {}
  for t, leaf in sorted(folded.items()):
    for i in range(leaf["A"].shape[0]):
      tensors[peft_key(i, t, "A", lora=True)] = np.ascontiguousarray(leaf["A"][i])
      tensors[peft_key(i, t, "B", lora=True)] = np.ascontiguousarray(leaf["B"][i])
  return tensors


def lora_config(targets, r: int, base: str | None = None) -> dict:
  """adapter_config.json of a plain-LoRA export: lora_alpha = r, so alpha / r = 1."""
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base,
    "inference_mode": True,
    "r": int(r),
    "lora_alpha": int(r),
    "lora_dropout": 0.0,
    "target_modules": target_modules(targets),
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
  }


# ---- transformers checkpoints ----------------------------------------------------------------
def hf_tensors(params: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """Our param arrays by name (embed, q, ..., stacked per layer) under transformers' names,
  in torch's (out, in) layout."""
  out = {}
  for name, value in params.items():
    template, transpose = HF_NAMES[name]
    per_layer = [(template.format(i=i), value[i]) for i in range(num_layers)]
    for key, w in per_layer if "{i}" in template else [(template, value)]:
      out[key] = np.ascontiguousarray(w.T if transpose else w)
  return out


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """config.json for AutoModelForCausalLM (legacy rope keys: transformers 4 and 5 read them)."""
  eos = list(cfg.eos_token_ids)
  out = {
    "architectures": [ARCHITECTURES[cfg.model_type]],
    "model_type": cfg.model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_hidden_layers,
    "num_attention_heads": cfg.num_attention_heads,
    "num_key_value_heads": cfg.num_key_value_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_position_embeddings,
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_scaling": cfg.rope_scaling_dict(),
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "attention_dropout": 0.0,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    "pad_token_id": cfg.pad_token_id,
    "torch_dtype": dtype,
  }
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
  elif cfg.model_type == "mistral":
    out["sliding_window"] = cfg.sliding_window
  else:  # qwen2: q/k/v biases always
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def generation_config(cfg: ModelConfig) -> dict:
  eos = list(cfg.eos_token_ids)
  return {
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    "pad_token_id": cfg.pad_token_id,
  }
