"""Low-rank adapter deltas applied inside the frozen model's projections.

An adapter leaf for one projection of one layer is a dict of arrays:
  SVD form (AdaLoRA):  {"A": ([S,] r, in), "E": ([S,] r), "B": ([S,] out, r)}
  plain LoRA:          {"A": ([S,] r, in), "B": ([S,] out, r)}
  served skills:       {"A": (R, in), "B": (out, R), "route": (R, S)}
  packed served:       {"A": (R, in), "route": (R, S)}, B stacked under W in the kernel
with an optional leading skill axis S. The model stacks layers, so the leaves it receives
from the caller carry a layer axis too (after the skill axis; first in the served form);
`Llama.hidden` moves it to the front and its scan slices it off before calling `deltas` once
per layer and input (q, k, v together; o; gate, up together; down).

The served form (`serving.serving_stack`) is stage 2's inference layout of S skills, built
once when the skills are loaded: every skill's A⊙E side by side on one rank axis R (S·r, or
only the ranks AdaLoRA kept), layer-major, with a one-hot `route` saying which skill each rank
belongs to. A routed forward is then two plain matmuls per projection with a per-row rank
weighting in between (the multi-LoRA layout), with no per-call transposes or A⊙E products.
`serving.pack_served` goes one step further: B joins the frozen kernel as extra rows,
[W ; Bᵀ], so the up-product and the add run inside the base GEMM.

This module says how each form is applied (`AdapterCtx.project`, which the frozen model calls
per layer); `serving.py` builds and reshapes the forms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdkif_jax.ops import dots
from mdkif_jax.ops.layers import matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterCtx:
  """How adapters are applied in one forward pass (the model's `AdapterContext`).

  scale: multiplier of B·(A⊙E)·x (PEFT AdaLoRA: lora_alpha / (init_r + 1e-5)).
  skill_ids: int32 [B] — row b uses skill skill_ids[b] (stage-1 multi-skill training).
  weights: float [B, S] — row b uses Σ_s weights[b, s]·ΔW_s (stage-2 routing), or [B, L, S]
    for a mixture per layer. At most one of skill_ids / weights is set; both None means the
    leaves have no skill axis.
  """

  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  skill_ids: jax.Array | None = None
  weights: jax.Array | None = None

  def scan_inputs(self, adapters: dict) -> tuple[dict, jax.Array | None]:
    """(leaves with the layer axis first, per-layer weights [L, B, S] or None), for the
    model's scan over layers: skill-stacked leaves ([S, L, ...]) move their layer axis to the
    front; leaves without a skill axis and served leaves are layer-major already."""
    leaves = {
      t: leaf
      if "route" in leaf or leaf["A"].ndim == 3
      else jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), leaf)
      for t, leaf in adapters.items()
    }
    per_layer = None
    if self.weights is not None and self.weights.ndim == 3:
      per_layer = jnp.moveaxis(self.weights, 1, 0)
    return leaves, per_layer

  def at_layer(self, layer_inputs: tuple[dict, jax.Array | None]) -> AdapterCtx:
    """This context for one layer: that layer's weights when the mixture is per layer."""
    per_layer = layer_inputs[1]
    return self if per_layer is None else dataclasses.replace(self, weights=per_layer)

  def project(
    self, names: Sequence[str], x: jax.Array, kernels: Mapping, layer_inputs: tuple
  ) -> list[jax.Array]:
    """x·W + ΔW·x in f32 for projections of one layer that share the input x (q, k, v; o;
    gate, up; down). Unpacked adapters' down-products run as one (`deltas`); a packed kernel
    [W ; Bᵀ] (serving.pack_served) runs [x, h]·[W ; Bᵀ] as one GEMM."""
    leaves = layer_inputs[0]
    width = x.shape[-1]
    unpacked = [n for n in names if n in leaves and kernels[n].shape[-2] == width]
    found = deltas(x, [leaves[n] for n in unpacked], self, jnp.float32)
    found = dict(zip(unpacked, found, strict=True))
    out = []
    for n in names:
      w = kernels[n]
      if w.shape[-2] != width:
        out.append(self._packed_projection(n, x, w, leaves.get(n)))
        continue
      y = matmul(x, w, jnp.float32)
      out.append(y + found[n] if n in found else y)
    return out

  def _packed_projection(self, name, x, w, leaf) -> jax.Array:
    """[x, h]·[W ; Bᵀ] with h = `served_ranks(x)` ([x, 0] when no skills are given)."""
    extra = w.shape[-2] - x.shape[-1]
    if leaf is None:
      h = jnp.zeros((*x.shape[:-1], extra), x.dtype)
    elif "B" in leaf or "route" not in leaf:
      raise ValueError(
        f"the {name!r} kernel is packed ([W ; Bᵀ]): it takes the packed skills "
        "serving.packed_params returned with it"
      )
    else:
      h = served_ranks(x, leaf, self)
    return matmul(jnp.concatenate([x, h], -1), w, jnp.float32)


def effective_a(leaf: dict) -> jax.Array:
  """A ⊙ E (row i of A scaled by E_i) for the SVD form; A for plain LoRA."""
  a = leaf["A"]
  if "E" in leaf:
    a = a * leaf["E"][..., None]
  return a


def served_ranks(x_BTI: jax.Array, leaf: dict, ctx: AdapterCtx) -> jax.Array:
  """The served ranks' inputs [B, T, R] in x's dtype: (x·Aᵀ) weighted per row by its skills'
  weights (`route` maps skills to ranks) times the scale. ΔW·x is this times Bᵀ."""
  if ctx.weights is None:
    raise ValueError("served skills (a 'route' leaf) need AdapterCtx(weights=[B, S])")
  f32 = jnp.float32
  w_BR = jnp.einsum("bs,rs->br", ctx.weights.astype(f32), leaf["route"].astype(f32))
  h = dots.einsum("bti,ri->btr", x_BTI, leaf["A"].astype(x_BTI.dtype), out_dtype=f32)
  return (h * (w_BR * ctx.scale)[:, None, :]).astype(x_BTI.dtype)  # scale folded in


def delta(x_BTI: jax.Array, leaf: dict, ctx: AdapterCtx) -> jax.Array:
  """ΔW·x for one projection of one layer, in x's dtype with f32 accumulation."""
  return deltas(x_BTI, [leaf], ctx)[0]


def deltas(
  x_BTI: jax.Array, leaves: Sequence[dict], ctx: AdapterCtx, out_dtype=None
) -> list[jax.Array]:
  """ΔW·x for several projections of one layer that share the input x (q, k, v; gate, up),
  each in `out_dtype` (default x's dtype; the products accumulate in f32 either way).

  Their down-products run as one: the leaves' A⊙E are stacked on the rank axis, so x is read
  once for all of them, and in the backward pass one product gives dA for all of them and
  one gives their joint contribution to dx (per projection, each would re-read x, and the
  dx contributions would be summed one by one)."""
  if not leaves:
    return []
  for leaf in leaves:
    if "route" in leaf and "B" not in leaf:
      raise ValueError(
        "packed served skills (no 'B' leaf, see serving.pack_served) run only inside the "
        "model whose kernels pack_served returned"
      )
  dt = x_BTI.dtype
  bs = [leaf["B"].astype(dt) for leaf in leaves]
  if any("route" in leaf for leaf in leaves):  # served skills (serving_stack): one at a time
    hs = [served_ranks(x_BTI, leaf, ctx) for leaf in leaves]
    return [dots.einsum("btr,or->bto", h, b, out_dtype) for h, b in zip(hs, bs, strict=True)]
  # The scale rides on the small factor (A⊙E, [r, in]), never on the [B, T, out] product:
  # scaling the product makes its backward scale the full cotangent, and XLA fuses that
  # multiply into (a duplicate of) whatever produced the cotangent, once per projection.
  a_parts = [(effective_a(leaf) * ctx.scale).astype(dt) for leaf in leaves]
  a = a_parts[0] if len(a_parts) == 1 else jnp.concatenate(a_parts, axis=-2)
  splits = np.cumsum([p.shape[-2] for p in a_parts])[:-1].tolist()
  f32 = jnp.float32
  if a.ndim == 2:  # no skill axis
    h = dots.einsum("bti,ri->btr", x_BTI, a)
    up = "btr,or->bto"
  elif ctx.skill_ids is not None and a.shape[0] == 1:  # one skill: every row uses it
    h = dots.einsum("bti,ri->btr", x_BTI, a[0])
    bs, up = [b[0] for b in bs], "btr,or->bto"
  elif ctx.skill_ids is not None:  # one skill per row: gather that skill's factors
    h = dots.einsum("bti,bri->btr", x_BTI, a[ctx.skill_ids])
    bs, up = [b[ctx.skill_ids] for b in bs], "btr,bor->bto"
  elif ctx.weights is not None:  # exact weighted sum of deltas: Σ_s w_bs B_s A_s x
    h = dots.einsum("bti,sri->btsr", x_BTI, a, out_dtype=f32)
    h = (h * ctx.weights.astype(f32)[:, None, :, None]).astype(dt)
    up = "btsr,sor->bto"
  else:
    raise ValueError(
      "adapter leaves have a skill axis but the AdapterCtx gives neither skill_ids nor weights"
    )
  hs = jnp.split(h, splits, axis=-1) if splits else [h]
  return [dots.einsum(up, h_i, b, out_dtype) for h_i, b in zip(hs, bs, strict=True)]


# ----------------------------------------------------------------------------- targets, scale

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def select_targets(patterns: str | Sequence[str] = ".*") -> tuple[str, ...]:
  """Targets (in TARGETS order) whose name fully matches any regex in `patterns`."""
  if isinstance(patterns, str):
    patterns = [patterns]
  chosen = tuple(t for t in TARGETS if any(re.fullmatch(p, t) for p in patterns))
  if not chosen:
    raise ValueError(f"no adapter target matches {list(patterns)}; targets are {TARGETS}")
  return chosen


def llama_target_dims(
  hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int
) -> dict[str, tuple[int, int]]:
  """(in, out) of every Llama projection, in the model's `x @ W` kernel convention."""
  q, kv = heads * head_dim, kv_heads * head_dim
  return {
    "q": (hidden, q),
    "k": (hidden, kv),
    "v": (hidden, kv),
    "o": (q, hidden),
    "gate": (hidden, ffn),
    "up": (hidden, ffn),
    "down": (ffn, hidden),
  }


def adapter_scale(lora_alpha: float, r: int, convention: str = "peft") -> float:
  """Multiplier of B·(A⊙E)·x.

  "peft": PEFT AdaLoRA, (alpha if alpha > 0 else r) / (r + 1e-5), with r = init_r forever
  (ranknum is never updated after pruning); "alpha_over_r": PEFT LoRA, alpha / r;
  "rslora": alpha / sqrt(r).
  """
  if convention == "peft":
    return (lora_alpha if lora_alpha > 0 else float(r)) / (r + 1e-5)
  if convention == "alpha_over_r":
    return lora_alpha / r
  if convention == "rslora":
    return lora_alpha / math.sqrt(r)
  raise ValueError(f"unknown scale convention {convention!r}")


# ----------------------------------------------------------------------------- init


def _lead(num_layers: int, num_skills: int | None) -> tuple[int, ...]:
  return (num_layers,) if num_skills is None else (num_skills, num_layers)


def _draw(key: jax.Array, shapes: list[tuple[int, ...]], sample) -> list[jax.Array]:
  """One random draw cut into `shapes` (one threefry instead of one per shape)."""
  sizes = [math.prod(s) for s in shapes]
  flat = sample(key, (sum(sizes),))
  parts = jnp.split(flat, np.cumsum(sizes)[:-1].tolist())
  return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]


def init_adalora(
  key: jax.Array,
  dims: Mapping[str, tuple[int, int]],
  num_layers: int,
  init_r: int,
  num_skills: int | None = None,
  std: float = 0.02,
  dtype: Any = jnp.float32,
) -> dict:
  """PEFT AdaLoRA init: A, B ~ N(0, std²), E = 0, so every adapter starts as the identity."""
  spec = tuple(sorted((t, tuple(d)) for t, d in dims.items()))
  return _init_adalora(key, spec, num_layers, init_r, num_skills, std, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_adalora(key, spec, num_layers, init_r, num_skills, std, dtype):
  # jitted: one compile instead of one eager threefry/reshape compile per target
  lead = _lead(num_layers, num_skills)
  shapes = []
  for _, (d_in, d_out) in spec:
    shapes += [(*lead, init_r, d_in), (*lead, d_out, init_r)]
  drawn = _draw(key, shapes, lambda k, s: std * jax.random.normal(k, s))
  return {
    t: {
      "A": drawn[2 * i].astype(dtype),
      "E": jnp.zeros((*lead, init_r), dtype),
      "B": drawn[2 * i + 1].astype(dtype),
    }
    for i, (t, _) in enumerate(spec)
  }


def init_lora(
  key: jax.Array,
  dims: Mapping[str, tuple[int, int]],
  num_layers: int,
  r: int,
  num_skills: int | None = None,
  init: str = "kaiming",
  dtype: Any = jnp.float32,
) -> dict:
  """PEFT LoRA init with B = 0: A ~ U(±1/sqrt(in)) ("kaiming": kaiming_uniform(a=sqrt 5))
  or A ~ N(0, 1/r²) ("gaussian")."""
  if init not in ("kaiming", "gaussian"):
    raise ValueError(f"unknown LoRA init {init!r}")
  lead = _lead(num_layers, num_skills)
  targets = sorted(dims)
  shapes = [(*lead, r, dims[t][0]) for t in targets]
  if init == "kaiming":  # U(-1, 1), scaled per target by 1/sqrt(in) below
    drawn = _draw(key, shapes, lambda k, s: jax.random.uniform(k, s, minval=-1.0, maxval=1.0))
    drawn = [a / math.sqrt(dims[t][0]) for a, t in zip(drawn, targets, strict=True)]
  else:
    drawn = _draw(key, shapes, lambda k, s: jax.random.normal(k, s) / r)
  return {
    t: {"A": a.astype(dtype), "B": jnp.zeros((*lead, dims[t][1], r), dtype)}
    for a, t in zip(drawn, targets, strict=True)
  }


# ----------------------------------------------------------------------------- ΔW


def delta_weight(leaf: dict, scale: float) -> jax.Array:
  """ΔW in the kernel layout ([S,] L, in, out): (B·(A⊙E))ᵀ·scale, in f32."""
  a = effective_a(leaf).astype(jnp.float32)
  b = leaf["B"].astype(jnp.float32)
  return jnp.einsum("...or,...ri->...io", b, a) * scale


def adapter_logical_axes(adapters: dict) -> dict:
  """Logical axis names of every adapter leaf (for sharding.named_sharding).

  A: ([skill,] layers, rank, adapter_in), E: ([skill,] layers, rank),
  B: ([skill,] layers, adapter_out, rank). Optimizer moments and AdaLoRA EMAs share them.
  """
  names = {
    "A": ("layers", "rank", "adapter_in"),
    "E": ("layers", "rank"),
    "B": ("layers", "adapter_out", "rank"),
  }
  out = {}
  for t, leaf in adapters.items():
    if "route" in leaf:  # served
      out[t] = {"A": names["A"], "B": names["B"], "route": ("layers", "rank", "skill")}
      continue
    skill = ("skill",) if leaf["A"].ndim == 4 else ()
    out[t] = {k: skill + names[k] for k in leaf}
  return out
