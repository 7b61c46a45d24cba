"""A downstream task's standard metric, beside the answer NLL (pure: numpy and rouge-score).

Which metric a scored row gets is decided by `TASK_METRICS`, keyed by source (and, where a
source holds several skills, by skill):

- "choice" (label tasks: PubMedQA yes/no/maybe, RQE yes/no, MCQA letters, ChemProt labels):
  each candidate answer is scored by its log-likelihood given the prompt, lm-eval-harness
  style (the answer's tokens without the end-of-turn token), the highest wins (a tie goes to
  the first candidate in `candidates` order); reported as `accuracy` and `macro_f1` (over the
  labels that occur as gold or prediction, as sklearn's default). Candidates: the option
  letters listed in an MCQA query, else the source's fixed label set (`CHOICES`), else the
  distinct answers among the task's rows of that skill. ChemProt's rows here carry its 13
  relation types and no negative ("false") class, so its accuracy is also its micro-F1 over
  positive labels (the literature's 5-group CPR evaluation is not reproduced).
- "rouge" (summarisation, dialogue, free QA): greedy generation, then the mean ROUGE-1, ROUGE-2
  and ROUGE-L F-measure of Google's `rouge-score` (Porter stemming on), as `rouge1/2/L`.
- "sets" (HoC labels, NER mentions): greedy generation parsed as a one-per-line list
  (`data.skills.parse_list`, compared case-folded): `example_f1` (mean per-row F1: HoC's
  example-based F1) and `micro_f1` (pooled over rows: strict mention-level micro-F1 for NER,
  since each NER task asks for one entity type).
- "exact": nothing beyond the teacher-forced exact match every method already reports; the
  fall-back for sources not in the table (the knowledge-graph sources: ES/EA/ER).

Mixed corpora (`demo`, `instruct`, `hub`) take each skill's answer format (`FORMAT_METRICS`).
The model-facing half (one forward for choices, generation) lives in evaluate.py; this module
turns its per-row numbers into metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from mdkif_jax.data import unseen
from mdkif_jax.data.example import Example
from mdkif_jax.data.skills import get_skill, parse_list
from mdkif_jax.data.sources.text import CHEMPROT_LABELS
from mdkif_jax.errors import ConfigError

CHOICE, ROUGE, SETS, EXACT = "choice", "rouge", "sets", "exact"
KINDS = (CHOICE, ROUGE, SETS, EXACT)
BY_SKILL = "by_skill"
FORMAT_METRICS = {"option": CHOICE, "label": CHOICE, "list": SETS, "text": ROUGE}
TASK_METRICS: dict[str, str | dict[str, str]] = {
  "pubmedqa": {"mrc": CHOICE, "qa": ROUGE},  # yes/no/maybe; the long answer
  "medagents_pubmedqa": CHOICE,
  "medmcqa": CHOICE,
  "mmlu_fewshot": CHOICE,
  "rqe": CHOICE,
  "chemprot": CHOICE,
  "hoc": SETS,
  "bc5cdr_chem": SETS,
  "bc5cdr_disease": SETS,
  "ncbi_disease": SETS,
  "meqsum": ROUGE,
  "covid_dialogue": ROUGE,
  "genmedgpt": ROUGE,
  "medquad": {"qa": ROUGE, "es": SETS},
  "demo": BY_SKILL,
  "instruct": BY_SKILL,
  "hub": BY_SKILL,
  "custom": BY_SKILL,  # a user's task file (data/suite.py)
  # the unseen-task datasets (data/unseen.py)
  "healthfc": CHOICE,
  "negex": CHOICE,
  "mts_dialog": CHOICE,
  "ddi": CHOICE,
  "mediqa_mas": ROUGE,
}
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
  ("pubmedqa", "mrc"): ("yes", "no", "maybe"),
  ("rqe", "nli"): ("yes", "no"),
  ("chemprot", "re"): CHEMPROT_LABELS,
  ("healthfc", "nli"): tuple(unseen.HEALTHFC_LABELS.values()),
  ("negex", "nli"): unseen.NEGEX_LABELS,
  ("mts_dialog", "re"): unseen.MTS_HEADERS,
  ("ddi", "re"): unseen.DDI_LABELS,
}
MAX_CHOICES = 32  # more distinct answers than this is not a label task: use "rouge"
GENERATED = (ROUGE, SETS)


def check_metric(name: str) -> str:
  if name != "auto" and name not in KINDS:
    raise ConfigError(f"--config.metric must be 'auto' or one of {KINDS}, got {name!r}")
  return name


def kind_of(ex: Example, override: str = "auto") -> str:
  """The metric kind of one row: `override` unless "auto", else the table."""
  if check_metric(override) != "auto":
    return override
  kind = TASK_METRICS.get(ex.source, EXACT)
  if kind == BY_SKILL:
    return FORMAT_METRICS[get_skill(ex.skill).answer_format]
  if isinstance(kind, dict):
    return kind.get(ex.skill, EXACT)
  return kind


def candidates(ex: Example, pool: dict[tuple[str, str], tuple[str, ...]]) -> tuple[str, ...]:
  """The answers a label row chooses from (see the module docstring)."""
  if get_skill(ex.skill).answer_format == "option":
    letters = tuple(re.findall(r"(?m)^([A-J])\. ", ex.query))
    if letters:
      return letters
  key = (ex.source, ex.skill)
  return CHOICES.get(key) or pool[key]


def answer_pool(rows: Sequence[Example]) -> dict[tuple[str, str], tuple[str, ...]]:
  """Distinct answers per (source, skill), sorted: the candidates of label rows without a
  fixed label set. Pass every row of the task (fit and scored) so rare labels are present."""
  pool: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
  for ex in rows:
    pool[(ex.source, ex.skill)].add(ex.answer)
  return {k: tuple(sorted(v)) for k, v in pool.items()}


# ---- the metrics ---------------------------------------------------------------------------
def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
  return float(np.mean([g == p for g, p in zip(gold, pred, strict=True)])) if gold else 0.0


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
  """Mean over labels (those in gold or pred) of 2TP / (2TP + FP + FN)."""
  labels = sorted(set(gold) | set(pred))
  if not labels:
    return 0.0
  f1 = []
  for lab in labels:
    tp = sum(g == lab and p == lab for g, p in zip(gold, pred, strict=True))
    fp = sum(g != lab and p == lab for g, p in zip(gold, pred, strict=True))
    fn = sum(g == lab and p != lab for g, p in zip(gold, pred, strict=True))
    f1.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(f1))


def pick(scores: Sequence[Sequence[float]]) -> list[int]:
  """Index of each row's best candidate; ties go to the first (np.argmax)."""
  return [int(np.argmax(np.asarray(s, np.float64))) for s in scores]


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measure (rouge-score, Porter stemming), in [0, 1]."""
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  per = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
  return {
    k: float(np.mean([s[k].fmeasure for s in per])) if per else 0.0
    for k in ("rouge1", "rouge2", "rougeL")
  }


def _items(text: str) -> set[str]:
  return {x.casefold() for x in parse_list(text)}


def set_f1(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """Example-based F1 (mean per row; two empty sets agree: 1.0) and micro-F1 (pooled)."""
  tp = fp = fn = 0
  per = []
  for p, r in zip(preds, refs, strict=True):
    ps, rs = _items(p), _items(r)
    hit = len(ps & rs)
    tp, fp, fn = tp + hit, fp + len(ps) - hit, fn + len(rs) - hit
    per.append(1.0 if not ps and not rs else 2 * hit / (len(ps) + len(rs)))
  micro = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
  return {"example_f1": float(np.mean(per)) if per else 0.0, "micro_f1": float(micro)}


# ---- a task's plan: which rows get which metric ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
  """The scored rows split by metric kind. Indices point into the scored rows."""

  rows: tuple[Example, ...]
  kinds: tuple[str, ...]
  choices: dict[int, tuple[str, ...]]  # row -> candidates, for "choice" rows

  def of(self, kind: str) -> list[int]:
    return [i for i, k in enumerate(self.kinds) if k == kind]

  @property
  def generated(self) -> list[int]:
    return [i for i, k in enumerate(self.kinds) if k in GENERATED]

  def finish(self, choice_scores: dict[int, Sequence[float]], texts: dict[int, str]) -> dict:
    """Metrics from each choice row's candidate log-likelihoods and each generated row's text.

    Rows missing from both (too long to encode) count as wrong / empty."""
    out: dict[str, float] = {}
    rows = self.of(CHOICE)
    if rows:
      gold = [self.rows[i].answer for i in rows]
      scored = [i for i in rows if i in choice_scores]
      best = dict(zip(scored, pick([choice_scores[i] for i in scored]), strict=True))
      pred = [self.choices[i][best[i]] if i in best else "" for i in rows]
      out.update(accuracy=accuracy(gold, pred), macro_f1=macro_f1(gold, pred))
    for kind, fn in ((ROUGE, rouge), (SETS, set_f1)):
      rows = self.of(kind)
      if rows:
        out.update(fn([texts.get(i, "") for i in rows], [self.rows[i].answer for i in rows]))
    return out


def plan(scored: Sequence[Example], task_rows: Sequence[Example], override: str = "auto") -> Plan:
  """Decide each scored row's metric kind and a label row's candidates."""
  kinds = tuple(kind_of(ex, override) for ex in scored)
  pool = answer_pool(task_rows)
  choices = {}
  for i, (ex, kind) in enumerate(zip(scored, kinds, strict=True)):
    if kind == CHOICE:
      choices[i] = candidates(ex, pool)
      if len(choices[i]) > MAX_CHOICES:
        raise ValueError(
          f"metric 'choice' for {ex.source}:{ex.skill}: {len(choices[i])} distinct answers "
          f"(more than {MAX_CHOICES}) is not a label task; use metric='rouge' or 'exact'"
        )
  return Plan(tuple(scored), kinds, choices)


# ---- per-row outcomes, for bootstrap intervals ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class Outcomes:
  """What each scored row of one (task, method) contributes to a metric, so a resample of
  rows recomputes any metric, corpus-level ones (macro-F1, micro-F1) included.

  Label rows: gold, pred (the candidate with the highest log-likelihood) and pred_norm (the
  highest log-likelihood per character, lm-eval's acc_norm). Generated rows: ROUGE-1/2/L F
  per row and the item counts (tp, fp, fn) of list answers. A row's unused fields are empty
  or NaN.
  """

  gold: tuple[str, ...]
  pred: tuple[str, ...]
  pred_norm: tuple[str, ...]
  rouge: np.ndarray  # [n, 3] rouge1, rouge2, rougeL F; NaN where not generated
  counts: np.ndarray  # [n, 3] tp, fp, fn of list items; 0 where not a list row

  @property
  def n(self) -> int:
    return len(self.gold)

  def to_json(self) -> dict:
    """An evaluation cell's `outcomes` (NaN ROUGE as -1: JSON has no NaN)."""
    return {
      "gold": list(self.gold),
      "pred": list(self.pred),
      "pred_norm": list(self.pred_norm),
      "rouge": np.nan_to_num(self.rouge, nan=-1.0).tolist(),
      "counts": self.counts.tolist(),
    }

  @classmethod
  def from_json(cls, o: dict) -> Outcomes:
    rouge = np.asarray(o["rouge"], np.float64).reshape(-1, 3)
    rouge[rouge < 0] = np.nan
    counts = np.asarray(o["counts"], np.float64).reshape(-1, 3)
    return cls(tuple(o["gold"]), tuple(o["pred"]), tuple(o["pred_norm"]), rouge, counts)


def outcomes(plan: Plan, choice_scores: dict, texts: dict) -> Outcomes:
  """Per-row outcomes of one scoring (evaluate.TaskScorer.last). A row missing from both
  (too long to encode) counts as wrong / empty, as in Plan.finish."""
  from rouge_score import rouge_scorer

  n = len(plan.rows)
  gold, pred, pred_norm = [""] * n, [""] * n, [""] * n
  rouge_rows = np.full((n, 3), np.nan)
  counts = np.zeros((n, 3))
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  for i, (ex, kind) in enumerate(zip(plan.rows, plan.kinds, strict=True)):
    if kind == CHOICE:
      gold[i] = ex.answer
      if i in choice_scores:
        cands, logp = plan.choices[i], np.asarray(choice_scores[i], np.float64)
        pred[i] = cands[int(np.argmax(logp))]
        per_char = logp / np.asarray([max(len(c), 1) for c in cands], np.float64)
        pred_norm[i] = cands[int(np.argmax(per_char))]
    elif kind == ROUGE:
      s = scorer.score(ex.answer, texts.get(i, ""))
      rouge_rows[i] = [s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")]
    elif kind == SETS:
      ps, rs = _items(texts.get(i, "")), _items(ex.answer)
      hit = len(ps & rs)
      counts[i] = [hit, len(ps) - hit, len(rs) - hit]
  return Outcomes(tuple(gold), tuple(pred), tuple(pred_norm), rouge_rows, counts)


def lean(outs: Sequence[Outcomes], of: str = "pred") -> dict | None:
  """The most frequent label answer and its share of the label rows, pooled over `outs` (a
  seeded method's cells): of="pred" what a method answers, of="gold" the scored rows' own
  (a description, never used to choose anything). None without label rows."""
  values = [v for o in outs for g, v in zip(o.gold, getattr(o, of), strict=True) if g]
  if not values:
    return None
  answer, count = collections.Counter(values).most_common(1)[0]
  return {"answer": answer, "share": count / len(values)}


def _take(values: Sequence[str], idx: np.ndarray) -> list[str]:
  return [values[i] for i in idx]


def positive_micro_f1(gold: Sequence[str], pred: Sequence[str], negative: str) -> float:
  """Micro-F1 over every label but `negative` (DDI's "false"): a negative row predicted as a
  type is a false positive, a typed row predicted wrong a false negative (and a false
  positive if the prediction is another type)."""
  tp = sum(g == p != negative for g, p in zip(gold, pred, strict=True))
  fp = sum(p != negative and p != g for g, p in zip(gold, pred, strict=True))
  fn = sum(g != negative and p != g for g, p in zip(gold, pred, strict=True))
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def label_f1(gold: Sequence[str], pred: Sequence[str], label: str) -> float:
  """F1 of one class (NegEx's "negated")."""
  tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
  fp = sum(p == label != g for g, p in zip(gold, pred, strict=True))
  fn = sum(g == label != p for g, p in zip(gold, pred, strict=True))
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def metric_on(name: str, out: Outcomes, idx: np.ndarray) -> float:
  """Metric `name` on the rows `idx` (with repeats, for a bootstrap resample). Names:
  accuracy, acc_norm, macro_f1, micro_f1 (ChemProt: every label is positive), f1:<label>,
  micro_f1_without:<negative>, rouge1, rouge2, rougeL, entity_micro_f1."""
  idx = np.asarray(idx)
  if name in ("accuracy", "acc_norm", "macro_f1", "micro_f1") or ":" in name:
    idx = idx[[bool(out.gold[i]) for i in idx]]  # label rows only (a mixed task has others)
    gold = _take(out.gold, idx)
    pred = _take(out.pred_norm if name == "acc_norm" else out.pred, idx)
    if name in ("accuracy", "acc_norm", "micro_f1"):  # one label per row: micro-F1 == accuracy
      return accuracy(gold, pred)
    if name == "macro_f1":
      return macro_f1(gold, pred)
    kind, _, label = name.partition(":")
    if kind == "f1":
      return label_f1(gold, pred, label)
    if kind == "micro_f1_without":
      return positive_micro_f1(gold, pred, label)
  if name in ("rouge1", "rouge2", "rougeL"):
    col = out.rouge[idx, ("rouge1", "rouge2", "rougeL").index(name)]
    col = col[np.isfinite(col)]
    return float(col.mean()) if col.size else 0.0
  if name == "entity_micro_f1":
    tp, fp, fn = out.counts[idx].sum(0)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0
  raise ValueError(f"unknown metric {name!r}")
