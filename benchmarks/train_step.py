"""AdaLoRA training step on SmolLM2-135M-Instruct: mdkif_jax (one skill) vs PEFT, CPU.

Run (from the repo root; one command runs everything, each framework in its own process):

  PYTHONPATH=. .venv/bin/python benchmarks/train_step.py [--steps 10] [--warmup 2]
      [--batch 8] [--seq 256] [--dtype float32,bfloat16] [--only ours|peft] [--rounds 1]
      [--max-load 1.5] [--remat] [--data random|real] [--pack] [--accum K]

What is timed (identical for both frameworks):
  * Model: the packaged SmolLM2-135M-Instruct GGUF dequantized to f32 (ours: mdkif_jax.loading;
    PEFT: transformers' GGUF loader), frozen.
  * Adapters: AdaLoRA on q,k,v,o,gate,up,down of all 30 layers, init_r 12, target_r 8,
    tinit 10, tfinal 10, deltaT 5, total_step 100, lora_alpha 8, orth_reg_weight 0.5,
    beta1 = beta2 = 0.85. PEFT gets task_type CAUSAL_LM (without it, its loss silently lacks
    the orthogonal regulariser). Ours: one skill (S = 1) through `train.setup_training`, the real
    jitted step (loss + orthogonal regulariser, adapter gradients, AdamW, the allocator inside jit).
  * Data: `--batch` x `--seq` random token ids, a new batch every step from a fixed seed (the
    same batches for every run). labels = inputs: transformers shifts the labels inside its
    causal-LM loss (position t predicts token t+1, mean over B*(T-1) tokens); ours gets the
    same shifted targets explicitly with the last position masked out.
  * Optimizer: AdamW lr 1e-4 constant, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 (torch's
    AdamW default), no clipping. PEFT step = forward(labels=inputs) + backward + opt.step()
    + base_model.update_and_allocate(step) + zero_grad.
  * `--warmup` steps (ours: includes compilation), then the median wall time of `--steps`
    steps; ours waits for the step's outputs (`jax.block_until_ready`). tokens/s = B*T / median.
    Beside each speed ratio: a 90% bootstrap interval (each side's measured steps, all rounds
    pooled, resampled on their own; `_common.median_ratio_interval`), since single steps on
    these machines vary by 5-20%.
  * Peak memory: each framework runs in a fresh child process; its ru_maxrss at the end
    (model load included) is its peak RSS.
  * Runs alternate: ours (each --dtype), PEFT, per round. The parent waits before each child
    until the 1-min load average is below --max-load (the machine is shared) and prints it.
  * bf16: `model.compute_dtype=bfloat16` (bf16 activations and matmul inputs, f32
    accumulation), f32 frozen weights in memory and f32 adapters/optimizer. Loss curves of the
    f32 and bf16 runs use the same init and data; the max relative difference over the
    measured steps is printed.

`--data real` (issue 5: the full step through the real trainer) replaces the random batches by
stage-1 batches of the real skill data: `batches.make_batches` on ../shared/data (the
`configs/skill.py:shared` data config), all 12 skills, one row per skill
(12 rows x `--seq` tokens, bucketed and padded as in training), loss on answer tokens
only. Ours trains the 12 skills jointly (one adapter per skill, `train.make_step`); PEFT trains one
AdaLoRA adapter on the same rows with labels = -100 outside the answers (HF's usual SFT
masking), attention_mask on padding. `--accum K` accumulates K micro-batches per optimizer
update on both sides (ours: optax.MultiSteps inside the jitted step; PEFT: K backward passes
per opt.step()). The parent builds the batches once and hands both children the same arrays.

`--data real --pack` turns on the trainer's sequence packing (`data.pack=True`): each skill's
row holds consecutive examples of that skill, as many as fit in `--seq` tokens, each attending
only to itself. PEFT trains on the same examples per step, one per row (HF's usual layout), in
micro-batches of at most our row count (12; all ~24 rows at once exceed this machine's 24 GB
with PEFT) whose gradients accumulate into one update. The step's examples are sorted by
length before they are cut into micro-batches (as HF's `group_by_length`) and each
micro-batch is right-padded to its longest example (dynamic padding): the least padding PEFT
gets without packing. Both sides then do the same work per step (examples, answer
tokens, one optimizer update), and "tok/s" counts real (non-padding) tokens for both.

Targets (issue 3): ours >= 1.3x PEFT tokens/s in f32, >= 2x with bf16 compute, peak RSS <= 0.5x.
Target (issue 5, `--data real`): >= 2x PEFT tokens/s with bf16 compute, peak RSS <= 0.5x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

VOCAB = 49152
TARGETS_PEFT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADALORA = dict(
  init_r=12,
  target_r=8,
  tinit=10,
  tfinal=10,
  deltaT=5,
  total_step=100,
  lora_alpha=8,
  orth_reg_weight=0.5,
  beta1=0.85,
  beta2=0.85,
)
LR, WEIGHT_DECAY = 1e-4, 0.01


def random_tokens(n: int, batch: int, seq: int, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, (batch, seq), dtype=np.int64) for _ in range(n)]


# ---- ours -------------------------------------------------------------------------------------
def our_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """labels = inputs, shifted as transformers does: targets[t] = tokens[t+1], last masked."""
  from mdkif_jax.data import batches

  B, T = tokens.shape
  tok = tokens.astype(np.int32)
  targets = np.concatenate([tok[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
  loss_mask = np.ones((B, T), np.float32)
  loss_mask[:, -1] = 0.0
  b = {
    "tokens": tok,
    "targets": targets,
    "loss_mask": loss_mask,
    "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
    "attention_mask": np.ones((B, T), np.int32),
    "skill_ids": np.zeros((B,), np.int32),
  }
  b["answer_idx"], b["answer_valid"] = batches.answer_index(loss_mask)
  return b


def bench_config(dtype: str, remat: bool = False, accum: int = 1, seq: int = 256):
  from configs import skill

  cfg = skill.get_config("shared")  # the data config of the real run (../shared/data)
  cfg.data.buckets, cfg.data.max_len = (seq,), seq
  cfg.train.rows_per_skill = 1
  cfg.train.steps = ADALORA["total_step"]  # AdaLoRA's total_step
  cfg.train.progress = False
  cfg.mesh.shape = (1, 1, 1)
  cfg.optimizer.grad_accum_steps = accum
  cfg.model.compute_dtype = dtype
  cfg.model.remat = remat
  a = cfg.adalora
  a.targets = "q,k,v,o,gate,up,down"
  a.init_r, a.target_r = ADALORA["init_r"], ADALORA["target_r"]
  a.tinit, a.tfinal, a.delta_t = ADALORA["tinit"], ADALORA["tfinal"], ADALORA["deltaT"]
  a.lora_alpha, a.orth_reg_weight = float(ADALORA["lora_alpha"]), ADALORA["orth_reg_weight"]
  a.beta1, a.beta2 = ADALORA["beta1"], ADALORA["beta2"]
  o = cfg.optimizer
  o.learning_rate, o.weight_decay = LR, WEIGHT_DECAY
  o.decay, o.warmup_steps, o.clip_norm = "constant", 0, 0.0
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  return cfg


def real_batches(n: int, seq: int, path: str, pack: bool = False) -> dict:
  """`n` stage-1 batches of all 12 skills (one row each, packed or one example per row) from
  ../shared/data, saved to `path`."""
  from mdkif_jax import data
  from mdkif_jax.data import batches
  from mdkif_jax.model import tokenizer

  cfg = bench_config("float32", seq=seq)
  cfg.data.pack = pack
  it = batches.make_batches(cfg, data.SKILLS, tokenizer.load_tokenizer("smollm2_135m"))
  out = [next(it) for _ in range(n)]
  np.savez(path, **{f"{i}/{k}": v for i, b in enumerate(out) for k, v in b.items()})
  answer = sum(float((b["loss_mask"] > 0).sum()) for b in out)
  real = sum(float((b["attention_mask"] > 0).sum()) for b in out)
  examples = sum(int(b["attention_mask"].max(axis=1).sum()) for b in out)
  return {
    "rows": out[0]["tokens"].shape[0],
    "answer_share": answer / real,
    "padding_share": 1 - real / sum(b["tokens"].size for b in out),
    "real_per_step": real / n,
    "examples_per_step": examples / n,
  }


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
  z = np.load(path)
  out: dict[int, dict] = {}
  for key in z.files:
    i, k = key.split("/", 1)
    out.setdefault(int(i), {})[k] = z[key]
  return [out[i] for i in sorted(out)]


def setup_ours(dtype: str, num_skills: int = 1, remat: bool = False, accum: int = 1):
  """(step_fn, state, frozen, mesh, model cfg): the real stage-1 setup (`train.setup_training`)
  for the first `num_skills` registry skills."""
  from mdkif_jax import data, train

  run = train.setup_training(bench_config(dtype, remat, accum), data.SKILLS[:num_skills])
  return run.fns.train_step, run.state, run.frozen, run.mesh, run.model_cfg


def child_ours(args) -> dict:
  import jax
  import jax.numpy as jnp

  from mdkif_jax.data import batches

  t0 = time.perf_counter()
  real = load_batches(args.batches) if args.batches else None
  num_skills = 12 if real else 1
  step, state, frozen, mesh, mcfg = setup_ours(args.dtype, num_skills, args.remat, args.accum)
  load_s = time.perf_counter() - t0
  host = real or [
    our_batch(t) for t in random_tokens(args.warmup + args.steps, args.batch, args.seq)
  ]
  data = [batches.to_global(b, mesh) for b in host]
  times, losses, others = [], [], []
  for i, b in enumerate(data):
    if args.trace and i == args.warmup:
      jax.profiler.start_trace(args.trace)
    state, m, seconds, other = _common.timed_step(step, state, frozen, b)
    times.append(seconds)
    others.append(other)
    losses.append(float(jnp.sum(m["loss_S"] + ADALORA["orth_reg_weight"] * m["orth_S"])))
  if args.trace:
    jax.profiler.stop_trace()
  dtype = args.dtype + ("+remat" if args.remat else "")
  return {
    "framework": "ours",
    "dtype": dtype,
    "load_s": load_s,
    "first_step_s": times[0],
    "step_s": times[args.warmup :],
    "others": others[args.warmup :],
    "losses": losses[args.warmup :],
    "all_losses": losses,
    "peak_rss_gb": _common.peak_rss_gb(),
  }


# ---- PEFT -------------------------------------------------------------------------------------
def child_peft(args) -> dict:
  import torch
  from peft import AdaLoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM

  from mdkif_jax.model import loading

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  t0 = time.perf_counter()
  gguf = loading.smollm2_gguf_path()
  model = AutoModelForCausalLM.from_pretrained(
    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
  )
  # task_type CAUSAL_LM gives PeftModelForCausalLM, whose forward goes through
  # AdaLoraModel.forward and adds the orthogonal regulariser; without it PEFT returns a plain
  # PeftModel that calls the base model directly and silently drops the regulariser.
  pcfg = AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS_PEFT, **ADALORA)
  model = get_peft_model(model, pcfg)
  model.train()
  opt = torch.optim.AdamW(
    [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY
  )
  load_s = time.perf_counter() - t0
  times, losses, others = [], [], []
  if args.batches:  # per step: micro-batches and their shares of the step's answer tokens
    inputs = [peft_inputs(b, args.pack) for b in load_batches(args.batches)]
  else:
    inputs = [
      [({"input_ids": torch.from_numpy(t), "labels": torch.from_numpy(t)}, 1.0)]
      for t in random_tokens(args.warmup + args.steps, args.batch, args.seq)
    ]
  update = 0
  for i, micro in enumerate(inputs):
    c0 = _common.cpu_snapshot()
    t = time.perf_counter()
    loss = 0.0
    for kw, share in micro:  # the step's mean answer-token loss, one micro-batch at a time
      out = model(**kw)
      (out.loss * share / args.accum).backward()
      loss += float(out.loss.detach()) * share
    if (i + 1) % args.accum == 0:  # as optax.MultiSteps: one update per `accum` micro-batches
      opt.step()
      model.base_model.update_and_allocate(update)
      opt.zero_grad()
      update += 1
    times.append(time.perf_counter() - t)
    others.append(_common.others_share(c0, _common.cpu_snapshot()))
    losses.append(loss)
  return {
    "framework": "peft",
    "dtype": "float32",
    "load_s": load_s,
    "first_step_s": times[0],
    "step_s": times[args.warmup :],
    "others": others[args.warmup :],
    "losses": losses[args.warmup :],
    "all_losses": losses,
    "peak_rss_gb": _common.peak_rss_gb(),
    "torch_threads": torch.get_num_threads(),
  }


def peft_inputs(b: dict[str, np.ndarray], unpack: bool = False) -> list[tuple[dict, float]]:
  """HF causal-LM inputs of one stage-1 batch, labels -100 outside the answer tokens, as
  [(micro-batch kwargs, its share of the batch's answer tokens)].

  Ours: loss_mask[t] > 0 means targets[t] (= tokens[t+1]) is an answer token. transformers
  shifts inside its loss (position t predicts labels[t+1]), so labels[t+1] = tokens[t+1] there.
  unpack: a packed batch becomes one row per example, sorted by length, in micro-batches of at
  most our row count (more rows do not fit this machine's memory with PEFT), each right-padded
  to its longest example; their losses, weighted by answer tokens, give the batch's mean.
  """
  import torch

  parts = [b]
  if unpack:  # longest first, as HF's group_by_length: the least padding short of packing
    rows, n = unpack_rows(b), b["tokens"].shape[0]
    order = np.argsort(-(rows["attention_mask"] > 0).sum(1), kind="stable")
    rows = {k: v[order] for k, v in rows.items()}
    starts = range(0, len(rows["tokens"]), n)
    parts = [_trim({k: v[i : i + n] for k, v in rows.items()}) for i in starts]
  total = sum(float((p["loss_mask"][:, :-1] > 0).sum()) for p in parts)
  out = []
  for p in parts:
    tokens = p["tokens"].astype(np.int64)
    labels = np.full_like(tokens, -100)
    keep = p["loss_mask"][:, :-1] > 0
    labels[:, 1:][keep] = tokens[:, 1:][keep]
    kw = {
      "input_ids": torch.from_numpy(tokens),
      "labels": torch.from_numpy(labels),
      "attention_mask": torch.from_numpy(p["attention_mask"].astype(np.int64)),
    }
    out.append((kw, float(keep.sum()) / total))
  return out


def _trim(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Right-padded rows cut to their longest row."""
  T = int((rows["attention_mask"] > 0).sum(1).max())
  return {k: v[:, :T] for k, v in rows.items()}


def unpack_rows(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed batch as one example per row (segment ids -> rows), padded to the longest."""
  segs = [
    (r, np.flatnonzero(m == s))
    for r, m in enumerate(b["attention_mask"])
    for s in range(1, m.max() + 1)
  ]
  T = max(len(at) for _, at in segs)
  out = {k: np.zeros((len(segs), T), b[k].dtype) for k in ("tokens", "loss_mask")}
  out["attention_mask"] = np.zeros((len(segs), T), np.int32)
  for i, (r, at) in enumerate(segs):
    out["tokens"][i, : len(at)] = b["tokens"][r, at]
    out["loss_mask"][i, : len(at)] = b["loss_mask"][r, at]
    out["attention_mask"][i, : len(at)] = 1
  return out


# ---- parent -----------------------------------------------------------------------------------
def summarize(runs: list[dict], tokens_per_step: int) -> None:
  def key(r):
    return "PEFT f32" if r["framework"] == "peft" else f"ours {r['dtype']}"

  rows: dict[str, list[dict]] = {}
  for r in runs:
    rows.setdefault(key(r), []).append(r)
  print(
    f"\n{'run':<16} {'load s':>6} {'s/step':>7} {'min':>6} {'tok/s':>7} {'peak GB':>8} "
    f"{'1st step':>9} {'load avg':>9} {'others':>7}"
  )
  stats = {}
  for k, rs in rows.items():
    med = _common.median([_common.median(r["step_s"]) for r in rs])
    peak = max(r["peak_rss_gb"] for r in rs)
    stats[k] = (tokens_per_step / med, peak)
    loads = "/".join(f"{r['load_at_start']:.1f}" for r in rs)
    fastest = min(min(r["step_s"]) for r in rs)
    others = _common.median([_common.median(r["others"]) for r in rs])
    print(
      f"{k:<16} {rs[0]['load_s']:6.1f} {med:7.2f} {fastest:6.2f} {tokens_per_step / med:7.1f} "
      f"{peak:8.2f} {rs[0]['first_step_s']:9.1f} {loads:>9} {others:7.1%}"
    )
    for r in rs:
      print(f"    step times: {' '.join(f'{t:.2f}' for t in r['step_s'])}")
      print(f"    others' CPU share per step: {' '.join(f'{o:.0%}' for o in r['others'])}")
  print(
    "(others = share of the machine's cores used by other processes during the measured "
    "steps; median. 'load avg' = 1-min load when the child started.)"
  )
  if "PEFT f32" in stats:
    tps_p, mem_p = stats["PEFT f32"]
    for k, target in (
      ("ours float32", 1.3),
      ("ours bfloat16", 2.0),
      ("ours float32+remat", 1.3),
      ("ours bfloat16+remat", 2.0),
    ):
      if k in stats:
        tps, mem = stats[k]
        steps_p = [t for r in rows["PEFT f32"] for t in r["step_s"]]
        lo, hi = _common.median_ratio_interval(steps_p, [t for r in rows[k] for t in r["step_s"]])
        print(
          f"{k} / PEFT f32: tokens/s {tps / tps_p:.2f}x [{_common.INTERVAL_LEVEL:.0%} "
          f"interval {lo:.2f}-{hi:.2f}] "
          f"(target >= {target}x: {'met' if tps / tps_p >= target else 'MISSED'}), peak "
          f"memory {mem / mem_p:.2f}x (target <= 0.5x: "
          f"{'met' if mem / mem_p <= 0.5 else 'MISSED'})"
        )
  sfx = "+remat" if any(r["dtype"].endswith("+remat") for r in runs) else ""
  f32 = rows.get("ours float32" + sfx, [None])[0]
  bf16 = rows.get("ours bfloat16" + sfx, [None])[0]
  if f32 and bf16:
    a, b = np.asarray(f32["all_losses"]), np.asarray(bf16["all_losses"])
    rel = np.abs(b - a) / np.abs(a)
    print(
      f"bf16 vs f32 loss curve (same init and data): max relative difference "
      f"{rel[len(rel) - len(f32['losses']) :].max():.2e} over the measured steps "
      f"({rel.max():.2e} over all steps)"
    )
  peft = rows.get("PEFT f32", [None])[0]
  if f32 and peft:
    print(
      f"step-0 loss incl. orth reg (E = 0: adapters are the identity): ours f32 "
      f"{f32['all_losses'][0]:.4f}, PEFT {peft['all_losses'][0]:.4f}"
    )
  for k, rs in rows.items():
    print(f"{k} losses: {' '.join(f'{x:.4f}' for x in rs[0]['all_losses'])}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=10, help="measured steps (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (incl. compile)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--only", choices=("ours", "peft"), default=None)
  p.add_argument("--dtype", default="float32,bfloat16", help="our compute dtype(s), comma-sep")
  p.add_argument("--rounds", type=int, default=1, help="alternating rounds of all runs")
  p.add_argument("--max-load", type=float, default=1.5, help="wait for 1-min load below this")
  p.add_argument("--wait", type=float, default=600.0, help="max seconds to wait for the load")
  p.add_argument("--remat", action="store_true", help="ours: model.remat=True (per block)")
  p.add_argument(
    "--retries",
    type=int,
    default=2,
    help="rerun a child whose steps were contended (others' median CPU share > 10%%)",
  )
  p.add_argument("--trace", default=None, help="ours: jax.profiler trace dir (measured steps)")
  p.add_argument(
    "--data",
    choices=("random", "real"),
    default="random",
    help="random tokens (issue 3) or stage-1 batches of ../shared/data (issue 5)",
  )
  p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer update")
  p.add_argument(
    "--pack",
    action="store_true",
    help="--data real: ours packs examples per "
    "row (data.pack); PEFT gets the same examples one per row",
  )
  p.add_argument("--batches", default=None, help=argparse.SUPPRESS)
  p.add_argument("--child", choices=("ours", "peft"), default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child == "ours":
    _common.emit(child_ours(args))
    return
  if args.child == "peft":
    _common.emit(child_peft(args))
    return
  common = [
    "--steps",
    str(args.steps),
    "--warmup",
    str(args.warmup),
    "--batch",
    str(args.batch),
    "--seq",
    str(args.seq),
    "--accum",
    str(args.accum),
  ]
  common += (["--trace", args.trace] if args.trace else []) + (["--remat"] if args.remat else [])
  common += ["--pack"] if args.pack else []
  tokens_per_step = args.batch * args.seq
  if args.data == "real":
    path = os.path.join(tempfile.mkdtemp(prefix="mdkif_bench_"), "batches.npz")
    info = real_batches(args.warmup + args.steps, args.seq, path, args.pack)
    common += ["--batches", path]
    tokens_per_step = info["real_per_step"]  # real (non-padding) tokens: same for both sides
    print(
      f"real batches: {info['rows']} rows x {args.seq} (one per skill"
      f"{', packed' if args.pack else ''}), {info['examples_per_step']:.1f} examples and "
      f"{info['real_per_step']:.0f} real tokens per step, answer tokens "
      f"{info['answer_share']:.1%} of the real tokens, padding {info['padding_share']:.1%} of "
      "our rows",
      file=sys.stderr,
      flush=True,
    )
    if args.pack:
      steps = [
        [kw["input_ids"].shape for kw, _ in peft_inputs(b, True)] for b in load_batches(path)
      ]
      print(
        "PEFT micro-batches per step (rows x padded length): "
        + "  ".join("+".join(f"{n}x{t}" for n, t in st) for st in steps),
        file=sys.stderr,
        flush=True,
      )
  plan = []
  dtypes = [d for d in args.dtype.split(",") if d]
  if args.only != "peft":
    plan.append(["ours", dtypes[0]])
  if args.only != "ours":
    plan.append(["peft", "float32"])
  if args.only != "peft":
    plan += [["ours", d] for d in dtypes[1:]]
  runs = []
  for _ in range(args.rounds):
    for fw, dt in plan:
      r = _common.run_child(
        [os.path.abspath(__file__), "--child", fw, "--dtype", dt, *common],
        args.max_load,
        args.wait,
        args.retries,
      )
      print(
        f"  {fw} {dt}: median {_common.median(r['step_s']):.2f} s/step, peak "
        f"{r['peak_rss_gb']:.2f} GB (load {r['load_at_start']:.2f} -> "
        f"{r['load_at_end']:.2f})",
        file=sys.stderr,
        flush=True,
      )
      runs.append(r)
  summarize(runs, tokens_per_step)


if __name__ == "__main__":
  main()
