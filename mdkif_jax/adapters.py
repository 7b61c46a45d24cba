"""Low-rank adapter deltas applied inside the frozen model's projections.

An adapter leaf for one projection of one layer is a dict of arrays:
  SVD form (AdaLoRA):  {"A": ([S,] r, in), "E": ([S,] r), "B": ([S,] out, r)}
  plain LoRA:          {"A": ([S,] r, in), "B": ([S,] out, r)}
with an optional leading skill axis S. The model stacks layers, so the leaves it receives
from the caller carry a layer axis too; `Llama.__call__` slices it off before calling
`delta` once per layer inside its scan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AdapterCtx:
  """How adapters are applied in one forward pass.

  scale: multiplier of B·(A⊙E)·x (PEFT AdaLoRA: lora_alpha / (init_r + 1e-5)).
  skill_ids: int32 [B] — row b uses skill skill_ids[b] (stage-1 multi-skill training).
  weights: float [B, S] — row b uses Σ_s weights[b, s]·ΔW_s (stage-2 routing). At most one
    of skill_ids / weights is set; both None means the leaves have no skill axis.
  """

  scale: float = 1.0
  skill_ids: jax.Array | None = None
  weights: jax.Array | None = None


def effective_a(leaf: dict) -> jax.Array:
  """A ⊙ E (row i of A scaled by E_i) for the SVD form; A for plain LoRA."""
  a = leaf["A"]
  if "E" in leaf:
    a = a * leaf["E"][..., None]
  return a


def delta(x_BTI: jax.Array, leaf: dict, ctx: AdapterCtx) -> jax.Array:
  """ΔW·x for one projection of one layer, in x's dtype with f32 accumulation."""
  dt = x_BTI.dtype
  a = effective_a(leaf).astype(dt)
  b = leaf["B"].astype(dt)
  f32 = jnp.float32
  if a.ndim == 2:  # no skill axis
    h = jnp.einsum("bti,ri->btr", x_BTI, a, preferred_element_type=f32).astype(dt)
    out = jnp.einsum("btr,or->bto", h, b, preferred_element_type=f32)
  elif ctx.skill_ids is not None:  # one skill per row: gather that skill's factors
    a_b, b_b = a[ctx.skill_ids], b[ctx.skill_ids]
    h = jnp.einsum("bti,bri->btr", x_BTI, a_b, preferred_element_type=f32).astype(dt)
    out = jnp.einsum("btr,bor->bto", h, b_b, preferred_element_type=f32)
  elif ctx.weights is not None:  # exact weighted sum of deltas: Σ_s w_bs B_s A_s x
    h = jnp.einsum("bti,sri->btsr", x_BTI, a, preferred_element_type=f32)
    h = (h * ctx.weights.astype(f32)[:, None, :, None]).astype(dt)
    out = jnp.einsum("btsr,sor->bto", h, b, preferred_element_type=f32)
  else:
    raise ValueError(
      "adapter leaves have a skill axis but the AdapterCtx gives neither skill_ids nor weights"
    )
  return (out * ctx.scale).astype(dt)
