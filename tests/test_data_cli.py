"""`python -m mdkif_jax.data stats` on the demo corpus, as a user runs it."""

import pathlib
import subprocess
import sys

import pytest

from mdkif_jax.data import SKILLS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stats_and_show_on_the_demo_corpus():
  cmd = [sys.executable, "-m", "mdkif_jax.data", "stats", "--config=configs/skill.py", "--show=12"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  text = out.stdout
  assert "== train: 312 examples ==" in text and "== eval: 72 examples ==" in text
  rows = [
    line.split() for line in text.splitlines() if line.split()[:1] and line.split()[0] in SKILLS
  ]
  train_rows = rows[:12]
  assert [r[0] for r in train_rows] == list(SKILLS)
  assert all(r[1] == "demo" and r[2] == "26" and r[-2:] == ["0", "0"] for r in train_rows)
  shown = [line for line in text.splitlines() if line.startswith("----- ")]
  assert [line.split()[1] for line in shown] == list(SKILLS)
  assert text.count(">>> loss on the") == 12 and "<|im_start|>assistant" in text
