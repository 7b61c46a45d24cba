"""A tiny frozen base with random "skills" and data planted from a known skill mixture.

The tiny model's logits are near-uniform at init, so the LM head is scaled up: a planted
mixture then shapes the sampled targets strongly enough that a router can recover it from a few
hundred answer tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdkif_jax.data import task
from mdkif_jax.model import loading
from mdkif_jax.peft import adapters

B, T, PROMPT, RANK = 16, 24, 8, 4
SCALE = 1.0


def tiny_base(mesh=None):
  """(base module, graphdef, frozen params) of the random `tiny` preset, sharper logits."""
  base = loading.load_model("tiny", mesh=mesh)
  graphdef, frozen = nnx.split(base)
  frozen["lm_head"] = frozen["lm_head"].replace(frozen["lm_head"][...] * 30)
  nnx.update(base, frozen)
  return base, graphdef, frozen


def random_skills(cfg, num_skills: int, seed: int, rank: int = RANK) -> dict:
  """Skill-stacked AdaLoRA adapters with a nonzero Λ (E), so every skill changes the model."""
  st = adapters.init_adalora(
    jax.random.key(seed),
    cfg.projection_dims(),
    cfg.num_hidden_layers,
    rank,
    num_skills=num_skills,
    std=0.2,
  )
  rng = np.random.default_rng(seed)
  return {
    t: {**leaf, "E": jnp.asarray(rng.standard_normal(leaf["E"].shape), jnp.float32)}
    for t, leaf in st.items()
  }


def raw_batch(seed: int, rows: int = B, low: int = 3, high: int = 512) -> dict[str, np.ndarray]:
  """Random prompt+answer tokens; the answer is the last T - PROMPT tokens of every row."""
  rng = np.random.default_rng(seed)
  lm = np.zeros((rows, T), np.float32)
  lm[:, PROMPT - 1 : T - 1] = 1
  return {
    "tokens": rng.integers(low, high, (rows, T)).astype(np.int32),
    "targets": np.zeros((rows, T), np.int32),
    "loss_mask": lm,
    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy(),
    "attention_mask": np.ones((rows, T), np.int32),
  }


def planted(graphdef, frozen, stacked, w_BS, raw, seed: int = 5) -> dict:
  """`raw` with answer targets sampled from base + Σ_s w_bs ΔW_s (a prepared router batch)."""
  model = nnx.merge(graphdef, frozen)
  ctx = adapters.AdapterCtx(SCALE, weights=jnp.asarray(w_BS, jnp.float32))
  logits = jax.jit(lambda t: model(t, adapters=stacked, adapter_ctx=ctx))(raw["tokens"])
  sampled = np.asarray(jax.random.categorical(jax.random.key(seed), logits), np.int32)
  return task.prepare({**raw, "targets": sampled})
