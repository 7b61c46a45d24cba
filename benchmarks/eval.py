"""Candidate scoring: our TaskScorer (the base, configs/eval.py:lm_eval_mcqa) against
lm-evaluation-harness's `hf` backend, the same rows and SmolLM2-135M-Instruct weights (or
another transformers directory, `--model`), one run. Two kinds of rows:
  MCQA (default)     one-token candidates " A".." D": one forward per row on both sides
  --labels TASK      a suite task's label rows (chemprot: 13 relation labels of 1-9 tokens):
                     lm-eval runs prompt + label once per label; ours runs the prompt once with
                     every label after it, in one sequence (model/candidates.py)

Weights: the packaged GGUF (Q4_1), dequantized to f32 by transformers and saved once as a HF
directory (cached under $MDKIF_CACHE or ~/.cache/mdkif_jax/hf/); both frameworks load that
directory, weights and tokenizer alike. lm-eval runs f32; ours runs f32 (the same numerics:
the accuracy check) and bf16 weights and compute with f32 accumulation (`--ours-dtypes`).
Rows: the first `--rows` 4-option records of `--data` (default: MedMCQA's test file in
../shared/data/medagents, MedQA layout), whitespace-collapsed once (what our reader does) into
a temporary JSONL that both sides read: ours with `data/suite.read_task_file`, lm-eval through a
custom local task (MMLU's prompt "{question}\nA. ..\nD. ..\nAnswer:", candidates " A".." D").

Timed, per framework and dtype, in its own child process (torch's spinning OpenMP threads slow
XLA in a shared process), after loading the model (reported apart) and one untimed warm-up
(JAX's compilation, one program per padded length; torch's first calls): `--reps` repetitions of
  ours     read the file, TaskScorer(...) (tokenise, pad each length-sorted batch to a bucket,
           `BUCKETS`) and score(): one forward per row, the candidates' log-likelihoods at the
           answer position only (the one-token fast path)
  lm-eval  simple_evaluate(model=<the loaded HFLM>, the task, log_samples=True,
           bootstrap_iters=0): build requests, tokenise, forward (one per row: its one-token
           continuations share the context's logits), log-softmax over every position, metrics
each with `--batch-size` rows per forward; torch runs with os.cpu_count() threads. Reported:
rows/s from the median repetition, the ratio ours / lm-eval with a 90% bootstrap interval
(`_common.median_ratio_interval`, each side's repetitions resampled on its own), the machine's
CPU model, both accuracies (acc, acc_norm) and on how many rows the choice is the same.

Label rows (--labels): the first --rows scored rows of the suite's task (configs/eval.py:paper's
data and split), in our Example layout; lm-eval's task prompts "Context: {context}\n{query}\n
Answer:" (the preset's context header) with the task's sorted labels as choices, ours reads the
same file (candidates: the file's distinct answers, sorted).

Run (from the repo root; the real measurement, ~15 min on 2 cores):
  PYTHONPATH=. .venv/bin/python benchmarks/eval.py --rows 500 --reps 3 --out eval_bench.json
  PYTHONPATH=. .venv/bin/python benchmarks/eval.py --labels chemprot --rows 100 --reps 3
Smoke:  ... --rows 16 --reps 1
Another model (an exported router mixture, docs/results.md's cross-check) on the rows an
evaluation scored: ... --model DIR --rows-of runs/paper/eval/cells/medmcqa/base.json
Target: ours >= 3x lm-eval's rows/s, the same accuracy.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medagents" / "medmcqa" / "test.jsonl"
TASK = "mdkif_bench_mcqa"
LETTERS = "ABCD"
# lm-eval's MMLU template (tasks/mmlu/default/_default_template_yaml) over MedQA-layout fields
DOC_TO_TEXT = (
  "{{question.strip()}}\nA. {{options.A}}\nB. {{options.B}}\nC. {{options.C}}\n"
  "D. {{options.D}}\nAnswer:"
)
# label rows (our Example layout) as configs/eval.py:lm_eval_mcqa prompts them
LABEL_TEXT = "Context: {{context}}\n{{query}}\nAnswer:"
DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform

  return platform.processor() or "unknown"


def hf_dir() -> pathlib.Path:
  """Where the GGUF's f32 HF copy lives, keyed by the GGUF file's size and mtime."""
  from mdkif_jax.model import loading

  gguf = loading.smollm2_gguf_path()
  st = gguf.stat()
  key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
  base = os.environ.get("MDKIF_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mdkif_jax"
  )
  return pathlib.Path(base) / "hf" / f"{gguf.stem}-{key}"


def convert(out: pathlib.Path) -> None:
  """The GGUF as a HF directory (f32 safetensors + tokenizer), written atomically."""
  import shutil

  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from mdkif_jax.model import loading

  gguf = loading.smollm2_gguf_path()
  out.parent.mkdir(parents=True, exist_ok=True)
  kw = dict(gguf_file=gguf.name, local_files_only=True)
  loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
  # a GGUF-loaded model counts as quantized and refuses save_pretrained: copy its (already
  # dequantized) weights into a plain model of the same config
  config = loaded.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.load_state_dict(loaded.state_dict())
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent))
  try:
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(tmp)
    if not out.exists():
      tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def scored_ids(cell: pathlib.Path | None) -> set[str] | None:
  """The row ids an evaluation cell scored (EVAL/cells/TASK/METHOD.json), None without one."""
  if cell is None:
    return None
  return {p["id"] for p in json.loads(cell.read_text())["predictions"]}


def write_rows(src: pathlib.Path, n: int, out: pathlib.Path, ids: set[str] | None = None) -> int:
  """The first `n` 4-option records of `src` (of those whose `realidx` is in `ids`, if given),
  whitespace collapsed as our reader does (so both frameworks see the same text), as
  MedQA-layout JSONL. Returns the count written."""
  from mdkif_jax.data.sources.qa import squash

  rows = []
  with open(src, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      opts = rec.get("options") or {}
      if sorted(opts) != list(LETTERS) or rec.get("answer_idx") not in opts:
        continue
      if ids is not None and rec.get("realidx") not in ids:
        continue
      rows.append(
        {
          "question": squash(rec["question"]),
          "options": {k: squash(v) for k, v in sorted(opts.items())},
          "answer_idx": rec["answer_idx"],
        }
      )
      if len(rows) == n:
        break
  out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return len(rows)


def write_label_rows(task_name: str, n: int, out: pathlib.Path) -> tuple[int, list[str]]:
  """The first `n` scored rows of a suite task (configs/eval.py:paper's data and split) in our
  Example layout; returns the count written and their labels, sorted (both sides' candidates)."""
  from configs import eval as eval_config
  from mdkif_jax.data import suite
  from mdkif_jax.data.example import LoadReport

  c = eval_config.get_config("paper")
  spec = suite.resolve(task_name)
  rows = suite.task_rows(spec, c.data, LoadReport())
  scored = suite.split_rows(spec, rows, c.fit_fraction)[1][:n]
  recs = [
    {"skill": r.skill, "context": r.context, "query": r.query, "answer": r.answer} for r in scored
  ]
  out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
  return len(recs), sorted({r.answer for r in scored})


def write_task(rows: pathlib.Path, task_dir: pathlib.Path, labels: list[str] | None = None) -> None:
  """lm-eval's task over `rows`: MMLU's prompt and letters over MedQA-layout rows, or (with
  `labels`) "Context: {context}\n{query}\nAnswer:" and the labels over our Example layout."""
  import yaml

  if labels is None:
    text, choices, target = DOC_TO_TEXT, list(LETTERS), "['A', 'B', 'C', 'D'].index(answer_idx)"
  else:
    text, choices, target = LABEL_TEXT, labels, f"{labels!r}.index(answer)"
  task = {
    "task": TASK,
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": str(rows)}},
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": text,
    "doc_to_choice": choices,
    "doc_to_target": "{{" + target + "}}",
    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
  }
  task_dir.mkdir(parents=True, exist_ok=True)
  (task_dir / f"{TASK}.yaml").write_text(yaml.safe_dump(task))


# ---- the two frameworks, each in its own child -------------------------------------------------
def timed_reps(once, reps: int) -> dict:
  """One untimed warm-up, then `reps` timed calls of once() -> (acc, acc_norm, per-row candidate
  log-likelihoods)."""
  t = time.perf_counter()
  once()
  warmup = time.perf_counter() - t
  times, others = [], []
  for _ in range(reps):
    c0 = _common.cpu_snapshot()
    t = time.perf_counter()
    acc, acc_norm, logps = once()
    times.append(time.perf_counter() - t)
    others.append(_common.others_share(c0, _common.cpu_snapshot()))
  return {
    "warmup_s": warmup,
    "times": times,
    "others": others,
    "acc": acc,
    "acc_norm": acc_norm,
    "choices": [int(max(range(len(x)), key=x.__getitem__)) if x else -1 for x in logps],
    "logps": logps,
  }


def ours_child(args) -> dict:
  import numpy as np
  from flax import nnx

  from configs import eval as eval_config
  from mdkif_jax import evaluate, metrics
  from mdkif_jax.data import suite
  from mdkif_jax.data.example import LoadReport
  from mdkif_jax.model import loading, tokenizer
  from mdkif_jax.model.config import numerics_from

  c = eval_config.get_config("lm_eval_mcqa")
  c.model.source = args.hf_dir
  c.model.param_dtype = c.model.compute_dtype = DTYPES[args.ours_dtypes[0]]
  c.router.batch_size = args.batch_size
  c.data.buckets = tuple(args.buckets)
  c.data.max_len = max(args.buckets)
  t = time.perf_counter()
  base = loading.load_model(args.hf_dir, numerics=numerics_from(c), progress=False)
  tok = tokenizer.load_tokenizer(args.hf_dir)
  load_s = time.perf_counter() - t
  graphdef, frozen = nnx.split(base)
  stats_fn = functools.partial(evaluate.merged_stats, frozen, graphdef=graphdef)
  # label rows: multi-token candidates after one prompt pass (the evaluation's path)
  decoder = evaluate.Decoder(tok, c, base) if args.labels else None

  def once():
    rows = suite.read_task_file(pathlib.Path(args.rows_file), LoadReport())
    scorer = evaluate.TaskScorer(rows, rows, tok, c, put=lambda batch: batch)
    scores = scorer(stats_fn, decoder)
    oc = metrics.outcomes(scorer.plan, scorer.last["choice"], scorer.last["texts"])
    norm = metrics.metric_on("acc_norm", oc, np.arange(oc.n))
    choice = scorer.last["choice"]
    logps = [np.asarray(choice[i]).tolist() if i in choice else [] for i in range(len(rows))]
    return scores["accuracy"], norm, logps

  import jax

  out = timed_reps(once, args.reps)
  out.update(load_s=load_s, backend=f"jax {jax.__version__} {jax.default_backend()}")
  return out


def lm_eval_child(args) -> dict:
  import lm_eval
  import torch
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  torch.set_num_threads(os.cpu_count())
  t = time.perf_counter()
  lm = HFLM(pretrained=args.hf_dir, dtype="float32", batch_size=args.batch_size, device="cpu")
  load_s = time.perf_counter() - t
  manager = TaskManager(include_path=args.task_dir)

  def once():
    out = lm_eval.simple_evaluate(
      model=lm,
      tasks=[TASK],
      task_manager=manager,
      log_samples=True,
      bootstrap_iters=0,
      verbosity="WARNING",
    )
    res = out["results"][TASK]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    logps = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return res["acc,none"], res["acc_norm,none"], logps

  out = timed_reps(once, args.reps)
  out.update(load_s=load_s, backend=f"torch {torch.__version__} x{torch.get_num_threads()}")
  return out


# ---- driver ------------------------------------------------------------------------------------
# Our padded lengths: multiples of 16 up to 512, so a length-sorted batch of short MCQA rows
# pads about as little as lm-eval's pad-to-the-longest (MedMCQA: 28-171 tokens, median 49);
# configs/common.py's (128, 256, 512) would score 2.4x the real tokens there. One compiled
# program per length used (the warm-up).
BUCKETS = (*range(16, 513, 16), 1024, 2048)


def child_args(args, kind: str, dtype: str = "f32") -> list[str]:
  return [
    os.path.abspath(__file__),
    "--child",
    kind,
    "--hf-dir",
    args.hf_dir,
    "--rows-file",
    args.rows_file,
    "--task-dir",
    args.task_dir,
    "--reps",
    str(args.reps),
    "--batch-size",
    str(args.batch_size),
    "--ours-dtypes",
    dtype,
    "--buckets",
    *map(str, args.buckets),
    *(["--labels", args.labels] if args.labels else []),
  ]


def max_abs_diff(ours, theirs) -> float:
  """Largest |our - lm-eval's| candidate log-likelihood over the rows both scored."""
  rows = [(u, v) for u, v in zip(ours, theirs, strict=True) if u and v]
  return max((abs(a - b) for u, v in rows for a, b in zip(u, v, strict=True)), default=math.nan)


def summarize(args, n: int, results: dict) -> dict:
  theirs = results["lm_eval"]
  r = {
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "rows": n,
    "labels": args.labels,
    "data": str(args.data),
    "rows_of": None if args.rows_of is None else str(args.rows_of),
    "model": args.hf_dir,
    "batch_size": args.batch_size,
    "buckets": list(args.buckets),
    "reps": args.reps,
    "interval_level": _common.INTERVAL_LEVEL,
    "runs": {},
    "vs_lm_eval": {},
  }
  for name, x in results.items():
    r["runs"][name] = {**x, "rows_per_s": n / _common.median(x["times"])}
    if name == "lm_eval":
      continue
    lo, hi = _common.median_ratio_interval(theirs["times"], x["times"])
    r["vs_lm_eval"][name] = {
      "ratio": _common.median(theirs["times"]) / _common.median(x["times"]),
      "ratio_interval": [lo, hi],
      "same_accuracy": x["acc"] == theirs["acc"],
      "same_acc_norm": x["acc_norm"] == theirs["acc_norm"],
      "same_choices": sum(a == b for a, b in zip(x["choices"], theirs["choices"], strict=True)),
      # the choices alone are a weak check (a small model may pick " A" on every row)
      "max_abs_logp_diff": max_abs_diff(x["logps"], theirs["logps"]),
    }
  return r


def report(r: dict) -> None:
  print(f"\nCPU: {r['cpu']} ({r['cpu_count']} logical CPUs)")
  what = f"{r['labels']} label rows" if r.get("labels") else f"MCQA rows of {r['data']}"
  print(
    f"{r['rows']} {what}, model {r['model']}, batch {r['batch_size']}, "
    f"median of {r['reps']} "
    "(lm-eval: hf backend, f32)"
  )
  for name, x in r["runs"].items():
    print(
      f"  {name:<9} {x['rows_per_s']:8.1f} rows/s  runs {[round(t, 2) for t in x['times']]} s  "
      f"warm-up {x['warmup_s']:.1f} s  load {x['load_s']:.1f} s  acc {x['acc']:.4f}  "
      f"acc_norm {x['acc_norm']:.4f}  others' CPU share {max(x['others']):.0%}  [{x['backend']}]"
    )
  for name, v in r["vs_lm_eval"].items():
    lo, hi = v["ratio_interval"]
    print(
      f"  {name} / lm-eval: {v['ratio']:.2f}x (90% interval {lo:.2f}-{hi:.2f}; target >= 3x); "
      f"same accuracy: {v['same_accuracy']} (acc_norm: {v['same_acc_norm']}); same choice on "
      f"{v['same_choices']}/{r['rows']} rows; largest |Δ log-likelihood| "
      f"{v['max_abs_logp_diff']:.2e}"
    )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rows", type=int, default=500, help="MCQA rows scored per repetition")
  ap.add_argument("--data", type=pathlib.Path, default=DATA, help="MedQA-layout JSONL")
  ap.add_argument("--reps", type=int, default=3, help="timed repetitions per framework")
  ap.add_argument("--batch-size", type=int, default=16, help="rows per forward, both frameworks")
  ap.add_argument(
    "--ours-dtypes",
    nargs="+",
    choices=sorted(DTYPES),
    default=["f32", "bf16"],
    help="our weight+compute dtypes (bf16 accumulates in f32); lm-eval runs f32",
  )
  ap.add_argument(
    "--buckets", type=int, nargs="+", default=list(BUCKETS), help="our padded lengths"
  )
  ap.add_argument(
    "--model",
    type=pathlib.Path,
    help="a transformers directory to score instead of the base, e.g. an evaluation's router "
    "mixture: python -m mdkif_jax.export --from SKILLS --router EVAL/cells/TASK/gd.json "
    "--format hf --out DIR",
  )
  ap.add_argument(
    "--rows-of",
    type=pathlib.Path,
    help="only the --data rows an evaluation cell scored (EVAL/cells/medmcqa/base.json: the "
    "suite's scored MedMCQA rows, by realidx)",
  )
  ap.add_argument(
    "--labels",
    metavar="TASK",
    help="score a suite task's label rows instead (chemprot: 13 labels of several tokens)",
  )
  ap.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
  ap.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-min load below this")
  ap.add_argument("--wait", type=float, default=300.0, help="at most this many s per wait")
  ap.add_argument("--retries", type=int, default=1, help="reruns of a contended child")
  ap.add_argument("--child", choices=("ours", "lm_eval"), help=argparse.SUPPRESS)
  ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
  ap.add_argument("--rows-file", help=argparse.SUPPRESS)
  ap.add_argument("--task-dir", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    run = ours_child if args.child == "ours" else lm_eval_child
    _common.emit(run(args))
    return
  if args.reps < 1 or args.rows < 1:
    ap.error("--reps and --rows must be >= 1")

  out_dir = args.model or hf_dir()
  if args.model and not (out_dir / "config.json").is_file():
    ap.error(f"--model {out_dir}: no config.json (a transformers directory is expected)")
  if not (out_dir / "config.json").is_file():
    print(f"converting the GGUF to {out_dir} (once)", flush=True)
    convert(out_dir)
  args.hf_dir = str(out_dir)
  with tempfile.TemporaryDirectory() as tmp:
    args.rows_file = str(pathlib.Path(tmp) / "rows.jsonl")
    args.task_dir = str(pathlib.Path(tmp) / "tasks")
    rows_file, task_dir = pathlib.Path(args.rows_file), pathlib.Path(args.task_dir)
    if args.labels:
      n, labels = write_label_rows(args.labels, args.rows, rows_file)
      write_task(rows_file, task_dir, labels)
    else:
      n = write_rows(args.data, args.rows, rows_file, scored_ids(args.rows_of))
      write_task(rows_file, task_dir)
    if n == 0:
      ap.error(f"no rows to score ({args.labels or args.data}, of those {args.rows_of} scored)")
    print(f"{n} rows, CPU {cpu_model()}, load {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for d in args.ours_dtypes:
      results[f"ours_{d}"] = _common.run_child(
        child_args(args, "ours", d), args.max_load, args.wait, args.retries
      )
    results["lm_eval"] = _common.run_child(
      child_args(args, "lm_eval"), args.max_load, args.wait, args.retries
    )
  r = summarize(args, n, results)
  report(r)
  if args.out:
    args.out.write_text(json.dumps(r, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
