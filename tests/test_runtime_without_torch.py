"""The runtime needs no PyTorch: requirements.txt has none, only the test reference does."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.modules["torch"] = None  # `import torch` fails and transformers sees no torch
from configs import skill
from mdkif_jax import data, router, train  # noqa: F401
from mdkif_jax.model import loading, tokenizer
tok = tokenizer.tokenizer_from_gguf(loading.smollm2_gguf_path())
cfg = skill.get_config()
batch = next(data.make_iterator(data.load_examples(cfg.data, "train"), tok, cfg.data, batch_size=4))
assert batch["tokens"].shape[0] == 4 and batch["loss_mask"].sum() > 0
assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
print("ok")
"""


def test_tokenizer_data_and_trainer_import_without_torch():
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")
