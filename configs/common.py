"""Pieces shared by every stage's config: model presets, mesh and logical-axis rules, AdaLoRA
defaults, the optimizer and the data section. Each stage's `get_config(arg)` starts from these.
"""

from __future__ import annotations

import ml_collections

from configs.common_data import data_config  # noqa: F401  (re-exported)
from mdkif_jax.sharding import DEFAULT_RULES


def model_config(source: str = "smollm2_135m") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Where the frozen base comes from: a preset name ("smollm2_135m" = the packaged GGUF;
  # "tiny"/"tiny_smollm_vocab" = random init for tests; "llama2_7b", "llama3_8b",
  # "mistral_7b", "qwen2_0_5b", "qwen2_7b" = random weights of that shape), a HF checkpoint
  # directory or a .gguf file.
  c.source = source
  # Tokenizer source (same forms); None = the model's own (required for real checkpoints).
  c.tokenizer = ml_collections.config_dict.placeholder(str)
  c.param_dtype = "float32"  # dtype the frozen weights are stored in: float32 | bfloat16
  # dtype of activations and matmul inputs: float32 | bfloat16 (always f32 accumulation).
  c.compute_dtype = "float32"
  c.remat = False  # rematerialise each transformer block in the backward pass
  # Query positions per block of the causal attention (mdkif_jax/attention.py): each block
  # multiplies only the keys it can see, and its backward recomputes the block's scores instead
  # of keeping [T, T] per layer. <= 0 = one block (no key skipping).
  c.attention_block = 64
  c.seed = 0  # seed of random-init presets
  return c


def mesh_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Devices along ('data', 'fsdp', 'tensor'); one -1 takes the remaining devices. The same
  # config runs on a laptop CPU (1 device) and a pod slice (e.g. (-1, 8, 1) on 64 chips).
  c.shape = (-1, 1, 1)
  # Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). Weights
  # and activations use separate names; see mdkif_jax/sharding.py.
  c.rules = DEFAULT_RULES
  return c


def adalora_config() -> ml_collections.ConfigDict:
  """PEFT AdaLoraConfig names and defaults (deltaT is delta_t here)."""
  c = ml_collections.ConfigDict()
  c.targets = "q,k,v,o,gate,up,down"  # comma-separated regexes over q,k,v,o,gate,up,down
  c.init_r = 12  # initial rank of every adapted matrix
  c.target_r = 8  # average final rank per matrix (the budget b_T = n * target_r)
  c.tinit = 10  # warm-up optimizer steps before any pruning
  c.tfinal = 10  # LENGTH of the final phase with the pattern frozen (a duration)
  c.delta_t = 5  # prune every delta_t steps during the budgeting phase
  c.beta1 = 0.85  # sensitivity EMA coefficient
  c.beta2 = 0.85  # uncertainty EMA coefficient
  c.orth_reg_weight = 0.5  # gamma of the orthogonal regulariser
  c.orth_reg_form = "peft"  # "peft": mean of unsquared norms | "paper": sum of squared norms
  c.sensitivity = "post_update"  # "post_update" (PEFT) | "pre_update" (paper Alg. 1)
  c.lora_alpha = 8.0  # scale = lora_alpha / (init_r + 1e-5) under the "peft" convention
  c.scale_convention = "peft"  # "peft" | "alpha_over_r" | "rslora"
  c.init_std = 0.02  # std of the normal init of P (B) and Q (A); Λ (E) starts at 0
  return c


def optimizer_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-3  # peak learning rate
  c.warmup_steps = 5  # linear warm-up from 0 to the peak
  c.decay = "cosine"  # after warm-up: "cosine" (to end_lr_fraction * peak) | "constant"
  c.end_lr_fraction = 0.1  # final learning rate as a fraction of the peak (cosine)
  c.b1 = 0.9  # AdamW beta1
  c.b2 = 0.999  # AdamW beta2
  c.eps = 1e-8  # AdamW epsilon
  c.weight_decay = 0.0  # AdamW decoupled weight decay on the adapters
  c.clip_norm = 1.0  # clip each skill's gradient to this global norm (0 = off)
  c.grad_accum_steps = 1  # micro-batches per optimizer update (optax.MultiSteps)
  return c


def apply_presets(c: ml_collections.ConfigDict, arg: str | None, presets: dict, where: str):
  """Apply `--config=file.py:a,b,key=value`: named presets in order, `key=value` sets a
  top-level field (e.g. skills=ner+re, task=pubmedqa)."""
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if sep and key in c:
      c[key] = value
    elif key in presets:
      presets[key](c)
    else:
      raise ValueError(f"unknown preset {key!r} in {where} (known: {sorted(presets)})")
  return c
