"""Allocator, orth reg, scale and ΔW parity with PEFT's AdaLoRA on a tiny torch module.

Both sides start from identical base weights and adapters, see the same data, compute real
gradients of the same loss (incl. the orthogonal regulariser) and step the same optimizer;
PEFT's update_and_allocate(t) runs after each torch step, our adalora() inside the update.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import get_peft_model
from torch import nn

from mdkif_jax.optimizer import with_allocator
from mdkif_jax.peft import adapters as ad
from mdkif_jax.peft.adalora import AdaLoraConfig, find_state, orth_reg, peft_config_kwargs

DIMS = ad.llama_target_dims(hidden=16, heads=2, kv_heads=1, head_dim=8, ffn=24)
L, R0, RT = 2, 6, 3
N_ROWS = 5


class Block(nn.Module):
  def __init__(self):
    super().__init__()
    for t, (i, o) in DIMS.items():
      setattr(self, f"{t}_proj", nn.Linear(i, o, bias=False))


class Tiny(nn.Module):
  """Each projection regresses its own targets: a loss with real, distinct gradients."""

  def __init__(self):
    super().__init__()
    self.layers = nn.ModuleList([Block() for _ in range(L)])

  def forward(self, xs, ys):
    loss = 0.0
    for layer_idx, layer in enumerate(self.layers):
      for t in DIMS:
        out = getattr(layer, f"{t}_proj")(xs[t])
        loss = loss + torch.mean((out - ys[t][layer_idx]) ** 2)
    return types.SimpleNamespace(loss=loss)


def make_peft(cfg: AdaLoraConfig):
  torch.manual_seed(0)
  base = Tiny()
  pcfg = PeftAdaLoraConfig(**peft_config_kwargs(cfg), target_modules=[f"{t}_proj" for t in DIMS])
  return get_peft_model(base, pcfg)


def peft_module(pm, layer_idx, t):
  return getattr(pm.base_model.model.layers[layer_idx], f"{t}_proj")


def copy_adapters_into(module, adapters, num_layers):
  """Write our adapters into PEFT modules; module(layer, target) finds the SVDLinear."""
  with torch.no_grad():
    for t, leaf in adapters.items():
      for i in range(num_layers):
        m = module(i, t)
        m.lora_A["default"].copy_(torch.from_numpy(np.array(leaf["A"][i])))
        m.lora_E["default"].copy_(torch.from_numpy(np.array(leaf["E"][i]))[:, None])
        m.lora_B["default"].copy_(torch.from_numpy(np.array(leaf["B"][i])))


def read_e(pm):
  return {
    t: np.stack([peft_module(pm, i, t).lora_E["default"].detach().numpy()[:, 0] for i in range(L)])
    for t in DIMS
  }


def base_kernels(pm):
  """Frozen torch weights (out, in) as our stacked kernels (L, in, out)."""
  return {
    t: jnp.stack(
      [jnp.asarray(peft_module(pm, i, t).base_layer.weight.detach().numpy().T) for i in range(L)]
    )
    for t in DIMS
  }


def jax_loss(adapters, kernels, xs, ys, cfg):
  ctx = ad.AdapterCtx(scale=ad.adapter_scale(cfg.lora_alpha, cfg.init_r))
  loss = 0.0
  for layer_idx in range(L):
    for t in DIMS:
      leaf = jax.tree.map(lambda a, i=layer_idx: a[i], adapters[t])
      x = xs[t][None]  # [1, rows, in]
      out = x @ kernels[t][layer_idx] + ad.delta(x, leaf, ctx)
      loss = loss + jnp.mean((out[0] - ys[t][layer_idx]) ** 2)
  return loss + cfg.orth_reg_weight * orth_reg(adapters, cfg.orth_reg_form)


def batch(step):
  rng = np.random.default_rng(100 + step)
  xs = {t: rng.standard_normal((N_ROWS, i)).astype(np.float32) for t, (i, _) in DIMS.items()}
  ys = {t: rng.standard_normal((L, N_ROWS, o)).astype(np.float32) for t, (_, o) in DIMS.items()}
  return xs, ys


CLIP = 0.02  # below most gradient norms of these batches: most steps are clipped

OPTIMIZERS = {
  # name: (ours, torch factory); "_clipped": the gradients are clipped to CLIP (global norm)
  # first, as HF Trainer does before PEFT's update_and_allocate sees them
  "adamw": (
    lambda: optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
  ),
  "sgd": (lambda: optax.sgd(0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
}
OPTIMIZERS["adamw_clipped"] = OPTIMIZERS["adamw"]


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_allocation_matches_peft(opt):
  cfg = AdaLoraConfig(
    init_r=R0, target_r=RT, tinit=3, tfinal=6, delta_t=2, total_step=24, lora_alpha=8.0
  )
  pm = make_peft(cfg)
  adapters = ad.init_adalora(jax.random.key(1), DIMS, L, R0)
  copy_adapters_into(lambda i, t: peft_module(pm, i, t), adapters, L)
  kernels = base_kernels(pm)
  ours_tx, torch_opt = OPTIMIZERS[opt]
  clipped = opt.endswith("_clipped")
  clip = optax.clip_by_global_norm(CLIP) if clipped else None
  tx = with_allocator(clip, ours_tx(), cfg, "clipped")
  state = tx.init(adapters)
  topt = torch_opt([p for p in pm.parameters() if p.requires_grad])

  @jax.jit
  def step(adapters, state, xs, ys):
    grads = jax.grad(jax_loss)(adapters, kernels, xs, ys, cfg)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state

  max_e_diff = 0.0
  allocations = n_clipped = 0
  for t in range(cfg.total_step + 3):  # a few steps past T: the pattern stays frozen
    xs, ys = batch(t)
    loss = pm.base_model(
      {k: torch.from_numpy(v) for k, v in xs.items()},
      {k: torch.from_numpy(v) for k, v in ys.items()},
    ).loss  # AdaLoraModel.forward adds the orth reg to .loss
    loss.backward()
    if clipped:
      norm = torch.nn.utils.clip_grad_norm_([p for p in pm.parameters() if p.requires_grad], CLIP)
      n_clipped += int(norm > CLIP)
    topt.step()
    pm.base_model.update_and_allocate(t)
    topt.zero_grad()
    adapters, state = step(adapters, state, xs, ys)

    want_e = read_e(pm)
    for tgt in DIMS:
      got_e = np.asarray(adapters[tgt]["E"])
      # Pruned singular values are exactly zero on both sides, at the same positions.
      np.testing.assert_array_equal(got_e == 0, want_e[tgt] == 0, err_msg=f"t={t} {tgt}")
      np.testing.assert_allclose(got_e, want_e[tgt], rtol=2e-4, atol=2e-6, err_msg=f"t={t}")
      max_e_diff = max(max_e_diff, float(np.abs(got_e - want_e[tgt]).max()))
    if pm.peft_config["default"].rank_pattern is not None:
      allocations += 1

  rank_pattern = pm.peft_config["default"].rank_pattern
  masks = find_state(state).mask
  n_kept, max_ab_diff = 0, 0.0
  for tgt in DIMS:
    for i in range(L):
      want = rank_pattern[f"layers.{i}.{tgt}_proj.lora_E.default"]
      np.testing.assert_array_equal(np.asarray(masks[tgt][i]), want)
      n_kept += sum(want)
    for name in ("A", "B"):
      want = np.stack(
        [getattr(peft_module(pm, i, tgt), f"lora_{name}")["default"].detach() for i in range(L)]
      )
      # Adam normalises tiny gradients, so f32 noise grows to ~1e-5 over the 27 steps.
      np.testing.assert_allclose(adapters[tgt][name], want, rtol=1e-4, atol=2e-5)
      max_ab_diff = max(max_ab_diff, float(np.abs(np.asarray(adapters[tgt][name]) - want).max()))
  assert n_kept == RT * L * len(DIMS)  # b_T triplets survive
  assert allocations > 0
  assert not clipped or n_clipped > cfg.total_step // 2  # the clipping really acted
  print(f"{opt}: max |ΔE| = {max_e_diff:.2e}, max |ΔA|,|ΔB| = {max_ab_diff:.2e}")


def test_orth_reg_matches_peft():
  cfg = AdaLoraConfig(init_r=R0, target_r=RT, total_step=10, orth_reg_weight=0.5)
  pm = make_peft(cfg)
  adapters = ad.init_adalora(jax.random.key(2), DIMS, L, R0)
  copy_adapters_into(lambda i, t: peft_module(pm, i, t), adapters, L)
  xs, ys = batch(0)
  tx, ty = ({k: torch.from_numpy(v) for k, v in d.items()} for d in (xs, ys))
  with_reg = pm.base_model(tx, ty).loss.item()
  without = pm.base_model.model(tx, ty).loss.item()
  want = (with_reg - without) / cfg.orth_reg_weight
  got = float(orth_reg(adapters, "peft"))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Total loss (data + gamma * reg) also matches.
  got_loss = float(jax_loss(adapters, base_kernels(pm), xs, ys, cfg))
  np.testing.assert_allclose(got_loss, with_reg, rtol=1e-5)


def test_orth_reg_paper_form():
  adapters = ad.init_adalora(jax.random.key(3), DIMS, L, R0)
  want = 0.0
  for leaf in adapters.values():
    for i in range(L):
      a, b = np.asarray(leaf["A"][i], np.float64), np.asarray(leaf["B"][i], np.float64)
      want += np.sum((a @ a.T - np.eye(R0)) ** 2) + np.sum((b.T @ b - np.eye(R0)) ** 2)
  np.testing.assert_allclose(float(orth_reg(adapters, "paper")), want, rtol=1e-5)


def test_scale_and_delta_weight_match_peft():
  cfg = AdaLoraConfig(init_r=R0, target_r=RT, total_step=10, lora_alpha=8.0)
  pm = make_peft(cfg)
  adapters = ad.init_adalora(jax.random.key(4), DIMS, L, R0)
  key = jax.random.key(5)
  for t in sorted(adapters):  # non-zero E, so ΔW is not trivially zero
    key, k = jax.random.split(key)
    adapters[t]["E"] = jax.random.normal(k, adapters[t]["E"].shape)
  copy_adapters_into(lambda i, t: peft_module(pm, i, t), adapters, L)
  scale = ad.adapter_scale(cfg.lora_alpha, cfg.init_r)
  for t, leaf in adapters.items():
    got = np.asarray(ad.delta_weight(leaf, scale))
    for i in range(L):
      m = peft_module(pm, i, t)
      want = m.get_delta_weight("default").detach().numpy().T  # (out, in) -> kernel (in, out)
      np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-7)
      peft_scale = m.scaling["default"] / (m.ranknum["default"].item() + 1e-5)
      np.testing.assert_allclose(scale, peft_scale, rtol=1e-6)


@pytest.mark.parametrize("importance", ["clipped", "raw"])
def test_importance_scores_see_the_gradient_the_config_names(importance):
  """With clipping on, the first step's sensitivity EMA is (1 - beta1)·|θ'·g| with g the clipped
  gradient ("clipped", PEFT under HF Trainer) or the raw one ("raw")."""
  cfg = AdaLoraConfig(init_r=R0, target_r=RT, tinit=3, tfinal=6, delta_t=2, total_step=24)
  adapters = ad.init_adalora(jax.random.key(1), DIMS, L, R0)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 10.0), adapters)  # global norm >> 1e-3
  tx = with_allocator(optax.clip_by_global_norm(1e-3), optax.sgd(0.1), cfg, importance)
  updates, state = tx.update(grads, tx.init(adapters), adapters)
  clipped = optax.clip_by_global_norm(1e-3).update(grads, optax.EmptyState())[0]
  seen = clipped if importance == "clipped" else grads
  theta = optax.apply_updates(adapters, updates)  # post_update sensitivity: θ after the step
  want = jax.tree.map(lambda p, g: (1 - cfg.beta1) * jnp.abs(p * g), theta, seen)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12),
    find_state(state).ipt,
    want,
  )
