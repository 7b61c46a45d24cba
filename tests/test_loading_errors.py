"""Bad weight input gives one clear error naming the file and the tensor or limit."""

import json

import numpy as np
import pytest

from mdkif_jax.model import config as model_config
from mdkif_jax.model import loading
from tests import hf_fixtures


def test_missing_directory_and_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    loading.load_model(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="absent.gguf"):
    loading.load_gguf(tmp_path / "absent.gguf")


def test_missing_shard_named(tmp_path):
  hf_fixtures.write_hf("llama", tmp_path, shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  victim = sorted(set(index["weight_map"].values()))[1]
  (tmp_path / victim).unlink()
  with pytest.raises(loading.WeightLoadError, match=f"{victim}.*missing"):
    loading.load_hf_dir(tmp_path, progress=False)


def test_corrupt_safetensors_named(tmp_path):
  hf_fixtures.write_hf("llama", tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(loading.WeightLoadError, match="model.safetensors: corrupt"):
    loading.load_hf_dir(tmp_path, progress=False)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  hf_fixtures.write_hf("llama", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 128  # the weights were written with 96
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
    loading.WeightLoadError,
    match=r"model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape \(96, 64\).*"
    r"expects \(128, 64\)",
  ):
    loading.load_hf_dir(tmp_path, progress=False)


def test_missing_tensor_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  hf_fixtures.write_hf("llama", tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(loading.WeightLoadError, match="model.layers.1.mlp.up_proj.weight.*missing"):
    loading.load_hf_dir(tmp_path, progress=False)


@pytest.mark.parametrize(
  "patch,match",
  [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "'yarn'"),
  ],
)
def test_unsupported_architecture_refused(tmp_path, patch, match):
  hf_fixtures.write_hf("llama", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.update(patch)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(model_config.UnsupportedModelError, match=match):
    loading.load_hf_dir(tmp_path, progress=False)


def test_invalid_json_config_names_line(tmp_path):
  hf_fixtures.write_hf("llama", tmp_path)
  (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
  with pytest.raises(ValueError, match=r"config.json:3: not valid JSON"):
    loading.load_hf_dir(tmp_path, progress=False)


def test_unsupported_gguf_quantization_named(tmp_path):
  import gguf

  ref = hf_fixtures.write_hf("llama", tmp_path / "hf")
  qtype = gguf.GGMLQuantizationType.Q8_1  # the gguf package cannot dequantize this one
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = np.zeros((96, 64 // block * size), np.uint8)
  hf_fixtures.write_gguf(
    ref, tmp_path / "q.gguf", quant_override={"blk.0.ffn_up.weight": (qtype, raw)}
  )
  with pytest.raises(
    loading.WeightLoadError,
    match="q.gguf: tensor 'blk.0.ffn_up.weight' uses GGUF quantization Q8_1",
  ):
    loading.load_gguf(tmp_path / "q.gguf", progress=False)


def test_corrupt_gguf_named(tmp_path):
  (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
  with pytest.raises(loading.WeightLoadError, match="bad.gguf: corrupt"):
    loading.load_gguf(tmp_path / "bad.gguf", progress=False)


def test_no_pickle_and_no_remote_code_in_the_package():
  import pathlib

  root = pathlib.Path(loading.__file__).parent
  for path in root.rglob("*.py"):
    text = path.read_text()
    assert "import pickle" not in text, path
    assert "trust_remote_code=True" not in text, path
