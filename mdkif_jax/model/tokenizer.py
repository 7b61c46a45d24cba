"""Tokenizers through transformers: a HF directory, or one built from GGUF metadata (no torch).

Never runs remote code: `trust_remote_code` is always False and nothing is fetched.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import tempfile

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mdkif_jax.errors import ConfigError
from mdkif_jax.model import config as model_config
from mdkif_jax.model import loading


def tokenizer_source(model_section) -> str:
  """Where a config's tokenizer comes from (both stages and the stats tool): `model.tokenizer`,
  else the model's own source. A random-weight preset has no tokenizer of its own: refused
  here, before anything is built."""
  source = model_section.tokenizer or model_section.source
  if source != "smollm2_135m" and source in model_config.PRESETS:
    raise ConfigError(
      f"--config.model.source={model_section.source} is a random-weight preset with no "
      "tokenizer: set --config.model.tokenizer to that model's HF directory or .gguf file "
      "(or --config.model.source to the real checkpoint, which carries its own)"
    )
  return source


@functools.lru_cache(maxsize=8)
def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
  """The tokenizer for a model source (preset name, HF directory or .gguf file)."""
  if source == "smollm2_135m":
    source = str(loading.smollm2_gguf_path())
  path = pathlib.Path(source)
  if path.suffix == ".gguf":
    tok = _gguf_tokenizer(path)
  elif path.is_dir():
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
  else:
    raise FileNotFoundError(
      f"{source}: no tokenizer (expected 'smollm2_135m', a HF directory or a .gguf file)"
    )
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok


def _cache_root() -> pathlib.Path:
  base = os.environ.get("MDKIF_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mdkif_jax"
  )
  return pathlib.Path(base) / "tokenizers"


def _gguf_tokenizer(path: pathlib.Path) -> PreTrainedTokenizerBase:
  """Build the tokenizer from GGUF metadata once, then reuse a saved copy (much faster).

  The cache key is the file's name, size and mtime; the copy is written to a temporary
  directory and renamed, so an interrupted save never leaves a half-written tokenizer.
  """
  if not path.is_file():
    raise FileNotFoundError(f"{path}: GGUF file not found")
  st = path.stat()
  key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
  cached = _cache_root() / f"{path.stem}-{key}"
  if (cached / "tokenizer.json").is_file():
    return AutoTokenizer.from_pretrained(
      str(cached), local_files_only=True, trust_remote_code=False
    )
  tok = tokenizer_from_gguf(path)
  try:
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=cached.parent))
    tok.save_pretrained(str(tmp))
    try:
      tmp.rename(cached)
    except OSError:  # another process won the race: theirs is identical
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError:  # a read-only home: just do without the cache
    pass
  return tok


def tokenizer_from_gguf(path: pathlib.Path) -> PreTrainedTokenizerBase:
  """The tokenizer a GGUF file describes, built without torch.

  transformers' own GGUF route (`AutoTokenizer.from_pretrained(..., gguf_file=...)`) reads the
  metadata with a torch-based reader; this reads it with the `gguf` package and hands it to the
  same transformers builder (`convert_gguf_tokenizer`), so the result is identical (a test
  compares ids and chat strings with the torch route).
  """
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    _SPECIAL_TOKENS,
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
  )

  meta = loading.gguf_metadata(
    loading.open_gguf(path), lambda k: k.startswith(("tokenizer.", "general.architecture"))
  )
  if "tokenizer.ggml.tokens" not in meta:
    raise ValueError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
  grouped = {
    group: {name: meta[f"tokenizer.{k}"] for k, name in renames.items() if f"tokenizer.{k}" in meta}
    for group, renames in GGUF_TOKENIZER_MAPPING.items()
  }
  tokenizer_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer_dict.get("tokenizer_type") == "llama":
    tok_config.setdefault("add_bos_token", True)
  for name, key in _SPECIAL_TOKENS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}")
    tok_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
  backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tok_config, **extra})


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
