"""Scoring of a downstream task for any adapter configuration: the base, a mixture merged into
the kernels, or skills applied unmerged per row (the gate); and stage 1's before/after losses
on reserved rows. Nothing scores tasks anywhere else.

Per method: answer NLL, token accuracy, teacher-forced exact match and the task's standard
metric (metrics.py: accuracy + macro-F1 over candidate log-likelihoods for label tasks, ROUGE
or set F1 of greedy generations), and per scored row the chosen candidate or generated text.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from mdkif_jax import metrics, reporting, router
from mdkif_jax.data import batches, task
from mdkif_jax.data.template import Template
from mdkif_jax.data.tokenize import answer_ids
from mdkif_jax.model import candidates, generate
from mdkif_jax.peft import serving
from mdkif_jax.peft.adapters import AdapterCtx

STAT_KEYS = ("nll", "tokens", "correct", "exact")


def summarize(stats: list[dict]) -> dict[str, float]:
  tot = {k: float(sum(np.sum(np.asarray(s[k])) for s in stats)) for k in STAT_KEYS}
  rows = float(sum(np.sum(np.asarray(s["tokens"]) > 0) for s in stats))
  return {
    "loss": tot["nll"] / max(tot["tokens"], 1.0),
    "token_acc": tot["correct"] / max(tot["tokens"], 1.0),
    "exact": tot["exact"] / max(rows, 1.0),
  }


@functools.partial(jax.jit, static_argnames=("graphdef",))
def merged_stats(params, batch, *, graphdef):
  """Answer stats of the model with these params (the base, or a mixture merged into its
  kernels), plus candidate log-probabilities when the batch has `choice_ids`."""
  return router.mixture_stats(graphdef, params, None, 1.0, batch)


def gate_stats_fn(gate, graphdef, frozen, skills, scale):
  """stats_fn for TaskScorer of the input-conditioned gate, unmerged: answer stats and the
  gate's per-row weights ("weights" [B, S])."""

  def stats(batch):
    st, w_BS = router.gate_stats(gate, graphdef, frozen, skills, scale, batch)
    return {**st, "weights": w_BS}

  return stats


class TaskScorer:
  """Scores one method on the task's scored rows: answer NLL, token accuracy, teacher-forced
  exact match and the task's standard metric (metrics.py).

  Rows are batched by length (less padding). Label rows: when every candidate is one token,
  their log-likelihoods come from the gold pass itself (`choice_ids`); otherwise the method's
  `Decoder` runs each row's prompt once with its candidates after it, in one sequence
  (model/candidates.py; rows of `router.batch_size` prompts), and with merged kernels the gold
  answer rides along there too (`__call__`). Without a decoder, each
  (row, candidate) is one more row through stats_fn, the same jitted forward as the gold pass
  (lm-eval's way: K candidates cost K prompt passes). Either way a candidate's tokens and prompt
  are exactly those of the row with that candidate as its answer (`task.encode_rows`, the EOS
  left out), and a candidate too long for max_len scores -inf. Generated rows: greedy
  decoding of up to `gen.max_new_tokens` tokens (generate.py), `gen.batch_size` prompts a
  call, sorted by length and padded to full batches so each prompt bucket compiles once.
  progress: a bar over the scoring batches and one over the generation calls of each call.
  """

  def __init__(
    self, rows, task_rows, tok, config, put, multiple=1, one_token_fast=True, progress=False
  ):
    self.progress = progress
    self.plan = metrics.plan(rows, task_rows, config.metric)
    self.tok, self.config = tok, config
    bs, dcfg = int(config.router.batch_size), config.data
    enc = task.encode_rows(rows, tok, dcfg)
    eos = tok.eos_token or ""
    fast, slow = {}, []
    # each candidate's tokens as they follow the row's prompt (the template's answer prefix and
    # tokenisation: lm-eval's for layout "lm_eval"), without the final EOS
    cand_rows = [
      dataclasses.replace(rows[i], answer=c) for i, cs in self.plan.choices.items() for c in cs
    ]
    cand_ids = iter(answer_ids(cand_rows, tok, Template.from_config(dcfg.template)))
    for i, cands in self.plan.choices.items():
      ids = [next(cand_ids) for _ in cands]
      ids = [x[:-1] if eos and x and x[-1] == tok.eos_token_id else x for x in ids]
      if one_token_fast and all(len(x) == 1 for x in ids) and len({x[0] for x in ids}) == len(ids):
        fast[i] = [x[0] for x in ids]
      else:
        slow += [(i, j) for j in range(len(cands))]
    width = max((len(v) for v in fast.values()), default=0)
    self.fast, self.gold = fast, []
    for idx, batch in task.pack(enc, tok, dcfg, bs, multiple, by_length=True):
      if width:
        batch["choice_ids"] = np.zeros((len(idx), width), np.int32)
        for r, i in enumerate(idx):
          batch["choice_ids"][r, : len(fast.get(i, ()))] = fast.get(i, ())
      self.gold.append((idx, put(batch)))
    self.slow, self._expanded, self._unfolded, self._cenc, self.groups = slow, None, None, [], []
    # the expanded path (no decoder) packs its rows only when first asked: see `expanded`
    self._pack = functools.partial(
      task.pack,
      tok=tok,
      data_cfg=dcfg,
      batch_size=bs,
      multiple=multiple,
      by_length=True,
      drop_eos=bool(eos),
    )
    self.put = put
    self.folded: frozenset[int] = frozenset()
    self._unfolded_enc = []  # the answer pass's rows when the candidate pass gives the rest
    if slow:
      cand = [dataclasses.replace(rows[i], answer=self.plan.choices[i][j]) for i, j in slow]
      self._cenc = task.encode_rows(cand, tok, dcfg)
      # a row's gold answer is one of its candidates, encoded exactly as the answer pass
      # encodes the row: its stats can come from the candidate pass (see __call__)
      gold_slots = {
        k: i
        for k, (i, _) in enumerate(slow)
        if self._cenc[k] is not None
        and enc[i] is not None
        and np.array_equal(self._cenc[k].tokens, enc[i].tokens)
      }
      self.folded = frozenset(gold_slots.values())
      self.groups = _prompt_groups(slow, self._cenc, drop_eos=bool(eos), gold_slots=gold_slots)
      self._unfolded_enc = [None if i in self.folded else e for i, e in enumerate(enc)]
    gen = sorted(
      (i for i in self.plan.generated if enc[i] is not None), key=lambda i: enc[i].answer_start
    )
    self.prompts = {i: enc[i].tokens[: enc[i].answer_start].tolist() for i in gen}
    # the rows that fit max_len (the others count as wrong / empty: metrics.Plan.finish)
    self.encoded = frozenset(i for i, e in enumerate(enc) if e is not None)

  def _bar(self, total: int, desc: str):
    return reporting.progress_bar(self.progress, total=total, desc=desc, unit="call", leave=False)

  @property
  def unfolded(self) -> list:
    """The answer pass's batches without the rows whose stats the candidate pass gives."""
    if self._unfolded is None:
      rest = self._unfolded_enc
      packed = self._pack(rest, drop_eos=False) if any(e is not None for e in rest) else []
      self._unfolded = [(idx, self.put(b)) for idx, b in packed]
    return self._unfolded

  @property
  def expanded(self) -> list:
    """(indices into `slow`, device batch) of every (row, candidate) as a row of its own."""
    if self._expanded is None:
      packed = self._pack(self._cenc) if self.slow else []
      self._expanded = [(idx, self.put(b)) for idx, b in packed]
    return self._expanded

  def __call__(self, stats_fn, decoder: Decoder | None = None) -> dict[str, float]:
    """stats_fn(batch) -> per-row stats (router.mixture_stats; "weights" [B, S] for the gate);
    decoder: the same model as stats_fn's, for generation and the one-pass candidate scoring
    (None: no generated rows, and multi-token candidates scored as rows of their own).

    With a decoder of merged kernels, a multi-token label row's answer stats come from its
    candidate pass (the gold answer, EOS included, is one more candidate of its prompt): the
    answer pass skips that row, which was half the scoring of a label task with a few short
    labels. The gate's pass stays: it gives the per-row weights the candidates are scored with."""
    gold, choice, weights = [], {}, {}
    bs = int(self.config.router.batch_size)
    one_pass = decoder is not None
    fold = one_pass and decoder.stacked is None and bool(self.folded)
    answer_pass = self.unfolded if fold else self.gold
    n = -(-len(self.groups) // bs) if one_pass else len(self.expanded)
    with self._bar(len(answer_pass) + n, "score") as scoring:
      for idx, batch in answer_pass:
        st = jax.device_get(stats_fn(batch))  # the device read also paces the bar
        scoring.update()
        gold.append(st)
        for r, i in enumerate(idx):
          if i < 0:
            continue
          if i in self.fast:
            choice[i] = st["choice_logp"][r, : len(self.fast[i])]
          if "weights" in st:
            weights[i] = st["weights"][r]

      def put_choice(k, logp):
        i, j = self.slow[k]
        choice.setdefault(i, np.full(len(self.plan.choices[i]), -np.inf))[j] = logp

      if one_pass:
        most = max((len(g.tokens) for g in self.groups), default=0)
        C = max((len(c) for g in self.groups for c in g.tokens), default=0)
        folded = {k: [] for k in STAT_KEYS}
        for s in range(0, len(self.groups), bs):
          part = self.groups[s : s + bs]
          full = part + [part[-1]] * (bs - len(part))  # one shape per prompt bucket
          w = np.stack([weights[g.row] for g in full]) if weights else None
          K = min(_pow2(max(len(g.tokens) for g in part)), most)
          logp, hits = decoder.candidates(
            [g.prompt for g in full], [g.tokens for g in full], w, K, C, hits=True
          )
          scoring.update()
          for g, lp, hit in zip(part, logp, hits, strict=False):
            for k, v in zip(g.slots, lp, strict=False):
              put_choice(k, float(v))
            if fold and g.gold is not None:
              n_tok = len(g.tokens[g.gold])
              folded["nll"].append(-float(lp[g.gold]))
              folded["tokens"].append(n_tok)
              folded["correct"].append(int(hit[g.gold]))
              folded["exact"].append(float(int(hit[g.gold]) == n_tok))
        if fold:
          gold.append({k: np.asarray(v, np.float64) for k, v in folded.items()})
      else:
        for idx, batch in self.expanded:
          st = jax.device_get(stats_fn(batch))
          scoring.update()
          for r, k in enumerate(idx):
            if k >= 0:
              put_choice(k, -st["nll"][r])
    out = summarize(gold)
    texts = {}
    if self.prompts and decoder is not None:
      order, size = list(self.prompts), int(self.config.gen.batch_size)
      with self._bar(-(-len(order) // size), "generate") as generating:
        for s in range(0, len(order), size):
          part = order[s : s + size]
          full = part + [part[-1]] * (size - len(part))  # one shape per prompt bucket
          w = np.stack([weights[i] for i in full]) if weights else None
          new = decoder.generate([self.prompts[i] for i in full], w)
          generating.update()
          for i, ids in zip(part, new, strict=False):
            texts[i] = self.tok.decode(ids, skip_special_tokens=True).strip()
    out.update(self.plan.finish(choice, texts))
    # per scored row: candidate log-likelihoods, generated text, the gate's mixture
    self.last = {"choice": choice, "texts": texts, "weights": weights}
    return out


@dataclasses.dataclass(frozen=True)
class PromptGroup:
  """A scored row's candidates that share one encoded prompt (all of them, unless truncation
  to max_len cut the context differently for candidates of different lengths)."""

  row: int  # index into the scored rows
  prompt: list[int]
  tokens: list[list[int]]  # each candidate's scored tokens (the answer without its EOS)
  slots: list[int]  # each candidate's index into TaskScorer.slow
  # the entry of `tokens` that is the row's gold answer as the answer pass scores it (EOS
  # included: an entry after the candidates), or None when this prompt is not the gold's
  gold: int | None = None


def _pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _prompt_groups(slow, cenc, drop_eos: bool, gold_slots=()) -> list[PromptGroup]:
  """The (row, candidate) encodings grouped by row and prompt, sorted by their count of
  candidates (rounded up to a power of two) and then by prompt length; a candidate that does
  not fit max_len (None) is in no group and keeps -inf. The count comes first because a batch's
  sequences hold as many candidate segments as its largest group has candidates: where
  truncation splits rows (in-context examples fill max_len, so each label length cuts the
  context differently), ChemProt's groups hold 1, 2 or 5 of its 13 labels, and mixed batches
  would pad each to 13.
  gold_slots: the slots that are their row's gold answer; its group gets the gold entry."""
  by_key: dict[tuple, PromptGroup] = {}
  golds = {}
  for k, ((i, _), e) in enumerate(zip(slow, cenc, strict=True)):
    if e is None:
      continue
    prompt = e.tokens[: e.answer_start].tolist()
    answer = e.tokens[e.answer_start :].tolist()
    key = (i, tuple(prompt))
    g = by_key.setdefault(key, PromptGroup(i, prompt, [], []))
    g.tokens.append(answer[:-1] if drop_eos else answer)
    g.slots.append(k)
    if k in gold_slots:
      golds[key] = (answer, len(g.slots) - 1)
  groups = []
  for key, g in by_key.items():
    if key in golds:
      answer, at = golds[key]
      if drop_eos:  # the whole answer after the candidates
        g = dataclasses.replace(g, tokens=g.tokens + [answer], gold=len(g.tokens))
      else:  # the candidate is already the whole answer
        g = dataclasses.replace(g, gold=at)
    groups.append(g)
  return sorted(groups, key=lambda g: (_pow2(len(g.tokens)), len(g.prompt)))


@dataclasses.dataclass(frozen=True)
class Decoder:
  """One method's model for TaskScorer's own passes: greedy generation and candidate
  log-likelihoods, through `model` (merged kernels) or with the unmerged skills `stacked` mixed
  per row by the weights the scorer passes (the gate's)."""

  tok: object
  config: object
  model: object
  stacked: object = None
  scale: float = 1.0

  def _adapters(self, weights_BS) -> dict:
    if weights_BS is None:
      return {}
    return dict(adapters=self.stacked, adapter_ctx=AdapterCtx(self.scale, weights=weights_BS))

  @property
  def _eos(self) -> tuple[int, ...]:
    tok = self.tok
    return tuple(
      sorted({*self.model.cfg.eos_token_ids, *([tok.eos_token_id] if tok.eos_token else [])})
    )

  @property
  def _pad(self) -> int:
    return self.tok.pad_token_id if self.tok.pad_token_id is not None else self._eos[0]

  def generate(self, prompts, weights_BS=None) -> list[list[int]]:
    return generate.generate(
      self.model,
      prompts,
      max_new_tokens=int(self.config.gen.max_new_tokens),
      eos_ids=self._eos,
      pad_id=self._pad,
      **self._adapters(weights_BS),
    )

  def candidates(self, prompts, cands, weights_BS=None, num=None, length=None, hits=False):
    """[B, K] Σ log p(candidate | prompt), each prompt run once (model/candidates.py); hits:
    also [B, K] each candidate's tokens that are the argmax at their position."""
    return candidates.candidate_logprobs(
      self.model,
      prompts,
      cands,
      pad_id=self._pad,
      num_candidates=num,
      candidate_len=length,
      hits=hits,
      **self._adapters(weights_BS),
    )


def make_scorer(graphdef, frozen, stacked, scale, scorer: TaskScorer, tok, config):
  """score(w_S or None) through the merged kernels (the serving path): W0 + Σ w_s ΔW_s."""

  def score(w_S=None) -> dict[str, float]:
    params = frozen if w_S is None else serving.merged_params(frozen, stacked, w_S, scale)
    model = nnx.merge(graphdef, params)
    return scorer(
      functools.partial(merged_stats, params, graphdef=graphdef), Decoder(tok, config, model)
    )

  return score


def prediction_records(method: str, scorer: TaskScorer, rows) -> list[dict]:
  """Per scored row of the last scoring: the chosen candidate (highest log-likelihood, ties to
  the first, as the metric counts it) or the generated text, beside the reference answer."""
  last = scorer.last
  picked = [
    (i, "choice", scorer.plan.choices[i][int(np.argmax(logp))])
    for i, logp in sorted(last["choice"].items())
  ]
  picked += [(i, "generated", text) for i, text in sorted(last["texts"].items())]
  return [
    {
      "method": method,
      "id": rows[i].id,
      "source": rows[i].source,
      "kind": kind,
      "prediction": prediction,
      "answer": rows[i].answer,
    }
    for i, kind, prediction in picked
  ]


def reserved_losses(eval_step, adapters, frozen, batch, mesh, skills) -> dict[str, float]:
  """Stage 1's evaluation: each skill's mean answer-token loss on its reserved rows (one
  fixed batch, so before and after differ by the skill's learning, not by the rows)."""
  loss_S, tok_S = eval_step(adapters, frozen, batches.to_global(batch, mesh))
  return {f"eval_loss/{s}": float(loss_S[i]) for i, s in enumerate(skills) if tok_S[i] > 0}
