"""benchmarks/routing.py's analytic FLOP accounting against XLA's own count on the tiny model.

One layer, because XLA's cost analysis counts the body of the layer scan (a while loop) once.
XLA also counts elementwise work (norms, RoPE, softmax, the adapter scale and add), which the
analytic matmul count leaves out, so XLA may be a few percent above it, never below.
"""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdkif_jax import adapters, loading
from mdkif_jax import model as model_lib
from mdkif_jax import model_config as mc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _routing():
  spec = importlib.util.spec_from_file_location("routing", ROOT / "benchmarks" / "routing.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _xla_flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_flop_counts_match_xla_cost_analysis():
  routing = _routing()
  cfg = dataclasses.replace(mc.PRESETS["tiny"], num_hidden_layers=1)
  graphdef, params = nnx.split(loading.random_init(cfg))
  skills, kept = routing.make_skills(cfg)
  B, T = 2, 32
  tokens = jnp.zeros((B, T), jnp.int32)
  _, w_rows = routing.mixtures(B)
  ctx = adapters.AdapterCtx(0.5, weights=jnp.asarray(w_rows))

  base = _xla_flops(lambda p, t: model_lib.forward(graphdef, p, t), params, tokens)
  mixed = _xla_flops(
    lambda p, t, a: model_lib.forward(graphdef, p, t, adapters=a, adapter_ctx=ctx),
    params,
    tokens,
    skills,
  )
  fl = routing.flop_counts(cfg, B, T, routing.NUM_SKILLS * routing.INIT_R, kept)
  n = B * T
  assert 1.0 <= base / (fl["base"] * n) < 1.05, (base, fl["base"] * n)
  # the unmerged path multiplies every padded rank: the computed count, not the kept one
  extra = mixed - base
  assert 1.0 <= extra / (fl["extra_computed"] * n) < 1.03, (extra, fl["extra_computed"] * n)
  assert fl["extra_kept"] < 0.75 * fl["extra_computed"]
  assert np.isclose(fl["share_computed"], fl["extra_computed"] / fl["base"])
