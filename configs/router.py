"""Stage 2: fit a skill router for one downstream task on the frozen base and frozen skills.

Default (SmolLM2-135M-Instruct, the 12 skills of the default stage-1 run, the reserved rows of
the embedded demo corpus as a toy task; stage 1 must have run first): CMA-ES (34 fit rows <
cmaes_threshold) on a small budget, scored beside the base and the uniform average, a few
minutes on 2 CPU cores with a progress bar per method:

  python -m mdkif_jax.main --config=configs/router.py --config.skills_from=runs/skill \
    --workdir=runs/router

Presets after a colon, comma-separated, then `key=value` overrides:

  --config=configs/router.py:tiny                  # random tiny model (tests, smoke runs)
  --config=configs/router.py:full_baselines        # + each single skill, every router kind,
                                                   #   CMA-ES on k = 5, 20 rows x 3 seeds
  --config=configs/router.py:shared,task=pubmedqa  # a reserved task of ../shared/data
  --config=configs/router.py:shared,fewshot        # CMA-ES on k = 5, 20, 100 examples (a task
                                                   #   with >= 100 fit rows: not the demo's 34)
  --config=configs/router.py:gate                  # the input-conditioned router
  --config=configs/router.py:rqe_small             # the real run of docs/results.md
  --config=configs/router.py:meqsum_small          # its second task (ROUGE)

A 13th skill trained later (stage 1 with --config.skills=<it> in its own workdir) joins with
--config.skills_from=runs/skill,runs/skill13: the others are not retrained, the router refits.
"""

from __future__ import annotations

import ml_collections

from configs import common, skill


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "router"  # which stage main.py runs: "skill" | "router" (this file) | "eval"
  c.model = common.model_config("smollm2_135m")  # the frozen base: the one the skills trained on
  c.mesh = common.mesh_config()  # devices and the logical-axis rule table (as in stage 1)
  # The data section. Its template and max_len are replaced by the stage-1 checkpoint's (the
  # skills are served with the prompts they were trained on); the adapter scale comes from
  # the checkpoint too.
  c.data = common.data_config()
  c.data.buckets = (128,)  # padded lengths a batch can take (max_len is added)
  c.data.max_len = 128  # used only when the stage-1 checkpoint does not record its own

  # Stage-1 workdir(s) holding the skills (<dir>/checkpoints), comma-separated; their skills
  # are stacked on the skill axis in this order. Required.
  c.skills_from = ml_collections.config_dict.placeholder(str)
  # Checkpoint step to load when skills_from is one workdir; None = the latest, which must be
  # the run's last step (an unfinished stage 1 is refused: name a step to use it anyway).
  c.skills_step = ml_collections.config_dict.placeholder(int)
  # The downstream task: a source with reserved rows in the split registry
  # (mdkif_jax/data/splits.py, e.g. "pubmedqa", "covid_dialogue", "mmlu_fewshot", "demo"),
  # optionally ":skill" to keep that skill's rows only ("hoc:mldc").
  c.task = "demo"
  # Share of the task's reserved rows (by id hash) that score the router; the rest fit it.
  c.eval_fraction = 0.5
  c.max_fit_examples = 0  # at most this many rows fit the router (0 = all)
  c.max_eval_examples = 0  # at most this many rows score it (0 = all)
  c.plot = True  # write router_weights.png
  # Progress bars on stderr (process 0): methods, and per method its fit steps / generations,
  # scoring batches and generation calls. False for logs that should hold no bar redraws.
  c.progress = True
  # The task's standard metric, reported beside loss / token_acc / exact for every method
  # (mdkif_jax/metrics.py): "auto" picks it by source (metrics.TASK_METRICS: label tasks
  # "choice" = accuracy + macro-F1 over candidate log-likelihoods; summaries and dialogue
  # "rouge" = ROUGE-1/2/L of greedy generations; HoC and NER "sets" = F1 of generated lists);
  # or force "choice" | "rouge" | "sets" | "exact" (nothing beyond teacher-forced exact match).
  c.metric = "auto"
  c.gen = ml_collections.ConfigDict()
  # Greedy generation stops here for "rouge" / "sets" rows. Decoding is most of a method's
  # scoring; the demo's references are at most 29 tokens.
  c.gen.max_new_tokens = 32
  c.gen.batch_size = 8  # prompts per generation call (the last call is padded to it)

  c.router = ml_collections.ConfigDict()
  # "auto": CMA-ES when fewer than cmaes_threshold rows fit the router, else gradient
  # descent (the paper's rule); or force "gd" | "cmaes" | "gate" (input-conditioned).
  # CMA-ES scores all its rows in one batch per candidate: meant for few-shot data.
  c.router.method = "auto"
  c.router.cmaes_threshold = 64  # rows below which "auto" picks CMA-ES
  # What else is scored beside the router: "cheap" = the base and the uniform average (one
  # scoring each: the two references a router must beat); "all" = also each single skill and
  # the other router kinds (each as costly as the router: the :full_baselines preset);
  # "none". CMA-ES on cmaes.k_shots rows per seed runs with "cheap" and "all".
  c.router.baselines = "cheap"
  c.router.batch_size = 8  # rows per batch when fitting by gradient descent and scoring
  c.router.parametrisation = "free"  # w = theta ("free") | softmax(theta) | sigmoid(theta)
  c.router.regulariser = "l1"  # "l1" (sum |w|) | "entropy" (of |w| normalised) | "none"
  c.router.reg_weight = 0.05  # weight of the regulariser (LoraHub: L1 0.05)
  c.router.steps = 100  # gradient-descent steps (Adam)
  c.router.learning_rate = 0.05  # Adam learning rate of the task-level weights
  c.router.seed = 0  # seed of CMA-ES (main run) and of the gate's init

  c.cmaes = ml_collections.ConfigDict()
  c.cmaes.parametrisation = "free"  # as router.parametrisation, for the CMA-ES search space
  # CMA-ES's budget, population x generations candidates each scoring every fit row, is most
  # of the default run (~8 s a candidate on the demo's 34 rows on 2 CPU cores): 5 x 4 = 20
  # evaluations (half LoraHub's 40) keep the default run near 5 minutes.
  c.cmaes.population = 5  # candidates per generation (scored by one vmapped call)
  c.cmaes.generations = 4  # generations (one jitted lax.scan; one call each under a bar)
  c.cmaes.sigma0 = 0.3  # initial step size around the uniform average
  c.cmaes.bounds = (-1.5, 1.5)  # candidates are clipped to this box (LoraHub's)
  # Baselines: CMA-ES on k rows drawn from the fit rows, for each k and seed; k above the
  # number of fit rows is an error. () = none.
  c.cmaes.k_shots = ()
  c.cmaes.seeds = (0, 1, 2)  # seeds of the k-shot draws and of CMA-ES

  c.gate = ml_collections.ConfigDict()
  c.gate.hidden = 64  # hidden width of the gate MLP on the pooled prompt hidden state
  c.gate.top_k = 0  # keep the k largest skill weights per row (0 = dense softmax)
  c.gate.steps = 100  # Adam steps
  c.gate.learning_rate = 1e-3  # Adam learning rate of the gate

  return common.apply_presets(c, arg, PRESETS, "configs/router.py")


def _tiny(c):
  c_skill = skill.get_config("tiny")  # the same base as stage 1's :tiny
  c.model = c_skill.model
  c.data.buckets = c_skill.data.buckets
  c.router.steps = 10
  c.cmaes.generations = 5
  c.cmaes.population = 8
  c.gate.steps = 10
  c.gen.max_new_tokens = 8
  c.plot = False
  c.router.baselines = "all"  # tiny is cheap: every method runs (tests check each)


def _shared(c):
  c.data.data_dir = "../shared/data"
  c.data.max_per_source = 200  # as stage 1's :shared
  c.task = "pubmedqa"
  c.gen.max_new_tokens = 64  # real summaries and long answers run past the demo's 32


def _rqe_small(c):
  """docs/results.md's real run, stage 2: RQE question entailment (accuracy, macro-F1) on the
  skills of configs/skill.py:shared_small, with every baseline, sized for ~20 min on 2 CPU
  cores: 20 rows fit the router (so "auto" picks CMA-ES, the paper's few-shot rule; GD and the
  gate fit the same rows), 40 score it; CMA-ES 5 candidates x 4 generations (20 evaluations,
  half LoraHub's 40); k-shot draws of 5 and 20 rows with seeds 1 and 2 (seed 0 on all 20
  rows is the main "cmaes" run)."""
  _shared(c)
  c.task = "rqe"
  c.data.sources = "rqe"  # load only the task's source (its reserved rows are the same)
  c.data.buckets = (128, 192)  # max_len (192) comes from stage 1's :shared_small checkpoint
  c.max_fit_examples, c.max_eval_examples = 20, 40
  c.router.steps = 15
  c.gate.steps = 15
  c.gate.learning_rate = 1e-2  # 15 steps at 1e-3 would leave the gate at the uniform average
  c.cmaes.population, c.cmaes.generations = 5, 4
  c.cmaes.k_shots, c.cmaes.seeds = (5, 20), (1, 2)
  c.router.baselines = "all"


def _meqsum_small(c):
  """docs/results.md's second real task: MeQSum question summarisation (ROUGE-1/2/L of greedy
  generations of up to 32 tokens; its reference summaries are 12 tokens at the median, 29 at
  most), on the same skills as :rqe_small, smaller still: 12 rows fit, 24 score; CMA-ES
  4 x 3; k-shot draws of 5 rows with seeds 1 and 2."""
  _rqe_small(c)
  c.task = "meqsum"
  c.data.sources = "meqsum"
  c.max_fit_examples, c.max_eval_examples = 12, 24
  c.router.steps = c.gate.steps = 10
  c.cmaes.population, c.cmaes.generations = 4, 3
  c.cmaes.k_shots = (5,)
  c.gen.max_new_tokens = 32


def _full_baselines(c):
  """Every baseline: the base, each single skill, the uniform average, every router kind and
  CMA-ES on k = 5 and 20 rows for seeds 0, 1, 2."""
  c.router.baselines = "all"
  c.cmaes.k_shots, c.cmaes.seeds = (5, 20), (0, 1, 2)


def _fewshot(c):
  c.router.method = "cmaes"
  c.cmaes.k_shots = (5, 20, 100)


def _gate(c):
  c.router.method = "gate"


PRESETS = {
  "tiny": _tiny,
  "shared": _shared,
  "rqe_small": _rqe_small,
  "meqsum_small": _meqsum_small,
  "full_baselines": _full_baselines,
  "fewshot": _fewshot,
  "gate": _gate,
}
