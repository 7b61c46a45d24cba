"""Adapter tree surgery and stage 2's serving layouts: small pure functions on adapter trees.

- Compaction: training keeps every adapter at init_r (static shapes, one compile); once the
  pattern is frozen each target can be sliced to its kept ranks (`compact`, `rank_indices`),
  padded up to a small bucket so all layers (and skills) of a target still share one shape.
  Padded slots have A, E, B = 0, so ΔW is unchanged exactly. Rank patterns in PEFT's form.
- Merging: W0 + ΔW (`merge`, `unmerge`), W0 + Σ_s w_s ΔW_s (`merge_mixture`, `merged_params`):
  task-level mixtures served at exactly the base's cost.
- The served stack (`serving_stack`) and the packed layout (`pack_served`, `packed_params`):
  unmerged per-row mixtures of S skills in two matmuls per projection, or inside the base GEMM.
- Adding skills to a stack (`add_skills`, `pad_rank`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdkif_jax.peft.adapters import delta_weight, effective_a

F32 = jnp.float32

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


# ---- merging and the served layouts ---------------------------------------------------------
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
  `rank_indices` over the S·r ranks of all skills: the largest count over layers
  rounded up to a multiple of `bucket` (at most S·r; one bucket when nothing is kept),
  shorter layers padded with zero ranks that route to no skill. Compaction reads E on the
  host (once, at load).
  """
  out = {}
  for t, leaf in stacked.items():
    S, L, r, _ = leaf["A"].shape
    compacted = compact and "E" in leaf
    kept = _host_value(leaf["E"]) != 0 if compacted else np.ones((S, L, r), bool)  # (S, L, r)
    idx, valid = rank_indices(np.moveaxis(kept, 0, 1).reshape(L, S * r), bucket)
    if not idx.shape[-1]:  # nothing kept: one bucket of zero ranks (no zero-width matmuls)
      idx = np.zeros((L, min(bucket, S * r)), np.int32)
      valid = np.zeros(idx.shape, bool)
    flat = {  # every skill's ranks side by side: rank s·r + i is rank i of skill s
      "A": jnp.moveaxis(effective_a(leaf), 0, 1).reshape(L, S * r, -1),
      "B": jnp.moveaxis(leaf["B"], 0, 2).reshape(L, -1, S * r),
    }
    served = take_ranks(flat, idx, valid)
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
  `AdapterCtx.project`) then computes a routed projection as [x, h]·[W ; Bᵀ] with h =
  `served_ranks(x)`: x·W + h·Bᵀ in one GEMM, the same sum as `delta` up to float rounding.
  Run unpacked (`x·W + delta`), the [tokens, out] delta is written by a skinny GEMM and read
  back by a separate add; packed, it never exists (benchmarks/routing.py measures both;
  docs/benchmarks.md).
  A packed kernel with no skills given runs as the base ([x, 0]; R extra zero inputs).
  Memory: the packed kernels replace the originals (base + B, as unpacked); keeping both
  (e.g. for merged task-level inference) holds two copies of the adapted kernels.

  Only targets with R <= max_rank_fraction x in are packed; the others keep their served
  leaf (B included) and their kernel, and run unpacked. Packing pays where the ranks are a
  sliver of the contraction (a 7B shape: R ~ 100 of 4096); where they are not, copying
  [x, h] costs more than the add it saves (SmolLM2: R ~ 110 of 576). The default 1/8 lies
  between the two (docs/benchmarks.md).
  """
  out_k, out_a = {}, {}
  for t, leaf in served.items():
    if "route" not in leaf or "B" not in leaf:
      raise ValueError(f"pack_served: {t!r} is not a served leaf (serving_stack)")
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


# ---- zero-overhead inference for task-level weights ------------------------------------------
def merged_params(frozen: nnx.State, stacked: dict, w_S: jax.Array, scale: float) -> nnx.State:
  """A copy of the frozen params with W0 + Σ_s w_s ΔW_s in every adapted kernel, in place of
  the originals' shardings; run the plain model on it (no adapters): the base's cost."""
  kernels = {t: frozen[t][...] for t in stacked}
  shardings = {t: getattr(kernels[t], "sharding", None) for t in stacked}
  merged = jax.jit(merge_mixture, static_argnums=(3,), out_shardings=shardings)(
    kernels, stacked, jnp.asarray(w_S, F32), scale
  )
  out = nnx.State(dict(frozen))
  for t, value in merged.items():
    out[t] = frozen[t].replace(value)
  return out


# ---- unmerged inference for per-row weights ---------------------------------------------------
def packed_params(
  frozen: nnx.State, served: dict, max_rank_fraction: float = 0.125
) -> tuple[nnx.State, dict]:
  """(params, skills) in the packed serving layout (`pack_served`): a copy of the
  frozen params whose packed kernels are [W ; Bᵀ], and the served skills without their B.
  Give both to the model in place of (frozen, served): the same mixtures, the up-products
  inside the base GEMMs. Targets whose R exceeds max_rank_fraction x in stay unpacked. The
  copy keeps the kernels' shardings (R is a multiple of the bucket, so in + R divides as in
  does for every usual mesh)."""
  kernels = {t: frozen[t][...] for t in served}
  shardings = {
    t: getattr(kernels[t], "sharding", None)
    for t in served
    if packs(served[t], kernels[t], max_rank_fraction)
  }
  pack = functools.partial(pack_served, max_rank_fraction=max_rank_fraction)
  packed, skills = jax.jit(pack, out_shardings=(shardings, None))(kernels, served)
  out = nnx.State(dict(frozen))
  for t, value in packed.items():
    out[t] = frozen[t].replace(value)
  return out, skills


# ---- adding a skill ------------------------------------------------------------------------
def pad_rank(stacked: dict, rank: int) -> dict:
  """Zero-pad the rank axis of every leaf to `rank` (ΔW unchanged exactly)."""

  def pad(name, x):
    axis = {"A": -2, "E": -1, "B": -1}[name]
    width = [(0, 0)] * x.ndim
    width[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, width)

  return {t: {k: pad(k, v) for k, v in leaf.items()} for t, leaf in stacked.items()}


def add_skills(stacked: dict, new: dict) -> dict:
  """Append skills (leading axis) to the stack, padding ranks to a common size; the existing
  skills' arrays are untouched, so only the router needs refitting."""
  if set(stacked) != set(new):
    raise ValueError(f"new skill adapts {sorted(new)}, the stack adapts {sorted(stacked)}")
  for t in stacked:
    have, want = new[t]["A"].shape, stacked[t]["A"].shape
    if (have[1], have[3]) != (want[1], want[3]) or new[t]["B"].shape[2] != stacked[t]["B"].shape[2]:
      raise ValueError(f"new skill's {t!r} adapter {have} does not fit the stack's {want}")
  rank = max(stacked[t]["A"].shape[2] for t in stacked)
  rank = max([rank] + [new[t]["A"].shape[2] for t in new])
  a, b = pad_rank(stacked, rank), pad_rank(new, rank)
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y.astype(x.dtype)]), a, b)
