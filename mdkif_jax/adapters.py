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

The served form (`serving_stack`) is stage 2's inference layout of S skills, built once when
the skills are loaded: every skill's A⊙E side by side on one rank axis R (S·r, or only the
ranks AdaLoRA kept), layer-major, with a one-hot `route` saying which skill each rank belongs
to. A routed forward is then two plain matmuls per projection with a per-row rank weighting
in between (the multi-LoRA layout), with no per-call transposes or A⊙E products.
`pack_served` goes one step further for serving: B joins the frozen kernel as extra rows,
[W ; Bᵀ], so the up-product and the add run inside the base GEMM.
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

from mdkif_jax import dots, lora_tree


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterCtx:
  """How adapters are applied in one forward pass.

  scale: multiplier of B·(A⊙E)·x (PEFT AdaLoRA: lora_alpha / (init_r + 1e-5)).
  skill_ids: int32 [B] — row b uses skill skill_ids[b] (stage-1 multi-skill training).
  weights: float [B, S] — row b uses Σ_s weights[b, s]·ΔW_s (stage-2 routing). At most one
    of skill_ids / weights is set; both None means the leaves have no skill axis.
  """

  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  skill_ids: jax.Array | None = None
  weights: jax.Array | None = None


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
        "packed served skills (no 'B' leaf, see adapters.pack_served) run only inside the "
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
  # jitted: one compile instead of one eager threefry/reshape compile per target (~0.3 s each)
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


# ----------------------------------------------------------------------------- merge


def delta_weight(leaf: dict, scale: float) -> jax.Array:
  """ΔW in the kernel layout ([S,] L, in, out): (B·(A⊙E))ᵀ·scale, in f32."""
  a = effective_a(leaf).astype(jnp.float32)
  b = leaf["B"].astype(jnp.float32)
  return jnp.einsum("...or,...ri->...io", b, a) * scale


def merge(kernels: Mapping[str, jax.Array], adapters: dict, scale: float) -> dict:
  """W0 + ΔW for every adapted kernel (L, in, out); others unchanged. Adapters without S."""
  out = dict(kernels)
  for t, leaf in adapters.items():
    w = kernels[t]
    out[t] = (w.astype(jnp.float32) + delta_weight(leaf, scale)).astype(w.dtype)
  return out


def unmerge(kernels: Mapping[str, jax.Array], adapters: dict, scale: float) -> dict:
  """Inverse of `merge` (exact up to the rounding of the kernel dtype)."""
  out = dict(kernels)
  for t, leaf in adapters.items():
    w = kernels[t]
    out[t] = (w.astype(jnp.float32) - delta_weight(leaf, scale)).astype(w.dtype)
  return out


def merge_mixture(
  kernels: Mapping[str, jax.Array], adapters: dict, weights_S: jax.Array, scale: float
) -> dict:
  """W0 + Σ_s w_s ΔW_s for skill-stacked ([S,] L, ...) or served adapters: one einsum per
  target contracting skills and ranks together, Σ_(s,r) (w_s·A⊙E)_(s,r)ᵀ B_(s,r), so no
  per-skill dense delta (S, L, in, out) is ever materialised."""
  out = dict(kernels)
  w_S = jnp.asarray(weights_S, jnp.float32)
  for t, leaf in adapters.items():
    w = kernels[t]
    a = effective_a(leaf).astype(jnp.float32)
    b = leaf["B"].astype(jnp.float32)
    if "route" in leaf:  # served: (L, R, in), (L, out, R), route (L, R, S)
      w_R = jnp.einsum("lrs,s->lr", leaf["route"].astype(jnp.float32), w_S)
      d = jnp.einsum("lri,lor->lio", a * w_R[..., None], b)
    else:
      d = jnp.einsum("slri,slor->lio", a * w_S[:, None, None, None], b)
    out[t] = (w.astype(jnp.float32) + d * scale).astype(w.dtype)
  return out


def num_skills(adapters: dict) -> int:
  """S of skill-stacked ([S, L, ...]) or served adapters."""
  leaf = next(iter(adapters.values()))
  return int(leaf["route"].shape[-1]) if "route" in leaf else int(leaf["A"].shape[0])


def serving_stack(stacked: dict, *, compact: bool = True, bucket: int = 8) -> dict:
  """Stage 2's inference layout of skill-stacked adapters ([S, L, ...]), built once.

  Per target: {"A": (L, R, in) = A⊙E of every skill side by side on the rank axis,
  "B": (L, out, R), "route": (L, R, S) one-hot, which skill each rank belongs to}. With the
  same scale and weights it gives exactly the stacked adapters' mixture, Σ_s w_s ΔW_s
  (`delta`), in two matmuls per projection. R = S·r, or with `compact` only the ranks
  whose E is nonzero (AdaLoRA's pruned ranks contribute exactly 0), chosen per layer by
  `lora_tree.rank_indices` over the S·r ranks of all skills: the largest count over layers
  rounded up to a multiple of `bucket` (at most S·r; one bucket when nothing is kept),
  shorter layers padded with zero ranks that route to no skill. Compaction reads E on the
  host (once, at load).
  """
  out = {}
  for t, leaf in stacked.items():
    S, L, r, _ = leaf["A"].shape
    compacted = compact and "E" in leaf
    kept = _host_value(leaf["E"]) != 0 if compacted else np.ones((S, L, r), bool)  # (S, L, r)
    idx, valid = lora_tree.rank_indices(np.moveaxis(kept, 0, 1).reshape(L, S * r), bucket)
    if not idx.shape[-1]:  # nothing kept: one bucket of zero ranks (no zero-width matmuls)
      idx = np.zeros((L, min(bucket, S * r)), np.int32)
      valid = np.zeros(idx.shape, bool)
    flat = {  # every skill's ranks side by side: rank s·r + i is rank i of skill s
      "A": jnp.moveaxis(effective_a(leaf), 0, 1).reshape(L, S * r, -1),
      "B": jnp.moveaxis(leaf["B"], 0, 2).reshape(L, -1, S * r),
    }
    served = lora_tree.take_ranks(flat, idx, valid)
    route = jax.nn.one_hot(idx // r, S, dtype=jnp.float32) * valid[..., None]
    out[t] = {"A": served["A"], "B": served["B"], "route": route}
  return out


def packs(leaf: dict, kernel: jax.Array, max_rank_fraction: float) -> bool:
  """Whether `pack_served` packs this served leaf into its kernel: R <= fraction x in."""
  return "B" in leaf and leaf["B"].shape[-1] <= max_rank_fraction * kernel.shape[-2]


def pack_served(
  kernels: Mapping[str, jax.Array], served: dict, max_rank_fraction: float = 0.125
) -> tuple[dict, dict]:
  """Stage 2's unmerged serving layout with every up-product folded into the frozen GEMM.

  Returns (packed kernels, of the packed targets only; packed skills). Per packed target,
  the kernel becomes
  [W ; Bᵀ] (L, in + R, out): the base rows, then the served ranks' B, in the kernel's dtype;
  the skill leaf keeps {"A": (L, R, in), "route": (L, R, S)} and drops B. The model (see
  `Llama._block`) then computes a routed projection as [x, h]·[W ; Bᵀ] with h =
  `served_ranks(x)`: x·W + h·Bᵀ in one GEMM, the same sum as `delta` up to float rounding.
  Run unpacked (`x·W + delta`), the [tokens, out] delta is written by a skinny GEMM and read
  back by a separate add; packed, it never exists (benchmarks/routing.py: on the 2-layer
  7B shape this is what brings the served overhead down to its FLOP share).
  A packed kernel with no skills given runs as the base ([x, 0]; R extra zero inputs).
  Memory: the packed kernels replace the originals (base + B, as unpacked); keeping both
  (e.g. for merged task-level inference) holds two copies of the adapted kernels.

  Only targets with R <= max_rank_fraction x in are packed; the others keep their served
  leaf (B included) and their kernel, and run unpacked. Packing pays where the ranks are a
  sliver of the contraction (7B shape: R ~ 100 of 4096, served overhead 1.27x -> ~0x its
  FLOP share); where they are not, copying [x, h] costs more than the add it saves (SmolLM2:
  R ~ 110 of 576, 0.93x unpacked -> 1.10x packed). The default 1/8 lies between the two.
  """
  out_k, out_a = {}, {}
  for t, leaf in served.items():
    if "route" not in leaf or "B" not in leaf:
      raise ValueError(f"pack_served: {t!r} is not a served leaf (adapters.serving_stack)")
    w = kernels[t]
    if not packs(leaf, w, max_rank_fraction):
      out_a[t] = leaf
      continue
    bt = jnp.swapaxes(leaf["B"], -1, -2).astype(w.dtype)  # (L, R, out)
    out_k[t] = jnp.concatenate([w, bt], axis=-2)
    out_a[t] = {"A": leaf["A"], "route": leaf["route"]}
  return out_k, out_a


def _host_value(x) -> np.ndarray:
  """x on this host: a replicated global array spanning processes is read from a local copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.sharding.is_fully_replicated:
      raise ValueError("serving_stack(compact=True) needs E replicated on every process")
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


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
