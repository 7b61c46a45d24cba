"""The evaluation stage: a suite of downstream tasks x a set of methods -> one table with
bootstrap intervals, against the base LLM and the alternatives a user has.

`train_and_evaluate(config, workdir)` (main.py, `config.stage == "eval"`):
1. loads the frozen base and the stage-1 skills once (checkpoint.load_skills; rows are built
   with stage 1's template and max_len), in the merged and packed serving layouts (neither
   with no skills_from and an archive to restore from: step 3's `from_archive`);
2. for each task of `config.tasks` (data/suite.py): its rows, split into a fit part and a
   scored part by a hash of (task, the row's input); nothing is fitted or selected on scored
   rows;
3. for each method of `config.methods` (`method_table`): fits it on the fit part, if it fits
   anything, scores the scored part and writes one cell `cells/<task>/<method>.json`
   atomically (scores, per-row outcomes, predictions, seconds). A rerun of a killed
   evaluation skips every finished cell; one under another config (suite_cells.py's
   `cell_identity`: every field but the task and method lists, progress and bootstrap) is
   refused. With
   `reuse_cells_from`, the skill-free cells (base, base_k<k>) are copied from another
   evaluation of the same config and prompting (a learning-curve point, a control); with
   `restore_cells_from`, every cell an archive of this same evaluation holds
   (cells_archive.py: published without the data's text) is restored instead (with no
   skills_from: every cell from the archive and no model at all, `from_archive`);
4. assembles the cells: per (task, method) the headline metric with its 95% bootstrap
   interval over scored rows and the paired difference to the base; per track the mean
   relative gain over the base (stats.py). Writes results.json, results.md, results.png and
   predictions.jsonl.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
import time
import types
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from mdkif_jax import (
  cells_archive,
  checkpoint,
  evaluate,
  fit_router,
  metrics,
  reporting,
  sharding,
  stats,
  suite_cells,
  suite_report,
  task_adapter,
)
from mdkif_jax.data import batches, suite, task
from mdkif_jax.data.example import LoadReport
from mdkif_jax.errors import ConfigError
from mdkif_jax.model import loading, tokenizer
from mdkif_jax.model.config import numerics_from
from mdkif_jax.peft import serving

log = logging.getLogger(__name__)


# ---- methods -------------------------------------------------------------------------------
def base_in_context(k: int) -> Callable:
  """The base with k in-context examples from the fit part: their query and answer, after the
  row's own context, so a row too long for max_len loses examples before its own context
  (template.truncate "end"; the query and answer are never cut)."""

  def run(t: fit_router.Task) -> fit_router.Fitted:
    demos = task.k_shot_rows(t.fit_rows, k, seed=0, task=t.config.task)
    shots = "\n\n".join(f"Question: {d.query}\nAnswer: {d.answer}" for d in demos)
    rows = [
      dataclasses.replace(ex, context=f"{ex.context}\n\nExamples:\n{shots}".strip())
      for ex in t.score_rows
    ]
    scorer = make_scorer(t, rows)
    stats_fn = lambda batch: evaluate.merged_stats(t.frozen, batch, graphdef=t.graphdef)  # noqa: E731
    model = nnx.merge(t.graphdef, t.frozen)
    scores = scorer(stats_fn, evaluate.Decoder(t.tok, t.config, model))
    return fit_router.Fitted(scores, scorer=scorer)

  return run


def best_single(t: fit_router.Task) -> fit_router.Fitted:
  """The single skill with the lowest answer loss on the fit part, scored."""
  S = len(t.skills)
  fit_batches = t.batches(t.fit_rows)
  losses = []
  for s in range(S):
    params = serving.merged_params(t.frozen, t.served, np.eye(S, dtype=np.float32)[s], t.scale)
    st = [evaluate.merged_stats(params, b, graphdef=t.graphdef) for b in fit_batches]
    st = jax.device_get(st)
    losses.append(evaluate.summarize(st)["loss"])
  best = int(np.argmin(losses))
  w = np.eye(S, dtype=np.float32)[best]
  out = fit_router.Fitted(t.score_merged(w), w)
  out.state["chosen"] = t.skills[best]
  return out


def majority(t: fit_router.Task) -> fit_router.Fitted:
  """No model: every scored row gets the most frequent answer of the fit rows of its own
  (source, skill): a label row the most frequent of its candidates (ties to the first
  candidate), a generated row the most frequent answer text (ties to the one the fit part
  lists first; on a task whose answers are all distinct, such as summaries, that is the
  first fit row's). Rows too long for max_len stay unanswered, as every model method leaves
  them. The floor a method must clear to show more than which label a task leans to."""
  counts: dict[tuple, collections.Counter] = {}
  for ex in t.fit_rows:
    counts.setdefault((ex.source, ex.skill), collections.Counter())[ex.answer] += 1
  plan, encoded = t.scorer.plan, t.scorer.encoded
  choice, texts = {}, {}
  for i, cs in plan.choices.items():
    if i in encoded:
      c = counts.get((plan.rows[i].source, plan.rows[i].skill), collections.Counter())
      best = max(cs, key=lambda a: c[a])
      choice[i] = np.asarray([0.0 if a == best else -1.0 for a in cs])
  for i in plan.generated:
    c = counts.get((plan.rows[i].source, plan.rows[i].skill))
    if i in encoded and c:
      texts[i] = c.most_common(1)[0][0]
  scorer = types.SimpleNamespace(plan=plan, last={"choice": choice, "texts": texts})
  return fit_router.Fitted(plan.finish(choice, texts), scorer=scorer)


def adalora_task(t: fit_router.Task) -> fit_router.Fitted:
  """A task-specific AdaLoRA adapter trained on the fit part with the budget of the GD
  router: router.steps forward/backward passes of router.batch_size rows (what a PEFT user
  would do instead of routing), merged into the kernels and scored."""
  return task_adapter.train_and_score(t)


def cmaes_k(k: int, seed: int) -> Callable:
  def run(t):
    rows = task.k_shot_rows(t.fit_rows, k, seed, t.config.task)
    return fit_router.fit_cmaes(t, rows, seed)

  return run


def method_table(names) -> dict[str, Callable]:
  """Method name -> run(Task). `base_k<k>`: in-context; `cmaes_k<k>`: CMA-ES on k fit rows,
  one cell per seed of cmaes.seeds (named `cmaes_k<k>_s<seed>`)."""
  out = {}
  fixed = {
    "base": fit_router.fixed(None),
    "best_single": best_single,
    "gd": fit_router.fit_gd,
    "cmaes": fit_router.fit_cmaes,
    "gate": fit_router.fit_gate,
    "adalora_task": adalora_task,
    "majority": majority,
  }
  for name in names:
    if name in fixed:
      out[name] = fixed[name]
    elif name == "uniform":
      out[name] = "uniform"  # needs S: resolved per task
    elif name.startswith("base_k") and name[6:].isdigit():
      out[name] = base_in_context(int(name[6:]))
    elif name.startswith("cmaes_k") and name[7:].isdigit():
      out[name] = ("cmaes_k", int(name[7:]))
    else:
      raise ConfigError(
        f"unknown method {name!r} in --config.methods: use base, base_k<k>, uniform, "
        "best_single, gd, cmaes, cmaes_k<k>, gate, adalora_task, majority"
      )
  return out


def cells_of(table: dict, seeds) -> list[tuple[str, str, Callable | None]]:
  """(cell name, method name, run) for every cell a task has."""
  out = []
  for name, run in table.items():
    if isinstance(run, tuple):
      out += [(f"{name}_s{s}", name, cmaes_k(run[1], int(s))) for s in seeds]
    else:
      out.append((name, name, run))
  return out


# ---- the stage ------------------------------------------------------------------------------
@dataclasses.dataclass
class Shared:
  """What every task of a run shares: the base, the skills in both layouts, the tokenizer."""

  config: object
  graphdef: object
  frozen: object
  served: dict
  packed_params: object
  packed: dict
  scale: float
  skills: tuple[str, ...]
  tok: object
  mesh: object
  fingerprint: dict  # the skills' (checkpoint.Skills.fingerprint): what the cells belong to


def with_prompting(config, stage1_serving: dict | None):
  """The config the rows are built with: stage 1's template and max_len (`prompting="stage1"`,
  the rows the skills saw), or the config's own (`"config"`, e.g. lm-eval's MCQA prompt)."""
  if config.prompting not in ("stage1", "config"):
    raise ConfigError(f"--config.prompting must be 'stage1' or 'config', not {config.prompting!r}")
  if config.prompting == "config":
    return config.copy_and_resolve_references()
  return fit_router.with_stage1_prompting(config, stage1_serving)


def load_shared(config, base, mesh) -> Shared:
  graphdef, frozen = nnx.split(base)
  skills = checkpoint.load_skills(config, base.cfg, mesh)
  config = with_prompting(config, skills.serving)
  served = serving.serving_stack(skills.stacked)
  packed_params, packed = serving.packed_params(frozen, served)
  tok = tokenizer.load_tokenizer(tokenizer.tokenizer_source(config.model))
  scale, names, fp = skills.scale, skills.names, skills.fingerprint()
  return Shared(
    config, graphdef, frozen, served, packed_params, packed, scale, names, tok, mesh, fp
  )


def make_scorer(t, rows) -> evaluate.TaskScorer:
  dp = t.mesh.shape["data"] * t.mesh.shape["fsdp"]
  put = lambda batch: batches.to_global(batch, t.mesh, per_process=False)  # noqa: E731
  return evaluate.TaskScorer(rows, t.fit_rows + list(rows), t.tok, t.config, put, dp)


def build_task(sh: Shared, spec: suite.TaskSpec, fit_rows, score_rows) -> fit_router.Task:
  config = sh.config.copy_and_resolve_references()
  with config.unlocked():
    config.task = spec.name
  t = fit_router.Task(
    config=config,
    graphdef=sh.graphdef,
    frozen=sh.frozen,
    served=sh.served,
    packed_params=sh.packed_params,
    packed=sh.packed,
    scale=sh.scale,
    skills=sh.skills,
    tok=sh.tok,
    mesh=sh.mesh,
    fit_rows=fit_rows,
    score_rows=score_rows,
    scorer=None,
  )
  t.scorer = make_scorer(t, score_rows)
  return t


def load_rows(config, specs, report: LoadReport) -> dict[str, tuple[list, list]]:
  """(fit rows, scored rows) per task. The split registry's sources load once, together."""
  out = {}
  for spec in specs:
    rows = suite.task_rows(spec, config.data, report)
    fit, scored = suite.split_rows(
      spec, rows, config.fit_fraction, config.max_fit_rows, config.max_scored_rows
    )
    if not fit or not scored:
      raise suite.SuiteError(
        f"task {spec.name!r}: {len(rows)} rows give {len(fit)} fit and {len(scored)} scored "
        "rows (check --config.data.data_dir and --config.fit_fraction)"
      )
    out[spec.name] = (fit, scored)
  return out


def run_cell(t, run) -> dict:
  start, cpu = time.perf_counter(), time.process_time()  # process time: every thread's
  out = run(t)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
  scorer = out.scorer or t.scorer
  oc = metrics.outcomes(scorer.plan, scorer.last["choice"], scorer.last["texts"])
  return {
    "scores": out.scores,
    "seconds": seconds,
    "cpu_seconds": cpu_seconds,
    "weights": None if out.weights is None else np.asarray(out.weights).tolist(),
    "chosen": out.state.get("chosen"),
    "outcomes": oc.to_json(),
    "predictions": evaluate.prediction_records("", scorer, t.score_rows),
  }


def train_and_evaluate(config, workdir: str | pathlib.Path, base=None) -> dict:
  """Evaluation stage entry point (see the module docstring); returns results.json's dict."""
  workdir = pathlib.Path(workdir)
  specs = [suite.resolve(e) for e in config.tasks]  # bad names fail before anything loads
  table = method_table(config.methods)
  if not config.get("skills_from") and config.get("restore_cells_from"):
    return from_archive(config, workdir, specs, table)
  suite_cells.check_cells_identity(workdir, config)
  src = suite_cells.reuse_source(config)
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  if base is None:
    rules = tuple(tuple(r) for r in config.mesh.rules)
    base = loading.load_model(
      config.model.source,
      numerics=numerics_from(config),
      mesh=mesh,
      rules=rules,
      seed=config.model.seed,
    )
  sh = load_shared(config, base, mesh)
  suite_cells.record_prompting(workdir, sh.config, src)
  suite_cells.record_skills(workdir, sh.fingerprint)
  archived = suite_cells.restore_source(config, sh.config, sh.fingerprint)
  report = LoadReport()
  rows = load_rows(sh.config, specs, report)
  cells = cells_of(table, sh.config.cmaes.seeds)
  # what this run will compute, for `inspect` on it while it runs (what is left, how long)
  plan = {"tasks": [spec.name for spec in specs], "cells": [cell for cell, _, _ in cells]}
  suite_cells.write_json(workdir / "plan.json", plan)
  todo = [
    (spec, cell, run)
    for spec in specs
    for cell, _, run in cells
    if not (workdir / "cells" / spec.name / f"{cell}.json").exists()
  ]
  # the restored and reused cells first, all of them: the bar and `inspect` on this workdir
  # then count only what is left to compute, not cells a later task would copy in seconds
  left = []
  for spec, cell, run in todo:
    scored = rows[spec.name][1]
    restored = cells_archive.restore(archived, spec.name, cell, scored) if archived else None
    copied = restored or (suite_cells.copy_cell(src, spec, cell, scored) if src else None)
    if copied is None:
      left.append((spec, cell, run))
    else:  # its seconds stay the source's: the cost of computing it
      # every cell with its rows' order and answer digests: what cells_archive publishes
      path = workdir / "cells" / spec.name / f"{cell}.json"
      suite_cells.write_json(path, cells_archive.with_digests(copied, scored))
  total = len(specs) * len(cells)
  bar = reporting.progress_bar(
    config.progress, total=total, initial=total - len(left), desc="eval", unit="cell"
  )
  built: dict[str, fit_router.Task] = {}
  with bar:
    for spec, cell, run in left:
      bar.set_postfix_str(f"{spec.name}/{cell}")
      scored = rows[spec.name][1]
      path = workdir / "cells" / spec.name / f"{cell}.json"
      if spec.name not in built:
        built.clear()  # one task's rows and scorer at a time
        built[spec.name] = build_task(sh, spec, *rows[spec.name])
      t = built[spec.name]
      if run == "uniform":
        S = len(sh.skills)
        run = fit_router.fixed(np.full(S, 1.0 / S, np.float32))
      suite_cells.write_json(path, cells_archive.with_digests(run_cell(t, run), scored))
      bar.update()
  done = suite_cells.read_cells(workdir, specs, cells)
  results = assemble(config, sh.skills, specs, cells, rows, done)
  write_outputs(workdir, results, done)
  return results


def from_archive(config, workdir: pathlib.Path, specs, table) -> dict:
  """No skills_from, an archive to restore from: the archive's table rebuilt from its cells
  and the user's copy of the data (the answers re-joined, each checked by its digest), with
  no model and no stage-1 checkpoint: published numbers checked, or compared with
  `python -m mdkif_jax.compare`, in a checkout that never trained the skills. Every cell must
  be in the archive; the skills are the archive's (skills.json), and so is stage 1's
  prompting (prompting.json; with prompting="config" it must equal the config's), its config
  must be this one (cells_identity.json). Everything is checked and re-joined before the
  workdir gets a file: a refused run leaves nothing behind."""
  src = pathlib.Path(config.restore_cells_from)
  where = f"--config.restore_cells_from={str(src)!r}"
  if config.get("reuse_cells_from"):
    raise ConfigError(
      f"{where} without --config.skills_from is the archive alone: drop "
      "--config.reuse_cells_from (its cells would be copied into a run that computes nothing)"
    )
  held = {}
  for name in ("prompting.json", "skills.json"):
    try:
      held[name] = json.loads((src / name).read_text())
    except (OSError, ValueError) as e:
      raise ConfigError(
        f"{where}: {src / name}: {getattr(e, 'strerror', None) or e} (without "
        "--config.skills_from the archive is all there is)"
      ) from None
  skills = held["skills.json"].get("skills") if isinstance(held["skills.json"], dict) else None
  if not (isinstance(skills, list) and skills and all(isinstance(n, str) for n in skills)):
    raise ConfigError(f"{where}: {src / 'skills.json'}: no list of skill names ('skills')")
  prompting = held["prompting.json"]
  if not (
    isinstance(prompting, dict)
    and isinstance(prompting.get("template"), dict)
    and isinstance(prompting.get("max_len"), int)
  ):
    raise ConfigError(f"{where}: {src / 'prompting.json'}: no 'template' object and 'max_len'")
  run_config = with_prompting(config, prompting if config.prompting == "stage1" else None)
  archived = suite_cells.restore_source(config, run_config, held["skills.json"])
  cells = cells_of(table, config.cmaes.seeds)
  todo = [
    (spec, cell)
    for spec in specs
    for cell, _, _ in cells
    if not (workdir / "cells" / spec.name / f"{cell}.json").exists()
  ]
  missing = [
    f"{s.name}/{c}" for s, c in todo if not (archived / "cells" / s.name / f"{c}.json").exists()
  ]
  if missing:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise ConfigError(
      f"{where} has no cell {', '.join(missing[:3])}{more}: computing a cell needs the skills "
      "(--config.skills_from), or drop it from --config.tasks / --config.methods"
    )
  rows = load_rows(run_config, specs, LoadReport())
  restored = {}
  for spec, cell in todo:  # every answer re-joined and checked before anything is written
    scored = rows[spec.name][1]
    restored[(spec.name, cell)] = cells_archive.with_digests(
      cells_archive.restore(archived, spec.name, cell, scored), scored
    )
  suite_cells.check_cells_identity(workdir, config)
  suite_cells.record_prompting(workdir, run_config, None)
  suite_cells.record_skills(workdir, held["skills.json"])
  for (task_name, cell), data in restored.items():
    suite_cells.write_json(workdir / "cells" / task_name / f"{cell}.json", data)
  done = suite_cells.read_cells(workdir, specs, cells)
  results = assemble(config, tuple(skills), specs, cells, rows, done)
  write_outputs(workdir, results, done)
  return results


# ---- assembling the table ---------------------------------------------------------------------
ROUTER = "gd"  # the method the references below are compared with, row by row
REFERENCES = ("uniform", "best_single", "adalora_task")  # what a router must beat or approach


def _estimate(out: metrics.Outcomes, idx: np.ndarray, name: str) -> stats.Estimate:
  return stats.bootstrap(lambda i: metrics.metric_on(name, out, i), out.n, idx)


def method_estimate(outs, idx: np.ndarray, name: str) -> tuple[stats.Estimate, list]:
  """A method's estimate from its cells' outcomes (one per seed): the seeds' scores and
  bootstrap values averaged, and each seed's own estimate."""
  ests = [_estimate(o, idx, name) for o in outs]
  boot = np.mean([e.boot for e in ests], axis=0)
  score = float(np.mean([e.score for e in ests]))
  return stats.Estimate(score, stats.interval(boot), outs[0].n, boot), ests


def assemble(config, skills: tuple[str, ...], specs, cells, rows, done: dict) -> dict:
  """results.json's dict from the cells on disk (see the issue's schema)."""
  res = {"model": config.model.source, "skills": list(skills), "tasks": {}, "tracks": {}}
  # the resamples behind every interval (python -m mdkif_jax.compare draws the same ones)
  res["bootstrap"] = {"resamples": config.bootstrap.resamples, "seed": config.bootstrap.seed}
  est_by_track: dict[str, dict[str, list]] = {}
  for spec in specs:
    fit, scored = rows[spec.name]
    headline = spec.metrics[0]
    idx = stats.resample_indices(len(scored), config.bootstrap.resamples, config.bootstrap.seed)
    per_method: dict[str, list] = {}
    for cell, method, _ in cells:
      per_method.setdefault(method, []).append((cell, done[(spec.name, cell)]))
    methods_out, estimates, gold = {}, {}, None
    for method, entries in per_method.items():
      outs = [metrics.Outcomes.from_json(d["outcomes"]) for _, d in entries]
      est, ests = method_estimate(outs, idx, headline)
      score = est.score
      estimates[method] = est
      gold = gold or metrics.lean(outs[:1], of="gold")  # the rows' own: any method's cell
      entry = {
        "score": score,
        "ci": list(est.ci),
        "n": len(scored),
        "seconds": float(sum(d["seconds"] for _, d in entries)),
        # absent for cells written before it was recorded
        **(
          {"cpu_seconds": float(sum(d["cpu_seconds"] for _, d in entries))}
          if all("cpu_seconds" in d for _, d in entries)
          else {}
        ),
        "metrics": {
          m: float(np.mean([metrics.metric_on(m, o, np.arange(o.n)) for o in outs]))
          for m in spec.metrics
        },
      }
      # the gold answer's mean token NLL on the scored rows (teacher-forced): whether a method
      # moves the answer's likelihood even where the chosen label stays the same
      if all("loss" in d["scores"] for _, d in entries):
        entry["answer_nll"] = float(np.mean([d["scores"]["loss"] for _, d in entries]))
      if (answers := metrics.lean(outs)) is not None:  # which label it leans to
        entry["lean"] = answers
      ws = [d.get("weights") for _, d in entries]
      if all(w is not None for w in ws):  # what it gives each skill (several seeds: the mean)
        entry["weights"] = dict(zip(skills, np.mean(ws, axis=0).tolist(), strict=True))
      if len(entries) > 1:  # several seeds: their spread
        entry["seeds"] = {c: e.score for (c, _), e in zip(entries, ests, strict=True)}
      if entries[0][1].get("chosen"):
        entry["chosen"] = entries[0][1]["chosen"]
      methods_out[method] = entry
    if "base" in estimates:
      for method, est in estimates.items():
        methods_out[method]["delta_vs_base"] = stats.paired_difference(est, estimates["base"])
    refs = [r for r in REFERENCES if r in estimates and ROUTER in estimates]
    if refs:  # the router minus each reference, on the same resamples (paired)
      methods_out[ROUTER]["delta_vs"] = {
        r: stats.paired_difference(estimates[ROUTER], estimates[r]) for r in refs
      }
    res["tasks"][spec.name] = {
      **({"gold_lean": gold} if gold else {}),
      "track": spec.track,
      "metric": headline,
      "n_fit": len(fit),
      "n_scored": len(scored),
      "methods": methods_out,
    }
    track = est_by_track.setdefault(spec.track, {})
    for method, est in estimates.items():
      track.setdefault(method, []).append((est, estimates.get("base")))
  for track, by_method in est_by_track.items():
    res["tracks"][track] = {}
    for method, pairs in by_method.items():
      if all(b is not None for _, b in pairs):
        ms, bs = [m for m, _ in pairs], [b for _, b in pairs]
        res["tracks"][track][method] = _summary(ms, bs)
    # the router's mean relative gain over each reference (over adalora_task: its score share
    # minus 1), for the tracks where every task scored both
    router = [m for m, _ in by_method.get(ROUTER, [])]
    for r in REFERENCES:
      ref = [m for m, _ in by_method.get(r, [])]
      if router and len(ref) == len(router):
        res.setdefault("router_vs", {}).setdefault(track, {})[r] = stats.relative_gain(router, ref)
  res["all_tasks"] = _all_tasks(est_by_track, len(specs))
  return res


def _summary(ms: list, bs: list) -> dict:
  """ms against bs over tasks (a track, or every task): the mean relative gain, the gain of
  the mean score and the mean Δ in metric points."""
  return {
    **stats.relative_gain(ms, bs),
    "gain_of_means": stats.gain_of_means(ms, bs),
    "mean_delta": stats.mean_difference(ms, bs),
  }


def _all_tasks(est_by_track: dict, n_tasks: int) -> dict:
  """Over every task of every track (the issue's bar, suite_report._bar_lines): the router
  against the base and against each reference, for the methods every task scored."""
  by_method: dict[str, list] = {}
  for by in est_by_track.values():
    for method, pairs in by.items():
      by_method.setdefault(method, []).extend(pairs)
  out: dict = {"tasks": n_tasks}
  router = by_method.get(ROUTER, [])
  if len(router) != n_tasks:
    return out
  ms = [m for m, _ in router]
  if all(b is not None for _, b in router):
    out[ROUTER] = _summary(ms, [b for _, b in router])
  for r in REFERENCES:
    if len(ref := by_method.get(r, [])) == n_tasks:
      out.setdefault("router_vs", {})[r] = _summary(ms, [m for m, _ in ref])
  return out


def write_outputs(workdir: pathlib.Path, results: dict, done: dict) -> None:
  if jax.process_index() != 0:
    return
  suite_cells.write_json(workdir / "results.json", results)
  reporting.write_lines(workdir / "results.md", suite_report.results_table(results))
  preds = [
    {**p, "method": cell, "task": task_name}
    for (task_name, cell), data in done.items()
    for p in data["predictions"]
  ]
  reporting.write_jsonl(workdir / "predictions.jsonl", preds)
  suite_report.plot_results(workdir / "results.png", results)
  suite_report.plot_suite_weights(workdir / "router_weights.png", results)
  print("\n".join(suite_report.results_table(results)))
