"""Helpers shared by the benchmarks: load waiting, peak RSS, child processes, malloc, FLOPs.

Every framework runs in its own child process (`run_child`), so each process's peak RSS
(`peak_rss_gb`) is that framework's alone. The 2-core benchmark machines are shared: the
parent waits (`wait_for_quiet`) until the 1-minute load average is low before starting each
child and records the load it started at. Children run with `hugepage_env` (both frameworks).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

RESULT_PREFIX = "RESULT_JSON "


def load1() -> float:
  return os.getloadavg()[0]


# ---- host allocator ---------------------------------------------------------------------------
# XLA:CPU (and torch) take each program's outputs and temporaries from malloc. glibc serves a
# block above 32 MiB with a fresh mmap and unmaps it on free, so every call faults in (and the
# kernel zeroes) each 4 KiB page of its temporaries again: 457k page faults (1.87 GB) per
# SmolLM2 bf16 training step here. `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc
# madvise those blocks for transparent huge pages (these machines' THP mode is "madvise"):
# ~1.5k faults per step (docs/design.md, the huge-pages paragraph). A tunable is read when a process
# starts, hence child environments and `reexec_with_hugepages`. A GLIBC_TUNABLES that already
# sets glibc.malloc.hugetlb (e.g. =0, to opt out) is kept.
HUGEPAGES = "glibc.malloc.hugetlb=1"


def hugepage_env(env=None) -> dict:
  """A copy of `env` (default os.environ) whose GLIBC_TUNABLES asks for huge-page malloc."""
  env = dict(os.environ if env is None else env)
  tunables = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" not in tunables:
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGEPAGES) if t)
  return env


def reexec_with_hugepages() -> None:
  """Restart this script (same interpreter and arguments) under `hugepage_env`, once."""
  env = hugepage_env()
  if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES", None):
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 30.0) -> float:
  """Wait until the 1-min load average is below `max_load` (at most `timeout_s`); return it."""
  deadline = time.monotonic() + timeout_s
  load = load1()
  while load >= max_load and time.monotonic() < deadline:
    print(f"  load {load:.2f} >= {max_load}: waiting {poll_s:.0f} s", file=sys.stderr, flush=True)
    time.sleep(poll_s)
    load = load1()
  return load


def cpu_snapshot() -> tuple[float, float, float]:
  """(machine busy CPU-seconds, this process's CPU-seconds, wall time) for `others_share`."""
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  hz = os.sysconf("SC_CLK_TCK")
  busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()


def others_share(before, after) -> float:
  """Fraction of the machine's cores used by OTHER processes between two snapshots.

  ~0 on a quiet machine; 0.5 on 2 cores means another process took a whole core: that step's
  time is not a clean measurement.
  """
  busy, own, wall = (a - b for a, b in zip(after, before, strict=True))
  return max(busy - own, 0.0) / max(wall * os.cpu_count(), 1e-9)


def timed_step(step, state, frozen, batch):
  """Run one jitted step to completion: (state, metrics, seconds, others' CPU share)."""
  import jax

  c0 = cpu_snapshot()
  t = time.perf_counter()
  state, m = step(state, frozen, batch)
  jax.block_until_ready((state, m))
  seconds = time.perf_counter() - t
  return state, m, seconds, others_share(c0, cpu_snapshot())


def peak_rss_gb() -> float:
  """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def emit(result: dict) -> None:
  """Child side: print the result as one tagged JSON line on stdout."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(
  args: list[str], max_load: float, wait_s: float, retries: int = 0, max_others: float = 0.1
) -> dict:
  """Run `python <this script> args` in a fresh process after waiting for a quiet machine.

  The child reports `others` (per measured step, see `others_share`); if their median exceeds
  `max_others` (someone else ran during the measurement), the child is run again, up to
  `retries` times, and the cleanest attempt is kept.
  """
  best = None
  for attempt in range(retries + 1):
    out = _run_child_once(args, max_load, wait_s)
    out["attempt"] = attempt
    contention = median(out.get("others") or [0.0])
    if best is None or contention < median(best.get("others") or [0.0]):
      best = out
    if contention <= max_others:
      break
    print(
      f"  contended run (others used {contention:.0%} of the CPUs): retrying",
      file=sys.stderr,
      flush=True,
    )
  return best


def _run_child_once(args: list[str], max_load: float, wait_s: float) -> dict:
  load = wait_for_quiet(max_load, wait_s)
  cmd = [sys.executable, *args]
  print(f"  [load {load:.2f}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
  env = hugepage_env()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    sys.stdout.write(proc.stdout)
    raise RuntimeError(f"child failed (rc {proc.returncode}): {' '.join(cmd)}")
  out = json.loads(lines[-1][len(RESULT_PREFIX) :])
  out["load_at_start"] = load
  out["load_at_end"] = load1()
  return out


def median(xs) -> float:
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# Bootstrap intervals of medians: single timed calls on these machines vary by 5-20%.
INTERVAL_LEVEL, RESAMPLES = 0.90, 2000


def _resampled_medians(x, rng, n: int):
  import numpy as np

  x = np.asarray(x, np.float64)
  return np.median(x[rng.integers(0, len(x), (n, len(x)))], axis=1)


def _interval(values, level: float) -> tuple[float, float]:
  import numpy as np

  q = np.quantile(values, ((1 - level) / 2, (1 + level) / 2))
  return float(q[0]), float(q[1])


def median_interval(xs, n: int = RESAMPLES, level: float = INTERVAL_LEVEL, seed: int = 0):
  """(low, high) of median(xs) over `n` bootstrap resamples (e.g. paired per-round ratios)."""
  import numpy as np

  return _interval(_resampled_medians(xs, np.random.default_rng(seed), n), level)


def median_ratio_interval(
  num, den, n: int = RESAMPLES, level: float = INTERVAL_LEVEL, seed: int = 0
):
  """(low, high) of median(num) / median(den) over `n` bootstrap resamples of each sample.

  For unpaired timings (two processes, e.g. PEFT's steps and ours): each side's steps are
  resampled with replacement on their own; `level` of the resampled ratios lie in the interval.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  return _interval(_resampled_medians(num, rng, n) / _resampled_medians(den, rng, n), level)


# ---- analytic FLOPs -------------------------------------------------------------------------
def step_flops(
  cfg,
  rows: int,
  length: int,
  logit_positions: int,
  rank: int,
  targets,
  attention_block: int | None = None,
) -> dict:
  """Matmul FLOPs of one AdaLoRA training step (multiply-add = 2 FLOPs).

  N = rows * length tokens; P = frozen projection weights per token (all layers);
  A = Σ over adapted projections of r * (in + out) per layer; K = positions with logits.
    forward  = 2 N P + 2 rows K V D (vocab projection) + 4 L rows C H Dh (QKᵀ and PV over the
               C (query, key) pairs the causal query blocks of `attention_block` positions
               compute: `attention.computed_pairs`, T² for one block; None = the model's
               default, `Numerics.attention_block`) + 2 N L A (adapters)
    backward = activation gradients only for the frozen base: 2 N P + 2 rows K V D,
               attention 2x its forward (dQ, dK, dP, dV), adapters 2x their forward
               (activation gradient + weight gradient)
    total    = 2 (2 N P + 2 rows K V D) + 3 attention + 3 adapters
  Elementwise work (norms, RoPE, softmax, AdamW, the allocator) and the backward pass's
  recomputed scores are not counted.
  """
  from mdkif_jax.model.config import Numerics
  from mdkif_jax.ops import attention

  if attention_block is None:
    attention_block = Numerics().attention_block
  dims = cfg.projection_dims()
  L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
  H, Dh = cfg.num_attention_heads, cfg.head_dim
  n = rows * length
  p = L * sum(i * o for i, o in dims.values())
  dense = 2 * n * p + 2 * rows * logit_positions * V * D
  attn = 4 * L * rows * attention.computed_pairs(length, attention_block) * H * Dh
  adapter = 2 * n * L * rank * sum(dims[t][0] + dims[t][1] for t in targets)
  return {
    "forward": dense + attn + adapter,
    "total": 2 * dense + 3 * attn + 3 * adapter,
    "dense_fwd": dense,
    "attention_fwd": attn,
    "adapter_fwd": adapter,
  }


def matmul_peak(n: int = 2048, reps: int = 10) -> dict:
  """Median GFLOP/s of a jitted n x n matmul: f32, and bf16 inputs with f32 accumulation."""
  import jax
  import jax.numpy as jnp

  out = {}
  key = jax.random.key(0)
  a32 = jax.random.normal(key, (n, n), jnp.float32)
  b32 = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
  variants = {
    "f32": (jax.jit(lambda a, b: a @ b), a32, b32),
    "bf16_f32acc": (
      jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)),
      a32.astype(jnp.bfloat16),
      b32.astype(jnp.bfloat16),
    ),
  }
  for name, (fn, a, b) in variants.items():
    fn(a, b).block_until_ready()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn(a, b).block_until_ready()
      times.append(time.perf_counter() - t0)
    out[name] = 2 * n**3 / median(times) / 1e9
  return out
