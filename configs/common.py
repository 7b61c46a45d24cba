"""Pieces shared by every stage's config: model presets, mesh and logical-axis rules, AdaLoRA
defaults, the optimizer and the data section (read by mdkif_jax.data: load_examples,
make_iterator and the stats tool). Each stage's `get_config(arg)` starts from these.
"""

from __future__ import annotations

import ml_collections

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
  # Query positions per block of the causal attention (mdkif_jax/ops/attention.py): each block
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
  """PEFT AdaLoraConfig names (deltaT is delta_t here) and its defaults, but tinit, tfinal and
  delta_t (PEFT: 0, 0, 1), set for the 40-step demo run."""
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
  # Which gradient the importance scores see when optimizer.clip_norm > 0: "clipped" (PEFT
  # under HF Trainer, which clips before update_and_allocate) | "raw" (before clipping).
  c.importance_grads = "clipped"
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


def data_config() -> ml_collections.ConfigDict:
  """Every data field, with its default."""
  c = ml_collections.ConfigDict()
  # Folder of the datasets (the layout of ../shared/data). None = the small demo corpus
  # embedded in the package, so a fresh machine can train without any download.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  # Which converters to run: "all", or a tuple / comma string of names from
  # mdkif_jax.data.sources.SOURCES (e.g. "pubmedqa,rqe"). Ignored when data_dir is None.
  c.sources = "all"
  # Which skills' examples to load: "all", or names from mdkif_jax.data.SKILLS. Stage 1
  # trains the skills of the top-level `skills` field; this only narrows what is read.
  c.skills = "all"
  # The user's own JSONL files of {"skill", "context"?, "query", "answer", "id"?, "split"?},
  # relative to data_dir (the working directory when data_dir is None: the demo corpus is
  # then not loaded) or absolute; loaded as the source "instruct".
  c.instruct_files = ()
  # Datasets loaded with `datasets.load_dataset(name_or_path, config, split=split)`: a hub
  # name (needs network access, or the datasets cache when HF_DATASETS_OFFLINE=1) or a local
  # dataset folder laid out like a hub repo without a loading script (data/train-*.jsonl,
  # *.parquet, *.csv; a relative path is looked up under data_dir first). One string each:
  #   "name_or_path[:config]|split|skill|context|query|answer[|id]"
  #   name_or_path  hub name ("org/name") or folder; ":config" picks a subset if needed.
  #   split         the split to load ("train", "test", "validation", "train[:1000]", ...).
  #                 "train" trains, "test" is reserved for evaluation, any other split is
  #                 split by id hash (10% reserved).
  #   skill         the skill every row trains (a name from mdkif_jax.data.SKILLS).
  #   context       column of the context, or empty ("||") for none.
  #   query         column of the query.        answer  column of the answer.
  #   id            optional column of a stable row id (else "<split>/<row>"; rows are then
  #                 hash-split by content).
  # A dict with keys path, split, skill, context, query, answer, id?, config? works too.
  # Class-label columns give their label names, list columns one item per line. They load
  # whatever `sources` says; with data_dir None and this set, the demo corpus is not loaded.
  c.hub_datasets = ()
  # Stop at the first bad record (malformed line, missing field, empty answer, bad bytes,
  # unknown skill) instead of skipping and counting it. Also makes a missing source fatal.
  c.strict = False
  # At most this many examples per (source, skill) and split, chosen by id hash; 0 = all.
  c.max_per_source = 0
  # Hetionet node kinds that become Entity Attribute ("what kind of entity is X?") items.
  c.hetionet_node_kinds = (
    "Disease",
    "Symptom",
    "Compound",
    "Anatomy",
    "Side Effect",
    "Pharmacologic Class",
  )
  # Hetionet metaedges that become Entity-Entity Relation (pair -> relation) items. CtD and
  # CpD are left out: PharmacotherapyDB, their source, is converted on its own.
  c.hetionet_metaedges = ("DpS", "DlA", "DrD", "PCiC", "CcSE", "DaG")

  # The one prompt template of both stages (mdkif_jax/data/template.py).
  c.template = ml_collections.ConfigDict()
  # Wrap the prompt in the tokenizer's chat template (user turn, then the answer as the
  # assistant turn). False: plain text with `answer_header` before the answer.
  c.template.chat = True
  # System turn in chat mode; "" or None for none (SmolLM2's template then adds its own).
  c.template.system = "You are a careful medical assistant."
  c.template.context_header = "Context:"  # Line above the context (omitted if empty).
  c.template.query_header = "Question:"  # Line above the query.
  c.template.answer_header = "Answer:"  # Line before the answer when chat=False.
  # Which end of an over-long context is cut: "end" keeps its beginning (documents),
  # "start" keeps its end (dialogue histories). Query and answer are never cut.
  c.template.truncate = "end"
  # "sections" (the above, blank lines between parts) | "lm_eval": lm-evaluation-harness's
  # multiple-choice prompt and tokenisation (needs chat=False; see template.py).
  c.template.layout = "sections"
  c.template.instruction = True  # Start the prompt with the skill's instruction.
  c.template.answer_prefix = ""  # Text between the prompt and the answer (lm-eval's " ").

  # Longest row in tokens (prompt + answer); longer contexts are cut, see `template.truncate`.
  c.max_len = 512
  # Padded lengths a batch can take (jit compiles one shape per bucket); max_len is added.
  c.buckets = (128, 256, 512)
  # Pack consecutive examples of one skill into each row, up to max_len tokens, each
  # attending only to itself (positions restart per example): less padding, more examples per
  # step, the same loss per example. False: one example per row. Stage-1 training batches only
  # (evaluation rows and stage 2 always hold one example per row). Packed rows fill up to
  # max_len, so they nearly always take the max_len bucket.
  c.pack = False
  # Seed of the example order; the train/eval split does not depend on it.
  c.seed = 0
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
