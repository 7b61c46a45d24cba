"""Tokenisation with the loss on answer tokens only, and the context-side truncation rule.

Pieces are tokenised separately (before-context, context, after-context, answer+EOS) and
concatenated, so the answer's first token index is known exactly and the context can be cut
without re-tokenising. The ids can differ from tokenising the joined string at the three
joins; `--show` in the stats tool decodes the real ids, so what it prints is what trains.

A `Template.joint` template (layout "lm_eval") is tokenised as lm-evaluation-harness's hf backend
does instead: trailing whitespace of the prompt moves to the answer, the prompt is encoded
whole, and the answer's tokens are those of (prompt + answer) after the prompt's length. An
example too long for that falls back to the pieces and the rule below.

Truncation rule: an example longer than `max_len` loses context tokens only, from the end of
the context (`template.truncate="end"`, the default: abstracts and documents lead with their
topic) or from its start ("start": dialogue histories, where the latest turns matter). The
instruction, query and answer are never cut; when they alone exceed `max_len` the example is
skipped and counted as `too_long`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mdkif_jax.data.example import Example
from mdkif_jax.data.template import Template


@dataclasses.dataclass(frozen=True)
class Encoded:
  tokens: np.ndarray  # int32 [L]: prompt then answer (ending in EOS).
  answer_start: int  # Index of the first answer token; the loss covers [answer_start, L).
  context_dropped: int  # Context tokens removed by truncation (0 = untruncated).

  @property
  def truncated(self) -> bool:
    return self.context_dropped > 0


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
  if not texts:
    return []
  return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _bos(tokenizer, template: Template) -> list[int]:
  """A leading BOS for plain prompts of tokenizers that add one (Llama 2); chat templates
  write their own BOS into the text, so none is added there."""
  if template.chat or tokenizer.bos_token_id is None:
    return []
  probe = tokenizer("a", add_special_tokens=True)["input_ids"]
  return [tokenizer.bos_token_id] if probe and probe[0] == tokenizer.bos_token_id else []


def _joint(parts, answers, tokenizer):
  """lm-eval's `_encode_pair` for a joint template: the prompt's trailing whitespace starts the
  answer, and the answer's ids are what tokenising prompt + answer adds after the prompt's.
  Returns (the pieces without that whitespace, answer ids, whole-prompt ids)."""
  kept, texts = [], []
  for (b, c, a), ans in zip(parts, answers, strict=True):
    last = a if (c or a) else b
    tail = last[len(last.rstrip()) :]
    kept.append((b, c, a.rstrip()) if (c or a) else (b.rstrip(), "", ""))
    texts.append("".join(kept[-1]) + tail + ans)
  prompts = _ids(tokenizer, ["".join(p) for p in kept])
  whole = _ids(tokenizer, texts)
  return kept, [w[len(p) :] for w, p in zip(whole, prompts, strict=True)], prompts


def answer_ids(examples: Sequence[Example], tokenizer, template: Template) -> list[list[int]]:
  """Each example's answer tokens (EOS included) as `encode_many` puts them after its prompt
  (when the whole prompt fits): the candidates' ids of label scoring (evaluate.py)."""
  answers = [template.answer_text(ex, tokenizer) for ex in examples]
  if not template.joint:
    return _ids(tokenizer, answers)
  return _joint([template.prompt_parts(ex, tokenizer) for ex in examples], answers, tokenizer)[1]


def encode_many(
  examples: Sequence[Example], tokenizer, template: Template, max_len: int
) -> list[Encoded | None]:
  """Encode examples (None for those too long even without context), four batched calls
  (six for a joint template)."""
  parts = [template.prompt_parts(ex, tokenizer) for ex in examples]
  answers = [template.answer_text(ex, tokenizer) for ex in examples]
  prompts = None
  if template.joint:
    parts, answer, prompts = _joint(parts, answers, tokenizer)
  else:
    answer = _ids(tokenizer, answers)
  before = _ids(tokenizer, [p[0] for p in parts])
  context = _ids(tokenizer, [p[1] for p in parts])
  after = _ids(tokenizer, [p[2] for p in parts])
  bos = _bos(tokenizer, template)
  out: list[Encoded | None] = []
  for k, (b, c, a, ans) in enumerate(zip(before, context, after, answer, strict=True)):
    if prompts is not None and ans and len(bos) + len(prompts[k]) + len(ans) <= max_len:
      prompt = bos + prompts[k]
      out.append(Encoded(np.asarray(prompt + ans, dtype=np.int32), len(prompt), 0))
      continue
    fixed = len(bos) + len(b) + len(a) + len(ans)
    room = max_len - fixed
    if room < 0 or not ans:
      out.append(None)
      continue
    dropped = max(0, len(c) - room)
    if dropped:
      c = c[: len(c) - dropped] if template.truncate == "end" else c[dropped:]
    prompt = bos + b + c + a
    tokens = np.asarray(prompt + ans, dtype=np.int32)
    out.append(Encoded(tokens, len(prompt), dropped))
  return out


def encode(ex: Example, tokenizer, template: Template, max_len: int) -> Encoded | None:
  return encode_many([ex], tokenizer, template, max_len)[0]


def pad_row(enc: Encoded, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """One row of a batch, right-padded to `length`.

  targets[t] = tokens[t + 1]; loss_mask[t] = 1 exactly when targets[t] is an answer token
  (the EOS included), so the loss is next-token prediction over the answer only.
  attention_mask is 1 on the row's tokens and 0 on padding.
  """
  return pack_row([enc], length, pad_id)


def pack_row(encs: Sequence[Encoded], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Several examples side by side in one row, right-padded to `length` (`pad_row` for one).

  Each example is its own segment: attention_mask holds its segment id (1, 2, ...; 0 on
  padding), which the model reads as "attend only within your segment", and positions restart
  at 0 in every segment. Targets and loss_mask are each example's own (`pad_row`), so a packed
  row trains exactly what its examples would train in rows of their own.
  """
  n_all = sum(len(e.tokens) for e in encs)
  if n_all > length:
    raise ValueError(f"row of {n_all} tokens does not fit length {length}")
  tokens = np.full(length, pad_id, np.int32)
  targets = np.full(length, pad_id, np.int32)
  loss_mask = np.zeros(length, np.float32)
  positions = np.zeros(length, np.int32)
  attention_mask = np.zeros(length, np.int32)
  at = 0
  for seg, enc in enumerate(encs, start=1):
    n = len(enc.tokens)
    tokens[at : at + n] = enc.tokens
    targets[at : at + n - 1] = enc.tokens[1:]
    # (an answer at index 0 has no previous position: its first token carries no loss)
    loss_mask[at + max(enc.answer_start, 1) - 1 : at + n - 1] = 1.0
    positions[at : at + n] = np.arange(n, dtype=np.int32)
    attention_mask[at : at + n] = seg
    at += n
  return {
    "tokens": tokens,
    "targets": targets,
    "loss_mask": loss_mask,
    "positions": positions,
    "attention_mask": attention_mask,
  }
