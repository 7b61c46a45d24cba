"""Log-likelihoods of several candidate continuations of one prompt, the prompt run once.

Scoring each (prompt, candidate) as a sequence of its own (lm-eval's way, and ours without a
KV cache) runs a prompt of P tokens K times for K candidates: ChemProt's 13 relation labels
made every scored row 13 full forward passes. Here one sequence holds the prompt and then all
K candidates, [prompt | cand_1 | ... | cand_K], in one forward pass: each candidate is its own
segment that sees the prompt (`hidden`'s shared_prefix) and its own earlier tokens but not the
other candidates, and its positions continue the prompt's, so each candidate computes exactly
what prompt + candidate computes alone. P + K*C tokens in one pass instead of a prefill and K
small passes of C tokens into a KV cache (the first version: a scan over candidates, latency-
bound on CPU, where matmuls of a few rows run far below peak; docs/benchmarks.md).

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
  _, K, C = cand_BKC.shape
  positions = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0).astype(jnp.int32)
  cand_pos = positions[:, -1:, None] + 1 + jnp.arange(C, dtype=jnp.int32)[None, None]
  # candidate k is segment k + 2 (the prompt is 1); its padding is 0, never attended to
  seg_BKC = cmask_BKC * (jnp.arange(K, dtype=jnp.int32)[None, :, None] + 2)
  h, _ = model.hidden(
    jnp.concatenate([tokens_BP, cand_BKC.reshape(B, K * C)], axis=1),
    positions_BT=jnp.concatenate(
      [positions, jnp.broadcast_to(cand_pos, (B, K, C)).reshape(B, -1)], 1
    ),
    mask_BT=jnp.concatenate([mask_BP, seg_BKC.reshape(B, K * C)], axis=1),
    adapters=adapters,
    adapter_ctx=adapter_ctx,
    shared_prefix=P,
  )
  # row 0: the prompt's last position (predicts every candidate's first token); row
  # 1 + k*C + c: candidate k's token c (predicts its token c + 1)
  logp = jax.nn.log_softmax(model.logits(h[:, P - 1 :]).astype(jnp.float32), axis=-1)
  c_idx = jnp.arange(C)[None, :]
  rows_KC = jnp.where(c_idx == 0, 0, jnp.arange(K)[:, None] * C + c_idx)
  b = jnp.arange(B)[:, None, None]
  tok_lp = logp[b, rows_KC[None], cand_BKC]  # [B, K, C]
  hit = jnp.argmax(logp, axis=-1)[b, rows_KC[None]] == cand_BKC  # the greedy token, teacher-forced
  real = cmask_BKC > 0
  return jnp.sum(jnp.where(real, tok_lp, 0.0), axis=-1), jnp.sum(hit & real, axis=-1)


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
  hits: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Σ log p(candidate tokens | prompt) [B, K] (f32) for each prompt's candidates; entries past
  a prompt's own candidates are meaningless. num_candidates / candidate_len fix K and the
  padded candidate length (one compiled program for all the batches of a task); by default
  the batch's own. hits: also return [B, K] how many of each candidate's tokens are the argmax
  at their position (a candidate that is a row's whole answer gives that row's token accuracy
  and greedy exact match, as the answer pass would)."""
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
  logp, hit = _logprobs(
    graphdef,
    params,
    *map(jnp.asarray, (tokens, mask, cand, cmask)),
    adapters,
    adapter_ctx,
  )
  return (np.asarray(logp), np.asarray(hit)) if hits else np.asarray(logp)
