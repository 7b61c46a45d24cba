"""Stage 1: train the medical skills, one AdaLoRA adapter each, on one frozen base.

Default (all 12 skills, SmolLM2-135M-Instruct, the embedded demo corpus, ~5 min on 2 cores):

  python -m mdkif_jax.main --config=configs/skill.py --workdir=runs/skill

Presets after a colon, comma-separated, then `key=value` overrides of the preset:

  --config=configs/skill.py:tiny                       # random tiny model (tests, smoke runs)
  --config=configs/skill.py:llama2_7b,skills=ner+re    # a 7B-shaped run on two skills
  --config=configs/skill.py:shared                     # the real datasets in ../shared/data
  --config=configs/skill.py:shared_small               # 60 steps (docs/results.md)
  --config=configs/skill.py:paper                      # the headline run, ~2 h (docs/results.md)
  --config=configs/skill.py:paper,union                # its controls: one multi-task adapter,
  --config=configs/skill.py:paper,lora                 # or plain-LoRA skills

and any field from the command line: --config.adalora.init_r=12 --config.train.steps=200.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "skill"  # which stage main.py runs: "skill" (this file) | "router" | "eval"
  c.model = common.model_config("smollm2_135m")  # the frozen base (configs/common.py)
  c.mesh = common.mesh_config()  # devices and the logical-axis rule table
  c.adalora = common.adalora_config()  # one AdaLoRA adapter per skill
  c.optimizer = common.optimizer_config()  # AdamW + schedule + clipping + accumulation
  c.data = common.data_config()  # the skill data (configs/common.py)
  # The demo rows are 50-123 tokens: one padded length means one compiled step.
  c.data.buckets = (128,)  # padded lengths a batch can take
  c.data.max_len = 128  # longest row in tokens (longer contexts are cut)

  # Skills to train: "all" or names joined by "+" / "," (e.g. "ner+re"). Ids stay the
  # registry's (mdkif_jax.data.SKILLS) so checkpoints of different selections line up.
  c.skills = "all"
  c.train = ml_collections.ConfigDict()
  # "joint": all selected skills in one program on the skill axis (each batch holds
  # `rows_per_skill` rows of every skill); "separate": one run per skill, one after another.
  c.train.mode = "joint"
  c.train.rows_per_skill = 1  # rows of each skill in every batch (per host)
  # "adalora": AdaLoRA adapters (the paper); "lora": plain LoRA at rank adalora.target_r (the
  # parameter count AdaLoRA ends with), B = 0 at init, no pruning, no orthogonal regulariser.
  c.train.adapter = "adalora"
  # True: ONE adapter ("union") trained on the union of the skills' data, the same rows in the
  # same order as the per-skill run (the multi-task control of docs/results.md).
  c.train.union = False
  # The union adapter's budget: "all_skills" = the selected skills' together (init_r, target_r
  # and lora_alpha times their number: the same parameters and scale); "one_skill" = as set.
  c.train.union_budget = "all_skills"
  c.train.steps = 40  # optimizer updates per skill (= AdaLoRA total_step)
  c.train.seed = 0  # seed of the adapter init
  c.train.log_every = 5  # steps between metric writes (JSONL + TensorBoard)
  c.train.checkpoint_every = 20  # steps between checkpoints (one is always written at the end)
  c.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  c.train.keep_period = 0  # also keep every checkpoint whose step is a multiple (0 = none)
  c.train.async_checkpoint = True  # write checkpoints in the background
  # Reserved (eval) rows per skill scored before and after training (0 = no evaluation).
  c.train.eval_rows_per_skill = 2
  c.train.max_bad_steps = 5  # stop after this many non-finite steps in a row
  # Answer positions per chunk of the fused vocabulary projection + cross-entropy
  # (mdkif_jax/ops/losses.py): only [chunk, vocab] logits exist at a time.
  c.train.loss_chunk = 256
  c.train.plot = True  # write rank_allocation.png at the end
  c.train.progress = True  # show a progress bar

  return common.apply_presets(c, arg, PRESETS, "configs/skill.py")


def _tiny(c):
  c.model.source = "tiny_smollm_vocab"  # 2 layers, hidden 64, SmolLM2's 49152-token vocabulary
  c.model.tokenizer = "smollm2_135m"
  c.train.steps = 12
  c.adalora.init_r = 4
  c.adalora.target_r = 2
  c.adalora.tinit = 2
  c.adalora.tfinal = 2
  c.adalora.delta_t = 2
  c.train.checkpoint_every = 4
  c.train.log_every = 2
  c.data.buckets = (64, 128)
  c.data.max_len = 128


def _big(source):
  def apply(c):
    c.model.source = source
    c.model.param_dtype = "bfloat16"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.mesh.shape = (1, -1, 1)  # FSDP over every device

  return apply


def _shared(c):
  c.data.data_dir = "../shared/data"
  c.data.max_per_source = 200


def _shared_small(c):
  """docs/results.md's real run: all 12 skills on ../shared/data at 200 examples per source, rows
  of at most 192 tokens (ChemProt's question alone, with its 13 labels, needs more than 128),
  60 steps of one row per skill (~15-20 min on 2 CPU cores)."""
  _shared(c)
  c.data.buckets, c.data.max_len = (192,), 192
  c.train.steps = 60
  c.train.checkpoint_every = 30
  c.train.log_every = 10


def _paper(c):
  """docs/results.md's headline run (issue 21): all 12 skills on all of ../shared/data, each
  (source, skill) capped at 3000 examples per split so the big NER and KG sources do not
  crowd out the small ones; examples packed into 512-token rows, bf16 compute (f32 weights and
  accumulation); sized to ~2 h on 2 CPU cores, checkpointed every 25 steps so it resumes in
  pieces (rerun the same command)."""
  _shared(c)
  c.data.max_per_source = 3000
  c.data.pack = True
  c.data.buckets, c.data.max_len = (512,), 512
  c.model.compute_dtype = "bfloat16"
  c.train.steps = 300  # ~23 s a step on 2 cores of the Intel machine: ~2 h
  c.adalora.tinit = 30
  c.adalora.tfinal = 60
  c.adalora.delta_t = 10
  c.train.checkpoint_every = 25
  c.train.keep_period = 75  # steps 75, 150, 225, 300 stay: the learning curve's points
  c.train.log_every = 10
  c.train.eval_rows_per_skill = 8


def _union(c):
  """The multi-task control (docs/results.md): one adapter on the union of the skills' rows,
  with the budget of all of them together (train.union_budget). After a preset: paper,union."""
  c.train.union = True
  # run beside the evaluation it gets the idle CPU only: a checkpoint every 5 steps keeps it
  c.train.checkpoint_every = 5


def _lora(c):
  """The plain-LoRA control (docs/results.md): each skill a LoRA adapter of rank target_r, the
  parameter count its AdaLoRA adapter ends with. After a preset: paper,lora."""
  c.train.adapter = "lora"
  # run beside the evaluation it gets the idle CPU only: a checkpoint every 5 steps keeps it
  c.train.checkpoint_every = 5


PRESETS = {
  "tiny": _tiny,
  "shared": _shared,
  "shared_small": _shared_small,
  "paper": _paper,
  "union": _union,
  "lora": _lora,
  "llama2_7b": _big("llama2_7b"),
  "llama3_8b": _big("llama3_8b"),
  "mistral_7b": _big("mistral_7b"),
  "qwen2_7b": _big("qwen2_7b"),
}
