"""Autoregressive generation with a KV cache, jit-compiled with static shapes.

Prompts are left-padded to a length bucket, so a batch of prompts of different lengths is one
program; positions come from the padding mask, so a padded row computes exactly what it would
alone. Decoding stops early once every row has produced an end-of-sequence token.

The decode steps run the layers unrolled on per-layer weights sliced once per call, before the
token loop (`Llama.hidden(layers=...)`): the model's own layer scan slices (i.e. copies) every
layer's weights on every decode step, which doubled the memory traffic of a memory-bound
batch-1 step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdkif_jax.model import llama

# Above this many bytes of layer weights, generation runs the model's layer scan instead of
# holding a second, per-layer copy of the weights for the duration of a call.
UNROLL_MAX_BYTES = 4 << 30


class ContextLengthError(ValueError):
  """A prompt plus the requested new tokens do not fit in the model's context."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 means greedy; top_p < 1 keeps the smallest set of tokens with mass >= top_p."""

  temperature: float = 0.0
  top_p: float = 1.0


def bucket(n: int, multiple: int = 64) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def pad_prompts(
  prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None, multiple: int = 64
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to one length: (tokens [B, P], mask [B, P])."""
  longest = max(len(p) for p in prompts)
  if any(len(p) == 0 for p in prompts):
    raise ValueError("empty prompt: every prompt needs at least one token")
  P = length or bucket(longest, multiple)
  if longest > P:
    raise ContextLengthError(f"prompt of {longest} tokens exceeds the padded length {P}")
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  mask = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p) :] = p
    mask[i, P - len(p) :] = 1
  return tokens, mask


def sample(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  if sampling.temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / sampling.temperature
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # the first index at which the cumulative mass reaches top_p is the last kept token
    cutoff_idx = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _split_layers(model: llama.Llama, adapters, adapter_ctx) -> list | None:
  """Per-layer (weights, adapter inputs) when generation unrolls the layers, else None."""
  weights = model.layer_weights()
  if sum(w.nbytes for w in weights.values()) > UNROLL_MAX_BYTES:
    return None
  scanned = None if adapters is None else adapter_ctx.scan_inputs(adapters)
  return [
    jax.tree.map(lambda a, i=i: a[i], (weights, scanned))
    for i in range(model.cfg.num_hidden_layers)
  ]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "sampling", "eos_ids"))
def _generate(
  graphdef,
  params,
  tokens_BP,
  mask_BP,
  rng,
  adapters,
  adapter_ctx,
  *,
  max_new,
  sampling,
  eos_ids,
  pad_id,
):
  model = nnx.merge(graphdef, params)
  B, P = tokens_BP.shape
  cache = llama.init_cache(model.cfg, B, P + max_new, model.numerics.compute_dtype)
  positions = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0).astype(jnp.int32)
  kw = dict(adapters=adapters, adapter_ctx=adapter_ctx)
  layers = _split_layers(model, adapters, adapter_ctx) if max_new > 1 else None
  # the prefill is compute-bound: the model's scan (cheap to compile) slices each layer once
  h, cache = model.hidden(
    tokens_BP, positions_BT=positions, mask_BT=mask_BP, cache=cache, cache_index=0, **kw
  )
  rng, sub = jax.random.split(rng)
  tok = sample(model.logits(h[:, -1:])[:, 0], sub, sampling)
  eos = jnp.asarray(eos_ids, jnp.int32)
  out = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
  done = jnp.isin(tok, eos)
  next_pos = positions[:, -1] + 1
  ones = jnp.ones((B, 1), jnp.int32)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, done, out, rng = carry
    pos = (next_pos + i - 1)[:, None]
    h, cache = model.hidden(
      tok[:, None],
      positions_BT=pos,
      mask_BT=ones,
      cache=cache,
      cache_index=P + i - 1,
      layers=layers,
      **kw,
    )
    rng, sub = jax.random.split(rng)
    new = sample(model.logits(h)[:, 0], sub, sampling)
    new = jnp.where(done, pad_id, new)
    out = out.at[:, i].set(new)
    done = done | jnp.isin(new, eos)
    return i + 1, new, cache, done, out, rng

  carry = (jnp.int32(1), tok, cache, done, out, rng)
  _, _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out


def generate(
  model: llama.Llama,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int = 32,
  sampling: Sampling = Sampling(),
  seed: int = 0,
  eos_ids: Sequence[int] | None = None,
  pad_id: int | None = None,
  adapters=None,
  adapter_ctx=None,
  prompt_multiple: int = 64,
) -> list[list[int]]:
  """New tokens for each prompt (up to and including its first EOS)."""
  cfg = model.cfg
  eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
  pad_id = pad_id if pad_id is not None else (cfg.pad_token_id or 0)
  longest = max(len(p) for p in prompts)
  limit = cfg.max_position_embeddings
  if longest + max_new_tokens > limit:
    raise ContextLengthError(
      f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
      f"context of {limit} tokens"
    )
  length = min(bucket(longest, prompt_multiple), limit - max_new_tokens)
  tokens, mask = pad_prompts(prompts, pad_id, length)
  graphdef, params = nnx.split(model)
  out = _generate(
    graphdef,
    params,
    jnp.asarray(tokens),
    jnp.asarray(mask),
    jax.random.key(seed),
    adapters,
    adapter_ctx,
    max_new=max_new_tokens,
    sampling=sampling,
    eos_ids=eos_ids,
    pad_id=pad_id,
  )
  result = []
  for row in np.asarray(out).tolist():
    stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
    result.append(row if stop is None else row[: stop + 1])
  return result


def generate_no_cache(
  model: llama.Llama,
  prompt: Sequence[int],
  max_new_tokens: int,
  eos_ids: Sequence[int] | None = None,
) -> list[int]:
  """Greedy decoding by re-running the whole sequence each step (the reference for tests)."""
  eos_ids = tuple(model.cfg.eos_token_ids if eos_ids is None else eos_ids)
  graphdef, params = nnx.split(model)
  fwd = jax.jit(llama.forward, static_argnums=0)
  seq, new = list(prompt), []
  for _ in range(max_new_tokens):
    logits = fwd(graphdef, params, jnp.asarray([seq], jnp.int32))
    tok = int(jnp.argmax(logits[0, -1]))
    new.append(tok)
    seq.append(tok)
    if tok in eos_ids:
      break
  return new
