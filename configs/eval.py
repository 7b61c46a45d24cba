"""The evaluation stage: a suite of downstream tasks x methods -> one table with intervals.

Default (the demo corpus's reserved rows as one task, right after README's first command):

  python -m mdkif_jax.main --config=configs/eval.py --config.skills_from=runs/skill \
    --workdir=runs/eval

Presets after a colon, comma-separated, then `key=value` overrides:

  --config=configs/eval.py:paper      # the paper's 9 tasks on ../shared/data, 10 methods
  --config=configs/eval.py:tiny       # random tiny model (tests, smoke runs)
  --config=configs/eval.py:lm_eval_mcqa  # lm-evaluation-harness's MCQA prompt, the base only
  --config=configs/eval.py:paper,curve --config.skills_step=75  # a learning-curve point
  --config=configs/eval.py:paper,control  # a control's skills (docs/results.md)

A task of your own: --config.tasks="('mytask=/path/rows.jsonl',)" (our Example JSONL, or MCQA
in the MedQA or MedMCQA layout). The fitting methods read the router, cmaes and gate sections
(configs/router.py); the task-specific AdaLoRA reads adalora and optimizer.
"""

from __future__ import annotations

import ml_collections

from configs import common, router, skill
from mdkif_jax.data import suite


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = router.get_config()  # model, mesh, data, gen, router, cmaes, gate: as stage 2
  c.stage = "eval"  # which stage main.py runs: "skill" | "router" | "eval" (this file)
  # The tasks (data/suite.py): registered names, or name=path.jsonl for a file of your own.
  c.tasks = ("demo",)
  # The methods, rows of the table: base, base_k<k> (k in-context examples from the fit
  # part), uniform, best_single (chosen on the fit part), gd, cmaes, cmaes_k<k> (k fit rows,
  # one cell per cmaes.seeds), gate, adalora_task (an AdaLoRA adapter trained on the fit part
  # with the GD router's budget of forward/backward passes), majority (no model: the fit
  # part's most frequent answer on every row).
  c.methods = ("base", "uniform", "gd")
  # How task rows are prompted: "stage1" = the template and max_len stage 1 trained with (read
  # from its checkpoint: the rows the skills saw); "config" = data.template and data.max_len
  # as set here (the lm_eval_mcqa preset).
  c.prompting = "stage1"
  c.fit_fraction = 0.3  # share of a task's rows (by a hash of task and input) that may be fitted on
  c.max_fit_rows = 0  # at most this many fit rows per task (0 = all)
  c.max_scored_rows = 0  # at most this many scored rows per task (0 = all)
  # Another evaluation's workdir whose base and base_k<k> cells (which do not depend on the
  # skills) this run copies instead of recomputing: its config must equal this one but for
  # skills_from and skills_step, and stage 1's prompting must be the same. "" = compute all.
  c.reuse_cells_from = ""
  # An archive of this same evaluation's cells (python -m mdkif_jax.cells_archive: published
  # without the data's text; the answers come back from data_dir, generated texts stay null)
  # restored instead of computed: its config, prompting and skills must equal this run's.
  # With no skills_from, the archive alone: every cell restored, its skills (and stage 1's
  # prompting) taken as they are, no model loaded (the published table rebuilt from the
  # data); reuse_cells_from must then be "". "" = none.
  c.restore_cells_from = ""
  c.bootstrap = ml_collections.ConfigDict()
  c.bootstrap.resamples = 1000  # bootstrap resamples of the scored rows per task
  c.bootstrap.seed = 0  # seed of the resamples (the same for every method: paired)
  c.adalora = common.adalora_config()  # the task-specific AdaLoRA adapter (adalora_task)
  c.optimizer = common.optimizer_config()  # its optimizer
  c.train = ml_collections.ConfigDict()
  c.train.seed = 0  # seed of the task-specific adapter's init
  c.train.loss_chunk = 256  # answer positions per chunk of its fused loss (as stage 1)
  c.train.progress = False  # no stage-1 progress bar inside a cell
  c.router.baselines = "none"  # stage 2's own baselines are the methods above, not extra cells
  # GD router steps (also the task adapter's budget): 30 fit the demo task's few fit rows and
  # keep the default run to minutes on a CPU; the paper preset sets its own.
  c.router.steps = 30
  return common.apply_presets(c, arg, PRESETS, "configs/eval.py")


def _tiny(c):
  router.PRESETS["tiny"](c)
  c_skill = skill.get_config("tiny")
  c.adalora = c_skill.adalora
  c.methods = (
    "base",
    "base_k2",
    "uniform",
    "best_single",
    "gd",
    "cmaes_k4",
    "gate",
    "adalora_task",
    "majority",
  )
  c.cmaes.seeds = (0, 1)
  c.bootstrap.resamples = 200
  c.progress = False


def _paper(c):
  c.data.data_dir = "../shared/data"
  c.data.sources = "pubmedqa,medmcqa,bc5cdr_disease,chemprot,meqsum"
  c.tasks = (
    "pubmedqa",
    "medmcqa",
    "bc5cdr_disease",
    "chemprot",
    "meqsum",
    "healthfc",
    "negex",
    "mts_dialog",
    "ddi",
  )
  c.methods = (
    "base",
    "base_k5",
    "uniform",
    "best_single",
    "gd",
    "cmaes_k5",
    "cmaes_k20",
    "gate",
    "adalora_task",
    "majority",
  )
  c.max_fit_rows = 200  # the GD router's and the task adapter's fit rows (the cap)
  c.router.steps = 100  # GD steps over the fit rows (also the task adapter's budget)
  c.max_scored_rows = 300  # >= 200 scored rows where a task has them
  c.data.buckets = (128, 256, 512)
  # as stage 1's paper run trained: bf16 activations and matmul inputs (f32 accumulation);
  # on 2 CPU cores ~2x faster scoring and fitting than f32, decoding about the same
  c.model.compute_dtype = "bfloat16"


def _lm_eval_mcqa(c):
  """lm-evaluation-harness's multiple-choice prompt (MMLU's template) and tokenisation, so the
  base's label accuracy is comparable with lm-eval's `hf` backend (tests/test_lm_eval_agreement.py):
  "{question}\nA. ..\nD. ..\nAnswer:" and candidates " A".." D", no instruction, no chat template.
  E.g. --config=configs/eval.py:lm_eval_mcqa --config.tasks="('mine=rows.jsonl',)"."""
  c.data.template.chat = False
  c.data.template.layout = "lm_eval"
  c.data.template.instruction = False
  c.data.template.query_header = ""
  c.data.template.answer_header = "Answer:"
  c.data.template.answer_prefix = " "
  c.prompting = "config"  # this template, not the one stage 1 trained with
  c.methods = ("base",)


def _curve(c):
  """After :paper, a learning-curve point (docs/results.md): the unseen-data track with the
  base, the uniform mixture and the GD router, on the checkpoint --config.skills_step names."""
  c.tasks = tuple(t for t in c.tasks if suite.resolve(t).track == suite.UNSEEN_DATA)
  c.methods = ("base", "uniform", "gd")


def _control(c):
  """After :paper, a control's skills (docs/results.md): the multi-task adapter (one skill:
  gd fits its scalar weight) or the plain-LoRA skills, by the GD router as the AdaLoRA skills;
  the base rows pair its differences (launch/paper_experiment.sh copies the base cells from
  the main evaluation: --config.reuse_cells_from)."""
  c.methods = ("base", "gd")


PRESETS = {
  "tiny": _tiny,
  "paper": _paper,
  "lm_eval_mcqa": _lm_eval_mcqa,
  "curve": _curve,
  "control": _control,
}
