"""Template rendering, answer-only loss masks, and the context truncation rule."""

import numpy as np
import pytest

from mdkif_jax.data import Example, Template, get_skill
from mdkif_jax.data.tokenize import encode, encode_many, pad_row
from tests.test_data_fixtures import char_tokenizer, smol  # noqa: F401 - fixture

EX = Example("mrc", "The sky is blue.", "What colour is the sky?", "blue", "test", "1")


def test_plain_template_layout():
  text = Template(chat=False).render(EX, char_tokenizer())
  instruction = get_skill("mrc").instruction
  assert text == (
    f"{instruction}\n\nContext:\nThe sky is blue.\n\nQuestion:\nWhat colour is the sky?"
    "\n\nAnswer:\nblue<im_end>"
  )
  no_context = Example("qa", "", "Why?", "Because.", "test", "2")
  assert "Context:" not in Template(chat=False).render(no_context, char_tokenizer())


def test_chat_template_wraps_the_same_user_text():
  tok = char_tokenizer()
  t = Template(chat=True, system="Be brief.")
  expected = (
    "<im_start>system\nBe brief.<im_end>\n<im_start>user\n"
    + t.user_text(EX)
    + "<im_end>\n<im_start>assistant\nblue<im_end>"
  )
  assert t.render(EX, tok) == expected


@pytest.mark.parametrize("chat", [False, True])
def test_loss_mask_covers_exactly_the_answer_and_eos(chat):
  tok = char_tokenizer()
  t = Template(chat=chat)
  enc = encode(EX, tok, t, max_len=1000)
  assert tok.decode(enc.tokens.tolist()) == t.render(EX, tok)
  row = pad_row(enc, 512, tok.pad_token_id)
  n = len(enc.tokens)
  np.testing.assert_array_equal(row["targets"][: n - 1], enc.tokens[1:])
  masked_targets = row["targets"][row["loss_mask"] == 1]
  assert tok.decode(masked_targets.tolist()) == "blue<im_end>"
  assert row["loss_mask"].sum() == len("blue") + 1
  assert row["attention_mask"].sum() == n and row["attention_mask"][n:].sum() == 0
  np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
  assert (row["tokens"][n:] == tok.pad_token_id).all()


def test_truncation_cuts_only_the_context():
  tok = char_tokenizer()
  long = Example("mrc", "ABCDEFGHIJ" * 10, "Q?", "the answer", "test", "3")
  full = encode(long, tok, Template(chat=False), max_len=10_000)
  limit = len(full.tokens) - 37
  for side, kept in (("end", "ABCDEFGHIJ" * 6 + "ABC"), ("start", "HIJ" + "ABCDEFGHIJ" * 6)):
    t = Template(chat=False, truncate=side)
    enc = encode(long, tok, t, max_len=limit)
    assert len(enc.tokens) == limit and enc.context_dropped == 37 and enc.truncated
    text = tok.decode(enc.tokens.tolist())
    assert text.endswith("Q?\n\nAnswer:\nthe answer<im_end>")
    assert f"Context:\n{kept}\n\n" in text
  # Query + answer alone exceed max_len: skipped (None), never an answer cut.
  fixed = len(full.tokens) - len(long.context)
  assert encode(long, tok, Template(chat=False), max_len=fixed - 1) is None
  assert encode(long, tok, Template(chat=False), max_len=fixed).context_dropped == 100


def test_invalid_truncate_side():
  with pytest.raises(ValueError, match="truncate"):
    Template.from_config({"truncate": "middle"})


def test_smollm2_chat_rendering_and_mask(smol):  # noqa: F811
  t = Template(chat=True, system="You are a careful medical assistant.")
  (enc,) = encode_many([EX], smol, t, max_len=512)
  prompt = smol.apply_chat_template(
    [{"role": "system", "content": t.system}, {"role": "user", "content": t.user_text(EX)}],
    tokenize=False,
    add_generation_prompt=True,
  )
  ids = enc.tokens.tolist()
  assert smol.decode(ids) == prompt + "blue<|im_end|>"
  assert smol.decode(ids[enc.answer_start :]) == "blue<|im_end|>"
  assert ids[-1] == smol.eos_token_id == 2 and ids[0] == 1  # <|im_start|>
  # Piecewise ids equal tokenising the whole text here (joins fall on newlines).
  assert ids == smol(prompt + "blue<|im_end|>", add_special_tokens=False)["input_ids"]
