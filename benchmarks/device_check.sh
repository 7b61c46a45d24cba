#!/usr/bin/env bash
# Issue 22's device check in one call of the GPU machine (~7 min): first the gpu tests
# (tests/test_gpu.py: logits, a stage-1 step, the routed forward, generation and an Orbax
# save/restore, each against the CPU), then benchmarks/device_check.py (tokens/s and MFU of the
# 12-skill stage-1 step and the AdaLoRA steps, the routed forward merged and unmerged, candidate
# scoring, against the bf16 matmul rate measured in the same process). Results:
# $OUT/device_check.json (for docs/benchmarks.md), device_check.log, gpu_tests.{xml,log}.
#
# What the machine must have (its own python3; no venv, no network): jax with CUDA, flax, optax,
# orbax-checkpoint, numpy, tqdm, transformers and pytest, all in its 'cuda' image; and
# ml_collections, which is not: it travels in .device_deps/, made here once by
#   bash benchmarks/device_check.sh --prepare
# (copies the pure-Python package out of .venv, 0.6 MB, and git-ignores the folder locally).
# What travels: the working tree (mdkif_jax/, configs/, benchmarks/, tests/) and .device_deps.
# No weights: every model is random at its checkpoint's shape.
#
# The call (the `run` tool; the timeout leaves a minute over the script's own 450 s budget):
#   command: bash benchmarks/device_check.sh   carry: [".device_deps"]   timeout_s: 540
# Before it, here (a few minutes on 2 CPU cores, so a typo never costs GPU time):
#   bash benchmarks/device_check.sh --smoke
#
# Environment: DEVICE_CHECK_BUDGET_S (default 450: seconds for tests and timings together;
# parts that no longer fit are skipped and named in the JSON), DEVICE_CHECK_ONLY (comma-separated
# parts of device_check.py, e.g. adalora_1b,stage1_12skill: a rerun of what broke),
# DEVICE_CHECK_SKIP_TESTS=1, PYTHON (default python3; with --smoke .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
  local site exclude
  site=$(.venv/bin/python -c 'import ml_collections, os; print(os.path.dirname(os.path.dirname(ml_collections.__file__)))') || exit 1
  rm -rf .device_deps && mkdir -p .device_deps
  cp -r "$site/ml_collections" .device_deps/
  find .device_deps -name __pycache__ -prune -exec rm -rf {} +
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.device_deps/' "$exclude" 2>/dev/null || echo '/.device_deps/' >>"$exclude"
  echo ".device_deps: $(du -sh .device_deps | cut -f1) (git-ignored in $exclude); carry it"
}

mode=gpu
case "${1:-}" in
  --prepare) prepare; exit 0 ;;
  --smoke) mode=smoke ;;
  "") ;;
  *) echo "usage: $0 [--prepare | --smoke]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
flags=()
if [[ $mode == smoke ]]; then
  PY=${PYTHON:-.venv/bin/python}
  flags=(--smoke)
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"  # CPU: compile, not speed
fi
OUT=${OUT:-$(mktemp -d /tmp/device_check.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.device_deps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
budget=${DEVICE_CHECK_BUDGET_S:-450}

echo "== preflight ($mode): $($PY --version 2>&1); $(nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
MODE=$mode $PY - <<'EOF' || exit 3
import importlib, os, sys
missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "numpy", "ml_collections", "tqdm",
             "transformers", "pytest"):
  try:
    mod = importlib.import_module(name)
    print(f"  {name} {getattr(mod, '__version__', '')}")
  except Exception as e:  # noqa: BLE001
    missing.append(name)
    print(f"MISSING: python module {name} ({type(e).__name__}: {e})")
if "ml_collections" in missing:
  print("  -> run `bash benchmarks/device_check.sh --prepare` there and carry .device_deps")
import jax
print(f"  backend {jax.default_backend()}, devices {jax.devices()}")
if os.environ["MODE"] == "gpu" and jax.default_backend() != "gpu":
  print("PREFLIGHT FAILED: no GPU backend in this jax: timings would be the CPU's")
  sys.exit(1)
sys.exit(1 if missing else 0)
EOF

tests_rc=0
if [[ ${DEVICE_CHECK_SKIP_TESTS:-0} != 1 ]]; then
  echo "== gpu tests (tests/test_gpu.py)"
  timeout 240 "$PY" -m pytest -o addopts="" -m gpu tests/test_gpu.py -q -rfE -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
fi

left=$((budget - SECONDS))
echo "== timings (benchmarks/device_check.py, ${left} s of the budget left)"
timeout $((left + 60)) "$PY" benchmarks/device_check.py "${flags[@]}" --budget-s "$left" \
  --json "$OUT/device_check.json" --junit "$OUT/gpu_tests.xml" \
  ${DEVICE_CHECK_ONLY:+--only "$DEVICE_CHECK_ONLY"} 2>&1 | tee "$OUT/device_check.log"
bench_rc=${PIPESTATUS[0]}

echo "== device check ($mode) done in ${SECONDS} s: gpu tests rc=${tests_rc}, timings rc=${bench_rc}; results in $OUT/device_check.json"
exit $((tests_rc != 0 || bench_rc != 0))
