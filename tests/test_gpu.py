"""The GPU computes what the CPU computes (`pytest -m gpu`).

Logits of one random model in f32 and bf16 (tolerances: benchmarks/device_check.PARITY_TOL), a
stage-1 step of all 12 skills, the routed forward (unmerged per row, packed served layout,
merged), greedy generation, and an Orbax save and restore of a training state placed on the
GPU. The weights are drawn once on the CPU and copied, so both sides start bit-identical.
benchmarks/device_check.sh runs these on the GPU machine before its timings (its preflight
refuses a jax without a GPU backend there). Where there is no GPU (CI, laptops) a second host
CPU device stands in for it, so a code change that breaks one of these tests is found in every
test run, not in the GPU's few minutes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import skill
from mdkif_jax import checkpoint, data, evaluate, router, sharding, train
from mdkif_jax.data import batches, task
from mdkif_jax.model import generate, llama, loading
from mdkif_jax.model.config import PRESETS
from mdkif_jax.peft import adalora, adapters, serving
from tests import router_fixtures as fx
from tests.conftest import load_benchmark


def _accelerator():
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:  # no GPU backend in this jax: a second CPU device stands in
    cpus = jax.devices("cpu")
    return cpus[-1] if len(cpus) > 1 else None


ACCEL = _accelerator()
ON_GPU = ACCEL is not None and ACCEL.platform == "gpu"
CPU = jax.devices("cpu")[0]
pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(ACCEL is None, reason="no GPU and no second CPU device to stand in"),
]
dc = load_benchmark("device_check")
MAKE_MESH = sharding.make_mesh


def _mesh(device):
  return MAKE_MESH((1, 1, 1), devices=[device])


def _on(monkeypatch, device):
  """Meshes built without explicit devices (train.setup_training's) use `device`."""
  monkeypatch.setattr(sharding, "make_mesh", functools.partial(MAKE_MESH, devices=[device]))


@pytest.fixture(scope="module")
def parity():
  preset, layers, batch, seq = (dc.GPU if ON_GPU else dc.SMOKE).parity
  return dc.logits_parity(dc.model_config(preset, layers), ACCEL, CPU, batch, seq)


@pytest.mark.parametrize("dtype", sorted(dc.PARITY_TOL))
def test_logits_match_the_cpu(parity, dtype):
  got = parity[dtype]
  assert np.isfinite(got["rel_err"])
  assert got["rel_err"] <= dc.PARITY_TOL[dtype], got


# ---- a stage-1 step -----------------------------------------------------------------------------
def _stage1(device, monkeypatch, steps: int, skills=data.SKILLS):
  """The tiny model's stage-1 run for `skills` on `device` after `steps` steps of one batch:
  (state, [metrics per step]); the base is drawn on the CPU and copied."""
  c = skill.get_config("tiny")
  c.train.progress = False
  c.train.steps = 6
  c.adalora.tinit, c.adalora.tfinal, c.adalora.delta_t = 1, 2, 1  # prunes from step 2 on
  c.mesh.shape = (1, 1, 1)
  base = dc.moved(loading.random_init(PRESETS["tiny"], seed=0, mesh=_mesh(CPU)), device)
  _on(monkeypatch, device)
  run = train.setup_training(c, skills, base, dc.Vocab(PRESETS["tiny"].vocab_size))
  ids = [data.skill_id(s) for s in skills]
  batch = batches.to_global(dc.stage1_batch(512, ids, 1, 32, 0.25), run.mesh)
  state, metrics = run.state, []
  for _ in range(steps):
    state, m = run.fns.train_step(state, run.frozen, batch)
    metrics.append(m)
  assert {d for x in jax.tree.leaves(state) for d in x.devices()} == {device}
  return state, metrics


def test_stage1_step_of_12_skills_matches_the_cpu(monkeypatch):
  got, got_m = _stage1(ACCEL, monkeypatch, steps=4)
  want, want_m = _stage1(CPU, monkeypatch, steps=4)
  for g, w in zip(got_m, want_m, strict=True):
    assert bool(g["finite"])
    np.testing.assert_allclose(g["loss_S"], w["loss_S"], rtol=1e-5)
  jax.tree.map(
    lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5),
    got["adapters"],
    want["adapters"],
  )
  got_mask = adalora.find_state(got["opt_state"]).mask
  want_mask = adalora.find_state(want["opt_state"]).mask
  assert not all(np.asarray(m).all() for m in got_mask.values())  # the allocator pruned
  for t in want_mask:
    np.testing.assert_array_equal(got_mask[t], want_mask[t])


# ---- the routed forward -----------------------------------------------------------------------
def _routed(device, graphdef, frozen, stacked, batch, w_BS, w_S):
  """Answer stats of the unmerged per-row mixture, the merged task mixture and the unmerged
  task mixture, and the logits of the packed served layout and of the stacked skills, all
  computed on `device`."""
  frozen, stacked, batch, w_BS, w_S = jax.device_put((frozen, stacked, batch, w_BS, w_S), device)
  stats = jax.jit(router.mixture_stats, static_argnums=(0, 3))
  unmerged = stats(graphdef, frozen, stacked, fx.SCALE, batch, w_BS)
  merged = evaluate.merged_stats(
    serving.merged_params(frozen, stacked, w_S, fx.SCALE), batch, graphdef=graphdef
  )
  task_mix = stats(graphdef, frozen, stacked, fx.SCALE, batch, jnp.broadcast_to(w_S, w_BS.shape))
  params, packed = serving.packed_params(
    frozen, serving.serving_stack(stacked, bucket=4), max_rank_fraction=1.0
  )
  fwd = jax.jit(llama.forward, static_argnums=0)
  ctx = adapters.AdapterCtx(fx.SCALE, weights=w_BS)
  packed_logits = fwd(graphdef, params, batch["tokens"], adapters=packed, adapter_ctx=ctx)
  stacked_logits = fwd(graphdef, frozen, batch["tokens"], adapters=stacked, adapter_ctx=ctx)
  return jax.device_get((unmerged, merged, task_mix, packed_logits, stacked_logits))


def test_routed_forward_matches_the_cpu():
  _, graphdef, frozen = fx.tiny_base(_mesh(CPU))
  stacked = fx.random_skills(PRESETS["tiny"], 3, seed=1)
  raw = fx.raw_batch(0)
  raw["targets"][:, :-1] = raw["tokens"][:, 1:]
  batch = task.prepare(raw)
  rng = np.random.default_rng(2)
  w_BS = jax.nn.softmax(jnp.asarray(rng.standard_normal((fx.B, 3)), jnp.float32))
  w_S = jnp.asarray([0.6, -0.3, 0.5], jnp.float32)
  got = _routed(ACCEL, graphdef, frozen, stacked, batch, w_BS, w_S)
  want = _routed(CPU, graphdef, frozen, stacked, batch, w_BS, w_S)
  unmerged, merged, task_mix, packed_logits, stacked_logits = got
  for g, w in zip(got[:3], want[:3], strict=True):
    np.testing.assert_allclose(g["nll"], w["nll"], rtol=1e-5)
  np.testing.assert_allclose(got[3], want[3], atol=1e-4, rtol=1e-5)
  # on the accelerator itself: merged == the unmerged task mixture, packed == stacked
  np.testing.assert_allclose(merged["nll"], task_mix["nll"], rtol=1e-4)
  np.testing.assert_allclose(packed_logits, stacked_logits, atol=1e-4, rtol=1e-5)
  assert np.abs(unmerged["nll"] - merged["nll"]).max() > 1e-3  # the mixtures really differ


# ---- generation -------------------------------------------------------------------------------
def test_greedy_generation_matches_the_cpu():
  base, _, _ = fx.tiny_base(_mesh(CPU))  # sharpened logits: no near-ties for argmax to flip
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 512, int(n)).tolist() for n in (5, 17, 9, 30)]
  kw = dict(max_new_tokens=16, eos_ids=())
  with jax.default_device(CPU):
    want = generate.generate(base, prompts, **kw)
  on_accel = dc.moved(base, ACCEL)
  with jax.default_device(ACCEL):
    got = generate.generate(on_accel, prompts, **kw)
  assert got == want


# ---- checkpoints ------------------------------------------------------------------------------
def test_orbax_restores_a_gpu_placed_training_state(tmp_path, monkeypatch):
  state, _ = _stage1(ACCEL, monkeypatch, steps=1, skills=("qa", "ner"))
  meta = {"check": "gpu"}
  mngr = checkpoint.manager(tmp_path, keep=1, async_save=True)
  checkpoint.save(mngr, 1, state, {"position": 3}, meta)
  mngr.wait_until_finished()
  step, restored, data_state = checkpoint.restore_latest(mngr, checkpoint.abstract_of(state), meta)
  assert (step, data_state) == (1, {"position": 3})
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert got.sharding == want.sharding  # back on the accelerator, as it was saved
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # and onto the CPU: the checkpoint does not depend on the device that wrote it
  on_cpu = jax.sharding.SingleDeviceSharding(CPU)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_cpu), state)
  _, restored_cpu, _ = checkpoint.restore_latest(mngr, abstract, meta)
  for got, want in zip(jax.tree.leaves(restored_cpu), jax.tree.leaves(state), strict=True):
    assert got.devices() == {CPU}
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  mngr.close()
