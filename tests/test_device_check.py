"""benchmarks/device_check.py end to end in its CPU smoke mode (tiny shapes, ~40 s): it runs
every part without an error, and its JSON holds every number docs/benchmarks.md takes from the
GPU run, so a typo in the script never costs the GPU's minutes."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TRAIN = ("params", "rows", "seq", "step_s", "first_step_s", "tokens_per_s")
TRAIN += ("model_tflop_per_step", "achieved_tflops", "mfu", "losses_finite")
FIELDS = {  # section (dotted) -> keys it must hold
  "env": ("backend", "device_kind", "modules"),
  "gpu_tests": ("report",),
  "peak": ("n", "bf16_tflops", "f32_tflops"),
  "parity.float32": ("rel_err", "max_abs_rel", "tol", "ok"),
  "parity.bfloat16": ("rel_err", "max_abs_rel", "tol", "ok", "cpu_rel_err"),
  "train.adalora_1b": TRAIN,
  "train.stage1_12skill": TRAIN,
  "train.adalora_7b": TRAIN,
  "routing.tiny": ("median_ms", "merged_overhead", "merged_met", "unmerged_overhead", "base_mfu"),
  "routing.tiny.median_ms": ("base", "merged", "unmerged"),
  "scoring": ("rows", "seq", "rows_per_s", "tokens_per_s", "mfu", "finite"),
  "verdicts": ("mfu_adalora_1b", "mfu_stage1_12skill", "merged_within_3pct", "parity"),
}
POSITIVE = [
  "peak.bf16_tflops",
  "train.adalora_1b.mfu",
  "train.stage1_12skill.tokens_per_s",
  "train.adalora_7b.mfu",
  "routing.tiny.base_mfu",
  "scoring.rows_per_s",
  "scoring.mfu",
]


def _at(tree: dict, dotted: str):
  for key in dotted.split("."):
    tree = tree[key]
  return tree


@pytest.mark.slow
def test_smoke_run_writes_every_field(tmp_path):
  out = tmp_path / "device_check.json"
  env = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "XLA_FLAGS": "--xla_backend_optimization_level=0",  # tiny shapes: compile time is all
  }
  cmd = [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke", "--json", out]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  r = json.loads(out.read_text())
  assert r["mode"] == "smoke" and r["errors"] == {} and r["skipped"] == []
  missing = [f"{s}.{k}" for s, keys in FIELDS.items() for k in keys if k not in _at(r, s)]
  assert not missing, f"device_check.json lacks {missing}"
  for dotted in POSITIVE:
    value = _at(r, dotted)
    assert math.isfinite(value) and value > 0, (dotted, value)
  assert r["parity"]["float32"]["ok"] and r["parity"]["bfloat16"]["ok"]
  assert all(t["losses_finite"] for t in r["train"].values())
  assert "MFU" in proc.stdout and "verdicts:" in proc.stdout  # the summary table printed
