"""Routing forward: 12 skills mixed per example (unmerged) and a merged task mixture, against
the base model alone (issue 6). CPU, one process, same token batch, interleaved timing.

Run (from the repo root):

  PYTHONPATH=. .venv/bin/python benchmarks/routing.py [--models smollm2 llama2_7b_2l]
      [--batch N] [--seq N] [--repeats 10] [--paths base merged unmerged unpacked stacked]
      [--dtype f32|bf16] [--max-load 1.5] [--wait 600] [--json OUT]

Models:
  * smollm2: SmolLM2-135M-Instruct (the packaged GGUF, dequantized; 30 layers, tied
    49152 x 576 embedding), default batch 8 x 256.
  * llama2_7b_2l: the `llama2_7b` preset (hidden 4096, MLP 11008, 32 heads, untied 32000-token
    head) cut to 2 layers, random weights, default batch 4 x 256.
  `--batch` / `--seq` override both. `--dtype bf16` gives bf16 weights and compute (matmuls
  accumulate in f32); adapters stay f32 as stage 1 stores them and `delta` casts them.

Skills: S = 12 AdaLoRA skills stacked on the skill axis on all 7 targets (q,k,v,o,gate,up,
down) of every layer, init_r 12 (`adapters.init_adalora`), lora_alpha 8 (PEFT scale
8 / 12). E is drawn N(0, 1) (nonzero, so every ΔW is real) and then pruned the way AdaLoRA's
final allocation does: per skill one global top-k (`adalora.allocate`) over random triplet
scores keeps target_r x (matrices) = 8 ranks per matrix on average (from 0 to 12 per matrix).
Stage 2 loads the skills at init_r (`checkpoint.load_one`) and lays them out once for serving
(`serving.serving_stack`): per matrix, the kept ranks of all 12 skills side by side, layer-major,
padded to the busiest layer's count (a multiple of 8): the "served" rank R.

Five paths, each one jitted logits forward (`model.forward`, logits at every position):
  (a) base: the frozen model, no adapters.
  (b) merged: W0 + Σ_s w_s ΔW_s in a copy of the kernels (`serving.merged_params` on the served
      skills; run once before timing) fed to the same jitted base forward.
  (c) unmerged (served): `AdapterCtx(weights=[B, S])` on the served layout, packed
      (`serving.packed_params`, built once before timing: B stacked under W as extra kernel
      rows where R <= in / 8, so x·W + h·Bᵀ is one GEMM of [x, h]), a different softmax
      mixture per row (row 0 uses the merged path's task mixture, so merged and unmerged logits
      are compared on it). This is stage 2's unmerged path (the gate, and the fitting).
  (d) unmerged (unpacked): the same served layout and mixtures with every kernel unpacked:
      x·W plus a separate up-product and add per projection (the layout A/B).
  (e) unmerged (stacked): the same mixtures on the skill-stacked [S, L, ...] adapters as stage 1
      stores them (all S x r ranks, A⊙E and the layer-major transpose inside every call): the
      layout A/B.
The script restarts itself once with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (huge-page
malloc for every path alike; `--default-malloc` skips it; see benchmarks/_common.py).
After one warm-up call each (compilation), `--repeats` rounds call the paths in turn
(the order rotates each round), timed with time.perf_counter around the call and
`jax.block_until_ready`. `--paths` times only some of them (base always): with
`--paths base unmerged` every round is a base call next to a served call, twice as many rounds
fit in the same time, and each pair is seconds apart. Reported per path: the median, the
overhead vs base from the medians, "paired" (the median over rounds of that round's path
time / base time) and a 90% bootstrap interval of the paired overhead (rounds resampled with
replacement, 2000 times): single calls of the 2-layer 7B shape ranged over 5.55-7.58 s in one
run here, so one run's overhead on a share of ~3% is a noisy number; the interval says how
noisy (pairs in one run, not the drift between runs). Before the
rounds the script waits (up to `--wait` s over the whole run, polling every 60 s) until the
1-minute load average is below `--max-load`, and prints the load before and after and the
share of the CPUs other processes used during each path's calls (/proc/stat, see
benchmarks/_common.others_share; 50 % on 2 cores = another process held a whole core).

FLOPs (matmul FLOPs, multiply-add = 2; `flop_counts`): per token
  base  = 2 (P + V D) + 4 L (C / T) H Dh
          P = projection weights over all layers, V D = the vocabulary projection,
          4 L (C / T) H Dh = QKᵀ and PV over the C (query, key) pairs the causal query blocks
          compute (`attention.computed_pairs`: 62.5% of T x T at T = 256, blocks of 64)
  extra = Σ_targets L R_t (2 (in + out) + 1)   (x Aᵀ, h Bᵀ, and one multiply per rank for
          the per-row weighting), R_t = the ranks computed per matrix: served R, or S x r
"kept" is 2 Σ over (skill, layer, target) of kept rank x (in + out).
Share = extra / base. Targets: merged within 3 % of the base; unmerged (served) overhead at
most 1.25 x its computed-rank share (its ratio to the kept-rank share is printed beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MODELS = {  # name: (preset, layers or None for all, default batch, default seq)
  "smollm2": ("smollm2_135m", None, 8, 256),
  "llama2_7b_2l": ("llama2_7b", 2, 4, 256),
}
DTYPES = {"f32": "float32", "bf16": "bfloat16"}
NUM_SKILLS, INIT_R, TARGET_R, LORA_ALPHA = 12, 12, 8, 8.0
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PATHS = ("base", "merged", "unmerged", "unpacked", "stacked")
MERGED_TARGET, UNMERGED_FACTOR = 0.03, 1.25


# ---- FLOPs ---------------------------------------------------------------------------------
def flop_counts(cfg, batch: int, seq: int, computed: dict, kept_ranks: dict) -> dict:
  """Per-token matmul FLOPs of the base forward and of the unmerged skills (module docstring).

  computed: {target: ranks the unmerged path multiplies per matrix}: S x r for the stacked
    layout, the served rank R for `serving.serving_stack`.
  kept_ranks: {target: [S, L] int} ranks the allocation kept.
  """
  n = batch * seq
  f = _common.step_flops(cfg, batch, seq, seq, 0, ())
  dims = cfg.projection_dims()
  L = cfg.num_hidden_layers
  extra = sum(L * r * (2 * sum(dims[t]) + 1) for t, r in computed.items())  # + the weighting
  kept = 2 * sum(int(np.sum(k)) * sum(dims[t]) for t, k in kept_ranks.items())
  base = (f["dense_fwd"] + f["attention_fwd"]) / n
  return {
    "base": base,
    "dense": f["dense_fwd"] / n,
    "attention": f["attention_fwd"] / n,
    "extra_computed": extra,
    "extra_kept": kept,
    "share_computed": extra / base,
    "share_kept": kept / base,
  }


# ---- set-up --------------------------------------------------------------------------------
def model_config(name: str):
  from mdkif_jax.model import config as mc

  preset, layers, _, _ = MODELS[name]
  cfg = mc.PRESETS[preset]
  return cfg if layers is None else dataclasses.replace(cfg, num_hidden_layers=layers)


def load_base(name: str, dtype: str):
  import jax.numpy as jnp

  from mdkif_jax.model import loading
  from mdkif_jax.model.config import Numerics

  dt = jnp.dtype(DTYPES[dtype])
  numerics = Numerics(param_dtype=dt, compute_dtype=dt)
  if name == "smollm2":
    return loading.load_model("smollm2_135m", numerics=numerics, progress=False)
  return lean_random_init(model_config(name), numerics)


def lean_random_init(cfg, numerics):
  """Random N(0, 0.02²) weights (norms 1) drawn one weight at a time.

  `loading.random_init` draws the whole model in one program and peaked at 6.8 GB of RSS for
  the 2.7 GB 2-layer 7B shape; one jitted draw per weight peaks at the model plus one weight.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mdkif_jax.model import llama as model_lib

  graphdef, abstract = nnx.eval_shape(
    lambda: nnx.split(model_lib.Llama(cfg, numerics=numerics, rngs=nnx.Rngs(0)))
  )
  draw = jax.jit(
    lambda k, shape, dtype: (0.02 * jax.random.normal(k, shape)).astype(dtype),
    static_argnums=(1, 2),
  )
  leaves, treedef = jax.tree.flatten(abstract)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(abstract)[0]]
  values = []
  for i, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
    if "norm" in path:
      values.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      values.append(jax.block_until_ready(draw(jax.random.key(i), leaf.shape, leaf.dtype)))
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


def make_skills(cfg, seed: int = 0) -> tuple[dict, dict]:
  """(12 stacked AdaLoRA skills at init_r with pruned nonzero E, kept ranks {t: [S, L]})."""
  import jax
  import jax.numpy as jnp

  from mdkif_jax.peft import adalora, adapters

  key = jax.random.key(seed)
  L = cfg.num_hidden_layers
  dims = {t: cfg.projection_dims()[t] for t in TARGETS}
  ad = adapters.init_adalora(key, dims, L, INIT_R, num_skills=NUM_SKILLS)
  keys = jax.random.split(jax.random.fold_in(key, 1), 2 * len(TARGETS))
  scores = {t: jax.random.uniform(keys[i], (NUM_SKILLS, L, INIT_R)) for i, t in enumerate(dims)}
  masks = adalora.allocate(scores, jnp.int32(TARGET_R * L * len(TARGETS)))
  for i, t in enumerate(dims):
    e = jax.random.normal(keys[len(TARGETS) + i], (NUM_SKILLS, L, INIT_R))
    ad[t]["E"] = jnp.where(masks[t], e, 0.0)
  kept = {t: np.asarray(masks[t]).sum(-1) for t in TARGETS}
  return ad, kept


def mixtures(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(task mixture [S], per-row mixtures [B, S]): softmax of N(0, 1) logits; row 0 = task."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(batch + 1, NUM_SKILLS))
  w = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  rows = w[1:].astype(np.float32)
  rows[0] = w[0]
  return w[0].astype(np.float32), rows


# ---- measurement ---------------------------------------------------------------------------
def timed(fn, *args):
  import jax

  c0 = _common.cpu_snapshot()
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  seconds = time.perf_counter() - t
  return out, seconds, _common.others_share(c0, _common.cpu_snapshot())


def bench_model(name: str, args, deadline: float) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mdkif_jax.model import llama as model_lib
  from mdkif_jax.peft import adapters, serving

  _, _, batch, seq = MODELS[name]
  batch, seq = args.batch or batch, args.seq or seq
  log = lambda s: print(s, flush=True)
  t0 = time.perf_counter()
  base = load_base(name, args.dtype)
  cfg = base.cfg
  graphdef, frozen = nnx.split(base)
  skills, kept = make_skills(cfg)
  scale = adapters.adapter_scale(LORA_ALPHA, INIT_R)
  w_task, w_rows = mixtures(batch)
  jax.block_until_ready((frozen, skills))
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  served = jax.block_until_ready(serving.serving_stack(skills))
  packed_params, packed = jax.block_until_ready(serving.packed_params(frozen, served))
  serve_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  merged = jax.block_until_ready(serving.merged_params(frozen, served, w_task, scale))
  merge_s = time.perf_counter() - t0
  tokens = jnp.asarray(
    np.random.default_rng(1).integers(100, cfg.vocab_size, (batch, seq)), jnp.int32
  )
  weights = jnp.asarray(w_rows)

  @jax.jit
  def plain(params, tokens):
    return model_lib.forward(graphdef, params, tokens)

  @jax.jit
  def mixed(params, tokens, stacked, weights):
    ctx = adapters.AdapterCtx(scale, weights=weights)
    return model_lib.forward(graphdef, params, tokens, adapters=stacked, adapter_ctx=ctx)

  calls = {
    "base": (plain, frozen, tokens),
    "merged": (plain, merged, tokens),
    "unmerged": (mixed, packed_params, tokens, packed, weights),
    "unpacked": (mixed, frozen, tokens, served, weights),
    "stacked": (mixed, frozen, tokens, skills, weights),
  }
  paths = [p for p in PATHS if p in args.paths or p == "base"]
  first, outs = {}, {}
  for p, (fn, *a) in calls.items():  # warm-up: compiles (merged reuses base's executable)
    out, first[p], _ = timed(fn, *a)
    outs[p] = np.asarray(out[0], np.float32)
  ref = np.abs(outs["base"]).max()
  check = {
    "merged_vs_base": float(np.abs(outs["merged"] - outs["base"]).max() / ref),
    "unmerged_vs_merged_row0": float(np.abs(outs["unmerged"] - outs["merged"]).max() / ref),
    "unmerged_vs_stacked": float(np.abs(outs["unmerged"] - outs["stacked"]).max() / ref),
    "unmerged_vs_unpacked": float(np.abs(outs["unmerged"] - outs["unpacked"]).max() / ref),
  }
  del outs
  served_r = {t: int(leaf["route"].shape[1]) for t, leaf in served.items()}
  fl = flop_counts(cfg, batch, seq, served_r, kept)
  fl_stacked = flop_counts(cfg, batch, seq, {t: NUM_SKILLS * INIT_R for t in kept}, kept)
  log(
    f"\n== {name}: {cfg.num_hidden_layers} layers, batch {batch} x {seq}, {args.dtype}; "
    f"set-up {setup_s:.1f} s, serving layout {serve_s:.2f} s, merge {merge_s:.1f} s, "
    "first calls (compile) "
    + ", ".join(f"{p} {first[p]:.1f} s" for p in PATHS)
    + f"; timed: {', '.join(paths)}"
  )
  log(
    f"   max |logit diff| / max |logit|: merged vs base {check['merged_vs_base']:.2e} "
    f"(the deltas are real), unmerged vs merged on row 0 {check['unmerged_vs_merged_row0']:.2e}"
    f", unmerged (served) vs stacked {check['unmerged_vs_stacked']:.2e}, vs unpacked "
    f"{check['unmerged_vs_unpacked']:.2e}"
  )
  log(
    f"   kept ranks per matrix: mean {np.mean([k.mean() for k in kept.values()]):.2f}, "
    f"min {min(k.min() for k in kept.values())}, max {max(k.max() for k in kept.values())}; "
    f"computed: stacked {INIT_R} per skill ({NUM_SKILLS * INIT_R} per matrix), served "
    f"(kept ranks of all skills side by side) {served_r}; packed into the kernels (R <= in / 8): "
    f"{sorted(t for t, leaf in packed.items() if 'B' not in leaf)}"
  )
  wait_s = max(0.0, deadline - time.monotonic())
  load_before = _common.wait_for_quiet(args.max_load, wait_s, poll_s=60.0)
  times = {p: [] for p in paths}
  others = {p: [] for p in paths}
  for i in range(args.repeats):
    for p in paths[i % len(paths) :] + paths[: i % len(paths)]:
      fn, *a = calls[p]
      _, s, o = timed(fn, *a)
      times[p].append(s)
      others[p].append(o)
  load_after = _common.load1()
  med = {p: _common.median(times[p]) for p in paths}
  ratios = {p: np.asarray(times[p]) / np.asarray(times["base"]) for p in paths}
  paired = {p: float(np.median(ratios[p])) for p in paths}
  paired_ci = {p: _common.median_interval(ratios[p]) for p in paths}
  return {
    "model": name,
    "layers": cfg.num_hidden_layers,
    "batch": batch,
    "seq": seq,
    "dtype": args.dtype,
    "skills": NUM_SKILLS,
    "init_r": INIT_R,
    "target_r": TARGET_R,
    "kept_rank_mean": float(np.mean([k.mean() for k in kept.values()])),
    "flops_per_token": fl,
    "flops_per_token_stacked": fl_stacked,
    "served_ranks": served_r,
    "serve_s": serve_s,
    "median_s": med,
    "paths": paths,
    "paired_ratio": paired,
    "paired_ci": paired_ci,
    "times_s": times,
    "others": others,
    "first_call_s": first,
    "check": check,
    "load_before": load_before,
    "load_after": load_after,
    "setup_s": setup_s,
    "merge_s": merge_s,
    "peak_rss_gb": _common.peak_rss_gb(),
  }


def verdicts(r: dict) -> dict:
  """Overheads vs base (from the medians) and whether each target is met.

  The target is judged on the served layout (stage 2's unmerged path) against the share of the
  ranks it multiplies; its ratio to the kept-rank share (the allocation's own ranks) is
  reported beside it. The stacked layout is judged against its own S x r share.
  """
  base = r["median_s"]["base"]
  share = r["flops_per_token"]["share_computed"]
  over = {p: r["median_s"][p] / base - 1 for p in r["paths"]}
  out = {"overhead": over}
  if "merged" in over:
    out["merged_met"] = abs(over["merged"]) <= MERGED_TARGET
  if "unmerged" in over:
    out["unmerged_ratio"] = over["unmerged"] / share
    out["unmerged_ratio_kept"] = over["unmerged"] / r["flops_per_token"]["share_kept"]
    out["unmerged_met"] = over["unmerged"] <= UNMERGED_FACTOR * share
    lo, hi = (x - 1 for x in r["paired_ci"]["unmerged"])
    out["unmerged_paired_ratio_ci"] = (lo / share, hi / share)
  if "unpacked" in over:
    out["unpacked_ratio"] = over["unpacked"] / share
  if "stacked" in over:
    out["stacked_ratio"] = over["stacked"] / r["flops_per_token_stacked"]["share_computed"]
  return out


def table_rows(r: dict) -> list[list[str]]:
  """One row per path: model, path, median ms, overhead, paired, share, ratio, target, met."""
  v = verdicts(r)
  sk = r["flops_per_token"]["share_kept"]
  label = f"{r['model']} {r['batch']}x{r['seq']} {r['dtype']}"
  rows = []
  for p in r["paths"]:
    ms = f"{1e3 * r['median_s'][p]:.1f}"
    lo, hi = (x - 1 for x in r["paired_ci"][p])
    over = f"{v['overhead'][p]:+.2%}"
    paired = f"{r['paired_ratio'][p] - 1:+.2%} [{lo:+.2%}, {hi:+.2%}]"
    if p == "base":
      rows.append([label, p, ms, "–", "–", "–", "–", "–", "–"])
    elif p == "merged":
      target = f"within {MERGED_TARGET:.0%}"
      rows.append([label, p, ms, over, paired, "0", "–", target, v["merged_met"]])
    elif p == "unmerged":
      sc = r["flops_per_token"]["share_computed"]
      share = f"{sc:.2%} ({sk:.2%})"
      lo_r, hi_r = v["unmerged_paired_ratio_ci"]
      ratio = (
        f"{v['unmerged_ratio']:.2f} ({v['unmerged_ratio_kept']:.2f}); paired interval "
        f"{lo_r:.2f}-{hi_r:.2f}"
      )
      target = f"<= {UNMERGED_FACTOR * sc:.2%}"
      rows.append(
        [label, "unmerged (served)", ms, over, paired, share, ratio, target, v["unmerged_met"]]
      )
    elif p == "unpacked":
      sc = r["flops_per_token"]["share_computed"]
      rows.append(
        [
          label,
          "unmerged (unpacked)",
          ms,
          over,
          paired,
          f"{sc:.2%} ({sk:.2%})",
          f"{v['unpacked_ratio']:.2f}",
          "(layout A/B)",
          "–",
        ]
      )
    else:
      sc = r["flops_per_token_stacked"]["share_computed"]
      share = f"{sc:.2%} ({sk:.2%})"
      rows.append(
        [
          label,
          "unmerged (stacked)",
          ms,
          over,
          paired,
          share,
          f"{v['stacked_ratio']:.2f}",
          "(layout A/B)",
          "–",
        ]
      )
  return [[{True: "yes", False: "NO"}.get(c, c) for c in row] for row in rows]


def print_table(results: list[dict]) -> None:
  level = f"{_common.INTERVAL_LEVEL:.0%}"
  head = [
    "model",
    "path",
    "median ms",
    "overhead vs base",
    f"paired [{level} interval]",
    "extra-FLOP share computed (kept)",
    "overhead / share computed (kept)",
    "target",
    "met",
  ]
  print("\n" + " | ".join(head))
  print("|".join("---" for _ in head))
  for r in results:
    for row in table_rows(r):
      print(" | ".join(row))
  for r in results:
    fl = r["flops_per_token"]
    others = ", ".join(f"{p} {_common.median(r['others'][p]):.0%}" for p in r["paths"])
    print(
      f"  {r['model']}: base {fl['base'] / 1e6:.1f} MFLOP/token (dense {fl['dense'] / 1e6:.1f}"
      f" + attention {fl['attention'] / 1e6:.1f}), skills {fl['extra_computed'] / 1e6:.1f}"
      f" computed ({fl['extra_kept'] / 1e6:.1f} kept); 1-min load {r['load_before']:.2f} before,"
      f" {r['load_after']:.2f} after; others' CPU share (median per path) {others}; "
      f"peak RSS {r['peak_rss_gb']:.1f} GB",
      flush=True,
    )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
  ap.add_argument("--batch", type=int, default=None, help="rows (default: per model)")
  ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: per model)")
  ap.add_argument("--repeats", type=int, default=10, help="timed rounds after the warm-up")
  ap.add_argument(
    "--paths",
    nargs="+",
    choices=PATHS,
    default=list(PATHS),
    help="paths timed in the rounds (base always)",
  )
  ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
  ap.add_argument("--max-load", type=float, default=1.5, help="wait for a lower 1-min load")
  ap.add_argument("--wait", type=float, default=600.0, help="wait at most this long in all (s)")
  ap.add_argument("--json", default=None, help="write the results to this file")
  ap.add_argument(
    "--default-malloc", action="store_true", help="keep glibc's malloc (no _common.HUGEPAGES)"
  )
  args = ap.parse_args(argv)
  if args.repeats < 1:
    ap.error("--repeats must be >= 1")
  if not args.default_malloc and argv is None:  # run as a script, not called from Python
    _common.reexec_with_hugepages()
  import jax

  print(
    f"jax {jax.__version__} {jax.default_backend()} x{jax.device_count()}, "
    f"{os.cpu_count()} CPUs, load {_common.load1():.2f}, "
    f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}",
    flush=True,
  )
  deadline = time.monotonic() + args.wait  # one waiting budget for the whole run
  results = [bench_model(name, args, deadline) for name in args.models]
  print_table(results)
  if args.json:
    for r in results:
      r["verdicts"] = verdicts(r)
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
