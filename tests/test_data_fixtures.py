"""Shared helpers of the data tests: a tiny in-memory character tokenizer (one token per
character, so lengths are exact and known) and the data config the tests start from."""

import string

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from configs.common import data_config

SPECIAL = ["<pad>", "<eos>", "<bos>", "<im_start>", "<im_end>"]
CHAT_TEMPLATE = (
  "{% for m in messages %}<im_start>{{ m['role'] }}\n{{ m['content'] }}<im_end>\n{% endfor %}"
  "{% if add_generation_prompt %}<im_start>assistant\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
  """Every printable ASCII character is one token; specials are single tokens too."""
  chars = sorted(set(string.printable) | {"\x00"})
  vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
  backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
  backend.decoder = decoders.Fuse()  # Join characters back without spaces.
  tok = PreTrainedTokenizerFast(
    tokenizer_object=backend, pad_token="<pad>", eos_token="<im_end>", bos_token="<bos>"
  )
  tok.chat_template = CHAT_TEMPLATE
  return tok


def test_char_tokenizer_is_one_token_per_character():
  tok = char_tokenizer()
  text = "Abc <im_end>\nx"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert len(ids) == len("Abc ") + 1 + 2 and ids[4] == tok.eos_token_id
  assert tok.decode(ids) == text


def cfg(**overrides):
  c = data_config()
  c.batch_size = 8  # the data API's rows per batch (make_iterator's batch_size)
  c.update(overrides)
  return c


@pytest.fixture(scope="session")
def smol():
  from mdkif_jax.model.tokenizer import load_tokenizer

  return load_tokenizer("smollm2_135m")
