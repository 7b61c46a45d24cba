"""A decoder-only Llama-family LLM in Flax NNX: RMSNorm, RoPE, GQA, SwiGLU, tied/untied head.

The layers are stacked on a leading "layers" axis and run with `jax.lax.scan`, so a 30-layer
model compiles as fast as a 1-layer one. Every weight is an `nnx.Param` carrying its logical
axis names in the `logical_axes` metadata; `sharding.py` maps them to the mesh.

The weights stay frozen: callers `nnx.split` the model once and pass the parameter state into
their jitted step functions as an input (see `forward`). Adapters are a separate pytree passed
per call (`adapters=`), applied by `adapters.deltas` inside the projections.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mdkif_jax import adapters as adapters_lib
from mdkif_jax import attention, dots, sharding
from mdkif_jax.model_config import ModelConfig

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


@dataclasses.dataclass(frozen=True)
class Numerics:
  """dtypes and memory policy. bf16 compute always accumulates matmuls in f32."""

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each block in the backward pass (saves activations)
  # Query positions per block of the causal attention (`attention.causal`, used without a KV
  # cache): keys after a block are skipped; <= 0 = one block of all positions.
  attention_block: int = 64


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies, with Llama 3 / linear scaling as in transformers."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=F32) / dim))
  scaling = cfg.rope_scaling_dict()
  if scaling is None:
    return inv
  kind = scaling["rope_type"]
  if kind == "linear":
    return inv / scaling["factor"]
  # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_ctx = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
  wavelen = 2 * math.pi / inv
  inv_low = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old_ctx / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_low / factor + smooth * inv_low
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, inv_low)


def rope_tables(positions_BT: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(signed sin, cos), each [B, T, head_dim] f32, for `apply_rope`. The sin table carries the
  rotation's sign: -sin on the first half of head_dim, +sin on the second."""
  ang = positions_BT.astype(F32)[..., None] * rope_inv_freq(cfg)
  sin, cos = jnp.sin(ang), jnp.cos(ang)
  return jnp.concatenate([-sin, sin], axis=-1), jnp.concatenate([cos, cos], axis=-1)


def apply_rope(
  x_BTHD: jax.Array, ssin_BTD: jax.Array, cos_BTD: jax.Array, out_dtype=None
) -> jax.Array:
  """Rotate-half RoPE (HF layout: the two halves of head_dim form the pairs).

  x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1], written as x·cos + swap(x)·ssin
  (swap = [x2, x1], a reversal of the halves; ssin = [-sin, sin] from `rope_tables`): the
  same products bit for bit, with a reversal instead of slices and a concatenation (whose
  backward is pads and adds). Computed in f32; the result is cast to `out_dtype` (default
  x's dtype)."""
  x = x_BTHD.astype(F32)
  *lead, d = x.shape
  swap = jnp.flip(x.reshape(*lead, 2, d // 2), axis=-2).reshape(x.shape)
  out = x * cos_BTD[:, :, None, :] + swap * ssin_BTD[:, :, None, :]
  return out.astype(out_dtype or x_BTHD.dtype)


# RMSNorm and SwiGLU compute in f32 whatever the compute dtype. Left to autodiff, each keeps
# its f32 intermediates (x in f32, the normalised x, silu's sigmoid) for every layer until the
# backward pass: with bf16 compute those stacks outweigh every other activation. The custom
# VJPs below keep only their inputs and recompute the cheap elementwise rest.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in f32, scaled by the weight after casting back (as transformers does)."""
  return _rms_norm_fwd(x, w, eps)[0]


def _normalise(x, eps):
  xf = x.astype(F32)
  r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return xf * r, r


def _rms_norm_fwd(x, w, eps):
  n, _ = _normalise(x, eps)
  return w.astype(x.dtype) * n.astype(x.dtype), (dots.pack(x), w)


def _rms_norm_bwd(eps, res, g):
  x, w = dots.unpack(res[0]), res[1]
  n, r = _normalise(x, eps)
  nd = n.astype(x.dtype)
  dn = (g * w.astype(x.dtype)).astype(F32)
  dx = r * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
  dw = jnp.sum((g * nd).astype(F32), axis=tuple(range(g.ndim - 1)))
  return dx.astype(x.dtype), dw.astype(w.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up: silu in f32, cast back to the compute dtype, then the product."""
  return jax.nn.silu(gate.astype(F32)).astype(up.dtype) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (dots.pack(gate), dots.pack(up))


def _swiglu_bwd(res, g):
  gate, up = map(dots.unpack, res)
  gf = gate.astype(F32)
  s = jax.nn.sigmoid(gf)
  d_up = g * (gf * s).astype(up.dtype)
  d_gate = (g * up).astype(F32) * (s * (1.0 + gf * (1.0 - s)))
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """x @ w with x's dtype as operands and f32 accumulation, forward and backward (see
  dots.py); the result in `out_dtype` (default x's dtype)."""
  lead = "abcdefgh"[: x.ndim - 1]
  return dots.einsum(f"{lead}i,io->{lead}o", x, w.astype(x.dtype), out_dtype)


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
    adapters: dict | None = None,
    adapter_ctx: adapters_lib.AdapterCtx | None = None,
    cache: dict | None = None,
    cache_index: jax.Array | None = None,
  ) -> tuple[jax.Array, dict | None]:
    """Final-norm hidden states [B, T, D] (and the updated KV cache when one is given).

    mask_BT: 0 for padding (never attended to), else the token's segment id: 1 everywhere
      for one example per row; packed rows (`tokenize.pack_row`) number their examples
      1, 2, ... and a token attends only to keys of its own segment.
    cache: {"k": [L, B, S, K, Dh], "v": ..., "mask": [B, S]} with S >= the context length; the
      new keys/values are written at [cache_index, cache_index + T).
    """
    cfg, num = self.cfg, self.numerics
    B, T = tokens_BT.shape
    cd = num.compute_dtype
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if mask_BT is None:
      mask_BT = jnp.ones((B, T), jnp.int32)
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(cd)
    x = self._constrain(x, ("batch", "length", "act_embed"))

    sin, cos = rope_tables(positions_BT, cfg)  # sin is signed: see apply_rope

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
    # unused, see every real key up to their slot). Generation passes 0/1 masks (segment 1).
    q_seg, k_seg = mask_BT[:, :, None], k_mask[:, None, :]
    allowed = (k_idx[None, :] <= q_idx[:, None])[None] & (k_seg > 0)
    allowed &= (q_seg == k_seg) | (q_seg == 0)
    if cfg.sliding_window is not None:
      allowed &= (positions_BT[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window
    bias_BTS = jnp.where(allowed, 0.0, jnp.finfo(F32).min).astype(F32)

    ctx = adapter_ctx or adapters_lib.AdapterCtx()
    ad = _layer_major(adapters)
    # per-layer mixtures: weights [B, L, S] are scanned with the layers (layer l sees [B, S])
    per_layer = None
    if ctx.weights is not None and ctx.weights.ndim == 3:
      per_layer = jnp.moveaxis(ctx.weights, 1, 0)

    def block(carry, xs):
      x, kv = carry
      w, a, lw, layer = xs
      c = ctx if lw is None else dataclasses.replace(ctx, weights=lw)
      x, kv = self._block(x, w, a, c, sin, cos, bias_BTS, kv, layer, cache_index)
      return (x, kv), None

    if num.remat:
      block = jax.checkpoint(block, prevent_cse=False)
    # The whole KV cache rides in the scan carry and each layer writes only its new [B, T]
    # slots in place. (Scanned as xs/ys it was rebuilt, i.e. copied, on every decode step.)
    kv = None if cache is None else (cache["k"], cache["v"])
    layers = jnp.arange(cfg.num_hidden_layers)
    (x, kv), _ = jax.lax.scan(block, (x, kv), (self.layer_weights(), ad, per_layer, layers))
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    new_cache = None
    if cache is not None:
      new_cache = {"k": kv[0], "v": kv[1], "mask": k_mask, "pos": k_pos}
    return x, new_cache

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

  def _block(self, x, w, a, ctx, sin, cos, bias_BTS, kv, layer, cache_index):
    cfg = self.cfg
    B, T, _ = x.shape
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cd = x.dtype

    # Every projection returns f32: the product, the adapter delta and the bias are summed in
    # f32 and rounded to the compute dtype once, by the caller, after whatever elementwise op
    # follows (RoPE, the residual add). With bf16 compute that is one rounding instead of one
    # per operand and per op, and XLA's CPU fusions lose their chains of bf16 <-> f32
    # converts (each recomputed per use inside a fusion). With f32 compute nothing changes.
    def proj(name, inp, deltas=None):
      """inp·W (+ the adapter delta), f32; `deltas` from shared_input_deltas, else computed here."""
      extra = w[name].shape[-2] - inp.shape[-1]
      if extra:  # a packed kernel [W ; Bᵀ] (adapters.pack_served): [x, h]·[W ; Bᵀ], one GEMM
        if a is not None and name in a:
          if "B" in a[name] or "route" not in a[name]:
            raise ValueError(f"the {name!r} kernel is packed ([W ; Bᵀ]): it takes the packed "
                             "skills router.packed_params returned with it")  # fmt: skip
          h = adapters_lib.served_ranks(inp, a[name], ctx)
        else:
          h = jnp.zeros((*inp.shape[:-1], extra), inp.dtype)
        out = matmul(jnp.concatenate([inp, h], -1), w[name], F32)
      else:
        out = matmul(inp, w[name], F32)
        if deltas is None:
          deltas = shared_input_deltas((name,), inp)
        if name in deltas:
          out = out + deltas[name]
      if f"{name}_bias" in w:
        out = out + w[f"{name}_bias"].astype(F32)
      return out

    def shared_input_deltas(names, inp):
      """The deltas of the adapted, unpacked projections among `names` (same input), their
      down-products run as one (adapters.deltas)."""
      names = [n for n in names if a is not None and n in a and w[n].shape[-2] == inp.shape[-1]]
      ds = adapters_lib.deltas(inp, [a[n] for n in names], ctx, F32)
      return dict(zip(names, ds, strict=True))

    h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    d = shared_input_deltas(("q", "k", "v"), h)
    q = apply_rope(proj("q", h, d).reshape(B, T, H, Dh), sin, cos, cd)
    k = apply_rope(proj("k", h, d).reshape(B, T, K, Dh), sin, cos, cd)
    v = proj("v", h, d).astype(cd).reshape(B, T, K, Dh)
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
    x = (x + proj("o", att)).astype(cd)
    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    d = shared_input_deltas(("gate", "up"), h)

    def mlp_down(gate, up):
      mlp = self._constrain(swiglu(gate, up), ("batch", "length", "act_mlp"))
      return proj("down", mlp)  # f32

    # f32: silu(gate)·up is recomputed in the backward pass from gate and up (SwiGLU's
    # backward keeps those anyway) instead of being saved per layer: one [B, T, ffn] stack
    # less, and XLA no longer recomputes the product a second time to write that stack.
    # Not in bf16: the checkpoint would save gate and up as bf16 stacks, which XLA's CPU
    # backend updates through f32 copies of the whole stack (see dots.pack): 5.6 -> 7.4 s.
    if cd == F32:
      mlp_down = jax.checkpoint(mlp_down, prevent_cse=False)
    x = (x + mlp_down(proj("gate", h, d).astype(cd), proj("up", h, d).astype(cd))).astype(cd)
    return self._constrain(x, ("batch", "length", "act_embed")), new_kv


def _layer_major(adapters: dict | None) -> dict | None:
  """Move the layer axis of skill-stacked leaves ([S, L, ...]) to the front so `scan` slices
  it off; leaves without a skill axis and served leaves are layer-major already."""
  if not adapters:
    return None
  return {
    t: leaf if "route" in leaf or leaf["A"].ndim == 3
    else jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), leaf)
    for t, leaf in adapters.items()
  }  # fmt: skip


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
