"""Stage 2's run: fit a skill router for one downstream task; the base and every skill stay
frozen.

`train_and_evaluate(config, workdir)` (main.py, `config.stage == "router"`):
1. loads the stage-1 skills from `config.skills_from` (checkpoint.load_skills: one or more
   stage-1 workdirs stacked on the skill axis in the order given, refused when trained on
   another base model) and builds rows with stage 1's prompt template and max_len;
2. takes the task's reserved rows (data/task.py), split by id hash into rows that fit the
   router and rows that score it;
3. runs a table of methods, one loop that fits, times and scores each, under a progress bar
   (`config.progress`; inner bars for fit steps, scoring batches and generation calls): the
   chosen router (gradient descent, or CMA-ES when fewer than `router.cmaes_threshold` rows
   fit it, or the input-conditioned gate) and the baselines `router.baselines` asks for
   ("cheap": the base and the uniform average; "all": also each single skill and the other
   router kinds) and, unless "none", CMA-ES on k rows (`cmaes.k_shots`) for each k and seed.
   Task-level mixtures are scored merged into the kernels (the zero-overhead serving path);
   fitting and the gate run unmerged in the packed layout (serving.packed_params);
4. saves the router with Orbax and writes metrics.jsonl, router_weights.png and
   predictions.jsonl (every method's chosen candidate or generated text per scored row).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from mdkif_jax import checkpoint, evaluate, metrics, reporting, router, sharding
from mdkif_jax.data import batches, task
from mdkif_jax.errors import ConfigError
from mdkif_jax.model import loading, tokenizer
from mdkif_jax.model.config import numerics_from
from mdkif_jax.peft import serving

log = logging.getLogger(__name__)


def task_fit(config, seed: int | None = None, cmaes: bool = False) -> router.TaskFit:
  r, c = config.router, config.cmaes
  return router.TaskFit(
    parametrisation=c.parametrisation if cmaes else r.parametrisation,
    regulariser=r.regulariser,
    reg_weight=r.reg_weight,
    steps=r.steps,
    learning_rate=r.learning_rate,
    population=c.population,
    generations=c.generations,
    sigma0=c.sigma0,
    bounds=tuple(c.bounds),
    seed=r.seed if seed is None else seed,
  )


def choose_method(config, n_fit: int) -> str:
  m = config.router.method
  if m == "auto":
    return "cmaes" if n_fit < config.router.cmaes_threshold else "gd"
  if m not in ("gd", "cmaes", "gate"):
    raise ConfigError(f"--config.router.method must be auto | gd | cmaes | gate, got {m!r}")
  return m


def with_stage1_prompting(config, prompting: dict | None):
  """A copy of the config whose template and max_len are stage 1's (from its checkpoint), so
  the task's rows are built exactly as the skills saw theirs."""
  config = config.copy_and_resolve_references()
  if prompting:
    with config.unlocked():
      config.data.template.update(prompting["template"])
      config.data.max_len = int(prompting["max_len"])
  return config


@dataclasses.dataclass
class Task:
  """What every method of one run shares: the frozen base, the skills in the served (merged
  scoring) and packed (fitting, the gate) layouts, the rows and the scorer."""

  config: Any
  graphdef: Any
  frozen: Any  # the base's params
  served: dict  # serving.serving_stack of the skills
  packed_params: Any  # the base's params with packed kernels [W ; Bᵀ]
  packed: dict  # the skills without B, for packed_params
  scale: float
  skills: tuple[str, ...]
  tok: Any
  mesh: Any
  fit_rows: list
  score_rows: list
  scorer: evaluate.TaskScorer

  def batches(self, rows, size=None) -> list[dict]:
    """`rows` as device batches of `size` rows (default router.batch_size)."""
    size = size or int(self.config.router.batch_size)
    dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    host = task.make_batches(rows, self.tok, self.config.data, size, dp)
    return [batches.to_global(b, self.mesh, per_process=False) for b in host]

  def score_merged(self, w_S=None) -> dict[str, float]:
    """Scores of the base + Σ w_s ΔW_s merged into the kernels (None: the base)."""
    params = self.frozen
    if w_S is not None:
      params = serving.merged_params(self.frozen, self.served, w_S, self.scale)
    stats = lambda batch: evaluate.merged_stats(params, batch, graphdef=self.graphdef)  # noqa: E731
    model = nnx.merge(self.graphdef, params)
    return self.scorer(stats, evaluate.Decoder(self.tok, self.config, model))


@dataclasses.dataclass
class Fitted:
  """One method's outcome: its scores, the weights it gives each skill (the gate: the mean
  over scored rows), its fit curve and what a saved router holds."""

  scores: dict[str, float]
  weights: np.ndarray | None = None
  curve: list[float] | None = None
  state: dict = dataclasses.field(default_factory=dict)
  scorer: Any = None  # the TaskScorer it scored with, when not the task's (in-context rows)


def _task_level(t: Task, theta, curve, fit: router.TaskFit) -> Fitted:
  w = np.asarray(router.task_weights(theta, fit.parametrisation))
  return Fitted(t.score_merged(w), w, curve, {"theta": np.asarray(theta)})


def fit_gd(t: Task) -> Fitted:
  fit = task_fit(t.config)
  batch_list = t.batches(t.fit_rows)
  theta, curve = router.fit_task_gd(
    t.graphdef, t.packed_params, t.packed, t.scale, batch_list, fit, progress=t.config.progress
  )
  return _task_level(t, theta, curve, fit)


def fit_cmaes(t: Task, rows=None, seed: int | None = None) -> Fitted:
  """CMA-ES on `rows` (default: every fit row) as one batch."""
  rows = t.fit_rows if rows is None else rows
  fit = task_fit(t.config, seed=seed, cmaes=True)
  one = t.batches(rows, size=len(rows))[0]
  theta, curve = router.fit_task_cmaes(
    t.graphdef, t.packed_params, t.packed, t.scale, one, fit, progress=t.config.progress
  )
  return _task_level(t, theta, curve, fit)


def fit_gate(t: Task) -> Fitted:
  g = t.config.gate
  gate, curve = router.fit_gate(
    t.graphdef,
    t.packed_params,
    t.packed,
    t.scale,
    t.batches(t.fit_rows),
    hidden=g.hidden,
    top_k=g.top_k,
    steps=g.steps,
    learning_rate=g.learning_rate,
    seed=t.config.router.seed,
    progress=t.config.progress,
  )
  stats = evaluate.gate_stats_fn(gate, t.graphdef, t.packed_params, t.packed, t.scale)
  model = nnx.merge(t.graphdef, t.packed_params)
  scores = t.scorer(stats, evaluate.Decoder(t.tok, t.config, model, t.packed, t.scale))
  mean_w = np.mean(list(t.scorer.last["weights"].values()), 0)
  return Fitted(scores, mean_w, curve, {"gate": nnx.to_pure_dict(nnx.split(gate)[1])})


def fixed(w_S) -> Callable[[Task], Fitted]:
  """A method that fits nothing: the base (None) or fixed weights over the skills."""
  return lambda t: Fitted(t.score_merged(w_S))


ROUTERS = {"gd": fit_gd, "cmaes": fit_cmaes, "gate": fit_gate}
BASELINES = ("none", "cheap", "all")


def check_baselines(name: str) -> str:
  if name not in BASELINES:
    raise ConfigError(f"--config.router.baselines must be one of {BASELINES}, got {name!r}")
  return name


def methods(config, method: str, skills, fit_rows) -> list[tuple[str, Callable[[Task], Fitted]]]:
  """The run's table: the chosen router first, then the baselines of router.baselines (each
  fixed mixture costs one scoring; each single skill and router kind as much as the router)."""
  table = [(method, ROUTERS[method])]
  kind = check_baselines(config.router.baselines)
  if kind == "none":
    return table
  S = len(skills)
  table.append(("base", fixed(None)))
  if kind == "all":
    eye = np.eye(S, dtype=np.float32)
    table += [(f"skill_{s}", fixed(eye[i])) for i, s in enumerate(skills)]
  table.append(("uniform", fixed(np.full(S, 1.0 / S, np.float32))))
  if kind == "all":
    table += [(other, fit) for other, fit in ROUTERS.items() if other != method]
  for k in config.cmaes.k_shots:
    for seed in config.cmaes.seeds:
      rows = task.k_shot_rows(fit_rows, int(k), seed, config.task)  # k too large: fails now
      run = lambda t, rows=rows, seed=seed: fit_cmaes(t, rows, seed)  # noqa: E731
      table.append((f"cmaes_k{k}_s{seed}", run))
  return table


def prepare_task(config, base, mesh) -> Task:
  """Load the skills, lay them out for serving and fitting, and build the task's rows."""
  graphdef, frozen = nnx.split(base)
  skills = checkpoint.load_skills(config, base.cfg, mesh)
  config = with_stage1_prompting(config, skills.serving)
  # Stage 2's layout, built once: every skill's kept ranks side by side
  served = serving.serving_stack(skills.stacked)
  ranks = {t: int(leaf["route"].shape[1]) for t, leaf in served.items()}
  log.info("stage 2: served ranks per target %s", ranks)
  # The unmerged paths (fitting, the gate) run packed: B stacked under W in a copy of the
  # adapted kernels, the up-products inside the base GEMMs; merged scoring and the base keep
  # the plain kernels.
  packed_params, packed = serving.packed_params(frozen, served)
  tok = tokenizer.load_tokenizer(tokenizer.tokenizer_source(config.model))
  fit_rows, score_rows = task.task_examples(config)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  put = lambda batch: batches.to_global(batch, mesh, per_process=False)  # noqa: E731
  scorer = evaluate.TaskScorer(
    score_rows, fit_rows + score_rows, tok, config, put, dp, progress=config.progress
  )
  return Task(
    config,
    graphdef,
    frozen,
    served,
    packed_params,
    packed,
    skills.scale,
    skills.names,
    tok,
    mesh,
    fit_rows,
    score_rows,
    scorer,
  )


def train_and_evaluate(config, workdir: str | pathlib.Path, base=None) -> dict:
  """Stage 2 entry point (see the module docstring); returns scores and weights (for tests)."""
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  source, _ = task.parse_task(config.task)  # bad config fails before anything loads
  choose_method(config, 0)
  check_baselines(config.router.baselines)
  metrics.check_metric(config.metric)
  if base is None:
    rules = tuple(tuple(r) for r in config.mesh.rules)
    numerics = numerics_from(config)
    base = loading.load_model(
      config.model.source, numerics=numerics, mesh=mesh, rules=rules, seed=config.model.seed
    )
  t = prepare_task(config, base, mesh)
  method = choose_method(config, len(t.fit_rows))
  table = methods(config, method, t.skills, t.fit_rows)
  log.info(
    "stage 2: task %s, %d skills, %d fit / %d scored rows, router %s",
    config.task,
    len(t.skills),
    len(t.fit_rows),
    len(t.score_rows),
    method,
  )
  results, weights, history, predictions = {}, {}, {}, []
  state = {}
  bar = reporting.progress_bar(config.progress, total=len(table), desc="stage 2", unit="method")
  with bar:
    for name, fit in table:
      bar.set_postfix_str(name)
      start = time.perf_counter()
      out = fit(t)  # each method's seconds: its fit, if any, and its scoring
      results[name] = {**out.scores, "seconds": time.perf_counter() - start}
      bar.clear()  # the log line goes above the bar, not into it
      log.info("stage 2: %s done in %.1f s", name, results[name]["seconds"])
      bar.update()
      predictions += evaluate.prediction_records(name, t.scorer, t.score_rows)
      if out.weights is not None:
        weights[name] = out.weights
      if out.curve is not None:
        history[name] = out.curve
      if name == method:
        state = {**out.state, "weights": np.asarray(out.weights, np.float32)}
  meta = {
    "model": checkpoint.model_identity(base.cfg),
    "skills": list(t.skills),
    "task": config.task,
    "method": method,
    "parametrisation": config.router.parametrisation,
    "gate_hidden": config.gate.hidden,
    "gate_top_k": config.gate.top_k,
    "scale": t.scale,
    "skills_step": config.get("skills_step"),  # None: the runs' last (export merges these)
  }
  data_state = {"fit_rows": len(t.fit_rows), "score_rows": len(t.score_rows)}
  checkpoint.save_router(workdir, state, meta, data_state)
  reporting.write_router_report(workdir, config, t.skills, method, results, weights, history)
  if jax.process_index() == 0:
    reporting.write_jsonl(workdir / "predictions.jsonl", predictions)
  return {
    "method": method,
    "skills": t.skills,
    "results": results,
    "weights": weights,
    "history": history,
    "fit_rows": len(t.fit_rows),
    "score_rows": len(t.score_rows),
    "source": source,
  }
