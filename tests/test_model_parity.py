"""Our model + loaders against transformers + PyTorch (the reference no one here wrote)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdkif_jax.model import generate, loading, tokenizer
from mdkif_jax.model import llama as model_lib
from tests import hf_fixtures

LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 500000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 32,
}


def _logits(model, tokens, mask=None):
  graphdef, params = nnx.split(model)
  kw = {} if mask is None else {"mask_BT": jnp.asarray(mask)}
  return np.asarray(jax.jit(model_lib.forward, static_argnums=0)(graphdef, params, tokens, **kw))


@pytest.mark.parametrize(
  "kind,extra",
  [
    ("llama", {}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),  # Llama 3 RoPE scaling
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),  # tied, MHA
    ("mistral", {"sliding_window": 5}),  # window shorter than the sequence: it matters
    ("qwen2", {"tie_word_embeddings": True}),  # q/k/v biases
  ],
  ids=["llama2", "llama3_rope", "llama_tied_mha", "mistral_window", "qwen2_bias"],
)
def test_tiny_checkpoint_logits_match_transformers(tmp_path, kind, extra):
  ref = hf_fixtures.write_hf(kind, tmp_path, **extra)
  ours = loading.load_hf_dir(tmp_path, progress=False)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 24)).astype(np.int32)
  np.testing.assert_allclose(
    _logits(ours, tokens), hf_fixtures.reference_logits(ref, tokens), atol=1e-4, rtol=0
  )


def test_sharded_checkpoint_with_index_loads(tmp_path):
  ref = hf_fixtures.write_hf("llama", tmp_path, shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  ours = loading.load_hf_dir(tmp_path, progress=False)
  tokens = np.arange(16, dtype=np.int32)[None]
  np.testing.assert_allclose(
    _logits(ours, tokens), hf_fixtures.reference_logits(ref, tokens), atol=1e-4, rtol=0
  )


def test_right_padded_rows_match_transformers_with_attention_mask(tmp_path):
  ref = hf_fixtures.write_hf("llama", tmp_path)
  ours = loading.load_hf_dir(tmp_path, progress=False)
  tokens = np.random.default_rng(1).integers(0, 256, (2, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 7:] = 0
  got = _logits(ours, tokens, mask)
  want = hf_fixtures.reference_logits(ref, tokens, mask)
  np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got[1, :7], want[1, :7], atol=1e-4, rtol=0)


def test_tiny_gguf_with_permuted_qk_matches_transformers(tmp_path):
  ref = hf_fixtures.write_hf("llama", tmp_path / "hf")
  hf_fixtures.write_gguf(ref, tmp_path / "tiny.gguf")
  ours = loading.load_gguf(tmp_path / "tiny.gguf", progress=False)
  tokens = np.random.default_rng(2).integers(0, 256, (1, 20)).astype(np.int32)
  np.testing.assert_allclose(
    _logits(ours, tokens), hf_fixtures.reference_logits(ref, tokens), atol=1e-4, rtol=0
  )


MEDICAL_PROMPTS = [
  "What is the first-line treatment for type 2 diabetes?",
  "Explain what hypertension is in two sentences.",
  "What are common symptoms of iron-deficiency anemia?",
]


@pytest.fixture(scope="module")
def smollm2_pair():
  import torch
  from transformers import AutoModelForCausalLM

  path = loading.smollm2_gguf_path()
  ref = AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name, dtype=torch.float32
  ).eval()
  return (
    loading.load_model("smollm2_135m", progress=False),
    ref,
    tokenizer.load_tokenizer("smollm2_135m"),
  )


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers_gguf_loader(smollm2_pair):
  ours, ref, tok = smollm2_pair
  ids = np.asarray([tokenizer.chat_prompt(tok, MEDICAL_PROMPTS[0])], np.int32)
  got, want = _logits(ours, ids), hf_fixtures.reference_logits(ref, ids)
  # Both dequantize the same Q4_1/Q8_0 tensors to f32; differences are f32 summation order.
  assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
  assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_greedy_32_tokens_identical_to_transformers(smollm2_pair):
  import torch

  ours, ref, tok = smollm2_pair
  prompts = [tokenizer.chat_prompt(tok, p) for p in MEDICAL_PROMPTS]
  got = generate.generate(ours, prompts, max_new_tokens=32, eos_ids=())
  for prompt, new in zip(prompts, got, strict=True):
    with torch.no_grad():
      want = ref.generate(
        torch.tensor([prompt]),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
      )[0, len(prompt) :].tolist()
    assert new == want, (tok.decode(new), tok.decode(want))
