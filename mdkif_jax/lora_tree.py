"""Adapter tree surgery after the final allocation: compaction to kept ranks, rank patterns.

Training keeps every adapter at init_r (static shapes, one compile). Once the pattern is frozen
(t >= T - tfinal) each target is sliced to its kept ranks, padded up to a small bucket so all
layers (and skills) of a target still share one shape. Padded slots have A, E, B = 0, so ΔW is
unchanged exactly. This runs on the host once (the new shapes mean one recompile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# PEFT / HF Llama module path of each target, for rank_pattern keys.
LLAMA_MODULES = {
  "q": "self_attn.q_proj",
  "k": "self_attn.k_proj",
  "v": "self_attn.v_proj",
  "o": "self_attn.o_proj",
  "gate": "mlp.gate_proj",
  "up": "mlp.up_proj",
  "down": "mlp.down_proj",
}


def rank_indices(mask: np.ndarray, bucket: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Kept rank indices per matrix, padded to a bucket: (idx, valid), both ([S,] L, r_pad).

  r_pad = the largest kept rank over layers (and skills), rounded up to `bucket`, at most r0.
  Kept indices come first in their original order; the rest of a row is filler (valid=False).
  """
  mask = np.asarray(mask, bool)
  r0 = mask.shape[-1]
  most = int(mask.sum(-1).max(initial=0))
  r_pad = min(r0, -(-most // bucket) * bucket)
  order = np.argsort(~mask, axis=-1, kind="stable")[..., :r_pad]
  valid = np.take_along_axis(mask, order, axis=-1)
  return order.astype(np.int32), valid


def take_ranks(leaf: dict, idx: np.ndarray, valid: np.ndarray) -> dict:
  """Gather ranks `idx` of an SVD or LoRA leaf; filler slots are zeroed in A, E and B."""
  idx, valid = jnp.asarray(idx), jnp.asarray(valid)
  a = jnp.take_along_axis(leaf["A"], idx[..., None], axis=-2)
  b = jnp.take_along_axis(leaf["B"], idx[..., None, :], axis=-1)
  out = {
    "A": jnp.where(valid[..., None], a, 0).astype(a.dtype),
    "B": jnp.where(valid[..., None, :], b, 0).astype(b.dtype),
  }
  if "E" in leaf:
    e = jnp.take_along_axis(leaf["E"], idx, axis=-1)
    out["E"] = jnp.where(valid, e, 0).astype(e.dtype)
  return out


def compact(adapters: dict, masks: dict, bucket: int = 8) -> tuple[dict, dict]:
  """Slice every target to its kept ranks (padded to `bucket`).

  Returns (compact adapters, rank pattern {target: ([S,] L, r0) bool numpy}). The scale stays
  lora_alpha / init_r (PEFT keeps ranknum = r0), so the caller's AdapterCtx is unchanged.
  """
  out, pattern = {}, {}
  for t, leaf in adapters.items():
    m = np.asarray(jax.device_get(masks[t]), bool)
    idx, valid = rank_indices(m, bucket)
    out[t] = take_ranks(leaf, idx, valid)
    pattern[t] = m
  return out, pattern


def peft_rank_pattern(pattern: dict, modules: dict | None = None) -> dict:
  """PEFT's adapter_config `rank_pattern`: {"model.layers.{l}.<module>.lora_E": [bool]*r0}.

  Only for adapters without a skill axis (PEFT holds one trainable AdaLoRA adapter).
  """
  modules = modules or LLAMA_MODULES
  out = {}
  for t in sorted(pattern):
    m = np.asarray(pattern[t], bool)
    if m.ndim != 2:
      raise ValueError(f"rank pattern for {t!r} has shape {m.shape}; slice one skill first")
    for layer, row in enumerate(m):
      out[f"model.layers.{layer}.{modules[t]}.lora_E"] = [bool(x) for x in row]
  return out
