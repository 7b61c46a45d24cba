"""The first training step of `configs/skill.py:tiny`, pinned: a silent change to the numerics
(model, loss, attention, tokenizer, template, data order) moves these numbers."""

import numpy as np

from configs import skill
from mdkif_jax import data, train
from mdkif_jax.data import batches

# Measured with the seeded random tiny model (configs/skill.py:tiny, all skills, one row each)
# on one CPU device in f32. A deliberate numerics change must update these numbers (and say
# why in its commit); the answer-token counts change only with the data, the template or the
# tokenizer. The loss is ~ln(49152): the random model's logits are nearly uniform, so rtol
# 1e-5 catches e.g. a doubled RMSNorm eps or RoPE theta, not a 1% change of theta.
FIRST_STEP_LOSS_S = {
  "qa": 10.810466,
  "mcqa": 10.805527,
  "mc": 10.820827,
  "mldc": 10.818817,
  "mrc": 10.747847,
  "nli": 10.862182,
  "ts": 10.805500,
  "ner": 10.779277,
  "re": 10.823689,
  "ea": 10.808125,
  "es": 10.933361,
  "er": 10.665661,
}
FIRST_STEP_TOKENS_S = {
  "qa": 4,
  "mcqa": 2,
  "mc": 24,
  "mldc": 6,
  "mrc": 2,
  "nli": 2,
  "ts": 10,
  "ner": 4,
  "re": 3,
  "ea": 5,
  "es": 4,
  "er": 3,
}


def test_first_step_losses_of_the_tiny_preset_are_pinned():
  c = skill.get_config("tiny")
  c.mesh.shape = (1, 1, 1)  # one device, whatever the machine has: one summation order
  c.train.progress = False
  c.train.plot = False
  skills = data.SKILLS
  run = train.setup_training(c, skills)
  stream = batches.make_batches(c, skills, run.tok)
  _, m = run.fns.train_step(run.state, run.frozen, batches.to_global(next(stream), run.mesh))
  loss = dict(zip(skills, np.asarray(m["loss_S"]).tolist(), strict=True))
  tokens = dict(zip(skills, np.asarray(m["tokens_S"]).astype(int).tolist(), strict=True))
  assert tokens == FIRST_STEP_TOKENS_S
  np.testing.assert_allclose(
    [loss[s] for s in skills], [FIRST_STEP_LOSS_S[s] for s in skills], rtol=1e-5
  )
