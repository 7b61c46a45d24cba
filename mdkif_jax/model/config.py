"""The shape of a Llama-family decoder, read from a HF config.json or GGUF metadata, and the
numerics it runs with (dtypes, remat, attention blocks).

One dataclass covers Llama 2, Llama 3 (incl. its RoPE scaling), Mistral (sliding window),
Qwen2 (q/k/v biases) and SmolLM2. Anything outside that family is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Numerics:
  """dtypes and memory policy. bf16 compute always accumulates matmuls in f32."""

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each block in the backward pass (saves activations)
  # Query positions per block of the causal attention (`ops.attention.causal`, used without a
  # KV cache): keys after a block are skipped; <= 0 = one block of all positions.
  attention_block: int = 64


def numerics_from(config) -> Numerics:
  """The Numerics a stage config's `model` section asks for (configs/common.py)."""
  m = config.model
  return Numerics(
    param_dtype=jnp.dtype(m.param_dtype),
    compute_dtype=jnp.dtype(m.compute_dtype),
    remat=bool(m.remat),
    attention_block=int(m.attention_block),
  )


class UnsupportedModelError(ValueError):
  """The checkpoint's architecture or a feature of it is outside the Llama family we implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters; names follow the HF config where one exists."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # None, or a dict with "rope_type" in SUPPORTED_ROPE_TYPES plus its parameters.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v biases (Qwen2 sets this)
  sliding_window: int | None = None  # Mistral's local attention window, None = full causal
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  @property
  def q_dim(self) -> int:
    return self.num_attention_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_key_value_heads * self.head_dim

  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def projection_dims(self) -> dict[str, tuple[int, int]]:
    """(in, out) of every adaptable projection, keyed by our target names."""
    d, f = self.hidden_size, self.intermediate_size
    return {
      "q": (d, self.q_dim),
      "k": (d, self.kv_dim),
      "v": (d, self.kv_dim),
      "o": (self.q_dim, d),
      "gate": (d, f),
      "up": (d, f),
      "down": (f, d),
    }

  def validate(self, source: str = "config") -> ModelConfig:
    problems = []
    if self.num_attention_heads % self.num_key_value_heads:
      problems.append(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )
    if self.head_dim % 2:
      problems.append(f"head_dim={self.head_dim} must be even for RoPE")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
      if getattr(self, name) <= 0:
        problems.append(f"{name}={getattr(self, name)} must be positive")
    if problems:
      raise ValueError(f"{source}: invalid model config: " + "; ".join(problems))
    return self

  def num_params(self) -> int:
    d, layers = self.hidden_size, self.num_hidden_layers
    per_layer = sum(i * o for i, o in self.projection_dims().values()) + 2 * d
    if self.attention_bias:
      per_layer += self.q_dim + 2 * self.kv_dim
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return layers * per_layer + emb + d


def _freeze(d: dict | None) -> tuple[tuple[str, Any], ...] | None:
  if not d:
    return None
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _eos_tuple(eos: Any) -> tuple[int, ...]:
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Our config from a HF config.json dict; refuses architectures we do not implement."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedModelError(
      f"{source}: model_type={model_type!r} is not supported "
      f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedModelError(f"{source}: hidden_act={hf['hidden_act']!r} (only silu)")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
  rope = hf.get("rope_scaling") or hf.get("rope_parameters")
  rope_theta = hf.get("rope_theta")
  if isinstance(rope, dict):
    rope = dict(rope)
    rope_theta = rope.pop("rope_theta", rope_theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_type"] = rope_type
    rope.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise UnsupportedModelError(
        f"{source}: rope_scaling type {rope_type!r} is not supported "
        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
      )
    if rope_type == "default":
      rope = None
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
  attention_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
  sliding = hf.get("sliding_window") if model_type == "mistral" else None
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise UnsupportedModelError(f"{source}: Qwen2 use_sliding_window=true is not supported")
  return ModelConfig(
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"],
    num_hidden_layers=hf["num_hidden_layers"],
    num_attention_heads=n_heads,
    num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
    head_dim=head_dim,
    rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
    rope_scaling=_freeze(rope),
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    attention_bias=attention_bias,
    sliding_window=sliding,
    model_type=model_type,
    bos_token_id=hf.get("bos_token_id"),
    eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
    pad_token_id=hf.get("pad_token_id"),
  ).validate(source)


def from_hf_dir(path: str | pathlib.Path) -> ModelConfig:
  cfg_file = pathlib.Path(path) / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file}: no config.json in the checkpoint directory")
  try:
    hf = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file}:{e.lineno}: not valid JSON: {e.msg}") from e
  return from_hf_dict(hf, str(cfg_file))


def from_gguf_fields(meta: dict[str, Any], has_output: bool, source: str) -> ModelConfig:
  """Our config from GGUF metadata (llama.cpp key names)."""
  arch = meta.get("general.architecture")
  if arch not in ("llama", "qwen2"):
    raise UnsupportedModelError(f"{source}: GGUF architecture {arch!r} is not supported")

  def get(key, default=None):
    return meta.get(f"{arch}.{key}", default)

  n_heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  rope = None
  if get("rope.scaling.type") not in (None, "none"):
    raise UnsupportedModelError(f"{source}: GGUF rope scaling {get('rope.scaling.type')!r}")
  vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
  eos = meta.get("tokenizer.ggml.eos_token_id")
  return ModelConfig(
    vocab_size=int(vocab),
    hidden_size=hidden,
    intermediate_size=int(get("feed_forward_length")),
    num_hidden_layers=int(get("block_count")),
    num_attention_heads=n_heads,
    num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
    head_dim=int(get("attention.key_length", hidden // n_heads)),
    rope_theta=float(get("rope.freq_base", 10000.0)),
    rope_scaling=rope,
    rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
    max_position_embeddings=int(get("context_length", 2048)),
    tie_word_embeddings=not has_output,
    attention_bias=arch == "qwen2",
    model_type="llama" if arch == "llama" else "qwen2",
    bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
    eos_token_ids=_eos_tuple(eos),
    pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
  ).validate(source)


# Shapes of well-known checkpoints; the weights themselves come from the user's own directory.
PRESETS: dict[str, ModelConfig] = {
  "tiny": ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    eos_token_ids=(2,),
    pad_token_id=0,
  ),
  "smollm2_135m": ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=2,
  ),
  "llama2_7b": ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_ids=(2,),
  ),
  "llama3_8b": ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=_freeze(
      {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
      }
    ),
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
  ),
  "mistral_7b": ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=10000.0,
    max_position_embeddings=32768,
    sliding_window=4096,
    model_type="mistral",
    bos_token_id=1,
    eos_token_ids=(2,),
  ),
  "qwen2_0_5b": ModelConfig(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    attention_bias=True,
    model_type="qwen2",
    eos_token_ids=(151645,),
    pad_token_id=151643,
  ),
  "qwen2_7b": ModelConfig(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    attention_bias=True,
    model_type="qwen2",
    eos_token_ids=(151645,),
    pad_token_id=151643,
  ),
}

# The tiny shape with SmolLM2's vocabulary, so it trains on real tokenized text in tests.
PRESETS["tiny_smollm_vocab"] = dataclasses.replace(
  PRESETS["tiny"],
  vocab_size=49152,
  max_position_embeddings=1024,
  eos_token_ids=(2,),
  pad_token_id=2,
)
