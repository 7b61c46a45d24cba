"""Tokenizers through transformers: a HF directory, or one built from GGUF metadata (no torch).

Never runs remote code: `trust_remote_code` is always False and nothing is fetched.
"""

from __future__ import annotations

import functools
import pathlib

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mdkif_jax import loading


@functools.lru_cache(maxsize=8)
def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
  """The tokenizer for a model source (preset name, HF directory or .gguf file)."""
  if source == "smollm2_135m":
    source = str(loading.smollm2_gguf_path())
  path = pathlib.Path(source)
  if path.suffix == ".gguf":
    if not path.is_file():
      raise FileNotFoundError(f"{path}: GGUF file not found")
    tok = AutoTokenizer.from_pretrained(
      str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
    )
  elif path.is_dir():
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
  else:
    raise FileNotFoundError(
      f"{source}: no tokenizer (expected 'smollm2_135m', a HF directory or a .gguf file)"
    )
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok


def chat_prompt(tok: PreTrainedTokenizerBase, user: str, system: str | None = None) -> list[int]:
  """Token ids of a single user turn in the model's chat template, ready for the answer."""
  messages = ([{"role": "system", "content": system}] if system else []) + [
    {"role": "user", "content": user}
  ]
  if tok.chat_template is None:
    return tok(user, add_special_tokens=True)["input_ids"]
  ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
    ids = ids["input_ids"]
  return list(ids)
