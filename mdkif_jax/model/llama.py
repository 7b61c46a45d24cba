"""A decoder-only Llama-family LLM in Flax NNX: RMSNorm, RoPE, GQA, SwiGLU, tied/untied head.

The layers are stacked on a leading "layers" axis and run with `jax.lax.scan`, so a 30-layer
model compiles as fast as a 1-layer one. Every weight is an `nnx.Param` carrying its logical
axis names in the `logical_axes` metadata; `sharding.py` maps them to the mesh.

The weights stay frozen: callers `nnx.split` the model once and pass the parameter state into
their jitted step functions as an input (see `forward`). Adapters are a separate pytree passed
per call (`adapters=`) with an `adapter_ctx` that says how to apply them. The model knows no
adapter format: it asks the context for the scanned per-layer inputs and for each group of
projections that share an input (see `AdapterContext`; `mdkif_jax.peft.adapters.AdapterCtx`
implements it).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mdkif_jax import sharding
from mdkif_jax.model.config import ModelConfig, Numerics
from mdkif_jax.ops import attention, dots
from mdkif_jax.ops.layers import apply_rope, matmul, rms_norm, rope_inv_freq, rope_tables, swiglu

F32 = jnp.float32

# Logical axes of every weight; the layer stack's weights get a leading "layers" axis.
LAYER_WEIGHTS: dict[str, tuple[str, ...]] = {
  "attn_norm": ("norm",),
  "q": ("embed", "q_heads"),
  "k": ("embed", "kv_heads"),
  "v": ("embed", "kv_heads"),
  "o": ("q_heads", "embed"),
  "mlp_norm": ("norm",),
  "gate": ("embed", "mlp"),
  "up": ("embed", "mlp"),
  "down": ("mlp", "embed"),
}
BIAS_WEIGHTS = {"q_bias": ("q_heads",), "k_bias": ("kv_heads",), "v_bias": ("kv_heads",)}


class AdapterContext(Protocol):
  """What the model needs from the adapters passed to it (peft.adapters.AdapterCtx)."""

  def scan_inputs(self, adapters: Any) -> Any:
    """The adapters (and any per-layer context) with the layer axis first, for the scan."""

  def at_layer(self, layer_inputs: Any) -> AdapterContext:
    """The context of one layer, given that layer's slice of `scan_inputs`."""

  def project(
    self, names: tuple[str, ...], x: jax.Array, kernels: dict, layer_adapters: Any
  ) -> list[jax.Array]:
    """x·W + ΔW·x in f32 for the named projections of one layer that share the input x."""


class Llama(nnx.Module):
  """The frozen base model. `__call__` returns logits; `hidden` returns the final hidden state."""

  def __init__(
    self,
    cfg: ModelConfig,
    *,
    numerics: Numerics = Numerics(),
    rules=sharding.DEFAULT_RULES,
    mesh: jax.sharding.Mesh | None = None,
    rngs: nnx.Rngs,
  ):
    self.cfg = cfg
    self.numerics = numerics
    self.rules = tuple(rules)
    self.mesh = mesh
    pd = numerics.param_dtype
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    init = jax.nn.initializers.normal(0.02)

    def param(shape, names, ones=False):
      value = jnp.ones(shape, pd) if ones else init(rngs.params(), shape, F32).astype(pd)
      return nnx.Param(value, logical_axes=names)

    self.embed = param((cfg.vocab_size, D), ("vocab", "embed"))
    dims = cfg.projection_dims()
    for name, names in LAYER_WEIGHTS.items():
      shape = (L, D) if name.endswith("norm") else (L, *dims[name])
      setattr(self, name, param(shape, ("layers", *names), ones=name.endswith("norm")))
    if cfg.attention_bias:
      for name, names in BIAS_WEIGHTS.items():
        size = cfg.q_dim if name == "q_bias" else cfg.kv_dim
        setattr(self, name, nnx.Param(jnp.zeros((L, size), pd), logical_axes=("layers", *names)))
    self.final_norm = param((D,), ("norm",), ones=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = param((D, cfg.vocab_size), ("embed", "vocab"))

  # ---- helpers -------------------------------------------------------------------------------
  def _constrain(self, x, names):
    return sharding.constrain(x, names, self.mesh, self.rules)

  def layer_weights(self) -> dict[str, jax.Array]:
    names = list(LAYER_WEIGHTS) + (list(BIAS_WEIGHTS) if self.cfg.attention_bias else [])
    return {n: getattr(self, n)[...] for n in names}

  # ---- forward -------------------------------------------------------------------------------
  def hidden(
    self,
    tokens_BT: jax.Array,
    *,
    positions_BT: jax.Array | None = None,
    mask_BT: jax.Array | None = None,
    adapters: Any = None,
    adapter_ctx: AdapterContext | None = None,
    cache: dict | None = None,
    cache_index: jax.Array | None = None,
    layers: list | None = None,
    shared_prefix: int = 0,
  ) -> tuple[jax.Array, dict | None]:
    """Final-norm hidden states [B, T, D] (and the updated KV cache when one is given).

    mask_BT: 0 for padding (never attended to), else the token's segment id: 1 everywhere
      for one example per row; packed rows (`tokenize.pack_row`) number their examples
      1, 2, ... and a token attends only to keys of its own segment.
    adapters, adapter_ctx: a pytree of adapters and the `AdapterContext` that applies them
      (both or neither).
    cache: {"k": [L, B, S, K, Dh], "v": ..., "mask": [B, S]} with S >= the context length; the
      new keys/values are written at [cache_index, cache_index + T).
    layers: per layer (its weights, its adapter scan inputs or None), already sliced: the
      layers then run unrolled on them (the same ops in the same order as the scan). The scan
      slices, i.e. copies, every layer's weights on each call, which doubles the memory
      traffic of a memory-bound decode step; generation slices once per call instead.
    shared_prefix: the real keys in slots [0, shared_prefix) are seen by every later query,
      whatever its segment: one prompt followed by several continuations, each its own segment,
      that see the prompt but not each other (model/candidates.py).
    """
    cfg, num = self.cfg, self.numerics
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if mask_BT is None:
      mask_BT = jnp.ones((B, T), jnp.int32)
    if adapters is not None and adapter_ctx is None:
      raise ValueError("adapters were given without an adapter_ctx that says how to apply them")
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(num.compute_dtype)
    x = self._constrain(x, ("batch", "length", "act_embed"))
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict())
    sin, cos = rope_tables(positions_BT, inv_freq)  # sin is signed: see apply_rope
    bias_BTS, k_mask, k_pos = self._attention_bias(
      positions_BT, mask_BT, cache, cache_index, shared_prefix
    )
    scanned = None if adapters is None else adapter_ctx.scan_inputs(adapters)

    def block(carry, xs):
      x, kv = carry
      weights, layer_inputs, layer = xs
      ctx = None if layer_inputs is None else adapter_ctx.at_layer(layer_inputs)
      x, kv = self._block(x, weights, ctx, layer_inputs, sin, cos, bias_BTS, kv, layer, cache_index)
      return (x, kv), None

    if num.remat:
      block = jax.checkpoint(block, prevent_cse=False)
    # The whole KV cache rides in the scan carry and each layer writes only its new [B, T]
    # slots in place. (Scanned as xs/ys it was rebuilt, i.e. copied, on every decode step.)
    kv = None if cache is None else (cache["k"], cache["v"])
    if layers is None:
      xs = (self.layer_weights(), scanned, jnp.arange(cfg.num_hidden_layers))
      (x, kv), _ = jax.lax.scan(block, (x, kv), xs)
    else:
      for layer, (weights, layer_inputs) in enumerate(layers):
        (x, kv), _ = block((x, kv), (weights, layer_inputs, layer))
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    new_cache = None
    if cache is not None:
      new_cache = {"k": kv[0], "v": kv[1], "mask": k_mask, "pos": k_pos}
    return x, new_cache

  def _attention_bias(self, positions_BT, mask_BT, cache, cache_index, shared_prefix=0):
    """(additive bias [B, T, S] f32, key mask [B, S], key positions [B, S])."""
    T = positions_BT.shape[1]
    if cache is None:
      k_pos, k_mask = positions_BT, mask_BT
      q_idx = jnp.arange(T)
      k_idx = jnp.arange(T)
    else:
      S = cache["k"].shape[2]
      k_mask = jax.lax.dynamic_update_slice(
        cache["mask"], mask_BT.astype(jnp.int32), (0, cache_index)
      )
      k_pos = jax.lax.dynamic_update_slice(cache["pos"], positions_BT, (0, cache_index))
      q_idx = cache_index + jnp.arange(T)
      k_idx = jnp.arange(S)
    # Causality by slot index (padding is masked separately); sliding window by position.
    # Segments: real keys of the query's own segment (padding queries, whose outputs are
    # unused, see every real key up to their slot), and the real keys of a shared prefix.
    # Generation passes 0/1 masks (segment 1).
    q_seg, k_seg = mask_BT[:, :, None], k_mask[:, None, :]
    allowed = (k_idx[None, :] <= q_idx[:, None])[None] & (k_seg > 0)
    allowed &= (q_seg == k_seg) | (q_seg == 0) | (k_idx < shared_prefix)[None, None, :]
    if self.cfg.sliding_window is not None:
      allowed &= (positions_BT[:, :, None] - k_pos[:, None, :]) < self.cfg.sliding_window
    return jnp.where(allowed, 0.0, jnp.finfo(F32).min).astype(F32), k_mask, k_pos

  def vocab_projection(self) -> tuple[jax.Array, bool]:
    """(weight, tied): the tied embedding [V, D] (tied=True) or the untied lm_head [D, V]."""
    if self.cfg.tie_word_embeddings:
      return self.embed[...], True
    return self.lm_head[...], False

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Vocabulary logits in f32."""
    w, tied = self.vocab_projection()
    spec = "btd,vd->btv" if tied else "btd,dv->btv"
    out = dots.einsum(spec, h_BTD, w.astype(h_BTD.dtype), out_dtype=F32)
    return self._constrain(out, ("batch", "length", "act_vocab"))

  def __call__(self, tokens_BT: jax.Array, **kw) -> jax.Array:
    h, _ = self.hidden(tokens_BT, **kw)
    return self.logits(h)

  def _block(self, x, weights, ctx, layer_adapters, sin, cos, bias_BTS, kv, layer, cache_index):
    cfg = self.cfg
    B, T, _ = x.shape
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    compute = x.dtype

    # Every projection returns f32: the product, the adapter delta and the bias are summed in
    # f32 and rounded to the compute dtype once, by the caller, after whatever elementwise op
    # follows (RoPE, the residual add). With bf16 compute that is one rounding instead of one
    # per operand and per op, and XLA's CPU fusions lose their chains of bf16 <-> f32
    # converts (each recomputed per use inside a fusion). With f32 compute nothing changes.
    def project(names, inp):
      """inp·W (+ the adapters' deltas) + bias, f32, for projections sharing the input."""
      if ctx is None:
        # A kernel may carry extra input rows that only an adapter fills (a serving layout
        # that stacks adapter factors under W); without adapters they are unused.
        outs = [matmul(inp, weights[n][..., : inp.shape[-1], :], F32) for n in names]
      else:
        outs = ctx.project(names, inp, weights, layer_adapters)
      return [
        out + weights[f"{n}_bias"].astype(F32) if f"{n}_bias" in weights else out
        for n, out in zip(names, outs, strict=True)
      ]

    h = rms_norm(x, weights["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project(("q", "k", "v"), h)
    q = apply_rope(q.reshape(B, T, H, Dh), sin, cos, compute)
    k = apply_rope(k.reshape(B, T, K, Dh), sin, cos, compute)
    v = v.astype(compute).reshape(B, T, K, Dh)
    q = self._constrain(q, ("batch", "length", "act_heads", None))
    new_kv = None
    if kv is not None:  # the full caches [L, B, S, K, Dh]: write this layer's slots, read it
      at = (layer, 0, cache_index, 0, 0)
      ck = jax.lax.dynamic_update_slice(kv[0], k[None].astype(kv[0].dtype), at)
      cv = jax.lax.dynamic_update_slice(kv[1], v[None].astype(kv[1].dtype), at)
      k = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
      new_kv = (ck, cv)

    qg = q.reshape(B, T, K, H // K, Dh)
    if kv is None:  # self-attention over the T new slots: causal query blocks, own backward
      att = attention.causal(qg, k, v, bias_BTS, block=self.numerics.attention_block)
    else:  # against the cache (generation, scoring): no gradient flows here
      scores = dots.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), out_dtype=F32)
      scores = scores / math.sqrt(Dh) + bias_BTS[:, None, None]
      probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
      att = dots.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))
    att = att.astype(x.dtype).reshape(B, T, H * Dh)
    x = (x + project(("o",), att)[0]).astype(compute)
    h = rms_norm(x, weights["mlp_norm"], cfg.rms_norm_eps)
    gate, up = project(("gate", "up"), h)

    def mlp_down(gate, up):
      mlp = self._constrain(swiglu(gate, up), ("batch", "length", "act_mlp"))
      return project(("down",), mlp)[0]  # f32

    # f32: silu(gate)·up is recomputed in the backward pass from gate and up (SwiGLU's
    # backward keeps those anyway) instead of being saved per layer: one [B, T, ffn] stack
    # less, and XLA no longer recomputes the product a second time to write that stack.
    # Not in bf16: the checkpoint would save gate and up as bf16 stacks, which XLA's CPU
    # backend updates through f32 copies of the whole stack (see dots.pack).
    if compute == F32:
      mlp_down = jax.checkpoint(mlp_down, prevent_cse=False)
    x = (x + mlp_down(gate.astype(compute), up.astype(compute))).astype(compute)
    return self._constrain(x, ("batch", "length", "act_embed")), new_kv


# ---- the functional boundary ------------------------------------------------------------------
def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens_BT: jax.Array, **kw) -> jax.Array:
  """Pure logits function of the frozen params: jit/grad over the other arguments only."""
  return nnx.merge(graphdef, params)(tokens_BT, **kw)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """An empty KV cache of `length` slots."""
  shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
  return {
    "k": jnp.zeros(shape, dtype),
    "v": jnp.zeros(shape, dtype),
    "mask": jnp.zeros((batch, length), jnp.int32),
    "pos": jnp.zeros((batch, length), jnp.int32),
  }


def param_shardings(params: nnx.State, mesh, rules=sharding.DEFAULT_RULES) -> nnx.State:
  """The params' tree with each Variable holding its NamedSharding (from its logical axes).

  Usable directly as `out_shardings` / `in_shardings` of jit and by `jax.device_put`.
  """

  def one(v):
    names = v.get_metadata().get("logical_axes")
    return v.replace(sharding.named_sharding(mesh, names, v.shape, rules))

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
