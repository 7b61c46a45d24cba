"""A PEFT LoRA or AdaLoRA adapter directory trained in torch, as one of our skills.

`--config.skills_from=peft:PATH` (mixable with stage-1 workdirs) reads PATH/adapter_config.json
and PATH/adapter_model.safetensors (no torch needed) into our skill-stacked layout:
- AdaLoRA: each module's kept ranks go back to their slots of init_r (`rank_pattern`), the
  pruned slots stay zero (E = 0, so serving compacts them away); scale lora_alpha/(init_r+1e-5).
- LoRA: E = 1, per-module r and alpha (rank_pattern, alpha_pattern, rslora) honoured; modules
  of a lower rank are zero-padded (E = 0 there). The skill's scale is the config's lora_alpha/r;
  a module whose own scale differs has the ratio in its E.
Module names map through `peft.export.parse_peft_key`. An adapter for another base (layer count,
projection shapes) or with parts we cannot represent (DoRA, biases, modules_to_save,
embeddings, lm_head) is refused, naming the fields.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from mdkif_jax.errors import SkillsMismatchError
from mdkif_jax.peft.adapters import TARGETS
from mdkif_jax.peft.export import MODULE_TARGET, module_name, parse_peft_key

PEFT_PREFIX = "peft:"


class PeftImportError(SkillsMismatchError):
  """A PEFT adapter that cannot join as a skill on this base (the message names the fields)."""


def _pattern_get(pattern: dict, module: str, default):
  """PEFT's `get_pattern_key`: the first key that matches the end of the module path."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _refuse_config(cfg: dict, where: str) -> None:
  problems = []
  if cfg.get("peft_type") not in ("LORA", "ADALORA"):
    problems.append(f"peft_type={cfg.get('peft_type')!r} (only LORA and ADALORA)")
  for field, ok in (
    ("use_dora", not cfg.get("use_dora")),
    ("bias", cfg.get("bias", "none") == "none"),
    ("modules_to_save", not cfg.get("modules_to_save")),
    ("fan_in_fan_out", not cfg.get("fan_in_fan_out")),
    ("layer_replication", not cfg.get("layer_replication")),
  ):
    if not ok:
      problems.append(f"{field}={json.dumps(cfg.get(field))}")
  modules = cfg.get("target_modules")
  if isinstance(modules, list) and set(modules) - set(MODULE_TARGET):
    problems.append(
      f"target_modules={modules} names {sorted(set(modules) - set(MODULE_TARGET))}; only "
      f"{sorted(MODULE_TARGET)} can be adapted here"
    )
  if problems:
    raise PeftImportError(f"{where}: cannot import this adapter: " + "; ".join(problems))


def read_adapter(path: str | pathlib.Path, base_cfg) -> tuple[dict, float, dict]:
  """({target: {"A": (L, r, in), "E": (L, r), "B": (L, out, r)}} f32 numpy, scale, config)."""
  path = pathlib.Path(path)
  cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
  for f in (cfg_file, weights):
    if not f.is_file():
      raise PeftImportError(
        f"skills_from=peft:{path}: {f.name} is missing (need a PEFT adapter "
        "saved with safe_serialization)"
      )
  cfg = json.loads(cfg_file.read_text())
  _refuse_config(cfg, str(cfg_file))
  from safetensors.numpy import load_file

  raw = load_file(str(weights))
  parts, unknown = {}, []
  for key, value in raw.items():
    parsed = parse_peft_key(key)
    if parsed is None:
      unknown.append(key)
    else:
      parts.setdefault(parsed[:2], {})[parsed[2]] = np.asarray(value, np.float32)
  if unknown:
    raise PeftImportError(
      f"{weights}: tensors other than lora_A/E/B of a decoder layer's q/k/v/o/gate/up/down "
      f"projection (embeddings, lm_head, biases, modules_to_save): {unknown[:4]}"
    )
  _refuse_other_base(parts, base_cfg, weights)
  adalora = cfg["peft_type"] == "ADALORA"
  if adalora:
    init_r = int(cfg.get("init_r", 12))
    alpha = float(cfg.get("lora_alpha", 8))
    scale = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)
  else:
    scale = _lora_scale(cfg, cfg.get("r", 8), cfg.get("lora_alpha", 8))
  ranks = {}
  for (_, t), p in parts.items():
    ranks[t] = max(ranks.get(t, 0), init_r if adalora else p["A"].shape[0])
  L, dims = base_cfg.num_hidden_layers, base_cfg.projection_dims()
  out = {
    t: {
      "A": np.zeros((L, r, dims[t][0]), np.float32),
      "E": np.zeros((L, r), np.float32),
      "B": np.zeros((L, dims[t][1], r), np.float32),
    }
    for t, r in ranks.items()
  }
  for (layer, t), p in sorted(parts.items()):
    name = module_name(layer, t)
    if adalora:
      slots = _adalora_slots(cfg.get("rank_pattern"), name, init_r, p, weights)
      e = p["E"].reshape(-1)
    else:
      slots = np.arange(p["A"].shape[0])
      r_k = p["A"].shape[0]
      own = _lora_scale(
        cfg, r_k, _pattern_get(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
      )
      e = np.full(r_k, own / scale, np.float32)  # the module's own scale, relative to the skill's
    out[t]["A"][layer, slots] = p["A"]
    out[t]["E"][layer, slots] = e
    out[t]["B"][layer][:, slots] = p["B"]
  return out, scale, cfg


def _lora_scale(cfg: dict, r: int, alpha: float) -> float:
  return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))


def _adalora_slots(pattern, name: str, init_r: int, p: dict, where) -> np.ndarray:
  """Positions in 0..init_r-1 of a module's saved ranks (its rank_pattern's True entries)."""
  if "E" not in p:
    raise PeftImportError(f"{where}: {name} has no lora_E (an AdaLoRA adapter has one)")
  pattern = pattern or {}
  keep = pattern.get(f"{name}.lora_E", pattern.get(f"{name}.lora_E.default"))
  r_k = p["A"].shape[0]
  slots = np.arange(init_r) if keep is None else np.flatnonzero(np.asarray(keep, bool))
  if len(slots) != r_k:
    raise PeftImportError(
      f"{where}: {name} has {r_k} ranks, its rank_pattern (init_r={init_r}) keeps {len(slots)}"
    )
  return slots


def _refuse_other_base(parts: dict, base_cfg, where) -> None:
  dims, L = base_cfg.projection_dims(), base_cfg.num_hidden_layers
  problems = []
  for (layer, t), p in sorted(parts.items()):
    name = module_name(layer, t)
    if layer >= L:
      problems.append(f"{name}: layer {layer}, this base has num_hidden_layers={L}")
      continue
    if set(p) - {"E"} != {"A", "B"}:
      problems.append(f"{name}: has {sorted(p)}, needs lora_A and lora_B")
      continue
    (r_a, d_in), (d_out, r_b) = p["A"].shape, p["B"].shape
    if (d_in, d_out) != dims[t] or r_a != r_b:
      problems.append(
        f"{name}: lora_A {list(p['A'].shape)} and lora_B {list(p['B'].shape)} need "
        f"[r, {dims[t][0]}] and [{dims[t][1]}, r] on this base (hidden_size="
        f"{base_cfg.hidden_size}, intermediate_size={base_cfg.intermediate_size}, "
        f"num_attention_heads={base_cfg.num_attention_heads}, num_key_value_heads="
        f"{base_cfg.num_key_value_heads}, head_dim={base_cfg.head_dim})"
      )
  if problems:
    raise PeftImportError(
      f"{where}: this adapter was trained on another base model: "
      + "; ".join(problems[:4])
      + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
    )


def load_peft_skill(entry: str, base_cfg, mesh) -> tuple[dict, dict, float]:
  """(adapters [1, L, ...], meta, scale) of `peft:PATH`, as checkpoint.load_one returns a run;
  the skill is named after the directory."""
  path = pathlib.Path(entry.removeprefix(PEFT_PREFIX))
  if not path.is_dir():
    raise PeftImportError(f"skills_from={entry!r}: {path} is not a directory")
  leaves, scale, cfg = read_adapter(path, base_cfg)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  adapters = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x[None]), rep), leaves)
  targets = [t for t in TARGETS if t in leaves]
  meta = {
    "skills": [path.resolve().name],
    "targets": targets,
    "imported": f"peft:{path}",
    "peft_type": cfg["peft_type"],
  }
  return adapters, meta, scale


def align_targets(runs: list[tuple[dict, dict, float]]) -> list[tuple[dict, dict, float]]:
  """Runs that adapt different target sets, each zero-filled to their union (an absent
  projection is ΔW = 0 exactly: E = 0, which serving compacts away), so they stack."""
  union = [t for t in TARGETS if any(t in adapters for adapters, _, _ in runs)]
  out = []
  for adapters, meta, scale in runs:
    some = next(iter(adapters.values()))
    S, L, r = some["A"].shape[:3]
    filled = dict(adapters)
    for t in union:
      if t not in filled:
        d_in, d_out = _dims_of(runs, t)
        z = lambda *shape, like=some["A"]: jax.device_put(  # noqa: E731
          np.zeros(shape, np.float32), like.sharding
        )
        filled[t] = {"A": z(S, L, r, d_in), "E": z(S, L, r), "B": z(S, L, d_out, r)}
    out.append(({t: filled[t] for t in union}, meta, scale))
  return out


def _dims_of(runs, t: str) -> tuple[int, int]:
  leaf = next(adapters[t] for adapters, _, _ in runs if t in adapters)
  return int(leaf["A"].shape[-1]), int(leaf["B"].shape[-2])
