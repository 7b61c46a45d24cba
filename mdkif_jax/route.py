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
   the gate unmerged, in the packed layout of `router.packed_params`, which the fitting uses
   too) by answer NLL, token accuracy, teacher-forced exact match and the task's standard
   metric (`TaskScorer`, metrics.py: accuracy + macro-F1 over candidate log-likelihoods for
   label tasks, ROUGE of greedy generations for summaries and dialogue),
   saves the router with Orbax, writes metrics.jsonl, router_weights.png and predictions.jsonl
   (every method's chosen candidate or generated text per scored row, beside the answer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mdkif_jax import (
  adapters,
  checkpoint,
  data,
  generate,
  loading,
  metrics,
  reporting,
  router,
  sharding,
  skill_batches,
  tokenizer,
)
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
  answer positions per row ([B, N]: skill_batches.answer_index with one group per row, as
  router.answer_stats gathers them) and the prompt mask the gate pools over."""
  lm = batch["loss_mask"] > 0
  idx, valid = skill_batches.answer_index(batch["loss_mask"], groups=len(lm))
  prompt = ((np.cumsum(lm, 1) - lm) == 0) & (batch["attention_mask"] > 0)
  keys = ("tokens", "targets", "positions", "attention_mask")
  return {**{k: batch[k] for k in keys}, "answer_idx": idx, "answer_valid": valid,
          "prompt_mask": prompt.astype(np.float32)}  # fmt: skip


def encode_rows(examples, tok, data_cfg) -> list:
  """Each example's `Encoded` (None when it cannot fit data.max_len), in order."""
  template = data.Template.from_config(data_cfg.template)
  return encode_many(examples, tok, template, int(data_cfg.max_len))


def pack(enc: list, tok, data_cfg, batch_size: int, multiple: int = 1, by_length: bool = False,
         drop_eos: bool = False) -> list[tuple[np.ndarray, dict]]:  # fmt: skip
  """(row indices into `enc`, prepared batch) pairs: every encoded row once, `batch_size` rows
  a batch (rounded up to `multiple`, the data-parallel device count; filler rows have index -1
  and no answer tokens), padded to a bucket. `by_length` orders rows by length first (less
  padding); `drop_eos` leaves the final end-of-turn token out of the answer (candidate scoring)."""
  keep = [i for i, e in enumerate(enc) if e is not None]
  if not keep:
    raise TaskError("no task example fits data.max_len")
  if by_length:
    keep.sort(key=lambda i: len(enc[i].tokens))
  buckets = pipeline.resolve_buckets(data_cfg.buckets, int(data_cfg.max_len))
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  size = -(-batch_size // multiple) * multiple
  out = []
  for start in range(0, len(keep), batch_size):
    part = keep[start : start + batch_size]
    length = next(b for b in buckets if b >= max(len(enc[i].tokens) for i in part))
    rows = [pad_row(enc[i], length, pad_id) for i in part]
    if drop_eos:
      for r in rows:
        r["loss_mask"][np.flatnonzero(r["loss_mask"])[-1]] = 0.0
    rows += [{**rows[0], "loss_mask": np.zeros(length, np.float32)}] * (size - len(rows))
    idx = np.asarray(part + [-1] * (size - len(part)), np.int64)
    out.append((idx, prepare({k: np.stack([r[k] for r in rows]) for k in rows[0]})))
  return out


def make_batches(examples, tok, data_cfg, batch_size: int, multiple: int = 1) -> list[dict]:
  """Every example once, in order, `batch_size` rows a batch (see `pack`)."""
  enc = encode_rows(examples, tok, data_cfg)
  return [b for _, b in pack(enc, tok, data_cfg, batch_size, multiple)]


def to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """The same full batch on every host -> global arrays sharded over the batch axes."""
  out = {}
  for k, v in batch.items():
    sh = sharding.named_sharding(mesh, ("batch", "length")[: v.ndim], v.shape)
    out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
  return out


# ---- scoring -------------------------------------------------------------------------------
STAT_KEYS = ("nll", "tokens", "correct", "exact")


def summarize(stats: list[dict]) -> dict[str, float]:
  tot = {k: float(sum(np.sum(np.asarray(s[k])) for s in stats)) for k in STAT_KEYS}
  rows = float(sum(np.sum(np.asarray(s["tokens"]) > 0) for s in stats))
  return {"loss": tot["nll"] / max(tot["tokens"], 1.0),
          "token_acc": tot["correct"] / max(tot["tokens"], 1.0),
          "exact": tot["exact"] / max(rows, 1.0)}  # fmt: skip


def scored_stats(graphdef, params, stacked, scale, batch, weights_BS=None):
  """router.mixture_stats, plus `choice_logp` [B, C] when the batch carries `choice_ids`:
  log p(candidate token | prompt) at the first answer position, from the same forward (label
  tasks whose candidates are one token each cost no extra pass)."""
  model, h = router.mixture_hidden(graphdef, params, stacked, scale, batch, weights_BS)
  stats = router.answer_stats(model, h, batch)
  if "choice_ids" in batch:
    first = jnp.take_along_axis(h, batch["answer_idx"][:, :1, None], axis=1)
    logp = jax.nn.log_softmax(model.logits(first)[:, 0].astype(jnp.float32), axis=-1)
    stats["choice_logp"] = jnp.take_along_axis(logp, batch["choice_ids"], axis=1)
  return stats


_merged_stats = jax.jit(
  lambda params, batch, *, graphdef: scored_stats(graphdef, params, None, 1.0, batch),
  static_argnames=("graphdef",),
)


@functools.partial(jax.jit, static_argnames=("gate_def", "graphdef", "scale"))
def _gate_stats(params, frozen, stacked, batch, *, gate_def, graphdef, scale):
  w_BS = nnx.merge(gate_def, params)(router.pooled_prompt(graphdef, frozen, batch))
  return {**scored_stats(graphdef, frozen, stacked, scale, batch, w_BS), "weights": w_BS}


class TaskScorer:
  """Scores one method on the task's scored rows: answer NLL, token accuracy, teacher-forced
  exact match and the task's standard metric (metrics.py).

  Rows are batched by length (less padding). Label rows: when every candidate is one token,
  their log-likelihoods come from the gold pass itself (`choice_ids`); otherwise each
  (row, candidate) is one more row through the same jitted forward. Generated rows: greedy
  decoding of up to `gen.max_new_tokens` tokens (generate.py), `gen.batch_size` prompts a
  call, sorted by length and padded to full batches so each prompt bucket compiles once.
  """

  def __init__(self, rows, task_rows, tok, config, put, multiple: int = 1, one_token_fast=True):
    self.plan = metrics.plan(rows, task_rows, config.metric)
    self.tok, self.config = tok, config
    bs, dcfg = int(config.router.batch_size), config.data
    enc = encode_rows(rows, tok, dcfg)
    eos = tok.eos_token or ""
    fast, slow = {}, []
    for i, cands in self.plan.choices.items():
      ids = [tok(c + eos, add_special_tokens=False)["input_ids"] for c in cands]
      ids = [x[:-1] if eos and x and x[-1] == tok.eos_token_id else x for x in ids]
      if one_token_fast and all(len(x) == 1 for x in ids) and len({x[0] for x in ids}) == len(ids):
        fast[i] = [x[0] for x in ids]
      else:
        slow += [(i, j) for j in range(len(cands))]
    width = max((len(v) for v in fast.values()), default=0)
    self.fast, self.gold = fast, []
    for idx, batch in pack(enc, tok, dcfg, bs, multiple, by_length=True):
      if width:
        batch["choice_ids"] = np.zeros((len(idx), width), np.int32)
        for r, i in enumerate(idx):
          batch["choice_ids"][r, : len(fast.get(i, ()))] = fast.get(i, ())
      self.gold.append((idx, put(batch)))
    self.slow, self.expanded = slow, []
    if slow:
      cand = [dataclasses.replace(rows[i], answer=self.plan.choices[i][j]) for i, j in slow]
      cenc = encode_rows(cand, tok, dcfg)
      packed = pack(cenc, tok, dcfg, bs, multiple, by_length=True, drop_eos=bool(eos))
      self.expanded = [(idx, put(b)) for idx, b in packed]
    gen = sorted((i for i in self.plan.generated if enc[i] is not None),
                 key=lambda i: enc[i].answer_start)  # fmt: skip
    self.prompts = {i: enc[i].tokens[: enc[i].answer_start].tolist() for i in gen}

  def __call__(self, stats_fn, generate_fn=None) -> dict[str, float]:
    """stats_fn(batch) -> per-row stats (scored_stats; "weights" [B, S] for the gate);
    generate_fn(prompts, rows, weights) -> new token lists (None: no generated rows)."""
    gold, choice, weights = [], {}, {}
    for idx, batch in self.gold:
      st = jax.device_get(stats_fn(batch))
      gold.append(st)
      for r, i in enumerate(idx):
        if i < 0:
          continue
        if i in self.fast:
          choice[i] = st["choice_logp"][r, : len(self.fast[i])]
        if "weights" in st:
          weights[i] = st["weights"][r]
    out = summarize(gold)
    for idx, batch in self.expanded:
      st = jax.device_get(stats_fn(batch))
      for r, k in enumerate(idx):
        if k >= 0:
          i, j = self.slow[k]
          choice.setdefault(i, np.full(len(self.plan.choices[i]), -np.inf))[j] = -st["nll"][r]
    texts = {}
    if self.prompts and generate_fn is not None:
      order, size = list(self.prompts), int(self.config.gen.batch_size)
      for s in range(0, len(order), size):
        part = order[s : s + size]
        full = part + [part[-1]] * (size - len(part))  # one shape per prompt bucket
        w = np.stack([weights[i] for i in full]) if weights else None
        new = generate_fn([self.prompts[i] for i in full], full, w)
        for i, ids in zip(part, new, strict=False):
          texts[i] = self.tok.decode(ids, skip_special_tokens=True).strip()
    out.update(self.plan.finish(choice, texts))
    # per scored row: candidate log-likelihoods, generated text, the gate's mixture
    self.last = {"choice": choice, "texts": texts, "weights": weights}
    return out


def generator(tok, config, model, stacked=None, scale=1.0):
  """generate_fn for TaskScorer: greedy decoding with `model` (merged kernels), or with the
  unmerged skills mixed per row by the given weights (the gate)."""
  eos = tuple(sorted({*model.cfg.eos_token_ids, *([tok.eos_token_id] if tok.eos_token else [])}))
  pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]

  def run(prompts, rows, weights_BS):
    kw = {}
    if weights_BS is not None:
      kw = dict(adapters=stacked, adapter_ctx=adapters.AdapterCtx(scale, weights=weights_BS))
    return generate.generate(model, prompts, max_new_tokens=int(config.gen.max_new_tokens),
                             eos_ids=eos, pad_id=pad, **kw)  # fmt: skip

  return run


def make_scorer(graphdef, frozen, stacked, scale, scorer: TaskScorer, tok, config):
  """score(w_S or None) through the merged kernels (the serving path): W0 + Σ w_s ΔW_s."""

  def score(w_S=None) -> dict[str, float]:
    params = frozen if w_S is None else router.merged_params(frozen, stacked, w_S, scale)
    model = nnx.merge(graphdef, params)
    return scorer(functools.partial(_merged_stats, params, graphdef=graphdef),
                  generator(tok, config, model))  # fmt: skip

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
  metrics.check_metric(config.metric)
  if base is None:
    base = loading.load_model(config.model.source, numerics=train_lib._numerics(config),
                              mesh=mesh, rules=rules, seed=config.model.seed)  # fmt: skip
  graphdef, frozen = nnx.split(base)
  stacked, skills, scale = load_skills(config, base.cfg, mesh)
  # Stage 2's layout, built once: every skill's kept ranks side by side (adapters.serving_stack)
  stacked = adapters.serving_stack(stacked)
  log.info("stage 2: served ranks per target %s",
           {t: int(leaf["route"].shape[1]) for t, leaf in stacked.items()})  # fmt: skip
  # The unmerged paths (fitting, the gate) run packed: B stacked under W in a copy of the
  # adapted kernels (router.packed_params), the up-products inside the base GEMMs; merged
  # scoring and the base keep the plain kernels.
  pfrozen, packed = router.packed_params(frozen, stacked)
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

  def put(batch):
    return to_device(batch, mesh)

  fit_b = batches(fit_rows)
  scorer = TaskScorer(score_rows, fit_rows + score_rows, tok, config, put, dp)
  score = make_scorer(graphdef, frozen, stacked, scale, scorer, tok, config)
  S = len(skills)
  results: dict[str, dict] = {}
  weights: dict[str, np.ndarray] = {}
  history: dict[str, list[float]] = {}
  state: dict = {}

  clock = [time.perf_counter()]
  predictions: list[dict] = []

  def done(name, res):  # each method's seconds (its fit, if any, and its scoring)
    now = time.perf_counter()
    results[name] = {**res, "seconds": now - clock[0]}
    predictions.extend(prediction_records(name, scorer, score_rows))
    clock[0] = now
    log.info("stage 2: %s done in %.1f s", name, results[name]["seconds"])

  def task_level(name, theta, curve, fit):
    w = np.asarray(router.task_weights(theta, fit.parametrisation))
    weights[name], history[name] = w, curve
    done(name, score(w))
    return theta

  def run(kind: str, primary: bool):
    if kind == "gd":
      fit = task_fit(config)
      theta, curve = router.fit_task_gd(graphdef, pfrozen, packed, scale, fit_b, fit)
      theta = task_level("gd", theta, curve, fit)
    elif kind == "cmaes":
      fit = task_fit(config, cmaes=True)
      one = batches(fit_rows, size=len(fit_rows))[0]
      theta, curve = router.fit_task_cmaes(graphdef, pfrozen, packed, scale, one, fit)
      theta = task_level("cmaes", theta, curve, fit)
    else:
      g = config.gate
      gate, curve = router.fit_gate(graphdef, pfrozen, packed, scale, fit_b, hidden=g.hidden,
                                    top_k=g.top_k, steps=g.steps, learning_rate=g.learning_rate,
                                    seed=config.router.seed)  # fmt: skip
      gate_def, params = nnx.split(gate)
      stats = functools.partial(_gate_stats, params, pfrozen, packed, gate_def=gate_def,
                                graphdef=graphdef, scale=scale)  # fmt: skip
      model = nnx.merge(graphdef, pfrozen)
      done("gate", scorer(stats, generator(tok, config, model, packed, scale)))
      weights["gate"], history["gate"] = np.mean(list(scorer.last["weights"].values()), 0), curve
      if primary:
        state["gate"] = nnx.to_pure_dict(nnx.split(gate)[1])
      return
    if primary:
      state["theta"] = np.asarray(theta)

  run(method, primary=True)
  if config.router.baselines:
    clock[0] = time.perf_counter()
    done("base", score(None))
    for i, s in enumerate(skills):
      done(f"skill_{s}", score(np.eye(S, dtype=np.float32)[i]))
    done("uniform", score(np.full(S, 1.0 / S, np.float32)))
    for kind in ("gd", "cmaes", "gate"):
      if kind != method:
        run(kind, primary=False)
    for k in config.cmaes.k_shots:
      for seed in config.cmaes.seeds:
        clock[0] = time.perf_counter()
        fit = task_fit(config, seed=seed, cmaes=True)
        rows = k_shot_rows(fit_rows, int(k), seed, config.task)
        one = batches(rows, size=len(rows))[0]
        theta, curve = router.fit_task_cmaes(graphdef, pfrozen, packed, scale, one, fit)
        task_level(f"cmaes_k{k}_s{seed}", theta, curve, fit)

  state["weights"] = np.asarray(weights[method], np.float32)
  meta = {"model": model_identity(base.cfg), "skills": list(skills), "task": config.task,
          "method": method, "parametrisation": config.router.parametrisation,
          "gate_hidden": config.gate.hidden, "gate_top_k": config.gate.top_k,
          "scale": scale}  # fmt: skip
  save_router(workdir, state, meta, {"fit_rows": len(fit_rows), "score_rows": len(score_rows)})
  write_report(workdir, config, skills, method, results, weights, history)
  if jax.process_index() == 0:
    reporting.write_jsonl(workdir / "predictions.jsonl", predictions)
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


def prediction_records(method: str, scorer: TaskScorer, rows) -> list[dict]:
  """Per scored row of the last scoring: the chosen candidate (highest log-likelihood, ties to
  the first, as the metric counts it) or the generated text, beside the reference answer."""
  last, out = scorer.last, []
  for i, logp in sorted(last["choice"].items()):
    pick = scorer.plan.choices[i][int(np.argmax(logp))]
    out.append({"method": method, "id": rows[i].id, "source": rows[i].source, "kind": "choice",
                "prediction": pick, "answer": rows[i].answer})  # fmt: skip
  for i, text in sorted(last["texts"].items()):
    out.append({"method": method, "id": rows[i].id, "source": rows[i].source,
                "kind": "generated", "prediction": text, "answer": rows[i].answer})  # fmt: skip
  return out


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
    print(f"stage 2 on {config.task} (router: {method}):\n" + format_table(results))
    if config.plot:
      plot_weights(workdir / "router_weights.png", list(skills), weights, config.task)


COLUMNS = ("loss", "token_acc", "exact", "accuracy", "macro_f1", "rouge1", "rouge2", "rougeL",
           "example_f1", "micro_f1", "seconds")  # fmt: skip


def format_table(results: dict[str, dict]) -> str:
  """One line per method: the loss, token accuracy, exact match, the standard metric(s) the
  task has and the seconds the method took (fit + score)."""
  cols = [c for c in COLUMNS if any(c in r for r in results.values())]
  lines = ["  " + f"{'method':22s}" + "".join(f"{c:>11s}" for c in cols)]
  for m, r in results.items():
    cells = "".join(f"{r[c]:11.3f}" if c in r else f"{'-':>11s}" for c in cols)
    lines.append(f"  {m:22s}" + cells)
  return "\n".join(lines)


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
