"""Tiny real checkpoints written with transformers (and a GGUF writer) for loader tests."""

from __future__ import annotations

import pathlib

import numpy as np

TINY = dict(
  vocab_size=256,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
  rms_norm_eps=1e-6,
)


def write_hf(kind: str, out: pathlib.Path, seed: int = 0, shard_size: str | None = None, **extra):
  """Save a random transformers model of `kind` (llama, mistral, qwen2) as safetensors."""
  import torch
  import transformers

  config_cls, model_cls = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[kind]
  torch.manual_seed(seed)
  cfg = config_cls(**{**TINY, **extra})
  model = model_cls(cfg).eval()
  with torch.no_grad():  # norms start at 1 and biases at 0: randomise so parity tests see them
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  kw = {"max_shard_size": shard_size} if shard_size else {}
  model.save_pretrained(out, safe_serialization=True, **kw)
  return model


def reference_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  import torch

  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return model(torch.tensor(tokens), **kw).logits.float().numpy()


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter permutation of Q/K rows (the inverse of what our loader undoes)."""
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def write_gguf(model, path: pathlib.Path, quant_override: dict | None = None):
  """Write a transformers Llama as a llama.cpp-style GGUF (F32 tensors, permuted Q/K)."""
  import gguf

  cfg = model.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_eos_token_id(2)
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  names = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
  }
  per_layer = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
  }
  for i in range(cfg.num_hidden_layers):
    for hf, g in per_layer.items():
      names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{g}"
  for hf, g in names.items():
    if hf not in sd:
      continue
    t = sd[hf]
    if g.endswith("attn_q.weight"):
      t = permute_for_gguf(t, cfg.num_attention_heads)
    elif g.endswith("attn_k.weight"):
      t = permute_for_gguf(t, cfg.num_key_value_heads)
    if quant_override and g in quant_override:
      qtype, raw = quant_override[g]
      w.add_tensor(g, raw, raw_shape=raw.shape, raw_dtype=qtype)
    else:
      w.add_tensor(g, np.ascontiguousarray(t, dtype=np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
