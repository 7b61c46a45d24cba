"""Step-interleaved A/B of our training step under config variants, in one process.

Run (from the repo root):

  PYTHONPATH=. .venv/bin/python benchmarks/ab_step.py --dtype bfloat16 --steps 8 \
      --variant base: --variant block128:model.attention_block=128 \
      [--variant NAME:key=value,key=value ...]

Why: on these shared VMs the same step's time drifts by 20-40% over minutes (slow and fast
periods), so runs of two variants in separate processes, even alternating, compare
periods as much as variants. Here every variant is set up (`train.setup_training` on
`train_step.bench_config`: SmolLM2-135M, batch 8 x 256 random tokens, the issue-3 AdaLoRA
settings) in the same process, and after `--warmup` steps each (compilation included) the
variants run one step each, in an order that rotates every step, on the same batch. Each
variant's step time is divided by the first variant's time at the same step, and the median
of those paired ratios is printed with a 90% bootstrap interval: below 1 = faster than the
first variant. Losses are compared too (max relative difference to the first variant's).

Peak memory is not separable in one process: compare it with `benchmarks/train_step.py`.
`--variant` values are Python literals where they parse as one ("128", "True", "(256,)"),
else strings; keys are dotted paths into the config (`model.remat`, `train.loss_chunk`, ...).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
  """`name:key=value,key=value` -> (name, {key: value}); `name:` = the config unchanged.

  A comma separates items only where the next item starts with `key=`, so tuple values
  such as `data.buckets=(128,256)` keep theirs."""
  name, sep, rest = text.partition(":")
  if not sep or not name:
    raise ValueError(f"--variant {text!r}: expected NAME:key=value[,key=value...] (or NAME:)")
  overrides = {}
  for item in filter(None, re.split(r",(?=[\w.]+=)", rest)):
    key, eq, raw = item.partition("=")
    if not eq or not key:
      raise ValueError(f"--variant {text!r}: {item!r} is not key=value")
    try:
      overrides[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      overrides[key] = raw
  return name, overrides


def apply_overrides(config, overrides: dict[str, object]) -> None:
  """Set dotted `overrides` on an ml_collections config; an unknown key is an error."""
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for part in path:
      if part not in node:
        raise KeyError(f"--variant: no config section {part!r} in {key!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"--variant: no config field {key!r}")
    node[leaf] = value


def paired_summary(times: dict[str, list[float]]) -> list[dict]:
  """Per variant: median step time and the median (90% interval) of its per-step time ratio
  to the first variant's."""
  import numpy as np

  base = np.asarray(next(iter(times.values())))
  out = []
  for name, t in times.items():
    ratio = np.asarray(t) / base
    out.append(
      {
        "name": name,
        "median_s": _common.median(list(t)),
        "ratio": float(np.median(ratio)),
        "interval": _common.median_interval(ratio),
      }
    )
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--variant",
    action="append",
    required=True,
    help="NAME:key=value,...; the first is the baseline",
  )
  p.add_argument("--dtype", default="bfloat16", help="model.compute_dtype of every variant")
  p.add_argument("--steps", type=int, default=8, help="measured steps per variant")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (incl. compile)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  args = p.parse_args()
  variants = [parse_variant(v) for v in args.variant]
  if len({n for n, _ in variants}) != len(variants):
    p.error("--variant names must differ")
  _common.reexec_with_hugepages()

  import jax
  import jax.numpy as jnp
  import train_step as ts

  from mdkif_jax import data, train
  from mdkif_jax.data import batches

  runs = []
  for name, overrides in variants:
    cfg = ts.bench_config(args.dtype, seq=args.seq)
    apply_overrides(cfg, overrides)
    run = train.setup_training(cfg, data.SKILLS[:1])
    runs.append(
      {
        "name": name,
        "step": run.fns.train_step,
        "state": run.state,
        "frozen": run.frozen,
        "mesh": run.mesh,
        "times": [],
        "losses": [],
      }
    )
  host = [ts.our_batch(t) for t in ts.batches(args.warmup + args.steps, args.batch, args.seq)]
  for i, b in enumerate(host):
    order = runs[i % len(runs) :] + runs[: i % len(runs)]  # rotate: no variant always first
    for r in order:
      t0 = time.perf_counter()
      r["state"], m = r["step"](r["state"], r["frozen"], batches.to_global(b, r["mesh"]))
      jax.block_until_ready((r["state"], m))
      seconds = time.perf_counter() - t0
      r["losses"].append(float(jnp.sum(m["loss_S"])))
      if i >= args.warmup:
        r["times"].append(seconds)
    print(
      f"  step {i}: " + "  ".join(f"{r['name']} {r['losses'][-1]:.4f}" for r in runs),
      file=sys.stderr,
      flush=True,
    )
  summary = paired_summary({r["name"]: r["times"] for r in runs})
  base_losses = runs[0]["losses"]
  print(
    f"{args.dtype}, {args.steps} interleaved steps per variant (ratio < 1: faster than "
    f"{runs[0]['name']!r})"
  )
  for s, r in zip(summary, runs, strict=True):
    lo, hi = s["interval"]
    dl = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base_losses, strict=True))
    print(
      f"  {s['name']:16s} median {s['median_s']:.3f} s/step  paired ratio {s['ratio']:.3f} "
      f"[90%: {lo:.3f}-{hi:.3f}]  max rel loss diff {dl:.2e}  "
      f"steps {' '.join(f'{t:.2f}' for t in r['times'])}"
    )


if __name__ == "__main__":
  main()
