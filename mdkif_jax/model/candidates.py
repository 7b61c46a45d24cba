"""Log-likelihoods of several candidate continuations of one prompt, the prompt run once.

Scoring each (prompt, candidate) as a sequence of its own (lm-eval's way, and ours without a
KV cache) runs a prompt of P tokens K times for K candidates: ChemProt's 13 relation labels
made every scored row 13 full forward passes. Here the prompt runs once into a KV cache and
the candidates read it: one prefill of P tokens and K passes of C candidate tokens. The
candidates take turns in the same cache slots [P, P + C) (a scan over candidates with the cache
in its carry: each pass overwrites the slots the previous one wrote and attends only to the
prompt and its own tokens), so memory is one prompt's cache, not K copies.

Prompts are left-padded to a length bucket (positions from the padding mask, as generation
does), candidates right-padded to one length: a padded prompt or candidate computes what it
would alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdkif_jax.model import generate, llama


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logprobs(graphdef, params, tokens_BP, mask_BP, cand_BKC, cmask_BKC, adapters, adapter_ctx):
  model = nnx.merge(graphdef, params)
  B, P = tokens_BP.shape
  C = cand_BKC.shape[2]
  kw = dict(adapters=adapters, adapter_ctx=adapter_ctx)
  cache = llama.init_cache(model.cfg, B, P + C, model.numerics.compute_dtype)
  positions = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0).astype(jnp.int32)
  h, cache = model.hidden(
    tokens_BP, positions_BT=positions, mask_BT=mask_BP, cache=cache, cache_index=0, **kw
  )
  # the prompt's last position predicts every candidate's first token
  first_BV = jax.nn.log_softmax(model.logits(h[:, -1:])[:, 0], axis=-1)
  cand_pos = positions[:, -1:] + 1 + jnp.arange(C, dtype=jnp.int32)[None]

  def one(cache, xs):
    tok_BC, m_BC = xs
    h, cache = model.hidden(
      tok_BC, positions_BT=cand_pos, mask_BT=m_BC, cache=cache, cache_index=P, **kw
    )
    logp = jax.nn.log_softmax(model.logits(h[:, :-1]), axis=-1)  # [B, C-1, V]
    rest = jnp.take_along_axis(logp, tok_BC[:, 1:, None], axis=-1)[..., 0]
    head = jnp.take_along_axis(first_BV, tok_BC[:, :1], axis=-1)[:, 0]
    return cache, head + jnp.sum(jnp.where(m_BC[:, 1:] > 0, rest, 0.0), axis=-1)

  xs = (jnp.swapaxes(cand_BKC, 0, 1), jnp.swapaxes(cmask_BKC, 0, 1))
  _, out_KB = jax.lax.scan(one, cache, xs)
  return out_KB.T


def candidate_logprobs(
  model: llama.Llama,
  prompts: Sequence[Sequence[int]],
  candidates: Sequence[Sequence[Sequence[int]]],
  *,
  pad_id: int = 0,
  adapters=None,
  adapter_ctx=None,
  num_candidates: int | None = None,
  candidate_len: int | None = None,
  prompt_multiple: int = 64,
) -> np.ndarray:
  """Σ log p(candidate tokens | prompt) [B, K] (f32) for each prompt's candidates; entries past
  a prompt's own candidates are meaningless. num_candidates / candidate_len fix K and the
  padded candidate length (one compiled program for all the batches of a task); by default
  the batch's own."""
  if any(len(c) == 0 for cs in candidates for c in cs):
    raise ValueError("empty candidate: every candidate needs at least one token")
  K = num_candidates or max(len(cs) for cs in candidates)
  C = candidate_len or max(len(c) for cs in candidates for c in cs)
  if any(len(cs) > K for cs in candidates) or any(len(c) > C for cs in candidates for c in cs):
    raise ValueError(f"more than {K} candidates or one longer than {C} tokens")
  limit = model.cfg.max_position_embeddings
  longest = max(len(p) for p in prompts)
  if longest + C > limit:
    raise generate.ContextLengthError(
      f"prompt of {longest} tokens + a candidate of {C} exceeds the model's context of {limit}"
    )
  tokens, mask = generate.pad_prompts(
    prompts, pad_id, min(generate.bucket(longest, prompt_multiple), limit - C)
  )
  cand = np.full((len(prompts), K, C), pad_id, np.int32)
  cmask = np.zeros((len(prompts), K, C), np.int32)
  for b, cs in enumerate(candidates):
    for k, c in enumerate(cs):
      cand[b, k, : len(c)] = c
      cmask[b, k, : len(c)] = 1
  graphdef, params = nnx.split(model)
  out = _logprobs(
    graphdef,
    params,
    *map(jnp.asarray, (tokens, mask, cand, cmask)),
    adapters,
    adapter_ctx,
  )
  return np.asarray(out)
