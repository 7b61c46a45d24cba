"""The model on the 8-device CPU mesh computes what it computes on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdkif_jax import sharding
from mdkif_jax.model import llama as model_lib
from mdkif_jax.model import loading
from mdkif_jax.model.config import PRESETS
from mdkif_jax.peft import adapters


def test_eight_host_devices_are_forced():
  assert jax.device_count() == 8


def test_logical_rules_map_to_mesh_axes_once():
  spec = sharding.logical_to_spec(("batch", "length", "act_embed"))
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("nonsense",))


def _forward(model, tokens, **kw):
  graphdef, params = nnx.split(model)
  return jax.jit(model_lib.forward, static_argnums=0)(graphdef, params, tokens, **kw)


def test_sharded_forward_equals_single_device():
  cfg = PRESETS["tiny"]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 16)), jnp.int32)
  single = loading.random_init(cfg, seed=1, mesh=sharding.make_mesh((1, 1, 1)))
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = loading.random_init(cfg, seed=1, mesh=mesh)
  # the weights really are spread: the MLP kernel is split over fsdp x tensor
  assert sharded.gate[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(sharded.gate[...].addressable_shards) == 8
  np.testing.assert_allclose(_forward(sharded, tokens), _forward(single, tokens), atol=1e-5)


def test_sharded_forward_with_per_row_skill_adapters_equals_single_device():
  cfg = PRESETS["tiny"]
  rng = np.random.default_rng(1)
  L, S, r = cfg.num_hidden_layers, 3, 4
  ad = {}
  for name, (i, o) in cfg.projection_dims().items():
    ad[name] = {
      "A": jnp.asarray(rng.normal(0, 0.1, (S, L, r, i)), jnp.float32),
      "E": jnp.asarray(rng.normal(0, 1.0, (S, L, r)), jnp.float32),
      "B": jnp.asarray(rng.normal(0, 0.1, (S, L, o, r)), jnp.float32),
    }
  ctx = adapters.AdapterCtx(scale=0.5, skill_ids=jnp.asarray([0, 2, 1, 2], jnp.int32))
  tokens = jnp.asarray(rng.integers(0, 512, (4, 8)), jnp.int32)
  single = loading.random_init(cfg, seed=2)
  sharded = loading.random_init(cfg, seed=2, mesh=sharding.make_mesh((2, 2, 2)))
  a = _forward(single, tokens, adapters=ad, adapter_ctx=ctx)
  b = _forward(sharded, tokens, adapters=ad, adapter_ctx=ctx)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # and each row equals running that row's skill alone, without a skill axis
  for row, s in enumerate([0, 2, 1, 2]):
    alone = {k: jax.tree.map(lambda t, s=s: t[s], v) for k, v in ad.items()}
    ref = _forward(
      single, tokens[row : row + 1], adapters=alone, adapter_ctx=adapters.AdapterCtx(scale=0.5)
    )
    np.testing.assert_allclose(a[row : row + 1], ref, atol=1e-5)


def test_per_layer_mixture_weights_equal_task_weights_when_layers_agree():
  cfg = PRESETS["tiny"]
  rng = np.random.default_rng(3)
  L, S, r = cfg.num_hidden_layers, 2, 4
  ad = {
    name: {
      "A": jnp.asarray(rng.normal(0, 0.1, (S, L, r, i)), jnp.float32),
      "E": jnp.asarray(rng.normal(0, 1.0, (S, L, r)), jnp.float32),
      "B": jnp.asarray(rng.normal(0, 0.1, (S, L, o, r)), jnp.float32),
    }
    for name, (i, o) in cfg.projection_dims().items()
  }
  model = loading.random_init(cfg, seed=4)
  tokens = jnp.asarray(rng.integers(0, 512, (2, 8)), jnp.int32)
  w_BS = jnp.asarray([[0.7, 0.3], [0.2, 0.9]], jnp.float32)
  flat = _forward(model, tokens, adapters=ad, adapter_ctx=adapters.AdapterCtx(0.5, weights=w_BS))
  w_BLS = jnp.broadcast_to(w_BS[:, None, :], (2, L, S))
  same = _forward(model, tokens, adapters=ad, adapter_ctx=adapters.AdapterCtx(0.5, weights=w_BLS))
  np.testing.assert_allclose(flat, same, atol=1e-6)
  # a different mixture in layer 1 only changes the output
  w_BLS2 = w_BLS.at[:, 1].set(jnp.asarray([0.0, 1.0]))
  other = _forward(model, tokens, adapters=ad, adapter_ctx=adapters.AdapterCtx(0.5, weights=w_BLS2))
  assert np.abs(np.asarray(other) - np.asarray(flat)).max() > 1e-4
