"""Stage-1 skill training: 12 skills in one program vs 12 single-skill programs, and achieved
FLOP/s as a fraction of this machine's matmul peak (issue 5). SmolLM2-135M-Instruct, CPU.

Run (from the repo root; each mode in its own child process, alternating, load-gated):

  PYTHONPATH=. .venv/bin/python benchmarks/train_skills.py [--steps 3] [--warmup 1]
      [--dtype float32] [--only joint|separate] [--rounds 1] [--max-load 1.5]

What is timed:
  * The real stage-1 step (`train.setup_training`) with the default config (configs/skill.py: all 12
    skills, AdaLoRA init_r 12 on q,k,v,o,gate,up,down, AdamW + clipping + cosine schedule,
    answer-token loss + orthogonal regulariser, the allocator inside jit), fed by the real data
    pipeline (`batches.make_batches`) on the embedded demo corpus: rows_per_skill = 1, one
    128-token bucket, logits only at the answer positions (K, a power of two).
  * joint: one process loads the base once, builds the S = 12 step, runs `--warmup` steps
    (the first compiles) and `--steps` measured steps; each step holds one row of every skill.
  * separate: one process loads the base once and then, for each of the 12 skills in turn,
    builds that skill's own S = 1 step (a new jitted program, compiled again, exactly as
    `train.mode=separate` does) and runs `--warmup` + `--steps` steps of 1 row. Twelve separate
    *processes* would additionally pay the base load (`load_s`) eleven more times.
  * Reported per mode: base load time, compile (first-step) time, median step time, the wall
    time of everything after the base load (compiles + all steps of all skills), tokens/s on
    real (unpadded) tokens over the measured steps, peak RSS of the process (ru_maxrss).
  * FLOP/s: in the same process, after the steps, a jitted 2048 x 2048 matmul is timed in f32
    and in bf16 with f32 accumulation (median of 10): the machine's matmul peak. The step's
    matmul FLOPs are counted analytically (benchmarks/_common.step_flops, per step with its
    own padded shape: rows R, length T, answer positions K):
      forward  = 2 R T P + 2 R K V D + 4 L R T^2 H Dh + 2 R T L A
      total    = 2 (2 R T P + 2 R K V D) + 3 (4 L R T^2 H Dh) + 3 (2 R T L A)
    with P = frozen projection weights per token over all layers (106.2 M for SmolLM2-135M),
    V D the tied vocabulary projection, A = Σ_targets r (in + out) per layer. The frozen base
    needs activation gradients only (≈ 1x its forward), attention 2x, adapters 2x (activation
    and weight gradients). XLA's own count (`jit(...).lower(...).cost_analysis()`) is printed
    next to it. achieved = total / median step time; fraction = achieved / peak of the dtype.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def stage1_config(dtype: str):
  from configs import skill

  cfg = skill.get_config()
  cfg.model.compute_dtype = dtype
  cfg.train.progress = False
  cfg.mesh.shape = (1, 1, 1)
  return cfg


def run_steps(step, state, frozen, batches, mesh, n: int, mcfg, targets, rank) -> dict:

  times, shapes, flops, tokens, others = [], [], [], [], []
  for _ in range(n):
    b = next(batches)
    rows, T = b["tokens"].shape
    K = b["answer_idx"].size / rows  # packed logit positions per row
    g = batches.to_global(b, mesh)
    state, m, seconds, other = _common.timed_step(step, state, frozen, g)
    times.append(seconds)
    others.append(other)
    shapes.append((rows, T, K))
    flops.append(_common.step_flops(mcfg, rows, T, K, rank, targets)["total"])
    tokens.append(int((b["attention_mask"] > 0).sum()))
  return {
    "state": state,
    "times": times,
    "shapes": shapes,
    "flops": flops,
    "tokens": tokens,
    "others": others,
    "last_batch": g,
  }


def child(args) -> dict:
  import jax
  from flax import nnx

  from mdkif_jax import data, sharding, train
  from mdkif_jax.data.batches import make_batches
  from mdkif_jax.model import loading, tokenizer
  from mdkif_jax.model.config import numerics_from

  cfg = stage1_config(args.dtype)
  skills = data.skills.select_skills(cfg.skills.replace("+", ","))
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape))  # the mesh setup_training builds
  t0 = time.perf_counter()
  base = loading.load_model(
    cfg.model.source, numerics=numerics_from(cfg), mesh=mesh, progress=False
  )
  tok = tokenizer.load_tokenizer(cfg.model.tokenizer or cfg.model.source)
  load_s = time.perf_counter() - t0
  _, frozen = nnx.split(base)
  groups = [skills] if args.child == "joint" else [(s,) for s in skills]
  t_all = time.perf_counter()
  per_group = []
  for group in groups:
    tb = time.perf_counter()
    run = train.setup_training(cfg, group, base, tok)  # exactly as train.train_skills builds
    step, state, targets, rank = run.fns.train_step, run.state, run.targets, run.adalora_cfg.init_r
    batches = make_batches(cfg, group, tok)
    build_s = time.perf_counter() - tb
    warm = run_steps(step, state, frozen, batches, mesh, args.warmup, base.cfg, targets, rank)
    meas = run_steps(
      step, warm["state"], frozen, batches, mesh, args.steps, base.cfg, targets, rank
    )
    per_group.append(
      {
        "skills": list(group),
        "build_s": build_s,
        "warmup_s": warm["times"],
        "step_s": meas["times"],
        "shapes": meas["shapes"],
        "flops": meas["flops"],
        "tokens": meas["tokens"],
        "others": meas["others"],
        "warmup_shapes": warm["shapes"],
      }
    )
    last = (step, meas["state"], meas["last_batch"])
  total_s = time.perf_counter() - t_all
  step, state, b = last
  xla_flops = None
  try:
    ca = step.lower(state, frozen, b).cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    xla_flops = float(ca["flops"])
  except Exception as e:  # noqa: BLE001  (informational only)
    print(f"cost_analysis unavailable: {e}", file=sys.stderr)
  peak_rss = _common.peak_rss_gb()  # before the matmul probe allocates its own buffers
  return {
    "mode": args.child,
    "dtype": args.dtype,
    "load_s": load_s,
    "total_s": total_s,
    "others": [o for x in per_group for o in x["others"]],
    "groups": per_group,
    "xla_flops_last_group": xla_flops,
    "matmul_gflops": _common.matmul_peak(),
    "peak_rss_gb": peak_rss,
    "devices": str(jax.devices()),
  }


def summarize(runs: list[dict]) -> None:
  print(
    f"\n{'mode':<9} {'dtype':<9} {'load s':>6} {'compile s':>9} {'step s':>7} "
    f"{'wall s':>7} {'tok/s':>6} {'peak GB':>7} {'load avg':>8} {'others':>6}"
  )
  for r in runs:
    g = r["groups"]
    compile_s = sum(x["build_s"] + x["warmup_s"][0] for x in g)
    steps = [t for x in g for t in x["step_s"]]
    toks = sum(sum(x["tokens"]) for x in g)
    step_med = _common.median([_common.median(x["step_s"]) for x in g])
    print(
      f"{r['mode']:<9} {r['dtype']:<9} {r['load_s']:6.1f} {compile_s:9.1f} {step_med:7.2f} "
      f"{r['total_s']:7.1f} {toks / sum(steps):6.1f} {r['peak_rss_gb']:7.2f} "
      f"{r['load_at_start']:8.2f} {_common.median(r['others']):6.1%}"
    )
  for r in runs:
    g = r["groups"]
    print(
      f"\n{r['mode']} {r['dtype']}: {len(g)} program(s), measured steps "
      f"{sum(len(x['step_s']) for x in g)} in {sum(sum(x['step_s']) for x in g):.1f} s; "
      f"steps + compiles + warm-up after the base load: {r['total_s']:.1f} s"
      + (
        f"; as {len(g)} processes add {len(g) - 1} x {r['load_s']:.1f} s of base loads"
        if len(g) > 1
        else ""
      )
    )
    for x in g:
      name = x["skills"][0] if len(x["skills"]) == 1 else f"{len(x['skills'])} skills"
      print(
        f"  {name}:"
        f" build {x['build_s']:.1f} s, warm-up {' '.join(f'{t:.2f}' for t in x['warmup_s'])}"
        f" s, steps {' '.join(f'{t:.2f}' for t in x['step_s'])} s, (rows, T, K) "
        f"{sorted(set(map(tuple, x['shapes'])))}"
      )
    pk = r["matmul_gflops"]
    peak = pk["f32"] if r["dtype"] == "float32" else pk["bf16_f32acc"]
    flops = sum(f for x in g for f in x["flops"])
    secs = sum(t for x in g for t in x["step_s"])
    achieved = flops / secs / 1e9
    last = g[-1]
    print(
      f"  matmul peak (2048^2, same process): f32 {pk['f32']:.0f} GFLOP/s, bf16 x bf16 -> "
      f"f32 {pk['bf16_f32acc']:.0f} GFLOP/s"
    )
    print(
      f"  analytic step FLOPs {last['flops'][-1] / 1e9:.1f} GFLOP (last program, shape "
      f"{tuple(last['shapes'][-1])}); XLA cost_analysis (counts the scanned layer body once) "
      + (f"{r['xla_flops_last_group'] / 1e9:.1f}" if r["xla_flops_last_group"] else "n/a")
      + " GFLOP"
    )
    print(
      f"  achieved {achieved:.1f} GFLOP/s over the measured steps = {achieved / peak:.1%} of "
      f"the {r['dtype']} matmul peak ({peak:.0f})"
    )
  by = {r["mode"]: r for r in runs}
  if "joint" in by and "separate" in by:
    j, s = by["joint"], by["separate"]
    print(
      f"\njoint vs separate: wall time after the base load {j['total_s']:.1f} s vs "
      f"{s['total_s']:.1f} s ({s['total_s'] / j['total_s']:.2f}x faster joint); "
      f"measured steps only {sum(sum(x['step_s']) for x in j['groups']):.1f} s vs "
      f"{sum(sum(x['step_s']) for x in s['groups']):.1f} s; peak RSS {j['peak_rss_gb']:.2f} "
      f"vs {s['peak_rss_gb']:.2f} GB"
    )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=3, help="measured steps per skill program")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the 1st compiles)")
  p.add_argument("--dtype", default="float32", help="compute dtype(s), comma-separated")
  p.add_argument("--only", choices=("joint", "separate"), default=None)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--max-load", type=float, default=1.5, help="wait for 1-min load below this")
  p.add_argument("--wait", type=float, default=600.0, help="max seconds to wait for the load")
  p.add_argument("--retries", type=int, default=1, help="rerun a contended child")
  p.add_argument("--child", choices=("joint", "separate"), default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.warmup < 1:
    p.error("--warmup must be >= 1 (the first step compiles)")
  if args.child:
    _common.emit(child(args))
    return
  modes = [m for m in ("joint", "separate") if args.only in (None, m)]
  runs = []
  for _ in range(args.rounds):
    for dtype in [d for d in args.dtype.split(",") if d]:
      for mode in modes:
        cmd = [
          os.path.abspath(__file__),
          "--child",
          mode,
          "--dtype",
          dtype,
          "--steps",
          str(args.steps),
          "--warmup",
          str(args.warmup),
        ]
        r = _common.run_child(cmd, args.max_load, args.wait, args.retries)
        print(
          f"  {mode} {dtype}: {r['total_s']:.1f} s after load, peak {r['peak_rss_gb']:.2f} "
          f"GB (load {r['load_at_start']:.2f} -> {r['load_at_end']:.2f})",
          file=sys.stderr,
          flush=True,
        )
        runs.append(r)
  summarize(runs)


if __name__ == "__main__":
  main()
