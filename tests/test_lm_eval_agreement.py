"""Our label scoring == lm-evaluation-harness's: one tiny Llama checkpoint written by
transformers, one MCQA file (MedQA layout), scored by lm-eval's `hf` backend through a custom
local task (MMLU's prompt) and by our TaskScorer with configs/eval.py:lm_eval_mcqa (the base).
Same prompts, same per-candidate log-likelihoods, same per-row choices, same acc and acc_norm,
for a tokenizer without BOS (SmolLM2's) and one that adds BOS (as Llama 2's does). Beneath it,
the token ids of the prompt and the answer are those of lm-eval's own `_encode_pair`. And
labels of several tokens, which our Decoder scores in one sequence of the prompt and all of them
and lm-eval as one full sequence per label, agree the same way.

lm-eval is a test-only dependency (requirements-test.txt): it is the ground truth here.
"""

import copy
import dataclasses
import functools
import json
import pathlib
import types

import numpy as np
import pytest
from flax import nnx

from configs import eval as eval_config
from mdkif_jax import evaluate, evaluate_suite, metrics
from mdkif_jax.data import suite
from mdkif_jax.data.example import LoadReport
from mdkif_jax.data.template import Template
from mdkif_jax.data.tokenize import encode
from mdkif_jax.model import loading, tokenizer
from mdkif_jax.model.config import numerics_from
from mdkif_jax.peft import adapters, serving
from tests import hf_fixtures
from tests.conftest import load_benchmark
from tests.test_export import ALPHA, INIT_R, write_stage1

BENCH = load_benchmark("eval")  # its lm-eval task: MMLU's template over MedQA-layout rows
TASK = BENCH.TASK
WORDS = [
  *("insulin", "pancreas", "liver", "kidney", "renal", "cardiac", "aspirin", "fever", "dose"),
  *("acute", "chronic", "nerve", "artery", "vein", "cortex", "gland", "thyroid", "anemia"),
  *("sepsis", "lesion", "biopsy", "tumor", "ulcer", "edema"),
]


def mcqa_rows(n: int = 32) -> list[dict]:
  """MedQA-layout records with varied words, so candidates' log-likelihoods differ."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    q = " ".join(rng.choice(WORDS, 6 + i % 5))
    opts = {k: " ".join(rng.choice(WORDS, 1 + (i + j) % 3)) for j, k in enumerate("ABCD")}
    pad = " " if i % 7 == 0 else ""  # surrounding spaces: lm-eval strips them, and so do we
    out.append({"question": f"{pad}Which {q}?{pad}", "options": opts, "answer_idx": "ABCD"[i % 4]})
  return out


def write_rows(path, n: int):
  path.write_text("".join(json.dumps(r) + "\n" for r in mcqa_rows(n)))
  return path


def with_bos(tok):
  """A copy of the tokenizer whose encode adds BOS, as Llama 2's does."""
  from tokenizers import processors

  tok = copy.deepcopy(tok)
  bos = tok.bos_token
  tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
  )
  return tok


def lm_eval_encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-eval's own (context ids, continuation ids) of its hf backend (TemplateLM._encode_pair
  with HFLM.tok_encode, default add_bos_token), without loading a model."""
  from lm_eval.api.model import TemplateLM
  from lm_eval.models.huggingface import HFLM

  prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
  lm = types.SimpleNamespace(
    tokenizer=tok, add_bos_token=None, backend="causal", prefix_token_id=prefix
  )
  lm.tok_encode = functools.partial(HFLM.tok_encode, lm)
  return TemplateLM._encode_pair(lm, context, continuation)


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
@pytest.mark.parametrize("space_in", ["answer_prefix", "answer_header"])
def test_prompt_and_answer_tokens_are_lm_evals_encode_pair(tmp_path, bos, space_in):
  """Both with the preset (" A" after "Answer:") and with the space at the end of the prompt
  ("Answer: " then "A", which lm-eval moves into the continuation); with a context too."""
  smol = tokenizer.load_tokenizer("smollm2_135m")
  tok = with_bos(smol) if bos else smol
  t = Template.from_config(eval_config.get_config("lm_eval_mcqa").data.template)
  if space_in == "answer_header":
    t = dataclasses.replace(t, answer_header="Answer: ", answer_prefix="")
  rows = suite.read_task_file(write_rows(tmp_path / "rows.jsonl", 8), LoadReport())
  rows.append(dataclasses.replace(rows[0], context="Insulin  is made in the pancreas. "))
  for row in rows:
    enc = encode(row, tok, t, max_len=512)
    prompt = "".join(t.prompt_parts(row, tok))
    ctx, cont = lm_eval_encode_pair(tok, prompt, t.answer_prefix + row.answer)
    assert enc.tokens[: enc.answer_start].tolist() == ctx, row
    assert enc.tokens[enc.answer_start : -1].tolist() == cont, row
    assert enc.tokens[-1] == tok.eos_token_id  # the trained answer ends in EOS; scoring drops it


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The checkpoint (weights once, a tokenizer directory per BOS setting), rows and task."""

  root = tmp_path_factory.mktemp("lm_eval")
  smol = tokenizer.load_tokenizer("smollm2_135m")
  models = {}
  for bos in (False, True):
    d = root / f"model_bos{int(bos)}"
    hf_fixtures.write_hf(
      "llama",
      d,
      vocab_size=len(smol),
      max_position_embeddings=512,
      bos_token_id=smol.bos_token_id,
      eos_token_id=smol.eos_token_id,
    )
    (with_bos(smol) if bos else smol).save_pretrained(d)
    models[bos] = d
  data = write_rows(root / "rows.jsonl", 32)
  BENCH.write_task(data, root / "tasks")
  return models, data, root / "tasks"


def lm_eval_hf(model_dir, task_dir, peft=None) -> tuple[dict, list[dict]]:
  """lm-eval's results and per-doc samples (in file order) through its hf backend, f32 CPU;
  with `peft`, an adapter directory loaded on the model (`--model_args ...,peft=DIR`)."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  out = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={model_dir},dtype=float32" + (f",peft={peft}" if peft else ""),
    tasks=[TASK],
    task_manager=TaskManager(include_path=str(task_dir)),
    batch_size=16,
    device="cpu",
    log_samples=True,
    bootstrap_iters=0,
  )
  return out["results"][TASK], sorted(out["samples"][TASK], key=lambda s: s["doc_id"])


def ours(model_dir, data, skill=None, decode=False):
  """Our scoring of the file's rows with configs/eval.py:lm_eval_mcqa: the base, or with
  `skill` = (stacked adapters, weights, scale) merged into its kernels; `decode`: with the
  model's Decoder, as the evaluation runs it (multi-token candidates after one prompt pass)."""
  c = eval_config.get_config("lm_eval_mcqa")
  c.model.source = str(model_dir)
  rows = suite.read_task_file(data, LoadReport())
  tok = tokenizer.load_tokenizer(str(model_dir))
  base = loading.load_model(str(model_dir), numerics=numerics_from(c), progress=False)
  graphdef, frozen = nnx.split(base)
  if skill is not None:
    frozen = serving.merged_params(frozen, *skill)
  scorer = evaluate.TaskScorer(rows, rows, tok, c, put=lambda batch: batch)
  dec = evaluate.Decoder(tok, c, nnx.merge(graphdef, frozen)) if decode else None
  scores = scorer(functools.partial(evaluate.merged_stats, frozen, graphdef=graphdef), dec)
  return c, rows, tok, scorer, scores


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
def test_mcqa_choices_and_accuracy_match_lm_eval_hf(files, bos):
  models, data, task_dir = files
  results, samples = lm_eval_hf(models[bos], task_dir)
  c, rows, tok, scorer, scores = ours(models[bos], data)
  assert len(samples) == len(rows) == 32
  assert (tok("a")["input_ids"][0] == tok.bos_token_id) == bos
  template = Template.from_config(c.data.template)
  for i, (row, s) in enumerate(zip(rows, samples, strict=True)):
    # the same prompt and candidates (lm-eval's " A".." D") ...
    prompt = "".join(template.prompt_parts(row, tok))
    assert [a[0] for a in s["arguments"]] == [prompt] * 4, i
    assert [a[1] for a in s["arguments"]] == [template.answer_prefix + x for x in "ABCD"], i
    # ... the same log-likelihoods, so the same choice (acc) and per-character choice (acc_norm)
    theirs = np.asarray([r[0] for r in s["filtered_resps"]])
    mine = np.asarray(scorer.last["choice"][i])
    np.testing.assert_allclose(mine, theirs, atol=2e-4, err_msg=f"row {i}")
    assert np.argmax(mine) == np.argmax(theirs), i
    assert s["acc"] == float(row.answer == "ABCD"[np.argmax(mine)]), i
  assert set(scorer.fast) == set(range(len(rows)))  # one-token candidates: the fast path ran
  oc = metrics.outcomes(scorer.plan, scorer.last["choice"], scorer.last["texts"])
  norm = [float(g == p) for g, p in zip(oc.gold, oc.pred_norm, strict=True)]
  assert [s["acc_norm"] for s in samples] == norm
  assert scores["accuracy"] == pytest.approx(results["acc,none"])
  everything = np.arange(oc.n)
  assert metrics.metric_on("acc_norm", oc, everything) == pytest.approx(results["acc_norm,none"])
  assert 0 < results["acc,none"] < 1  # neither all right nor all wrong: choices are tested


LABELS = ("inhibitor", "no relation", "upregulator of the target", "substrate", "agonist")


def write_label_rows(path) -> pathlib.Path:
  """Relation-style rows in our Example layout: a context, a query and one of LABELS, most of
  them several tokens."""
  rng = np.random.default_rng(1)
  rows = [
    {
      "skill": "re",
      "context": " ".join(rng.choice(WORDS, 5 + i % 9)),
      "query": f"How does {rng.choice(WORDS)} relate to {rng.choice(WORDS)}?",
      "answer": LABELS[i % len(LABELS)],
    }
    for i in range(24)
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_multi_token_label_candidates_scored_after_one_prompt_match_lm_eval_hf(files, tmp_path):
  """Labels of several tokens: lm-eval runs prompt + label once per label; our Decoder runs the
  prompt once, every label after it in the same sequence. The same log-likelihoods and choices."""
  models, _, _ = files
  data = write_label_rows(tmp_path / "labels.jsonl")
  BENCH.write_task(data, tmp_path / "tasks", sorted(LABELS))  # benchmarks/eval.py --labels
  results, samples = lm_eval_hf(models[False], tmp_path / "tasks")
  _, rows, tok, scorer, scores = ours(models[False], data, decode=True)
  assert len(scorer.groups) == len(rows) == len(samples) == 24 and not scorer.fast
  assert max(len(x) for g in scorer.groups for x in g.tokens) > 1  # several tokens: the cache ran
  prompts = {g.row: tok.decode(g.prompt) for g in scorer.groups}
  for i, s in enumerate(samples):
    assert {a[0] for a in s["arguments"]} == {prompts[i]}, i
    assert [a[1] for a in s["arguments"]] == [" " + x for x in scorer.plan.choices[i]], i
    theirs = np.asarray([r[0] for r in s["filtered_resps"]])
    mine = np.asarray(scorer.last["choice"][i])
    np.testing.assert_allclose(mine, theirs, atol=2e-4, err_msg=f"row {i}")
    assert np.argmax(mine) == np.argmax(theirs), i
  assert scores["accuracy"] == pytest.approx(results["acc,none"])
  assert 0 < results["acc,none"] < 1


def test_the_preset_prompts_with_its_own_template_not_stage_ones():
  stage1 = {"template": {"chat": True, "layout": "sections", "instruction": True}, "max_len": 96}
  kept = evaluate_suite.with_prompting(eval_config.get_config("lm_eval_mcqa"), stage1)
  assert kept.data.template.layout == "lm_eval" and not kept.data.template.chat
  assert kept.data.max_len != 96
  default = evaluate_suite.with_prompting(eval_config.get_config(), stage1)
  assert default.data.template.chat and default.data.max_len == 96  # rows as the skills saw


def test_a_peft_export_under_lm_eval_agrees_with_our_evaluation_of_the_skill(files, tmp_path):
  """Issue 20: `lm_eval --model hf --model_args pretrained=BASE,peft=EXPORT` on the same rows
  makes the same choices as our scoring of the skill merged into the base."""
  from mdkif_jax import export

  models, data, task_dir = files
  base_dir = models[False]
  cfg = loading.load_model(str(base_dir), progress=False).cfg
  stacked = write_stage1(tmp_path / "skills", cfg)  # qa, ner, sum with pruned ranks
  out = tmp_path / "peft"
  argv = ["--base", str(base_dir), "--from", str(tmp_path / "skills"), "--format", "peft"]
  argv += ["--out", str(out), "--skills", "qa"]
  export.export(export.parse_args(argv), "python -m mdkif_jax.export " + " ".join(argv))
  results, samples = lm_eval_hf(base_dir, task_dir, peft=out / "qa")
  w = np.array([1.0, 0.0, 0.0], np.float32)  # the qa skill alone
  _, rows, _, scorer, scores = ours(
    base_dir, data, (stacked, w, adapters.adapter_scale(ALPHA, INIT_R))
  )
  _, _, _, base_scorer, _ = ours(base_dir, data)
  moved = 0
  for i, s in enumerate(samples):
    theirs = np.asarray([r[0] for r in s["filtered_resps"]])
    mine = np.asarray(scorer.last["choice"][i])
    np.testing.assert_allclose(mine, theirs, atol=2e-4, err_msg=f"row {i}")
    assert np.argmax(mine) == np.argmax(theirs), i
    moved += np.argmax(mine) != np.argmax(base_scorer.last["choice"][i])
  assert scores["accuracy"] == pytest.approx(results["acc,none"])
  assert moved > 0  # the skill changes choices: the adapter was really applied on both sides


def test_the_benchmark_keeps_only_the_rows_an_evaluation_cell_scored(tmp_path):
  """benchmarks/eval.py --rows-of CELL: the cross-check scores exactly the suite's scored rows
  (by realidx), whitespace collapsed as our reader does."""
  opts = {"A": "a  x", "B": "b", "C": "c", "D": "d"}
  src = tmp_path / "test.jsonl"
  recs = [
    {"question": f"q {i}\n?", "realidx": f"id{i}", "options": opts, "answer_idx": "B"}
    for i in range(6)
  ]
  src.write_text("".join(json.dumps(r) + "\n" for r in recs))
  cell = tmp_path / "base.json"
  cell.write_text(json.dumps({"predictions": [{"id": "id4"}, {"id": "id1"}, {"id": "elsewhere"}]}))
  out = tmp_path / "rows.jsonl"
  assert BENCH.write_rows(src, 300, out, BENCH.scored_ids(cell)) == 2
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["question"] for r in rows] == ["q 1 ?", "q 4 ?"] and rows[0]["options"]["A"] == "a x"
  assert BENCH.write_rows(src, 3, out) == 3  # without a cell: the first rows
