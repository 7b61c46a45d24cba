"""Stage 2: fit a skill router for one downstream task; the base and every skill stay frozen.

`train_and_evaluate(config, workdir)` (main.py, `config.stage == "router"`):
1. loads the stage-1 skills from `config.skills_from` (one or more stage-1 workdirs, stacked on
   the skill axis in the order given: a 13th skill trained later joins as one more workdir)
   and refuses a checkpoint trained on another base model;
2. takes the task's reserved examples from the split registry (`config.task` = a source, or
   `source:skill`), split by id hash into rows that fit the router and rows that score it;
3. fits the router: task-level weights by gradient descent, or by CMA-ES when fewer than
   `router.cmaes_threshold` examples fit it (`router.method="auto"`), or the input-conditioned
   gate; with `router.baselines` it also scores the base, each single skill, the uniform
   average, every router kind and CMA-ES on k examples for each k and seed;
4. scores each (task-level mixtures merged into the kernels: the zero-overhead serving path;
   the gate unmerged), saves the router with Orbax, writes metrics.jsonl and router_weights.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mdkif_jax import adapters, checkpoint, data, loading, reporting, router, sharding, tokenizer
from mdkif_jax import train as train_lib
from mdkif_jax.data import pipeline, splits
from mdkif_jax.data.tokenize import encode_many, pad_row

log = logging.getLogger(__name__)


class SkillsMismatchError(checkpoint.CheckpointMismatchError):
  """A skills checkpoint that belongs to another base model (or is missing)."""


class TaskError(ValueError):
  """An unknown downstream task, a task without reserved data, or k larger than the data."""


# ---- the skills ----------------------------------------------------------------------------
def model_identity(cfg) -> dict:
  """The base model's identity as stage 1 records it (train.run_meta's "model")."""
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def _read_meta(mngr, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load_one(workdir, base_cfg, mesh, step=None, lora_alpha=8.0, convention="peft"):
  """(adapters [S, ...], meta, scale) of one stage-1 run, checked against this base."""
  ckpt = pathlib.Path(workdir) / "checkpoints"
  latest = None
  if ckpt.is_dir():
    mngr = checkpoint.manager(ckpt, keep=1, async_save=False)
    latest = mngr.latest_step() if step is None else step
  if latest is None:
    raise SkillsMismatchError(
      f"skills_from={str(workdir)!r}: no stage-1 checkpoint in {ckpt} (run stage 1 with "
      f"--workdir={workdir} first)"
    )
  meta = _read_meta(mngr, latest)
  want = model_identity(base_cfg)
  if meta.get("model") != want:
    diff = sorted(k for k in set(want) | set(meta.get("model") or {})
                  if (meta.get("model") or {}).get(k) != want.get(k))  # fmt: skip
    raise SkillsMismatchError(
      f"{ckpt / str(latest)}: these skills were trained on another base model (differs in "
      f"{', '.join(diff)}; checkpoint: "
      + ", ".join(f"{k}={(meta.get('model') or {}).get(k)}" for k in diff[:4])
      + "; this run: "
      + ", ".join(f"{k}={want.get(k)}" for k in diff[:4])
      + "). Set --config.model.source to the stage-1 base, or retrain the skills on this one."
    )
  S, r, L = len(meta["skills"]), int(meta["init_r"]), base_cfg.num_hidden_layers
  dims = base_cfg.projection_dims()
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  f32 = jnp.float32
  abstract = {
    t: {
      "A": jax.ShapeDtypeStruct((S, L, r, dims[t][0]), f32, sharding=rep),
      "E": jax.ShapeDtypeStruct((S, L, r), f32, sharding=rep),
      "B": jax.ShapeDtypeStruct((S, L, dims[t][1], r), f32, sharding=rep),
    }
    for t in meta["targets"]
  }
  restored = mngr.restore(latest, args=ocp.args.Composite(
    state=ocp.args.PyTreeRestore({"adapters": abstract}, partial_restore=True)))  # fmt: skip
  scale = meta.get("scale", adapters.adapter_scale(lora_alpha, r, convention))
  return restored["state"]["adapters"], meta, float(scale)


def load_skills(config, base_cfg, mesh) -> tuple[dict, tuple[str, ...], float]:
  """(stacked adapters, skill names, scale) from every workdir in `config.skills_from`."""
  dirs = [d.strip() for d in (config.skills_from or "").split(",") if d.strip()]
  if not dirs:
    raise SkillsMismatchError("config.skills_from is not set: give the stage-1 workdir(s)")
  runs = [
    load_one(d, base_cfg, mesh, config.skills_step if len(dirs) == 1 else None,
             config.adalora.lora_alpha, config.adalora.scale_convention)
    for d in dirs
  ]  # fmt: skip
  names = [s for _, meta, _ in runs for s in meta["skills"]]
  if len(set(names)) != len(names):
    raise SkillsMismatchError(f"skills_from={config.skills_from!r} names a skill twice: {names}")
  scale = runs[0][2]
  stacked = None
  for ad, _, s in runs:
    if s != scale:  # fold a different scale into B so one scale serves the whole stack
      ad = {t: {**leaf, "B": leaf["B"] * (s / scale)} for t, leaf in ad.items()}
    stacked = ad if stacked is None else router.add_skills(stacked, ad)
  return stacked, tuple(names), scale


# ---- the task's data -----------------------------------------------------------------------
def task_names() -> list[str]:
  """Sources that can hold reserved (downstream) rows; a task is one, or `source:skill`."""
  return sorted({src for (src, _), rule in splits.SPLITS.items() if rule.role != splits.TRAIN})


def parse_task(task: str) -> tuple[str, str | None]:
  source, _, skill = (task or "").partition(":")
  if source not in task_names() or (skill and skill not in data.SKILLS):
    raise TaskError(
      f"unknown task {task!r}: use a source with reserved rows ({', '.join(task_names())}), "
      f"optionally ':skill' with a skill from {', '.join(data.SKILLS)}"
    )
  return source, skill or None


def task_examples(config) -> tuple[list, list]:
  """(rows that fit the router, rows that score it): the task's reserved examples, split by
  a hash of their id (the same split on every run and machine)."""
  source, skill = parse_task(config.task)
  rows = [
    ex for ex in data.load_examples(config.data, "eval")
    if ex.source == source and (skill is None or ex.skill == skill)
  ]  # fmt: skip
  if not rows:
    raise TaskError(
      f"task {config.task!r} has no reserved examples with data_dir={config.data.data_dir} "
      f"(sources={config.data.sources!r}, skills={config.data.skills!r})"
    )
  held = [splits.hash_unit("router/" + source, ex.id) < config.eval_fraction for ex in rows]
  fit = [ex for ex, h in zip(rows, held, strict=True) if not h]
  score = [ex for ex, h in zip(rows, held, strict=True) if h]
  if config.max_fit_examples:
    fit = fit[: config.max_fit_examples]
  if config.max_eval_examples:
    score = score[: config.max_eval_examples]
  if not fit or not score:
    raise TaskError(
      f"task {config.task!r}: {len(rows)} reserved examples give {len(fit)} to fit and "
      f"{len(score)} to score the router; change eval_fraction"
    )
  return fit, score


def prepare(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A padded batch (tokens, targets, loss_mask, positions, attention_mask) -> the router's:
  answer positions (train.answer_index) and the prompt mask the gate pools over."""
  lm = batch["loss_mask"] > 0
  idx, valid = train_lib.answer_index(batch["loss_mask"])
  prompt = ((np.cumsum(lm, 1) - lm) == 0) & (batch["attention_mask"] > 0)
  keys = ("tokens", "targets", "positions", "attention_mask")
  return {**{k: batch[k] for k in keys}, "answer_idx": idx, "answer_valid": valid,
          "prompt_mask": prompt.astype(np.float32)}  # fmt: skip


def make_batches(examples, tok, data_cfg, batch_size: int, multiple: int = 1) -> list[dict]:
  """Every example once, in order, `batch_size` rows a batch (rounded up to `multiple`, the
  data-parallel device count; filler rows have no answer tokens), padded to a bucket."""
  enc = [e for e in encode_many(examples, tok, data.Template.from_config(data_cfg.template),
                                int(data_cfg.max_len)) if e is not None]  # fmt: skip
  if not enc:
    raise TaskError("no task example fits data.max_len")
  buckets = pipeline.resolve_buckets(data_cfg.buckets, int(data_cfg.max_len))
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  size = -(-batch_size // multiple) * multiple
  out = []
  for i in range(0, len(enc), batch_size):
    part = enc[i : i + batch_size]
    length = next(b for b in buckets if b >= max(len(e.tokens) for e in part))
    rows = [pad_row(e, length, pad_id) for e in part]
    rows += [{**rows[0], "loss_mask": np.zeros(length, np.float32)}] * (size - len(rows))
    out.append(prepare({k: np.stack([r[k] for r in rows]) for k in rows[0]}))
  return out


def to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """The same full batch on every host -> global arrays sharded over the batch axes."""
  out = {}
  for k, v in batch.items():
    sh = sharding.named_sharding(mesh, ("batch", "length")[: v.ndim], v.shape)
    out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
  return out


# ---- scoring -------------------------------------------------------------------------------
def summarize(stats: list[dict]) -> dict[str, float]:
  tot = {k: float(sum(np.sum(np.asarray(s[k])) for s in stats)) for k in stats[0]}
  rows = float(sum(np.sum(np.asarray(s["tokens"]) > 0) for s in stats))
  return {"loss": tot["nll"] / max(tot["tokens"], 1.0),
          "token_acc": tot["correct"] / max(tot["tokens"], 1.0),
          "exact": tot["exact"] / max(rows, 1.0)}  # fmt: skip


def make_scorer(graphdef, frozen, stacked, scale, batches):
  """score(w_S or None) over `batches` through the merged kernels (the serving path)."""
  plain = jax.jit(lambda params, batch: router.mixture_stats(graphdef, params, None, scale, batch))

  def score(w_S=None) -> dict[str, float]:
    params = frozen if w_S is None else router.merged_params(frozen, stacked, w_S, scale)
    return summarize([plain(params, b) for b in batches])

  return score


# ---- the run -------------------------------------------------------------------------------
def task_fit(config, seed: int | None = None, cmaes: bool = False) -> router.TaskFit:
  r, c = config.router, config.cmaes
  return router.TaskFit(
    parametrisation=c.parametrisation if cmaes else r.parametrisation, regulariser=r.regulariser,
    reg_weight=r.reg_weight, steps=r.steps, learning_rate=r.learning_rate,
    population=c.population, generations=c.generations, sigma0=c.sigma0,
    bounds=tuple(c.bounds), seed=r.seed if seed is None else seed,
  )  # fmt: skip


def choose_method(config, n_fit: int) -> str:
  m = config.router.method
  if m == "auto":
    return "cmaes" if n_fit < config.router.cmaes_threshold else "gd"
  if m not in ("gd", "cmaes", "gate"):
    raise ValueError(f"router.method must be auto | gd | cmaes | gate, got {m!r}")
  return m


def k_shot_rows(pool: list, k: int, seed: int, task: str) -> list:
  if k > len(pool):
    raise TaskError(
      f"cmaes.k_shots asks for k={k} examples but task {task!r} has only {len(pool)} rows to "
      "fit the router; lower k or eval_fraction"
    )
  return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:k]]


def train_and_evaluate(config, workdir: str | pathlib.Path, base=None) -> dict:
  """Stage 2 entry point (see the module docstring); returns scores and weights (for tests)."""
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rules = tuple(tuple(r) for r in config.mesh.rules)
  source, _ = parse_task(config.task)  # bad config fails before anything loads
  choose_method(config, 0)
  if base is None:
    base = loading.load_model(config.model.source, numerics=train_lib._numerics(config),
                              mesh=mesh, rules=rules, seed=config.model.seed)  # fmt: skip
  graphdef, frozen = nnx.split(base)
  stacked, skills, scale = load_skills(config, base.cfg, mesh)
  tok = tokenizer.load_tokenizer(config.model.tokenizer or config.model.source)
  fit_rows, score_rows = task_examples(config)
  method = choose_method(config, len(fit_rows))
  if config.router.baselines:  # k larger than the data: fail before any fitting
    for k in config.cmaes.k_shots:
      k_shot_rows(fit_rows, int(k), 0, config.task)
  log.info("stage 2: task %s, %d skills, %d fit / %d scored rows, router %s", config.task,
           len(skills), len(fit_rows), len(score_rows), method)  # fmt: skip
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  bs = int(config.router.batch_size)

  def batches(rows, size=bs):
    return [to_device(b, mesh) for b in make_batches(rows, tok, config.data, size, dp)]

  fit_b, score_b = batches(fit_rows), batches(score_rows)
  score = make_scorer(graphdef, frozen, stacked, scale, score_b)
  S = len(skills)
  results: dict[str, dict] = {}
  weights: dict[str, np.ndarray] = {}
  history: dict[str, list[float]] = {}
  state: dict = {}

  def task_level(name, theta, curve, fit):
    w = np.asarray(router.task_weights(theta, fit.parametrisation))
    weights[name], history[name] = w, curve
    results[name] = score(w)
    return theta

  def run(kind: str, primary: bool):
    if kind == "gd":
      fit = task_fit(config)
      theta, curve = router.fit_task_gd(graphdef, frozen, stacked, scale, fit_b, fit)
      theta = task_level("gd", theta, curve, fit)
    elif kind == "cmaes":
      fit = task_fit(config, cmaes=True)
      one = batches(fit_rows, size=len(fit_rows))[0]
      theta, curve = router.fit_task_cmaes(graphdef, frozen, stacked, scale, one, fit)
      theta = task_level("cmaes", theta, curve, fit)
    else:
      g = config.gate
      gate, curve = router.fit_gate(graphdef, frozen, stacked, scale, fit_b, hidden=g.hidden,
                                    top_k=g.top_k, steps=g.steps, learning_rate=g.learning_rate,
                                    seed=config.router.seed)  # fmt: skip
      out = [router.gate_stats(gate, graphdef, frozen, stacked, scale, b) for b in score_b]
      results["gate"] = summarize([o[0] for o in out])
      rows = np.concatenate([np.asarray(w)[np.asarray(s["tokens"]) > 0] for s, w in out])
      weights["gate"], history["gate"] = rows.mean(0), curve
      if primary:
        state["gate"] = nnx.to_pure_dict(nnx.split(gate)[1])
      return
    if primary:
      state["theta"] = np.asarray(theta)

  run(method, primary=True)
  if config.router.baselines:
    results["base"] = score(None)
    for i, s in enumerate(skills):
      results[f"skill_{s}"] = score(np.eye(S, dtype=np.float32)[i])
    results["uniform"] = score(np.full(S, 1.0 / S, np.float32))
    for kind in ("gd", "cmaes", "gate"):
      if kind != method:
        run(kind, primary=False)
    for k in config.cmaes.k_shots:
      for seed in config.cmaes.seeds:
        fit = task_fit(config, seed=seed, cmaes=True)
        rows = k_shot_rows(fit_rows, int(k), seed, config.task)
        one = batches(rows, size=len(rows))[0]
        theta, curve = router.fit_task_cmaes(graphdef, frozen, stacked, scale, one, fit)
        task_level(f"cmaes_k{k}_s{seed}", theta, curve, fit)

  state["weights"] = np.asarray(weights[method], np.float32)
  meta = {"model": model_identity(base.cfg), "skills": list(skills), "task": config.task,
          "method": method, "parametrisation": config.router.parametrisation,
          "gate_hidden": config.gate.hidden, "gate_top_k": config.gate.top_k,
          "scale": scale}  # fmt: skip
  save_router(workdir, state, meta, {"fit_rows": len(fit_rows), "score_rows": len(score_rows)})
  write_report(workdir, config, skills, method, results, weights, history)
  return {"method": method, "skills": skills, "results": results, "weights": weights,
          "history": history, "fit_rows": len(fit_rows), "score_rows": len(score_rows),
          "source": source}  # fmt: skip


def save_router(workdir: pathlib.Path, state: dict, meta: dict, data_state: dict) -> None:
  """One Orbax checkpoint (step 0) of the router; a rerun replaces it, a foreign one is kept."""
  mngr = checkpoint.manager(workdir / "checkpoints", keep=1, async_save=False)
  for step in mngr.all_steps():
    checkpoint.check_meta(_read_meta(mngr, step), meta, str(workdir / "checkpoints" / str(step)))
    mngr.delete(step)
  checkpoint.save(mngr, 0, jax.tree.map(np.asarray, state), data_state, meta)  # every process
  mngr.wait_until_finished()
  mngr.close()


def load_router(workdir: str | pathlib.Path) -> tuple[dict, dict]:
  """(state, meta) of a saved router: {"weights": w_S, "theta"?: ..., "gate"?: pure dict}."""
  mngr = checkpoint.manager(pathlib.Path(workdir) / "checkpoints", keep=1, async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no router checkpoint in {pathlib.Path(workdir) / 'checkpoints'}")
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                   meta=ocp.args.JsonRestore()))  # fmt: skip
  return out["state"], out["meta"]


def write_report(workdir, config, skills, method, results, weights, history) -> None:
  """metrics.jsonl (one row per scored method + fit curves) and router_weights.png."""
  writer = reporting.MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=-1)
  longest = max((len(h) for h in history.values()), default=0)
  for i in range(0, longest, max(1, longest // 50)):
    writer.write(i + 1, {f"fit/{k}": v[i] for k, v in history.items() if i < len(v)})
  rec = {f"eval/{m}/{k}": v for m, r in results.items() for k, v in r.items()}
  rec.update({f"weights/{m}/{s}": float(w[i]) for m, w in weights.items()
              for i, s in enumerate(skills)})  # fmt: skip
  writer.write(longest + 1, rec)
  writer.close()
  if jax.process_index() == 0:
    lines = [f"  {m:22s} loss {r['loss']:7.3f}  token_acc {r['token_acc']:.3f}  exact "
             f"{r['exact']:.3f}" for m, r in results.items()]  # fmt: skip
    print(f"stage 2 on {config.task} (router: {method}):\n" + "\n".join(lines))
    if config.plot:
      plot_weights(workdir / "router_weights.png", list(skills), weights, config.task)


def plot_weights(path, skills: list[str], weights: dict[str, np.ndarray], task: str) -> None:
  """Grouped bars: the weight each router gives each skill (the gate: mean over scored rows)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(weights)
  S, M = len(skills), len(names)
  fig, ax = plt.subplots(figsize=(2 + 0.5 * S * max(1, M / 3), 3.5), constrained_layout=True)
  width = 0.8 / max(M, 1)
  for j, m in enumerate(names):
    label = f"{m} (mean over rows)" if m == "gate" else m
    ax.bar(np.arange(S) + (j - (M - 1) / 2) * width, weights[m], width, label=label)
  ax.axhline(0, color="k", lw=0.5)
  ax.set_xticks(range(S), skills, rotation=45)
  ax.set_ylabel("weight")
  ax.set_title(f"router weights per skill, task {task}")
  ax.legend(fontsize=7, ncol=max(1, M // 6))
  fig.savefig(path, dpi=110)
  plt.close(fig)
