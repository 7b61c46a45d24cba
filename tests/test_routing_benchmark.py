"""benchmarks/routing.py's analytic FLOP accounting against XLA's own count on the tiny model.

One layer, because XLA's cost analysis counts the body of the layer scan (a while loop) once.
XLA also counts elementwise work (norms, RoPE, softmax, the adapter scale and add), which the
analytic matmul count leaves out, so XLA may be a few percent above it, never below.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdkif_jax.model import config as mc
from mdkif_jax.model import llama as model_lib
from mdkif_jax.model import loading
from mdkif_jax.peft import adapters, serving
from tests.conftest import load_benchmark


def _routing():
  return load_benchmark("routing")


def _xla_flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_flop_counts_match_xla_cost_analysis():
  routing = _routing()
  cfg = dataclasses.replace(mc.PRESETS["tiny"], num_hidden_layers=1)
  graphdef, params = nnx.split(loading.random_init(cfg))
  skills, kept = routing.make_skills(cfg)
  B, T = 2, 96  # two causal query blocks of the default 64: the skipped keys are not counted
  tokens = jnp.zeros((B, T), jnp.int32)
  _, w_rows = routing.mixtures(B)
  ctx = adapters.AdapterCtx(0.5, weights=jnp.asarray(w_rows))

  base = _xla_flops(lambda p, t: model_lib.forward(graphdef, p, t), params, tokens)

  def mixed(a):
    fwd = lambda p, t, a: model_lib.forward(graphdef, p, t, adapters=a, adapter_ctx=ctx)
    return _xla_flops(fwd, params, tokens, a)

  n = B * T
  S, r = routing.NUM_SKILLS, routing.INIT_R
  served = serving.serving_stack(skills)
  served_r = {t: int(leaf["route"].shape[1]) for t, leaf in served.items()}
  assert all(rr < S * r for rr in served_r.values())  # the pruned ranks are not computed
  for layout, computed in ((skills, {t: S * r for t in kept}), (served, served_r)):
    fl = routing.flop_counts(cfg, B, T, computed, kept)
    assert 1.0 <= base / (fl["base"] * n) < 1.05, (base, fl["base"] * n)
    # the unmerged path multiplies every computed (padded) rank, not only the kept ones
    extra = mixed(layout) - base
    assert 1.0 <= extra / (fl["extra_computed"] * n) < 1.03, (extra, fl["extra_computed"] * n)
    assert fl["extra_kept"] <= fl["extra_computed"]
    assert np.isclose(fl["share_computed"], fl["extra_computed"] / fl["base"])
  fl_stacked = routing.flop_counts(cfg, B, T, {t: S * r for t in kept}, kept)
  assert fl_stacked["extra_kept"] < 0.75 * fl_stacked["extra_computed"]


def test_paired_interval_brackets_the_median_and_narrows_with_less_noise():
  routing = _routing()
  rng = np.random.default_rng(0)
  noisy = 1.03 + 0.05 * rng.standard_normal(30)
  quiet = 1.03 + 0.005 * rng.standard_normal(30)
  lo, hi = routing._common.median_interval(noisy)
  assert lo <= np.median(noisy) <= hi
  qlo, qhi = routing._common.median_interval(quiet)
  assert qlo <= np.median(quiet) <= qhi
  assert (qhi - qlo) < (hi - lo) / 4
  assert routing._common.median_interval(np.full(12, 1.02)) == (1.02, 1.02)
