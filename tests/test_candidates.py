"""Candidate log-likelihoods after one shared prompt pass (model/candidates.py) against one
plain forward of prompt + candidate per pair: the base and per-row skill mixtures (the gate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax.model import candidates, generate
from mdkif_jax.peft import adapters
from tests.router_fixtures import SCALE, random_skills, tiny_base


@pytest.fixture(scope="module")
def setup():
  base, graphdef, frozen = tiny_base()
  return base, random_skills(base.cfg, 3, seed=1)


def _naive(base, prompt, cand, kw):
  logits = base(jnp.asarray([prompt + cand], jnp.int32), **kw)[0]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cand))


@pytest.mark.parametrize("mixed", [False, True], ids=["base", "per_row_skill_mixture"])
def test_each_candidate_scores_what_a_full_forward_of_prompt_plus_candidate_scores(setup, mixed):
  base, stacked = setup
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 500, n).tolist() for n in (3, 70, 11)]  # two prompt buckets
  cands = [[rng.integers(3, 500, m).tolist() for m in ms] for ms in ((1, 4), (2, 5, 1), (3,))]
  w_BS = rng.random((3, 3)).astype(np.float32)
  kw = {}
  if mixed:
    kw = dict(adapters=stacked, adapter_ctx=adapters.AdapterCtx(SCALE, weights=w_BS))
  got = candidates.candidate_logprobs(base, prompts, cands, num_candidates=4, candidate_len=6, **kw)
  assert got.shape == (3, 4)
  for b in range(3):
    row_kw = kw and dict(
      adapters=stacked, adapter_ctx=adapters.AdapterCtx(SCALE, weights=w_BS[b : b + 1])
    )
    want = [_naive(base, prompts[b], c, row_kw) for c in cands[b]]
    # tight: a candidate one position off moves these log-likelihoods by ~1e-3
    np.testing.assert_allclose(got[b, : len(cands[b])], want, rtol=0, atol=5e-5)


def test_candidate_errors_name_the_problem(setup):
  base, _ = setup
  with pytest.raises(ValueError, match="empty candidate"):
    candidates.candidate_logprobs(base, [[5, 6]], [[[7], []]])
  limit = base.cfg.max_position_embeddings
  with pytest.raises(generate.ContextLengthError, match="exceeds the model's context"):
    candidates.candidate_logprobs(base, [[5] * (limit - 2)], [[[7, 8, 9]]])
  with pytest.raises(ValueError, match="more than 1 candidates"):
    candidates.candidate_logprobs(base, [[5]], [[[7], [8]]], num_candidates=1)
