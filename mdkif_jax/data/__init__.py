"""The data layer: the 12 skills as (skill, context, query, answer) examples.

    examples = load_examples(cfg.data, "train")        # stage 1; "eval" = reserved sets
    batches = make_iterator(examples, tokenizer, cfg.data, batch_size=8)  # this host's shard
    state = batches.get_state()                        # JSON-able; batches.set_state(state)

`python -m mdkif_jax.data stats --config=configs/skill.py [--show N]` prints what a config
loads, per skill and source.
"""

from mdkif_jax.data.example import DataError, Example, LoadReport
from mdkif_jax.data.pipeline import Batches, make_iterator
from mdkif_jax.data.skills import SKILL_SPECS, SKILLS, get_skill, skill_id
from mdkif_jax.data.splits import SPLITS, load_all, load_examples
from mdkif_jax.data.template import Template

__all__ = [
  "Batches",
  "Template",
  "make_iterator",
  "SKILLS",
  "SKILL_SPECS",
  "SPLITS",
  "DataError",
  "Example",
  "LoadReport",
  "get_skill",
  "load_all",
  "load_examples",
  "skill_id",
]
