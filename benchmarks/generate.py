"""Greedy generation speed: mdkif_jax.generate vs transformers, SmolLM2-135M-Instruct, CPU.

Both frameworks load the same packaged GGUF (SmolLM2-135M-Instruct.Q4_1, dequantized to f32)
and run on the same machine in the same run; transformers in f32 with
torch.set_num_threads(os.cpu_count()), ours in f32 (and optionally bf16, see below).

Method (identical for both frameworks, through their public generate APIs):
  * The prompt is `--prompt-len` fixed pseudo-random non-special token ids (same ids for every
    row and both frameworks; no padding: use a multiple of 64 so our length bucket adds none).
  * prefill time  t1 = time of generate(max_new_tokens=1): the prompt forward pass that fills
    the KV cache plus the first token (one argmax over the vocabulary).
  * full time     tN = time of generate(max_new_tokens=N) with N = `--new-tokens`, forced to
    exactly N steps: transformers min_new_tokens=N (EOS suppressed), ours eos_ids=() (no stop).
  * decode time per step = (tN - t1) / (N - 1): each of those steps feeds one token per row
    through the model against the KV cache.
  * prefill tokens/s = B * P / t1;  decode tokens/s = B * (N - 1) / (tN - t1).
  Each (framework, batch, N) call is run once first as warm-up (for JAX: compilation; shapes are
  static so later calls reuse the executable), then all calls of one batch size run in turn,
  `--reps` rounds (interleaved, so every framework sees the same background load); the median
  is reported, and the ratios are also given from each framework's best run (the machine may be
  shared: background load moves single runs by 10-100 %, and transformers' OpenMP threads
  degrade far more than XLA under oversubscription). Before each timed call the driver waits
  (up to `--quiet-wait` s) until the CPUs were < 15 % busy for 0.5 s, and logs that load.
  Timing: time.perf_counter around the whole call, inside the worker. Our generate() returns
  Python lists made with np.asarray(device output), which blocks until the computation is done
  (the equivalent of block_until_ready): nothing is left in flight when the clock stops.

Isolation: each framework (and each of our dtypes) runs in its own worker process, driven one
call at a time over a pipe, with a short pause between calls. In one process, torch's OpenMP
worker threads (which spin after each parallel region) were measured to slow our later XLA runs
by 1.5-2.5x; OMP_WAIT_POLICY=passive / KMP_BLOCKTIME=0 would cure that but slow transformers'
prefill by ~25 %, so separate processes are the fair set-up.

`--ours-dtypes f32 bf16` also times ours with bf16 weights and compute (f32 accumulation;
different numerics from the f32 reference, so the greedy-agreement column matters there).

Run:  PYTHONPATH=. .venv/bin/python benchmarks/generate.py [--new-tokens 64] [--prompt-len 256]
        [--reps 3] [--batch-sizes 1 8] [--ours-dtypes f32 bf16]
Targets: decode >= 2x transformers at batch 1, prefill >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = {"f32": "float32", "bf16": "bfloat16"}
TAG = "@@bench "  # prefix of protocol lines on a worker's stdout (anything else is ignored)
PAUSE_S = 0.5  # between calls, so one framework's spinning threads have gone idle


# ---- workers -------------------------------------------------------------------------------
def ours_runner(dtype: str, threads: int):
  import jax.numpy as jnp

  from mdkif_jax.model import generate as gen
  from mdkif_jax.model import loading
  from mdkif_jax.model.config import Numerics

  dt = jnp.dtype(DTYPES[dtype])
  model = loading.load_model(
    "smollm2_135m", numerics=Numerics(param_dtype=dt, compute_dtype=dt), progress=False
  )

  def run(prompts, n):
    # host lists: np.asarray inside generate() has already waited for the device
    return gen.generate(model, prompts, max_new_tokens=n, eos_ids=())

  return run


def hf_runner(dtype: str, threads: int):
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  from mdkif_jax.model import loading

  torch.set_num_threads(threads)
  hf_logging.disable_progress_bar()
  path = loading.smollm2_gguf_path()
  model = AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name, dtype=getattr(torch, DTYPES[dtype])
  ).eval()
  pad_id = model.generation_config.pad_token_id
  pad_id = model.config.eos_token_id if pad_id is None else pad_id

  def run(prompts, n):
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
      out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad_id,
      )
    assert out.shape[1] == ids.shape[1] + n, out.shape
    return out[:, ids.shape[1] :].tolist()

  return run


def worker(kind: str, dtype: str, threads: int) -> None:
  """Serve {"prompts", "n"} requests on stdin with {"t", "out"} replies on stdout."""
  t = time.perf_counter()
  run = (hf_runner if kind == "hf" else ours_runner)(dtype, threads)
  info = {"load_s": time.perf_counter() - t}
  if kind == "hf":
    import torch

    info["threads"] = torch.get_num_threads()
  else:
    import jax

    info["backend"] = f"jax {jax.__version__} {jax.default_backend()} x{jax.device_count()}"
  print(TAG + json.dumps(info), flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    t0 = time.perf_counter()
    out = run(req["prompts"], req["n"])
    elapsed = time.perf_counter() - t0
    print(TAG + json.dumps({"t": elapsed, "out": out}), flush=True)


class Worker:
  def __init__(self, name: str, kind: str, dtype: str, threads: int):
    self.name = name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, dtype, str(threads)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    self.proc = subprocess.Popen(
      cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=dict(os.environ, PYTHONPATH=path),
    )
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(TAG):
        return json.loads(line[len(TAG) :])
    raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")

  def __call__(self, prompts, n) -> tuple[float, list[list[int]]]:
    self.proc.stdin.write(json.dumps({"prompts": prompts, "n": n}) + "\n")
    self.proc.stdin.flush()
    reply = self._read()
    return reply["t"], reply["out"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


# ---- driver --------------------------------------------------------------------------------
def _cpu_ticks() -> tuple[int, int]:
  with open("/proc/stat") as f:
    vals = [int(v) for v in f.readline().split()[1:]]
  return vals[3] + vals[4], sum(vals)  # (idle + iowait, total)


def wait_quiet(max_wait: float, max_busy: float = 0.15, window: float = PAUSE_S) -> float:
  """Sleep `window` s at least; then keep waiting (up to `max_wait` s) until the machine was
  less than `max_busy` busy over the last window. Returns that last busy fraction."""
  start = time.perf_counter()
  while True:
    idle0, total0 = _cpu_ticks()
    time.sleep(window)
    idle1, total1 = _cpu_ticks()
    busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
    if busy < max_busy or time.perf_counter() - start > max_wait:
      return busy


def make_prompt(prompt_len: int, vocab: int = 49152, seed: int = 0) -> list[int]:
  import numpy as np

  rng = np.random.default_rng(seed)
  # ids >= 100 avoid SmolLM2's special tokens (0..16) and the byte tokens
  return rng.integers(100, vocab, size=prompt_len).tolist()


def fmt(times):
  return "[" + ", ".join(f"{t:.3f}" for t in times) + "] s"


def rates(t1, tN, B, P, N):
  prefill = B * P / t1
  step = (tN - t1) / (N - 1)
  return prefill, B / step, step


def common_prefix(a, b) -> int:
  n = 0
  for x, y in zip(a, b, strict=False):
    if x != y:
      break
    n += 1
  return n


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--prompt-len", type=int, default=256)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  ap.add_argument(
    "--ours-dtypes",
    nargs="+",
    choices=sorted(DTYPES),
    default=["f32"],
    help="our weight+compute dtypes to time (bf16 accumulates in f32); transformers is f32",
  )
  ap.add_argument(
    "--hf-dtypes",
    nargs="+",
    choices=sorted(DTYPES),
    default=["f32"],
    help="transformers' weight+compute dtypes to time; ratios are against transformers f32",
  )
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  ap.add_argument("--skip-hf", action="store_true", help="only time ours")
  ap.add_argument(
    "--quiet-wait",
    type=float,
    default=60.0,
    help="before each call wait up to this many s for the CPUs to be < 15%% busy (0: no wait)",
  )
  ap.add_argument("--worker", nargs=3, metavar=("KIND", "DTYPE", "THREADS"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    kind, dtype, threads = args.worker
    return worker(kind, dtype, int(threads))
  if args.new_tokens < 2:
    ap.error("--new-tokens must be >= 2 (decode time is (t_N - t_1) / (N - 1))")
  if args.reps < 1:
    ap.error("--reps must be >= 1")
  P, N = args.prompt_len, args.new_tokens
  log = lambda s: print(s, flush=True)

  log(f"cpu_count {os.cpu_count()}, loadavg {os.getloadavg()[0]:.2f}")
  log(
    f"prompt {P} tokens, {N} new tokens (forced), batch sizes {args.batch_sizes}, reps {args.reps}"
  )
  if P % 64:
    log(f"  note: ours pads the prompt to a multiple of 64 tokens; transformers runs {P}")
  workers = {}
  for d in args.ours_dtypes:
    workers[f"mdkif_jax {d}"] = Worker(f"mdkif_jax {d}", "ours", d, args.threads)
  if not args.skip_hf:
    for d in args.hf_dtypes:
      name = f"transformers {d}"
      workers[name] = Worker(name, "hf", d, args.threads)
  for name, w in workers.items():
    log(f"  {name}: {w.info}")
  prompt = make_prompt(P)

  # results[framework][B] = (median t1, median tN, min t1, min tN)
  results: dict[str, dict[int, tuple[float, ...]]] = {name: {} for name in workers}
  outputs: dict[tuple[str, int], list[list[int]]] = {}
  try:
    for B in args.batch_sizes:
      prompts = [prompt] * B
      for name, w in workers.items():  # warm-up (compilation for JAX)
        for n in (1, N):
          outputs[(name, B)] = w(prompts, n)[1]
          time.sleep(PAUSE_S)
      times = {(name, n): [] for name in workers for n in (1, N)}
      busy = {(name, n): [] for name in workers for n in (1, N)}
      for _ in range(args.reps):
        for name, w in workers.items():
          for n in (1, N):
            busy[(name, n)].append(wait_quiet(args.quiet_wait))
            times[(name, n)].append(w(prompts, n)[0])
      for name in workers:
        t1s, tNs = times[(name, 1)], times[(name, N)]
        results[name][B] = (statistics.median(t1s), statistics.median(tNs), min(t1s), min(tNs))
        load = max(busy[(name, 1)] + busy[(name, N)])
        log(
          f"  {name:<16} B={B}: t_1 runs {fmt(t1s)}  t_{N} runs {fmt(tNs)}  "
          f"(CPU busy before a run: up to {load:.0%})"
        )
  finally:
    for w in workers.values():
      w.close()
  log(f"loadavg after: {os.getloadavg()[0]:.2f}")

  log("")
  log(f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), prompt {P}, {N} new tokens, median of")
  log(f"{args.reps} (prefill = generate(max_new_tokens=1); decode = (t_{N} - t_1) / {N - 1})")
  head = (
    f"{'B':>3} | {'framework':<16} | {'prefill s':>9} | {'prefill tok/s':>13} | "
    f"{'decode ms/step':>14} | {'decode tok/s':>12}"
  )
  log(head)
  log("-" * len(head))
  for B in args.batch_sizes:
    for name, res in results.items():
      t1, tN = res[B][:2]
      pre, dec, step = rates(t1, tN, B, P, N)
      log(f"{B:>3} | {name:<16} | {t1:>9.3f} | {pre:>13.1f} | {step * 1e3:>14.1f} | {dec:>12.1f}")
  if args.skip_hf:
    return
  log("")
  refs = [name for name in workers if name.startswith("transformers")]
  log("ratios ours / transformers (tokens/s; > 1 means ours is faster)")
  log("targets: prefill >= 1.5x; decode >= 2x at B=1. [in brackets: from the best run of each]")
  for ref in refs:
    for name in workers:
      if name in refs:
        continue
      for B in args.batch_sizes:
        o, h = results[name][B], results[ref][B]
        po, do, _ = rates(*o[:2], B, P, N)
        ph, dh, _ = rates(*h[:2], B, P, N)
        po_b, do_b, _ = rates(*o[2:], B, P, N)
        ph_b, dh_b, _ = rates(*h[2:], B, P, N)
        same = min(
          common_prefix(a, b) for a, b in zip(outputs[(name, B)], outputs[(ref, B)], strict=True)
        )
        log(
          f"  {name:<16} / {ref:<17} B={B}: prefill {po / ph:.2f}x [{po_b / ph_b:.2f}x], "
          f"decode {do / dh:.2f}x [{do_b / dh_b:.2f}x]; greedy tokens equal for the first "
          f"{same}/{N} (worst row)"
        )


if __name__ == "__main__":
  main()
