"""`python -m mdkif_jax.data stats --config=configs/skill.py [--show N]`

Prints, per split and per (skill, source): records, token-length percentiles, how many were
truncated (context cut) and how many are too long to train (skipped); then the skipped-record
counts per file. `--show N` prints N examples decoded from the very token ids the model gets,
with the answer (the only tokens that carry loss) set off by a marker line.

Token statistics use up to `--sample` examples per (skill, source), picked by id hash, so the
tool stays quick on the full corpora; record counts are always exact.
"""

from __future__ import annotations

import collections
import logging
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mdkif_jax import flag_errors
from mdkif_jax.data.example import DataError, LoadReport
from mdkif_jax.data.skills import SKILLS
from mdkif_jax.data.splits import hash_unit, load_all
from mdkif_jax.data.template import Template
from mdkif_jax.data.tokenize import encode_many

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (needs .data, .model).")
_SHOW = flags.DEFINE_integer("show", 0, "Render this many examples as the model sees them.")
_SPLIT = flags.DEFINE_enum("split", "both", ["train", "eval", "both"], "Which split to describe.")
_SAMPLE = flags.DEFINE_integer("sample", 2000, "Examples per (skill, source) for token stats.")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", None, "Tokenizer source; default: the config's model.tokenizer or model.source."
)


def _tokenizer(cfg):
  """--tokenizer, else the config's model's own tokenizer: the rule training uses."""
  from mdkif_jax.model.tokenizer import load_tokenizer, tokenizer_source

  if _TOKENIZER.value:
    return load_tokenizer(_TOKENIZER.value)
  if "model" not in cfg:
    raise app.UsageError("the config has no model section: pass --tokenizer")
  return load_tokenizer(tokenizer_source(cfg.model))


def _sample(examples, n):
  if len(examples) <= n:
    return examples
  return sorted(examples, key=lambda e: hash_unit(e.source, e.id))[:n]


def _table(split, examples, tok, template, max_len, sample) -> None:
  groups = collections.defaultdict(list)
  for ex in examples:
    groups[(ex.skill, ex.source)].append(ex)
  head = f"{'skill':<5} {'source':<19} {'records':>8} {'sampled':>7} "
  head += f"{'p50':>5} {'p90':>5} {'p99':>5} {'max':>5} {'trunc':>6} {'toolong':>7}"
  print(f"\n== {split}: {len(examples)} examples ==\n{head}")
  order = {s: i for i, s in enumerate(SKILLS)}
  for (skill, source), exs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
    chosen = _sample(exs, sample)
    enc = encode_many(chosen, tok, template, max_len)
    lengths = np.asarray([len(e.tokens) for e in enc if e is not None] or [0])
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).astype(int)
    trunc = sum(e.truncated for e in enc if e is not None)
    too_long = sum(e is None for e in enc)
    print(
      f"{skill:<5} {source:<19} {len(exs):>8} {len(chosen):>7} {p50:>5} {p90:>5} {p99:>5} "
      f"{lengths.max():>5} {trunc:>6} {too_long:>7}"
    )


def _show(examples, n, tok, template, max_len) -> None:
  by_skill = collections.defaultdict(list)
  for ex in examples:
    by_skill[ex.skill].append(ex)
  picks = []
  for k in range(n):  # Round-robin over skills, so N >= 12 shows every skill.
    skills = [s for s in SKILLS if by_skill.get(s)]
    skill = skills[k % len(skills)]
    pool = by_skill[skill]
    picks.append(pool[(k // len(skills)) * 7919 % len(pool)])
  for ex, enc in zip(picks, encode_many(picks, tok, template, max_len), strict=True):
    print(f"\n----- {ex.skill} / {ex.source} / {ex.id} -----")
    if enc is None:
      print(f"(too long for max_len={max_len}: skipped in training)")
      continue
    ids = enc.tokens.tolist()
    print(tok.decode(ids[: enc.answer_start], skip_special_tokens=False), end="")
    note = f", context cut by {enc.context_dropped} tokens" if enc.truncated else ""
    print(f"\n>>> loss on the {len(ids) - enc.answer_start} answer tokens below{note} <<<")
    print(tok.decode(ids[enc.answer_start :], skip_special_tokens=False))


def main(argv) -> None:
  if len(argv) != 2 or argv[1] != "stats":
    raise app.UsageError("usage: python -m mdkif_jax.data stats --config=FILE [--show N]")
  logging.getLogger("mdkif_jax").setLevel(logging.ERROR)  # Counts are printed below instead.
  cfg = _CONFIG.value
  data = cfg.data
  report = LoadReport(strict=bool(data.strict))
  try:
    splits = load_all(data, report)
  except DataError as e:  # Bad config or input: the message says what, no traceback needed.
    sys.exit(f"error: {e}")
  tok = _tokenizer(cfg)
  template = Template.from_config(data.template)
  hub = ", ".join(str(h) for h in data.get("hub_datasets", ()) or ())
  mine = ", ".join(data.get("instruct_files", ()) or ())
  parts = [data.data_dir, hub and f"hub datasets {hub}", mine and f"instruct files {mine}"]
  where = " + ".join(filter(None, parts))
  where = where or "the embedded demo corpus"
  print(f"data: {where}; max_len {data.max_len}; chat template {data.template.chat}")
  names = ["train", "eval"] if _SPLIT.value == "both" else [_SPLIT.value]
  for name in names:
    _table(name, splits[name], tok, template, data.max_len, _SAMPLE.value)
  print("\n== skipped records per file ==")
  for path, count in sorted(report.skipped.items()):
    print(f"{count:>7}  {path}")
  if not report.skipped:
    print("      0")
  print("\n== dropped, by reason ==")
  for reason, count in sorted(report.reasons.items()):
    print(f"{count:>7}  {reason}")
  for note in report.notes:
    print(f"note: {note}")
  if _SHOW.value:
    _show(splits[names[0]], _SHOW.value, tok, template, data.max_len)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=flag_errors.parse_flags)
