"""The data part of every config: `data_config()` is `config.data` in configs/common.py.

Read by mdkif_jax.data (load_examples, make_iterator and the stats tool).
"""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """Every data field, with its default."""
  c = ml_collections.ConfigDict()
  # Folder of the datasets (the layout of ../shared/data). None = the small demo corpus
  # embedded in the package, so a fresh machine can train without any download.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  # Which converters to run: "all", or a tuple / comma string of names from
  # mdkif_jax.data.sources.SOURCES (e.g. "pubmedqa,rqe"). Ignored when data_dir is None.
  c.sources = "all"
  # Which skills to keep: "all", or names from mdkif_jax.data.SKILLS (stage 1 trains one
  # skill at a time: set this to that skill's name).
  c.skills = "all"
  # The user's own JSONL files of {"skill", "context"?, "query", "answer", "id"?, "split"?},
  # relative to data_dir or absolute; loaded as the source "instruct".
  c.instruct_files = ()
  # Datasets loaded with `datasets.load_dataset(name_or_path, config, split=split)`: a hub
  # name (needs network access, or the datasets cache when HF_DATASETS_OFFLINE=1) or a local
  # dataset folder laid out like a hub repo without a loading script (data/train-*.jsonl,
  # *.parquet, *.csv; a relative path is looked up under data_dir first). One string each:
  #   "name_or_path[:config]|split|skill|context|query|answer[|id]"
  #   name_or_path  hub name ("org/name") or folder; ":config" picks a subset if needed.
  #   split         the split to load ("train", "test", "validation", "train[:1000]", ...).
  #                 "train" trains, "test" is reserved for evaluation, any other split is
  #                 split by id hash (10% reserved).
  #   skill         the skill every row trains (a name from mdkif_jax.data.SKILLS).
  #   context       column of the context, or empty ("||") for none.
  #   query         column of the query.        answer  column of the answer.
  #   id            optional column of a stable row id (else "<split>/<row>"; rows are then
  #                 hash-split by content).
  # A dict with keys path, split, skill, context, query, answer, id?, config? works too.
  # Class-label columns give their label names, list columns one item per line. They load
  # whatever `sources` says; with data_dir None and this set, the demo corpus is not loaded.
  c.hub_datasets = ()
  # Stop at the first bad record (malformed line, missing field, empty answer, bad bytes,
  # unknown skill) instead of skipping and counting it. Also makes a missing source fatal.
  c.strict = False
  # At most this many examples per (source, skill) and split, chosen by id hash; 0 = all.
  c.max_per_source = 0
  # Hetionet node kinds that become Entity Attribute ("what kind of entity is X?") items.
  c.hetionet_node_kinds = (
    "Disease",
    "Symptom",
    "Compound",
    "Anatomy",
    "Side Effect",
    "Pharmacologic Class",
  )
  # Hetionet metaedges that become Entity-Entity Relation (pair -> relation) items. CtD and
  # CpD are left out: PharmacotherapyDB, their source, is converted on its own.
  c.hetionet_metaedges = ("DpS", "DlA", "DrD", "PCiC", "CcSE", "DaG")

  # The one prompt template of both stages (mdkif_jax/data/template.py).
  c.template = ml_collections.ConfigDict()
  # Wrap the prompt in the tokenizer's chat template (user turn, then the answer as the
  # assistant turn). False: plain text with `answer_header` before the answer.
  c.template.chat = True
  # System turn in chat mode; "" or None for none (SmolLM2's template then adds its own).
  c.template.system = "You are a careful medical assistant."
  c.template.context_header = "Context:"  # Line above the context (omitted if empty).
  c.template.query_header = "Question:"  # Line above the query.
  c.template.answer_header = "Answer:"  # Line before the answer when chat=False.
  # Which end of an over-long context is cut: "end" keeps its beginning (documents),
  # "start" keeps its end (dialogue histories). Query and answer are never cut.
  c.template.truncate = "end"

  # Longest row in tokens (prompt + answer); longer contexts are cut, see `template.truncate`.
  c.max_len = 512
  # Padded lengths a batch can take (jit compiles one shape per bucket); max_len is added.
  c.buckets = (128, 256, 512)
  # Rows per batch on each host (global batch = batch_size * jax.process_count()).
  c.batch_size = 8
  # Pack consecutive examples of one skill into each row, up to max_len tokens, each
  # attending only to itself (positions restart per example): less padding, more examples per
  # step, the same loss per example. False: one example per row. Stage-1 training batches only
  # (evaluation rows and stage 2 always hold one example per row). Packed rows fill up to
  # max_len, so they nearly always take the max_len bucket.
  c.pack = False
  # Seed of the example order; the train/eval split does not depend on it.
  c.seed = 0
  return c
