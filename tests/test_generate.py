"""Generation: the KV cache, padding and sampling change nothing they should not."""

import jax.numpy as jnp
import numpy as np
import pytest

from mdkif_jax.model import generate, loading
from mdkif_jax.model.config import PRESETS


@pytest.fixture(scope="module")
def tiny():
  return loading.random_init(PRESETS["tiny"], seed=3)


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 512, size=int(rng.integers(3, 20))).tolist() for _ in range(n)]


def test_generation_with_cache_equals_without_cache(tiny):
  for prompt in _prompts(3):
    cached = generate.generate(tiny, [prompt], max_new_tokens=12, eos_ids=())
    assert cached[0] == generate.generate_no_cache(tiny, prompt, 12, eos_ids=())


def test_batched_generation_equals_unbatched(tiny):
  prompts = _prompts(4, seed=1)
  batched = generate.generate(tiny, prompts, max_new_tokens=10, eos_ids=())
  for prompt, row in zip(prompts, batched, strict=True):
    assert row == generate.generate(tiny, [prompt], max_new_tokens=10, eos_ids=())[0]


def test_generation_stops_at_eos(tiny):
  prompt = _prompts(1, seed=2)[0]
  free = generate.generate(tiny, [prompt], max_new_tokens=8, eos_ids=())[0]
  eos = free[3]  # declare the 4th generated token an EOS: output must end there
  stopped = generate.generate(tiny, [prompt], max_new_tokens=8, eos_ids=(eos,))[0]
  first = free.index(eos)
  assert stopped == free[: first + 1]


def test_top_p_near_zero_is_greedy_and_temperature_samples_vary(tiny):
  prompt = _prompts(1, seed=4)[0]
  greedy = generate.generate(tiny, [prompt], max_new_tokens=8, eos_ids=())[0]
  nucleus = generate.generate(
    tiny, [prompt], max_new_tokens=8, eos_ids=(), sampling=generate.Sampling(1.0, 1e-6), seed=5
  )[0]
  assert nucleus == greedy
  hot = {
    tuple(
      generate.generate(
        tiny, [prompt], max_new_tokens=8, eos_ids=(), sampling=generate.Sampling(5.0, 1.0), seed=s
      )[0]
    )
    for s in range(4)
  }
  assert len(hot) > 1


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = {
    int(generate.sample(logits, generate.jax.random.key(s), generate.Sampling(1.0, 0.75))[0])
    for s in range(200)
  }
  assert draws == {0, 1}


def test_prompt_longer_than_context_is_a_clear_error(tiny):
  limit = tiny.cfg.max_position_embeddings
  with pytest.raises(generate.ContextLengthError, match=f"context of {limit} tokens"):
    generate.generate(tiny, [[5] * (limit - 4)], max_new_tokens=8)


def test_cached_gguf_tokenizer_equals_a_fresh_conversion(tmp_path, monkeypatch):
  from mdkif_jax.model import tokenizer

  monkeypatch.setenv("MDKIF_CACHE", str(tmp_path))
  path = loading.smollm2_gguf_path()
  fresh = tokenizer._gguf_tokenizer(path)  # converts and writes the cache
  assert list(tmp_path.glob("tokenizers/*/tokenizer.json"))
  cached = tokenizer._gguf_tokenizer(path)  # reads the cache
  text = "Patient: 45-year-old with dyspnoea; SpO2 91%. Café-au-lait spots? <|im_end|>"
  assert fresh(text)["input_ids"] == cached(text)["input_ids"]
  assert tokenizer.chat_prompt(fresh, text) == tokenizer.chat_prompt(cached, text)
  assert (fresh.eos_token_id, fresh.pad_token_id) == (cached.eos_token_id, cached.pad_token_id)


def test_torch_free_gguf_tokenizer_equals_transformers_gguf_route():
  from transformers import AutoTokenizer

  from mdkif_jax.model import tokenizer

  path = loading.smollm2_gguf_path()
  ours = tokenizer.tokenizer_from_gguf(path)
  ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # needs torch
  texts = [
    "What is the first-line treatment for type 2 diabetes?",
    "  leading spaces, tabs\tand émojis 🩺 <|im_start|>user\nhi<|im_end|>",
    "IL-6 and TNF-α levels (p<0.001) in 12,345 patients",
  ]
  for text in texts:
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    assert tokenizer.chat_prompt(ours, text) == tokenizer.chat_prompt(ref, text)
  assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (
    ref.eos_token_id,
    ref.pad_token_id,
    ref.bos_token_id,
  )
  assert ours.decode(ours(texts[1])["input_ids"]) == ref.decode(ref(texts[1])["input_ids"])
