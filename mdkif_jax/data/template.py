"""The one instruction template, shared by stage 1, stage 2 and evaluation.

A prompt is the skill's instruction, then an optional context section, then the query:

    {instruction}

    {context_header}
    {context}

    {query_header}
    {query}

With `chat=True` that text is the user turn of the tokenizer's chat template (after an
optional system turn) and the generation prompt follows; otherwise `answer_header` follows.
The answer is the model's turn, ended by the tokenizer's EOS token (`<|im_end|>` for
SmolLM2's ChatML), so generation learns to stop. `instruction=False` leaves the instruction out.

`layout="lm_eval"` is lm-evaluation-harness's multiple-choice prompt instead (plain text only),
one line per part, a header (if any) in front of its text on the same line:

    {context_header} {context}
    {query_header} {query}
    {answer_header}{answer_prefix}{answer}

With an empty query header, the query "question\nA. ..\nD. .." and `answer_prefix=" "` this is
MMLU's template with candidates " A".." D"; its tokenisation is lm-eval's too (tokenize.py).

The prompt is kept as three strings (before the context, the context, after it) so the
tokenizer can cut the context alone when an example is too long.
"""

from __future__ import annotations

import dataclasses

from mdkif_jax.data.example import Example
from mdkif_jax.data.skills import get_skill

_HOLE = "\x00CONTEXT\x00"  # Marks where the context goes while the chat template runs.
LAYOUTS = ("sections", "lm_eval")


def _inline(header: str) -> str:
  return f"{header} " if header else ""


@dataclasses.dataclass(frozen=True)
class Template:
  chat: bool = True
  system: str | None = "You are a careful medical assistant."
  context_header: str = "Context:"
  query_header: str = "Question:"
  answer_header: str = "Answer:"
  truncate: str = "end"  # Which end of an over-long context is cut: "end" or "start".
  layout: str = "sections"  # "sections" (blank-line separated) or "lm_eval" (see above).
  instruction: bool = True  # Start the prompt with the skill's instruction.
  answer_prefix: str = ""  # Text between the prompt and the answer (lm-eval's " ").

  @classmethod
  def from_config(cls, cfg) -> Template:
    """From the `data.template` ConfigDict (or a plain dict)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(cfg).items() if k in fields}
    if values.get("truncate", "end") not in ("end", "start"):
      raise ValueError(
        f"data.template.truncate must be 'end' or 'start', not {values['truncate']!r}"
      )
    return cls(**values)

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"data.template.layout must be one of {LAYOUTS}, not {self.layout!r}")
    if self.layout == "lm_eval" and self.chat:
      raise ValueError("data.template.layout='lm_eval' is plain text: set data.template.chat=False")

  @property
  def joint(self) -> bool:
    """Prompt and answer tokenised together, the answer's tokens the tail after the prompt's
    (lm-eval's hf backend), instead of piece by piece."""
    return self.layout == "lm_eval"

  def user_text(self, ex: Example, context: str | None = None) -> str:
    """The user turn; `context` replaces the example's (the tokenizer passes the hole)."""
    context = ex.context if context is None else context
    parts = [get_skill(ex.skill).instruction] if self.instruction else []
    if self.layout == "lm_eval":
      lines = [f"{_inline(self.context_header)}{context}"] if ex.context.strip() else []
      lines.append(f"{_inline(self.query_header)}{ex.query}")
      return "\n\n".join([*parts, "\n".join(lines)])
    if ex.context.strip():
      parts.append(f"{self.context_header}\n{context}")
    parts.append(f"{self.query_header}\n{ex.query}")
    return "\n\n".join(parts)

  def prompt_parts(self, ex: Example, tokenizer) -> tuple[str, str, str]:
    """(before, context, after): their concatenation is the full prompt text."""
    has_context = bool(ex.context.strip())
    user = self.user_text(ex, _HOLE if has_context else None)
    if self.chat:
      messages = [{"role": "system", "content": self.system}] if self.system else []
      messages.append({"role": "user", "content": user})
      text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif self.layout == "lm_eval":
      text = f"{user}\n{self.answer_header}"
    else:
      text = f"{user}\n\n{self.answer_header}\n"
    if not has_context:
      return text, "", ""
    before, hole, after = text.partition(_HOLE)
    if not hole:
      raise ValueError("the chat template dropped the context placeholder; use chat=False")
    return before, ex.context, after

  def answer_text(self, ex: Example, tokenizer) -> str:
    return self.answer_prefix + ex.answer + (tokenizer.eos_token or "")

  def render(self, ex: Example, tokenizer) -> str:
    """The whole training text (prompt + answer), untruncated."""
    return "".join(self.prompt_parts(ex, tokenizer)) + self.answer_text(ex, tokenizer)
