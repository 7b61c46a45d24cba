"""benchmarks/_common.py's huge-page malloc environment: what children and re-exec'd runs get."""

import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _common():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    spec = importlib.util.spec_from_file_location("_common", ROOT / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def test_hugepage_env_adds_keeps_and_respects_opt_out():
  c = _common()
  assert c.hugepage_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
  env = c.hugepage_env(other)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env["X"] == "1" and other["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # a copy
  assert c.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == (
    "glibc.malloc.hugetlb=0"
  )


def test_reexec_restarts_once_with_the_tunable(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(
    "import os, sys\n"
    f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
    "import _common\n"
    "print('start', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)\n"
    "_common.reexec_with_hugepages()\n"
    "print('ran', os.environ.get('GLIBC_TUNABLES'))\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run(
    [sys.executable, str(script), "--flag", "a b"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert out == [
    "start None ['--flag', 'a b']",
    "start glibc.malloc.hugetlb=1 ['--flag', 'a b']",
    "ran glibc.malloc.hugetlb=1",
  ]


def test_median_ratio_interval_brackets_the_ratio_and_narrows_with_less_noise():
  import numpy as np

  c = _common()
  rng = np.random.default_rng(0)
  peft = 10.0 * (1 + 0.10 * rng.standard_normal(10))
  ours = 8.0 * (1 + 0.10 * rng.standard_normal(10))
  lo, hi = c.median_ratio_interval(peft, ours)
  assert lo <= np.median(peft) / np.median(ours) <= hi
  qlo, qhi = c.median_ratio_interval(10.0 + 0.01 * rng.standard_normal(10), ours * 0 + 8.0)
  assert qhi - qlo < (hi - lo) / 10
  assert c.median_ratio_interval([10.0] * 5, [8.0] * 5) == (1.25, 1.25)
