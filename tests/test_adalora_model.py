"""AdaLoRA on the real model vs PEFT on transformers' LlamaForCausalLM with identical weights.

Same base checkpoint, same initial adapters: the loss (incl. the orthogonal regulariser), ΔW,
merged logits and a whole short AdaLoRA run (masks and E after every step) agree; only the
adapters get optimizer and allocator state, and the step returns nothing base-shaped.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import get_peft_model

from mdkif_jax.model import llama as model_lib
from mdkif_jax.model import loading
from mdkif_jax.peft import adapters as ad
from mdkif_jax.peft import serving
from mdkif_jax.peft.adalora import AdaLoraConfig, adalora, find_state, orth_reg, peft_config_kwargs
from tests import hf_fixtures
from tests.test_adalora_peft import copy_adapters_into

R0, RT = 4, 2
B, T = 2, 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(our model, transformers reference) from one tiny random Llama checkpoint."""
  path = tmp_path_factory.mktemp("tiny_llama")
  ref = hf_fixtures.write_hf("llama", path)
  return loading.load_hf_dir(path, progress=False), ref


def peft_model(ref, cfg: AdaLoraConfig):
  pcfg = PeftAdaLoraConfig(
    **peft_config_kwargs(cfg),
    task_type="CAUSAL_LM",
    target_modules=[m.split(".")[-1] for m in serving.LLAMA_MODULES.values()],
  )
  return get_peft_model(copy.deepcopy(ref), pcfg)


def peft_module(pm, layer, t):
  mod = pm.base_model.model.model.layers[layer]
  for part in serving.LLAMA_MODULES[t].split("."):
    mod = getattr(mod, part)
  return mod


def init(model, seed, random_e=False):
  cfg = model.cfg
  a = ad.init_adalora(jax.random.key(seed), cfg.projection_dims(), cfg.num_hidden_layers, R0)
  if random_e:  # a trained-looking adapter, so ΔW and the loss change are not zero
    rng = np.random.default_rng(seed)
    a = {
      t: {**leaf, "E": jnp.asarray(rng.standard_normal(leaf["E"].shape), jnp.float32)}
      for t, leaf in a.items()
    }
  return a


def make_loss(graphdef, cfg: AdaLoraConfig):
  ctx = ad.AdapterCtx(scale=ad.adapter_scale(cfg.lora_alpha, cfg.init_r))

  def loss_fn(adapters, params, tokens):
    logits = model_lib.forward(graphdef, params, tokens, adapters=adapters, adapter_ctx=ctx)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return jnp.mean(nll) + cfg.orth_reg_weight * orth_reg(adapters, cfg.orth_reg_form)

  return loss_fn


def tokens_at(step):
  return np.random.default_rng(50 + step).integers(0, 256, (B, T)).astype(np.int64)


def test_loss_delta_weight_and_merge_match_peft(pair):
  model, ref = pair
  cfg = AdaLoraConfig(init_r=R0, target_r=RT, total_step=10, lora_alpha=8.0)
  L = model.cfg.num_hidden_layers
  adapters = init(model, 0, random_e=True)
  pm = peft_model(ref, cfg)
  copy_adapters_into(lambda i, t: peft_module(pm, i, t), adapters, L)
  tokens = tokens_at(0)
  tt = torch.from_numpy(tokens)
  want = pm(input_ids=tt, labels=tt).loss.item()  # CE + 0.5 * orth reg, inside PEFT
  graphdef, params = nnx.split(model)
  got = float(jax.jit(make_loss(graphdef, cfg))(adapters, params, jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  base_only = pm.base_model.model(input_ids=tt, labels=tt).loss.item()
  assert abs(want - base_only) > 1e-3  # the adapters and the regulariser really matter

  scale = ad.adapter_scale(cfg.lora_alpha, cfg.init_r)
  max_dw = 0.0
  for t, leaf in adapters.items():
    dw = np.asarray(ad.delta_weight(leaf, scale))
    for i in range(L):
      want_dw = peft_module(pm, i, t).get_delta_weight("default").detach().numpy().T
      np.testing.assert_allclose(dw[i], want_dw, rtol=1e-5, atol=1e-7)
      max_dw = max(max_dw, float(np.abs(dw[i] - want_dw).max()))
  print(f"loss |Δ| = {abs(got - want):.2e}, max |ΔW_ours - ΔW_peft| = {max_dw:.2e}")

  # Merged kernels give PEFT's merge_and_unload logits with no adapters in the forward pass.
  kernels = {t: getattr(model, t)[...] for t in adapters}
  merged = serving.merge(kernels, adapters, scale)
  merged_params = jax.tree.map(lambda x: x, params)
  for t in adapters:
    merged_params[t][...] = merged[t]
  np.testing.assert_array_equal(model.q[...], kernels["q"])  # the shared model is untouched
  ours = jax.jit(model_lib.forward, static_argnums=0)(graphdef, merged_params, tt.numpy())
  with torch.no_grad():
    want_logits = pm.merge_and_unload()(tt).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), want_logits, atol=2e-4, rtol=0)
  unmerged = serving.unmerge(merged, adapters, scale)
  for t in adapters:
    np.testing.assert_allclose(unmerged[t], kernels[t], atol=1e-6)


def test_adalora_training_matches_peft(pair):
  model, ref = pair
  cfg = AdaLoraConfig(
    init_r=R0, target_r=RT, tinit=1, tfinal=2, delta_t=2, total_step=8, lora_alpha=8.0
  )
  L = model.cfg.num_hidden_layers
  adapters = init(model, 1)
  pm = peft_model(ref, cfg)
  copy_adapters_into(lambda i, t: peft_module(pm, i, t), adapters, L)
  graphdef, params = nnx.split(model)
  tx = adalora(optax.adamw(5e-3, weight_decay=0.01), cfg)
  state = tx.init(adapters)
  topt = torch.optim.AdamW(
    [p for p in pm.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.01
  )
  loss_fn = make_loss(graphdef, cfg)

  @jax.jit
  def step(adapters, state, params, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, tokens)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, loss

  max_e, max_loss = 0.0, 0.0
  for t in range(cfg.total_step + 2):
    tokens = tokens_at(t)
    tt = torch.from_numpy(tokens)
    loss = pm(input_ids=tt, labels=tt).loss
    loss.backward()
    topt.step()
    pm.base_model.update_and_allocate(t)
    topt.zero_grad()
    adapters, state, our_loss = step(adapters, state, params, jnp.asarray(tokens, jnp.int32))
    max_loss = max(max_loss, abs(float(our_loss) - loss.item()))
    for tgt, leaf in adapters.items():
      want_e = np.stack(
        [peft_module(pm, i, tgt).lora_E["default"].detach().numpy()[:, 0] for i in range(L)]
      )
      e = np.asarray(leaf["E"])
      np.testing.assert_array_equal(e == 0, want_e == 0, err_msg=f"step {t} {tgt}")
      np.testing.assert_allclose(e, want_e, rtol=1e-3, atol=1e-5, err_msg=f"step {t} {tgt}")
      max_e = max(max_e, float(np.abs(e - want_e).max()))
  assert max_loss < 1e-4
  rank_pattern = pm.peft_config["default"].rank_pattern
  masks = find_state(state).mask
  ours_rp = serving.peft_rank_pattern({t: np.asarray(m) for t, m in masks.items()})
  assert ours_rp == {
    k.replace(".default", "").replace("base_model.model.", ""): v for k, v in rank_pattern.items()
  }
  assert sum(sum(v) for v in ours_rp.values()) == RT * L * len(masks)
  print(f"max |E_ours - E_peft| = {max_e:.2e}, max |loss diff| = {max_loss:.2e}")

  # The frozen base was an input only: every leaf of the trained optimizer and allocator state
  # (Adam moments, sensitivity EMAs, masks) is adapter-shaped or a scalar, none base-shaped,
  # and nothing the step returns is base-shaped either.
  adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
  base_shapes = {x.shape for x in jax.tree.leaves(params) if x.ndim >= 2}
  assert adapter_shapes.isdisjoint(base_shapes)  # so the shape tells the two apart
  for x in jax.tree.leaves(state):
    assert x.ndim == 0 or x.shape in adapter_shapes, x.shape
  out_shapes = jax.eval_shape(step, adapters, state, params, jnp.zeros((B, T), jnp.int32))
  assert not base_shapes & {x.shape for x in jax.tree.leaves(out_shapes)}
