"""Logical axis names -> the ('data', 'fsdp', 'tensor') mesh, from one rule table.

Every weight and activation names its axes logically ("embed", "mlp", "batch", ...). The rule
table (a config field, see configs/common.py) maps each logical name to a mesh axis, a tuple of
mesh axes, or None (replicated). Nothing else in the code base mentions mesh axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The default rule table: weights FSDP-sharded on their model dimension and tensor-sharded on
# heads / the MLP hidden axis; activations data-parallel over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # weights
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("norm", None),
  # adapters: replicated by default (they are tiny), rank axis never sharded
  ("skill", None),
  ("rank", None),
  ("adapter_in", None),
  ("adapter_out", None),
  # activations
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  ("cache_batch", ("data", "fsdp")),
  ("cache_length", None),
  ("cache_heads", "tensor"),
)


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; -1 in one place takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % rest:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  n = int(np.prod(shape))
  if n > len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {n} devices, only {len(devices)} exist")
  return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for a tuple of logical names; a mesh axis is used at most once per array."""
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in the sharding rule table")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drop mesh axes that do not divide the dimension they shard (e.g. 9 heads on tensor=2)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept, size = [], 1
    for a in axes:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def named_sharding(
  mesh: Mesh, names: Sequence[str | None] | None, shape: Sequence[int], rules=DEFAULT_RULES
) -> NamedSharding:
  return NamedSharding(mesh, fit_spec(logical_to_spec(names, rules), shape, mesh))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None, rules=DEFAULT_RULES):
  """with_sharding_constraint by logical names; a no-op without a mesh (single device)."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))
