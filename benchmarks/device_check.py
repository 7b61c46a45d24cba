"""The device check of issue 22: logits parity with the CPU, then tokens/s and MFU of stage 1's
12-skill step (SmolLM2 shape), the AdaLoRA step on a 1B-parameter Llama shape and on the 7B
shape with fewer layers, the routed forward (merged and unmerged) and candidate scoring, each
against this chip's bf16 matmul rate measured in the same process. Random weights at each
checkpoint's shape: nothing is downloaded and no weights travel. One JSON for docs/benchmarks.md.

On the GPU machine it runs from benchmarks/device_check.sh (the gpu tests first). Here, the
whole script at tiny shapes on the CPU (~1 min; tests/test_device_check.py runs it too):

  PYTHONPATH=. .venv/bin/python benchmarks/device_check.py --smoke --json /tmp/device_check.json

What is measured (`--smoke` swaps every shape for a tiny one):
  * peak: a jitted n x n x n bf16 matmul with f32 accumulation (`_common.matmul_peak`, n =
    16384, median of 10 after one warm-up): the denominator of every MFU below.
  * parity: logits of one random model (SmolLM2's shape, 4 layers) on the accelerator against
    the CPU's f32 logits, as ‖Δ‖ / ‖CPU f32‖: f32 (matmul precision "highest", so no TF32)
    within PARITY_TOL["float32"], bf16 within PARITY_TOL["bfloat16"]; the CPU's own bf16 error
    is printed beside it for scale.
  * train steps: the real stage-1 step (`train.setup_training`: AdaLoRA init_r 12 on all seven
    projections, AdamW, the allocator inside jit) on random token batches, bf16 weights and
    compute. `warmup` steps (the first compiles), then `steps` steps back to back with one
    wait at the end: step time = their mean; tokens/s = rows x T / step time.
      stage1_12skill: all 12 skills (one adapter each, rows_per_skill rows of each skill per
        step), answers = the last quarter of each row, logits only there (as stage 1).
      adalora_1b / adalora_7b: one skill, loss on every next token (train_step.py's batches).
  * routing: benchmarks/routing.py's `bench_model` (12 pruned skills; base, merged, unmerged
    served/packed, unpacked and stacked paths; interleaved rounds) in bf16; target: merged
    within 3% of the base.
  * scoring: `evaluate.merged_stats` (the scoring forward of a label task: answer stats and
    4 candidate log-probabilities per row) on full batches: rows/s and MFU.

MFU = model FLOPs / time / measured bf16 peak. Model FLOPs of a training step on a frozen base
(`_common.step_flops`, attention over the causal T(T+1)/2 (query, key) pairs, not the blocks
the kernel computes): the frozen projections cost 2 P per token forward and 2 P backward (the
activation gradient only: the base has no weight gradient), 4 P per token instead of the
usual 6 P; the vocabulary projection at the logit positions likewise 2x its forward; attention
3x its forward; the adapters 3x theirs (forward, activation and weight gradients). A forward
pass (routing, scoring) is 2 P per token plus attention and its logits. Embedding gathers,
norms, softmax and the optimizer are not counted.
"""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
import traceback
import xml.etree.ElementTree as ET

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# ‖accelerator − CPU f32‖ / ‖CPU f32‖ of the logits. f32 rounding alone lands near 1e-6; TF32
# (the GPU's fast f32 matmuls) near 3e-4, so 1e-4 proves true f32 products. bf16 weights and
# activations: about 1e-2 on the CPU itself at SmolLM2's shape.
PARITY_TOL = {"float32": 1e-4, "bfloat16": 3e-2}
MFU_TARGETS = {"adalora_1b": 0.35, "stage1_12skill": 0.25}
MERGED_TARGET = 0.03  # the merged routed forward within 3% of the base (routing.MERGED_TARGET)
# What the check imports beyond the standard library; the GPU machine's image has all of it but
# ml_collections, which travels in .device_deps (device_check.sh --prepare).
MODULES = ("jax", "flax", "optax", "orbax.checkpoint", "numpy", "ml_collections", "tqdm")
MODULES += ("transformers", "pytest")


@dataclasses.dataclass(frozen=True)
class Train:
  """One training-step measurement: a model shape, a batch, and the step's settings."""

  preset: str  # a mdkif_jax.model.config.PRESETS name, or "llama_1b" (`model_config`)
  layers: int | None  # cut the preset to this many layers (None: all)
  skills: int  # 12: every registry skill (stage 1); 1: one adapter
  rows_per_skill: int
  seq: int
  answer_share: float  # the last share of each row is answer (1.0: every next token)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Every size the check uses: GPU (issue 22's shapes) or SMOKE (tiny, for the CPU)."""

  matmul_n: int
  parity: tuple[str, int | None, int, int]  # preset, layers, batch, seq
  train: dict[str, Train]
  routing: dict[str, tuple[str, int | None, int, int]]  # name: routing.MODELS entry
  scoring: tuple[str, int | None, int, int]  # preset, layers, rows, seq
  warmup: int
  steps: int
  repeats: int
  attention_block: int
  loss_chunk: int


GPU = Shapes(
  matmul_n=16384,
  parity=("smollm2_135m", 4, 4, 128),
  train={
    "adalora_1b": Train("llama_1b", None, 1, 8, 2048, 1.0),
    "stage1_12skill": Train("smollm2_135m", None, 12, 8, 512, 0.25),
    "adalora_7b": Train("llama2_7b", 8, 1, 4, 2048, 1.0),
  },
  routing={
    "smollm2_shape": ("smollm2_135m", None, 32, 512),
    "llama2_7b_2l": ("llama2_7b", 2, 8, 1024),
  },
  scoring=("smollm2_135m", None, 128, 256),
  warmup=2,
  steps=8,
  repeats=20,
  attention_block=256,
  loss_chunk=1024,
)
SMOKE = Shapes(
  matmul_n=256,
  parity=("tiny", None, 2, 16),
  train={
    "adalora_1b": Train("tiny", None, 1, 2, 32, 1.0),
    "stage1_12skill": Train("tiny", None, 12, 1, 32, 0.25),
    "adalora_7b": Train("tiny", 1, 1, 2, 32, 1.0),
  },
  routing={"tiny": ("tiny", None, 2, 32)},
  scoring=("tiny", None, 4, 32),
  warmup=1,
  steps=2,
  repeats=2,
  attention_block=64,
  loss_chunk=256,
)
# Seconds each part may take on the GPU machine (compiles included): a part that no longer fits
# `--budget-s` is skipped, so the JSON holds what finished. Parts run in this order.
PART_COST_S = {
  "peak": 15,
  "parity": 25,
  "adalora_1b": 70,
  "stage1_12skill": 70,
  "routing:smollm2_shape": 60,
  "scoring": 30,
  "adalora_7b": 70,
  "routing:llama2_7b_2l": 60,
}


def model_config(preset: str, layers: int | None = None):
  """A preset's ModelConfig, cut to `layers`. "llama_1b": Llama 3.2 1B's shape (1.24 B
  parameters, tied embedding; RoPE scaled as Llama 3.1 8B's, which no timing depends on)."""
  from mdkif_jax.model.config import PRESETS

  if preset == "llama_1b":
    cfg = dataclasses.replace(
      PRESETS["llama3_8b"],
      hidden_size=2048,
      intermediate_size=8192,
      num_hidden_layers=16,
      num_attention_heads=32,
      num_key_value_heads=8,
      head_dim=64,
      tie_word_embeddings=True,
    )
  else:
    cfg = PRESETS[preset]
  return cfg if layers is None else dataclasses.replace(cfg, num_hidden_layers=layers)


# ---- parity -----------------------------------------------------------------------------------
def moved(model, device):
  """The same NNX model with its weights on `device` (bit-identical)."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, device))


def logits_on(model, tokens, device, precision: str | None = None) -> np.ndarray:
  """The model's f32 logits computed on `device` (`precision`: jax's default matmul precision
  for the call, e.g. "highest"; None leaves it)."""
  import contextlib

  import jax
  from flax import nnx

  from mdkif_jax.model import llama

  graphdef, params = nnx.split(model)
  params, tokens = jax.device_put((params, tokens), device)
  ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
  with ctx:
    out = jax.jit(llama.forward, static_argnums=0)(graphdef, params, tokens)
  return np.asarray(out, np.float64)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def logits_parity(cfg, accel, cpu, batch: int, seq: int, seed: int = 0) -> dict:
  """{dtype: errors} of the accelerator's logits against the CPU's f32 logits (same weights:
  the bf16 model is the f32 one rounded), with the tolerances of PARITY_TOL."""
  import jax.numpy as jnp

  from mdkif_jax import sharding
  from mdkif_jax.model import loading
  from mdkif_jax.model.config import Numerics

  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
  mesh = sharding.make_mesh((1, 1, 1), devices=[cpu])
  models = {
    dt: loading.random_init(
      cfg, seed=seed, numerics=Numerics(jnp.dtype(dt), jnp.dtype(dt)), mesh=mesh
    )
    for dt in PARITY_TOL
  }
  want = logits_on(models["float32"], tokens, cpu, "highest")
  out = {}
  for dt, model in models.items():
    got = logits_on(model, tokens, accel, "highest" if dt == "float32" else None)
    err = rel_err(got, want)
    out[dt] = {
      "rel_err": err,
      "max_abs_rel": float(np.abs(got - want).max() / np.abs(want).max()),
      "tol": PARITY_TOL[dt],
      "ok": bool(err <= PARITY_TOL[dt]),
    }
  out["bfloat16"]["cpu_rel_err"] = rel_err(logits_on(models["bfloat16"], tokens, cpu), want)
  out["shape"] = {"layers": cfg.num_hidden_layers, "batch": batch, "seq": seq}
  return out


# ---- training steps ---------------------------------------------------------------------------
class Vocab:
  """Stands in for the tokenizer: `train.setup_training` only checks its length against the
  model's vocabulary, and the batches here are random token ids (no tokenizer travels)."""

  def __init__(self, size: int):
    self.size = size

  def __len__(self) -> int:
    return self.size


def stage1_batch(
  vocab: int, skill_ids, rows_per_skill: int, seq: int, answer_share: float, seed: int = 0
) -> dict[str, np.ndarray]:
  """A random stage-1 batch: `rows_per_skill` rows of each registry skill id, the last
  `answer_share` of every row as answer (1.0: every next token; the last position never has a
  target), targets = the next token, as `data.batches.make_batches` lays it out."""
  from mdkif_jax.data import batches

  rng = np.random.default_rng(seed)
  ids = np.repeat(np.asarray(skill_ids, np.int32), rows_per_skill)
  B, T = len(ids), seq
  tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
  loss_mask = np.zeros((B, T), np.float32)
  loss_mask[:, T - max(1, round(answer_share * T)) : T - 1] = 1.0
  b = {
    "tokens": tokens,
    "targets": np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], axis=1),
    "loss_mask": loss_mask,
    "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
    "attention_mask": np.ones((B, T), np.int32),
    "skill_ids": ids,
  }
  b["answer_idx"], b["answer_valid"] = batches.answer_index(loss_mask)
  return b


def train_config(shapes: Shapes, seq: int):
  """train_step.py's issue-3 AdaLoRA settings (init_r 12 on q,k,v,o,gate,up,down), bf16
  weights and compute, on one device."""
  import train_step

  cfg = train_step.bench_config("bfloat16", seq=seq)
  cfg.model.param_dtype = "bfloat16"
  cfg.model.attention_block = shapes.attention_block
  cfg.train.loss_chunk = shapes.loss_chunk
  cfg.mesh.shape = (1, 1, 1)
  return cfg


def train_part(shapes: Shapes, spec: Train, peak_flops: float) -> dict:
  import jax

  from mdkif_jax import data, sharding, train
  from mdkif_jax.data import batches
  from mdkif_jax.model import loading
  from mdkif_jax.model.config import numerics_from

  mcfg = model_config(spec.preset, spec.layers)
  config = train_config(shapes, spec.seq)
  skills = data.SKILLS[: spec.skills]
  t0 = time.perf_counter()
  mesh = sharding.make_mesh((1, 1, 1))
  base = loading.random_init(mcfg, numerics=numerics_from(config), mesh=mesh)
  run = train.setup_training(config, skills, base, Vocab(mcfg.vocab_size))
  ids = [data.skill_id(s) for s in skills]
  host = stage1_batch(mcfg.vocab_size, ids, spec.rows_per_skill, spec.seq, spec.answer_share)
  batch = batches.to_global(host, run.mesh)
  setup_s = time.perf_counter() - t0
  losses = []

  def step(state):
    state, m = run.fns.train_step(state, run.frozen, batch)
    losses.append(m["loss_S"])
    return state, m

  t = time.perf_counter()
  state, m = jax.block_until_ready(step(run.state))  # compiles
  first_s = time.perf_counter() - t
  for _ in range(shapes.warmup - 1):
    state, m = jax.block_until_ready(step(state))
  t = time.perf_counter()
  for _ in range(shapes.steps):  # back to back: the host enqueues while the device runs
    state, m = step(state)
  jax.block_until_ready((state, m))
  step_s = (time.perf_counter() - t) / shapes.steps
  rows, T = host["tokens"].shape
  K = float(host["loss_mask"].sum()) / rows  # logit positions per row that carry a target
  flops = _common.step_flops(mcfg, rows, T, K, run.adalora_cfg.init_r, run.targets, 1)
  losses = [float(np.sum(np.asarray(x))) for x in losses]
  return {
    "model": spec.preset + (f" ({mcfg.num_hidden_layers} layers)" if spec.layers else ""),
    "params": mcfg.num_params(),
    "layers": mcfg.num_hidden_layers,
    "skills": spec.skills,
    "rows": rows,
    "seq": T,
    "logit_positions_per_row": K,
    "dtype": "bfloat16",
    "attention_block": shapes.attention_block,
    "setup_s": setup_s,
    "first_step_s": first_s,
    "step_s": step_s,
    "tokens_per_s": rows * T / step_s,
    "model_tflop_per_step": flops["total"] / 1e12,
    "achieved_tflops": flops["total"] / step_s / 1e12,
    "mfu": flops["total"] / step_s / peak_flops,
    "losses_finite": bool(np.all(np.isfinite(losses))),
    "loss_first_last": [losses[0], losses[-1]],
  }


# ---- routing and scoring ----------------------------------------------------------------------
def routing_part(name: str, entry, shapes: Shapes, peak_flops: float) -> dict:
  import routing

  routing.MODELS[name] = entry  # random weights of the preset's shape (routing.load_base)
  _, _, batch, seq = entry
  args = argparse.Namespace(
    batch=batch,
    seq=seq,
    dtype="bf16",
    paths=list(routing.PATHS),
    repeats=shapes.repeats,
    max_load=float("inf"),  # no waiting for a quiet machine: the accelerator is ours
  )
  r = routing.bench_model(name, args, deadline=time.monotonic())
  v = routing.verdicts(r)
  cfg = routing.model_config(name)
  fwd = _common.step_flops(cfg, batch, seq, seq, 0, (), 1)["forward"]
  base_s = r["median_s"]["base"]
  return {
    "model": name,
    "layers": r["layers"],
    "batch": batch,
    "seq": seq,
    "dtype": "bfloat16",
    "median_ms": {p: 1e3 * s for p, s in r["median_s"].items()},
    "overhead": v["overhead"],
    "paired_ratio": r["paired_ratio"],
    "merged_overhead": v["overhead"]["merged"],
    "merged_met": bool(abs(v["overhead"]["merged"]) <= MERGED_TARGET),
    "unmerged_overhead": v["overhead"]["unmerged"],
    "unmerged_share_computed": r["flops_per_token"]["share_computed"],
    "unmerged_met": bool(v["unmerged_met"]),
    "check": r["check"],
    "base_tokens_per_s": batch * seq / base_s,
    "base_mfu": fwd / base_s / peak_flops,
    "first_call_s": r["first_call_s"],
  }


def label_batch(vocab: int, rows: int, seq: int, candidates: int = 4, seed: int = 0) -> dict:
  """A prepared label-task batch: random prompts, a one-token answer and its end-of-turn
  token, and `candidates` one-token candidates per row (`choice_ids`), as TaskScorer scores."""
  from mdkif_jax.data import task

  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (rows, seq)).astype(np.int32)
  loss_mask = np.zeros((rows, seq), np.float32)
  loss_mask[:, seq - 3 : seq - 1] = 1.0  # targets = the answer token and the end of turn
  raw = {
    "tokens": tokens,
    "targets": np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], axis=1),
    "loss_mask": loss_mask,
    "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
    "attention_mask": np.ones((rows, seq), np.int32),
  }
  b = task.prepare(raw)
  b["choice_ids"] = rng.integers(3, vocab, (rows, candidates)).astype(np.int32)
  return b


def scoring_part(shapes: Shapes, peak_flops: float) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mdkif_jax import evaluate, sharding
  from mdkif_jax.model import loading
  from mdkif_jax.model.config import Numerics

  preset, layers, rows, seq = shapes.scoring
  cfg = model_config(preset, layers)
  bf16 = jnp.dtype("bfloat16")
  mesh = sharding.make_mesh((1, 1, 1))
  base = loading.random_init(cfg, numerics=Numerics(bf16, bf16), mesh=mesh)
  graphdef, params = nnx.split(base)
  batch = jax.device_put(label_batch(cfg.vocab_size, rows, seq), mesh.devices.flat[0])
  t = time.perf_counter()
  jax.block_until_ready(evaluate.merged_stats(params, batch, graphdef=graphdef))
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(shapes.repeats):
    out = evaluate.merged_stats(params, batch, graphdef=graphdef)
  jax.block_until_ready(out)
  call_s = (time.perf_counter() - t) / shapes.repeats
  # logits at the 2 answer positions and the candidates' position
  fwd = _common.step_flops(cfg, rows, seq, 3, 0, (), 1)["forward"]
  return {
    "model": preset,
    "rows": rows,
    "seq": seq,
    "candidates": int(batch["choice_ids"].shape[1]),
    "dtype": "bfloat16",
    "first_call_s": first_s,
    "call_s": call_s,
    "rows_per_s": rows / call_s,
    "tokens_per_s": rows * seq / call_s,
    "mfu": fwd / call_s / peak_flops,
    "finite": bool(np.all(np.isfinite(np.asarray(out["choice_logp"])))),
  }


# ---- the run ----------------------------------------------------------------------------------
def environment() -> dict:
  import jax

  versions = {}
  for name in MODULES:
    try:
      mod = importlib.import_module(name)
      versions[name] = str(getattr(mod, "__version__", "present"))
    except ImportError as e:
      versions[name] = None
      print(f"MISSING: python module {name} ({e})", flush=True)
  dev = jax.devices()[0]
  return {
    "python": platform.python_version(),
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "devices": [str(d) for d in jax.devices()],
    "modules": versions,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def junit_counts(path: str) -> dict:
  """Test counts of a pytest --junitxml report (the gpu tests device_check.sh ran first)."""
  if not os.path.isfile(path):
    return {"report": None}
  root = ET.parse(path).getroot()
  suites = [root] if root.tag == "testsuite" else list(root)
  keys = ("tests", "failures", "errors", "skipped")
  out = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
  out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
  out["failed_names"] = [
    f"{c.get('classname')}::{c.get('name')}"
    for c in root.iter("testcase")
    if c.find("failure") is not None or c.find("error") is not None
  ]
  out["report"] = os.path.basename(path)
  return out


def write_json(result: dict, path: str | None) -> None:
  if not path:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=float)
  os.replace(tmp, path)


def plan(shapes: Shapes, result: dict) -> list[tuple[str, object]]:
  """(part name, zero-argument function) in priority order; peak first (every MFU needs it)."""
  import jax

  accel, cpu = jax.devices()[0], jax.devices("cpu")[0]

  def peak():
    p = _common.matmul_peak(shapes.matmul_n, reps=10)
    return {
      "n": shapes.matmul_n,
      "bf16_tflops": p["bf16_f32acc"] / 1e3,
      "f32_tflops": p["f32"] / 1e3,
    }

  def flops():
    return result["peak"]["bf16_tflops"] * 1e12

  preset, layers, batch, seq = shapes.parity
  parity_cfg = model_config(preset, layers)

  def train(name):
    return lambda: train_part(shapes, shapes.train[name], flops())

  def route(name):
    return lambda: routing_part(name, shapes.routing[name], shapes, flops())

  first, *rest = shapes.routing
  return [
    ("peak", peak),
    ("parity", lambda: logits_parity(parity_cfg, accel, cpu, batch, seq)),
    ("adalora_1b", train("adalora_1b")),
    ("stage1_12skill", train("stage1_12skill")),
    (f"routing:{first}", route(first)),
    ("scoring", lambda: scoring_part(shapes, flops())),
    ("adalora_7b", train("adalora_7b")),
    *[(f"routing:{n}", route(n)) for n in rest],
  ]


def store(result: dict, name: str, value: dict) -> None:
  """routing:<model> parts go under result["routing"][model], train parts under "train"."""
  if name.startswith("routing:"):
    result.setdefault("routing", {})[name.split(":", 1)[1]] = value
  elif name in ("adalora_1b", "stage1_12skill", "adalora_7b"):
    result.setdefault("train", {})[name] = value
  else:
    result[name] = value


def verdicts(result: dict) -> dict:
  """Each issue-22 target: met or not (None when its part did not run)."""
  train, routing = result.get("train", {}), result.get("routing", {})
  out = {f"mfu_{k}": (train[k]["mfu"] >= t if k in train else None) for k, t in MFU_TARGETS.items()}
  out["merged_within_3pct"] = all(r["merged_met"] for r in routing.values()) if routing else None
  if "parity" in result:
    out["parity"] = all(result["parity"][dt]["ok"] for dt in PARITY_TOL)
  return out


def summary(result: dict) -> None:
  print("\n== device check:", result["env"]["device_kind"], f"({result['mode']})", flush=True)
  if "peak" in result:
    p = result["peak"]
    print(f"peak: bf16 {p['bf16_tflops']:.1f} TFLOP/s, f32 {p['f32_tflops']:.1f} (n={p['n']})")
  if "parity" in result:
    for dt in PARITY_TOL:
      x = result["parity"][dt]
      print(f"parity {dt}: rel err {x['rel_err']:.2e} (tol {x['tol']:.0e}) ok={x['ok']}")
    print(f"  CPU's own bf16 rel err {result['parity']['bfloat16']['cpu_rel_err']:.2e}")
  for name, r in result.get("train", {}).items():
    target = MFU_TARGETS.get(name)
    print(
      f"{name}: {r['model']} {r['rows']}x{r['seq']}: {r['step_s'] * 1e3:.1f} ms/step, "
      f"{r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}"
      + (f" (target {target:.0%})" if target else "")
      + f", first step {r['first_step_s']:.1f} s"
    )
  for name, r in result.get("routing", {}).items():
    ms = ", ".join(f"{p} {t:.2f}" for p, t in r["median_ms"].items())
    print(
      f"routing {name} {r['batch']}x{r['seq']}: ms {ms}; merged {r['merged_overhead']:+.1%} "
      f"(target within 3%: {r['merged_met']}), unmerged {r['unmerged_overhead']:+.1%}; base "
      f"{r['base_tokens_per_s']:.0f} tok/s, MFU {r['base_mfu']:.1%}"
    )
  if "scoring" in result:
    s = result["scoring"]
    print(
      f"scoring: {s['rows']}x{s['seq']}, {s['candidates']} candidates: {s['rows_per_s']:.0f} "
      f"rows/s, MFU {s['mfu']:.1%}"
    )
  print("verdicts:", json.dumps(result["verdicts"]))
  if result["skipped"]:
    print("skipped (out of time):", ", ".join(result["skipped"]))
  for name, err in result["errors"].items():
    print(f"ERROR in {name}: {err.strip().splitlines()[-1]}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, CI)")
  ap.add_argument("--json", default=None, help="write the results here (default $OUT/...)")
  ap.add_argument("--budget-s", type=float, default=None, help="skip parts that no longer fit")
  ap.add_argument("--only", default=None, help="comma-separated part names (see PART_COST_S)")
  ap.add_argument("--junit", default=None, help="pytest --junitxml report of the gpu tests")
  args = ap.parse_args(argv)
  if args.json is None and os.environ.get("OUT"):
    args.json = os.path.join(os.environ["OUT"], "device_check.json")
  shapes = SMOKE if args.smoke else GPU
  start = time.monotonic()
  result = {
    "schema": 1,
    "mode": "smoke" if args.smoke else "gpu",
    "env": environment(),
    "gpu_tests": junit_counts(args.junit) if args.junit else {"report": None},
    "errors": {},
    "skipped": [],
  }
  print(json.dumps(result["env"]), flush=True)
  only = set(args.only.split(",")) if args.only else None
  for name, fn in plan(shapes, result):
    if only and name not in only and name != "peak":
      continue
    left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
    if left is not None and not args.smoke and left < PART_COST_S.get(name, 60):
      result["skipped"].append(name)
      continue
    t = time.monotonic()
    print(f"-- {name}", flush=True)
    try:
      store(result, name, fn())
    except Exception:  # noqa: BLE001  (one part failing leaves the others' numbers)
      result["errors"][name] = traceback.format_exc()
      print(result["errors"][name], flush=True)
    print(f"   {name}: {time.monotonic() - t:.1f} s", flush=True)
    result["wall_s"] = time.monotonic() - start
    result["verdicts"] = verdicts(result)
    write_json(result, args.json)
  result["wall_s"] = time.monotonic() - start
  result["verdicts"] = verdicts(result)
  write_json(result, args.json)
  summary(result)
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
