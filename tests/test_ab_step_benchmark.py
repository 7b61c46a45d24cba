"""benchmarks/ab_step.py's variant parsing, config overrides and paired-ratio summary."""

import sys

import pytest

from configs import skill
from tests.conftest import load_benchmark


def _ab():
  return load_benchmark("ab_step")


def test_parse_variant_reads_literals_and_strings():
  ab = _ab()
  assert ab.parse_variant("base:") == ("base", {})
  name, o = ab.parse_variant("v:model.attention_block=128,model.remat=True,model.x=float32")
  assert name == "v" and o == {
    "model.attention_block": 128,
    "model.remat": True,
    "model.x": "float32",
  }
  assert ab.parse_variant("b:data.buckets=(128,256),model.remat=False")[1] == {
    "data.buckets": (128, 256),
    "model.remat": False,
  }
  for bad in ("nocolon", ":x=1", "v:novalue", "v:=3"):
    with pytest.raises(ValueError, match="--variant"):
      ab.parse_variant(bad)


def test_apply_overrides_sets_fields_and_names_unknown_keys():
  ab = _ab()
  cfg = skill.get_config()
  ab.apply_overrides(cfg, {"model.attention_block": 128, "train.loss_chunk": 512})
  assert cfg.model.attention_block == 128 and cfg.train.loss_chunk == 512
  with pytest.raises(KeyError, match="model.attention_blok"):
    ab.apply_overrides(cfg, {"model.attention_blok": 1})
  with pytest.raises(KeyError, match="'modle'"):
    ab.apply_overrides(cfg, {"modle.remat": True})


def test_paired_summary_ratios_follow_the_baseline_step_by_step():
  ab = _ab()
  # Both variants drift together (a slow period at steps 2-3); b is always 10% faster: the
  # paired ratio is exactly 0.9 although b's median alone overlaps a's range.
  a = [1.0, 1.1, 2.0, 2.2, 1.0]
  b = [0.9 * x for x in a]
  s = ab.paired_summary({"a": a, "b": b})
  assert [x["name"] for x in s] == ["a", "b"]
  assert s[0]["ratio"] == pytest.approx(1.0) and s[0]["interval"] == pytest.approx((1.0, 1.0))
  assert s[1]["ratio"] == pytest.approx(0.9) and s[1]["interval"] == pytest.approx((0.9, 0.9))
  assert s[1]["median_s"] == pytest.approx(0.99)
  assert sys.modules.get("ab_step") is None  # loaded by path, not left importable
