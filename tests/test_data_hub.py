"""`data.hub_datasets`: datasets given by hub name or local dataset folder, without network.

A local folder goes through exactly the call a hub name does,
`datasets.load_dataset(name_or_path, config, split=...)`; conftest sets HF_DATASETS_OFFLINE=1.
"""

import json
import os
import pathlib
import subprocess
import sys

import datasets
import pytest

from mdkif_jax.data import DataError, LoadReport, load_all
from mdkif_jax.data.example import content_key
from mdkif_jax.data.sources import hub
from mdkif_jax.data.splits import hash_unit
from tests.test_data_fixtures import cfg

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rows(n, start=0, **extra):
  return [
    {"uid": f"r{i}", "q": f"What is drug {i}?", "a": f"Drug {i} is a statin.", "ctx": f"Doc {i}."}
    | extra
    for i in range(start, start + n)
  ]


def write_repo(root, splits: dict[str, list[dict]]):
  """A hub-style repo without a loading script: data/<split>-00000-of-00001.jsonl."""
  (root / "data").mkdir(parents=True)
  for split, records in splits.items():
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (root / "data" / f"{split}-00000-of-00001.jsonl").write_text(lines)
  return str(root)


def test_local_repo_loads_like_a_hub_name_with_split_roles(tmp_path):
  train = rows(4)
  train[1]["a"] = ""  # Row 1: empty answer, skipped and named.
  path = write_repo(tmp_path / "org_ds", {"train": train, "test": rows(2, start=10)})
  spec = f"{path}|train|qa|ctx|q|a|uid"
  report = LoadReport()
  out = load_all(cfg(hub_datasets=(spec, f"{path}|test|qa|ctx|q|a|uid")), report)
  assert [e.id for e in out["train"]] == ["r0", "r2", "r3"]  # No demo corpus mixed in.
  assert [e.id for e in out["eval"]] == ["r10", "r11"]
  ex = out["train"][0]
  assert (ex.skill, ex.context, ex.query, ex.answer) == (
    "qa",
    "Doc 0.",
    rows(1)[0]["q"],
    rows(1)[0]["a"],
  )
  assert ex.source == f"hub:{path}"
  assert report.skipped == {f"{path}[train]": 1}
  with pytest.raises(DataError, match=r"\[train\]:1: empty field: 'a'"):
    load_all(cfg(hub_datasets=(spec,), strict=True))


def test_parquet_folder_relative_to_data_dir_other_split_is_hashed(tmp_path):
  """A parquet file under data_dir, a dict entry, a class-label answer, no id column, the
  validation split: hash-split by content, every row lands on the side its hash says."""
  (tmp_path / "nli_set" / "data").mkdir(parents=True)
  n = 40
  features = datasets.Features(
    {
      "premise": datasets.Value("string"),
      "hypothesis": datasets.Value("string"),
      "label": datasets.ClassLabel(names=["no", "yes"]),
    }
  )
  table = datasets.Dataset.from_dict(
    {
      "premise": [f"Patient {i} takes aspirin." for i in range(n)],
      "hypothesis": [f"Patient {i} takes a drug." for i in range(n)],
      "label": [i % 2 for i in range(n)],
    },
    features=features,
  )
  table.to_parquet(str(tmp_path / "nli_set" / "data" / "validation-00000.parquet"))
  entry = dict(
    path="nli_set",
    split="validation",
    skill="nli",
    context="premise",
    query="hypothesis",
    answer="label",
  )
  out = load_all(cfg(data_dir=str(tmp_path), sources="", hub_datasets=(entry,)))
  both = out["train"] + out["eval"]
  assert len(both) == n and {e.answer for e in both} == {"no", "yes"}
  assert out["train"] and out["eval"]  # 10% reserved of 40: both sides non-empty here.
  for role, exs in out.items():
    for e in exs:
      group = f"{e.source}/{content_key(e)}"
      assert (hash_unit("hub", group) < 0.1) == (role == "eval")


def test_missing_column_names_dataset_and_field(tmp_path):
  path = write_repo(tmp_path / "ds", {"train": rows(2)})
  with pytest.raises(DataError, match=r"ds\[train\]: no column 'answer_text' \(the answer field\)"):
    load_all(cfg(hub_datasets=(f"{path}|train|qa||q|answer_text",)))


def test_bad_entries_are_config_errors(tmp_path):
  with pytest.raises(DataError, match="expected 6 or 7 .* got 3"):
    load_all(cfg(hub_datasets=("org/ds|train|qa",)))
  with pytest.raises(DataError, match="unknown skill 'surgery'"):
    load_all(cfg(hub_datasets=("org/ds|train|surgery||q|a",)))
  with pytest.raises(DataError, match="does not exist"):
    load_all(cfg(hub_datasets=(f"{tmp_path}/absent|train|qa||q|a",)))
  with pytest.raises(DataError, match=r"unknown keys \['question'\]"):
    load_all(cfg(hub_datasets=(dict(path="org/ds", split="train", skill="qa", question="q"),)))
  spec = hub.parse_spec("org/ds:pqa_labeled|train[:10]|qa||q|a")
  assert (spec.path, spec.config, spec.part) == ("org/ds", "pqa_labeled", "all")


def test_uncached_hub_name_offline_is_a_clear_error():
  with pytest.raises(DataError) as err:
    load_all(cfg(hub_datasets=("mdkif-test/no-such-dataset-4e1b|train|qa||q|a",)))
  msg = str(err.value)
  assert "mdkif-test/no-such-dataset-4e1b[train]" in msg
  assert "network" in msg and "OFFLINE" in msg


def test_stats_tool_reports_the_error_without_a_traceback():
  entry = "('mdkif-test/no-such-dataset-4e1b|train|qa||q|a',)"
  cmd = [sys.executable, "-m", "mdkif_jax.data", "stats", "--config=configs/skill.py"]
  env = os.environ | {"HF_DATASETS_OFFLINE": "1"}
  out = subprocess.run(
    [*cmd, f"--config.data.hub_datasets={entry}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "error: hub dataset mdkif-test/no-such-dataset-4e1b[train]" in out.stderr
