"""Export skills, a task router's mixture or the base for torch serving, verified where written.

  python -m mdkif_jax.export --base smollm2_135m --from runs/skill --format peft --out out/peft
  python -m mdkif_jax.export --base smollm2_135m --from runs/skill --router runs/router \
    --format lora --out out/task_lora
  python -m mdkif_jax.export --base model.gguf --format hf --out out/base_hf

--format peft: one PEFT AdaLoRA adapter directory per skill (sliced to its kept ranks);
--format lora: one plain LoRA per skill, or ONE for a task-level router's mixture (exact, scale
1, one rank per export, as vLLM and LoRAX take it); --format hf: a transformers checkpoint of
the base with one skill or the router's mixture merged in (or the base alone). `--router` is a
stage-2 router workdir or an evaluation's cell (EVAL/cells/TASK/gd.json: the weights that
evaluation scored with, over the skills of its skills_from, which --from must be). `--from` takes
what --config.skills_from takes (workdirs, peft:PATH), at their last step (`--step N`: a
checkpoint of a run that has not finished; a router brings the step it was fitted on). The
export is written to OUT.tmp, re-read (by our loader, and by transformers/PEFT when torch is
installed) and compared with our logits on a few rows; README.md records the agreement and this
command; then OUT.tmp -> OUT.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import shlex
import shutil
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdkif_jax import checkpoint, sharding
from mdkif_jax.model import llama, loading, tokenizer
from mdkif_jax.peft import adapters, import_peft, serving
from mdkif_jax.peft import export as pe

ROWS, LENGTH = 3, 16  # the verification rows (token ids, seeded)


class ExportError(ValueError):
  """An export that cannot be made as asked, or that did not verify."""


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m mdkif_jax.export", description=__doc__.split("\n")[0])
  p.add_argument("--base", default="smollm2_135m", help="the base: preset, HF dir or .gguf")
  p.add_argument("--from", dest="skills_from", help="as --config.skills_from (comma-separated)")
  p.add_argument(
    "--router",
    help="a stage-2 router workdir, or an evaluation's cell (EVAL/cells/TASK/METHOD.json of a "
    "task-level method: gd, cmaes*, best_single) with --from its skills_from",
  )
  p.add_argument(
    "--step",
    type=int,
    help="the checkpoint step of --from (default: its last, which must end its training; a "
    "--router brings its own)",
  )
  p.add_argument("--format", required=True, choices=("peft", "lora", "hf"))
  p.add_argument("--out", required=True, type=pathlib.Path)
  p.add_argument("--skills", help="comma-separated skill names (default: all)")
  p.add_argument("--tokenizer", help="tokenizer source for --format hf (default: the base)")
  # f32 summation order alone gives ~6e-4 on SmolLM2's 30 layers; grosser errors fail
  p.add_argument("--tolerance", type=float, default=1e-2, help="largest |Δlogit| accepted")
  p.add_argument("--no-torch", action="store_true", help="verify with our loader only")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  return p.parse_args(argv)


def main(argv=None) -> None:
  from mdkif_jax.main import user_errors

  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  try:
    report = export(args, "python -m mdkif_jax.export " + shlex.join(argv))
  except (*user_errors(), ExportError, FileNotFoundError) as e:
    print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  for name, reader, delta in report["checks"]:
    print(f"{name}: {reader}: max |Δlogit| = {delta:.2e}")
  print(f"wrote {report['out']}")


# ---- what to export --------------------------------------------------------------------------
def _cell_path(args) -> pathlib.Path | None:
  """--router as an evaluation cell (EVAL/cells/TASK/METHOD.json), absolute; None for a
  router workdir. Neither, or a cell not written yet, is refused before anything is opened
  (Orbax would create a missing workdir)."""
  path = pathlib.Path(args.router).resolve()
  if path.is_dir():
    return None
  shaped = path.suffix == ".json" and len(path.parents) > 2 and path.parents[1].name == "cells"
  if not shaped or not path.is_file():
    raise ExportError(
      f"--router {args.router}: no router workdir or finished evaluation cell there "
      "(EVAL/cells/TASK/METHOD.json)"
    )
  return path


def _cell_identity(args, path: pathlib.Path) -> dict:
  """The evaluation's cells_identity.json, once --from is checked to be its skills_from."""
  identity = path.parents[2] / "cells_identity.json"
  if not identity.exists():
    raise ExportError(f"--router {args.router}: {identity} is missing (not an evaluation)")
  ident = json.loads(identity.read_text())
  ours = [str(pathlib.Path(e.strip()).resolve()) for e in (args.skills_from or "").split(",")]
  theirs = [str(pathlib.Path(e.strip()).resolve()) for e in str(ident["skills_from"]).split(",")]
  if ours != theirs:
    raise ExportError(
      f"--router {args.router}: its weights are over the skills of {ident['skills_from']!r} "
      f"(relative to where that evaluation ran); pass --from {ident['skills_from']}"
    )
  return ident


def _router(args) -> tuple[np.ndarray, list[str] | None, str, int | None]:
  """(weights, the skills they weigh, method, skills_step) of --router. A stage-2 router
  workdir names its skills; an evaluation cell's weights are over the whole stack of its
  evaluation's skills_from (which --from must be) at its skills_step (None: the skills are
  the stack --from loads, in its order)."""
  path = _cell_path(args)
  if path is None:
    state, meta = checkpoint.load_router(args.router)
    weights = np.asarray(state["weights"], np.float32)
    return weights, list(meta["skills"]), meta.get("method", ""), meta.get("skills_step")
  ident = _cell_identity(args, path)
  method = path.stem
  weights = json.loads(path.read_text()).get("weights")
  if method.startswith("gate"):
    weights = None  # its stored weights are the mean gate, not what it scored with
  if weights is None:
    raise ExportError(
      f"--router {args.router}: method {method!r} has no task-level weights to merge (gd, "
      "cmaes*, best_single have; the gate is input-conditioned, the base and adalora_task mix "
      "no skills)"
    )
  return np.asarray(weights, np.float32), None, method, ident.get("skills_step")


def _skills(args, base_cfg):
  """(Skills or None, indices of the chosen skills, router weights over the stack or None)."""
  if not args.skills_from:
    return None, [], None
  weights, mixed, _, step = _router(args) if args.router else (None, None, "", args.step)
  if args.router and args.step is not None and args.step != step:
    raise ExportError(
      f"--step {args.step}: --router {args.router} was fitted on the skills at step "
      f"{'the last' if step is None else step}; leave --step out"
    )
  cfg = types.SimpleNamespace(skills_from=args.skills_from, skills_step=step)
  skills = checkpoint.load_skills(cfg, base_cfg, sharding.make_mesh((1, 1, 1)))
  names = list(skills.names)
  chosen = [s.strip() for s in args.skills.split(",")] if args.skills else names
  if unknown := [s for s in chosen if s not in names]:
    raise ExportError(f"--skills names {unknown}; --from has {names}")
  idx = [names.index(s) for s in chosen]
  if not args.router:
    if args.format == "hf" and len(idx) != 1:
      raise ExportError(f"--format hf merges one skill or a --router mixture; got {chosen}")
    return skills, idx, None
  if mixed is None:  # an evaluation cell: a weight per skill of the stack
    if len(weights) != len(names):
      raise ExportError(
        f"--router {args.router}: {len(weights)} weights for the {len(names)} skills of --from"
      )
    mixed = names
  if missing := [s for s in mixed if s not in names]:
    raise ExportError(f"{args.router} mixes {missing}, which --from does not hold ({names})")
  w = np.zeros(len(names), np.float32)
  for s, value in zip(mixed, weights, strict=True):
    w[names.index(s)] = value
  return skills, [names.index(s) for s in mixed], w


def check_request(args) -> None:
  """Refuse what cannot be exported before anything is loaded."""
  if args.out.exists() and not args.overwrite:
    raise ExportError(f"{args.out} exists: pass --overwrite to replace it, or another --out")
  if not args.skills_from and (args.router or args.skills or args.format != "hf"):
    raise ExportError("--from is required unless exporting the base alone (--format hf)")
  if not args.router:
    return
  if args.format == "peft":
    raise ExportError("a router mixture is not one AdaLoRA adapter: use --format lora or hf")
  if _router(args)[2] == "gate":
    raise ExportError(
      f"{args.router}: the gate weighs the skills per row (input-conditioned); a static "
      "adapter or merged model cannot do that. Export a task-level router (router.method=gd "
      "or cmaes), or the skills one by one"
    )


def _one(stacked: dict, s: int) -> dict:
  return jax.tree.map(lambda x: np.asarray(x[s], np.float32), stacked)


def _schedules(skills_from: str) -> dict[str, dict]:
  """Each stage-1 skill's AdaLoRA schedule, as its checkpoint recorded it (PEFT needs one)."""
  out = {}
  for entry in (e.strip() for e in skills_from.split(",")):
    if not entry or entry.startswith(import_peft.PEFT_PREFIX):
      continue
    for run in checkpoint.stage1_runs(entry):
      mngr = checkpoint.manager(run / "checkpoints", keep=1, async_save=False)
      meta = checkpoint.read_meta(mngr, mngr.latest_step())
      known = {
        "total_step": meta.get("train.steps"),
        "tinit": meta.get("adalora.tinit"),
        "tfinal": meta.get("adalora.tfinal"),
        "deltaT": meta.get("adalora.delta_t"),
        "target_r": checkpoint.trained_target_r(meta),
      }
      out.update({s: {k: v for k, v in known.items() if v is not None} for s in meta["skills"]})
  return out


# ---- writers ---------------------------------------------------------------------------------
def _save(directory: pathlib.Path, tensors: dict, config: dict | None, name: str) -> None:
  from safetensors.numpy import save_file

  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / name), metadata={"format": "pt"})
  if config is not None:
    cfg_name = "adapter_config.json" if name.startswith("adapter") else "config.json"
    (directory / cfg_name).write_text(json.dumps(config, indent=2) + "\n")


def write_peft(tmp, skills, idx, base_source, schedules) -> list[tuple[str, pathlib.Path]]:
  """One AdaLoRA adapter directory per skill. PEFT validates the schedule on load: a skill
  whose checkpoint recorded none (an import) gets a valid one, target_r = its mean kept rank."""
  out = []
  for s in idx:
    name, skill = skills.names[s], _one(skills.stacked, s)
    tensors, pattern = pe.adalora_tensors(skill)
    init_r = next(iter(skill.values()))["A"].shape[1]
    mean_rank = float(np.mean([pe.kept(v).sum(-1).mean() for v in skill.values()]))
    schedule = {"target_r": round(mean_rank), "tinit": 0, "tfinal": 0, "deltaT": 1}
    schedule = {**schedule, "total_step": 1, **schedules.get(name, {})}
    targets = [t for t in adapters.TARGETS if t in skill]
    cfg = pe.adalora_config(targets, init_r, skills.scale, pattern, schedule, base_source)
    _save(tmp / name, tensors, cfg, "adapter_model.safetensors")
    out.append((name, tmp / name))
  return out


def write_lora(tmp, skills, idx, w, base_source, notes) -> list[tuple[str, pathlib.Path]]:
  """One LoRA per skill, or one for the mixture w (at `tmp` itself)."""
  jobs = [("mixture", tmp, w)] if w is not None else []
  for s in [] if w is not None else idx:
    jobs.append((skills.names[s], tmp / skills.names[s], np.eye(len(skills.names))[s]))
  out, stacked = [], jax.tree.map(np.asarray, skills.stacked)
  for name, directory, weights in jobs:
    folded, r = pe.fold_lora(stacked, weights, skills.scale)
    cfg = pe.lora_config([t for t in adapters.TARGETS if t in folded], r, base_source)
    _save(directory, pe.lora_tensors(folded), cfg, "adapter_model.safetensors")
    if r > pe.VLLM_MAX_LORA_RANK:
      notes.append(
        f"{name}: rank {r} exceeds vLLM's default max_lora_rank {pe.VLLM_MAX_LORA_RANK}: "
        f"start vLLM with --max-lora-rank >= {r}"
      )
    out.append((name, directory))
  return out


def write_hf(directory: pathlib.Path, cfg, params: dict, tok_source, notes) -> None:
  """A transformers checkpoint of `params` (our names, numpy) with the tokenizer's files."""
  tensors = pe.hf_tensors(params, cfg.num_hidden_layers)
  _save(directory, tensors, pe.hf_config(cfg), "model.safetensors")
  gen = {**pe.generation_config(cfg), "transformers_version": _version("transformers")}
  (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
  if tok_source is None:
    return
  try:
    tokenizer.load_tokenizer(tok_source).save_pretrained(str(directory))
  except (OSError, ValueError) as e:
    notes.append(f"no tokenizer files ({e}); pass --tokenizer")


def _version(package: str) -> str | None:
  from importlib.metadata import PackageNotFoundError, version

  try:
    return version(package)
  except PackageNotFoundError:
    return None


# ---- verification ----------------------------------------------------------------------------
def _tokens(vocab: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, vocab, (ROWS, LENGTH)).astype(np.int32)


_forward = jax.jit(llama.forward, static_argnums=0)


def ours(graphdef, params, tokens, leaves=None, ctx=None) -> np.ndarray:
  """Our logits of the frozen params with adapter leaves applied by ctx (f32)."""
  kw = {} if leaves is None else {"adapters": leaves, "adapter_ctx": ctx}
  return np.asarray(_forward(graphdef, params, jnp.asarray(tokens), **kw))


def _torch_available(args) -> bool:
  return not args.no_torch and all(
    importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")
  )


def _torch_logits(model_dir, tokens, adapter_dir=None) -> np.ndarray:
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
    str(model_dir), dtype=torch.float32, local_files_only=True
  ).eval()
  if adapter_dir is not None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _max_delta(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def verify_adapters(written, want, base, base_hf, use_torch) -> list[tuple[str, str, float]]:
  """Each adapter directory re-read by import_peft (ours) and by PeftModel (torch)."""
  graphdef, params = nnx.split(base)
  tokens, checks = _tokens(base.cfg.vocab_size), []
  for name, directory in written:
    leaves, scale, _ = import_peft.read_adapter(directory, base.cfg)
    got = ours(graphdef, params, tokens, leaves, adapters.AdapterCtx(scale))
    checks.append((name, "mdkif_jax import_peft", _max_delta(got, want[name])))
    if use_torch:
      got = _torch_logits(base_hf, tokens, directory)
      checks.append((name, "transformers + peft PeftModel", _max_delta(got, want[name])))
  return checks


def export(args, command: str) -> dict:
  """Write, verify and move into place one export; returns {"out", "checks", "notes"}."""
  out = args.out
  check_request(args)
  base = loading.load_model(args.base, progress=False)
  graphdef, params = nnx.split(base)
  skills, idx, w = _skills(args, base.cfg)
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  tokens, notes = _tokens(base.cfg.vocab_size), []
  use_torch = _torch_available(args)
  want = {}  # our logits of each written item, the reference every reader is compared with
  if w is not None:
    ctx = adapters.AdapterCtx(skills.scale, weights=jnp.tile(jnp.asarray(w)[None], (ROWS, 1)))
    want["mixture"] = ours(graphdef, params, tokens, skills.stacked, ctx)
  elif skills is not None:
    for s in idx:
      leaves = _one(skills.stacked, s)
      want[skills.names[s]] = ours(
        graphdef, params, tokens, leaves, adapters.AdapterCtx(skills.scale)
      )
  with tempfile.TemporaryDirectory() as scratch:
    base_hf = _torch_base(args.base, base, scratch) if use_torch and args.format != "hf" else None
    if args.format == "peft":
      written = write_peft(tmp, skills, idx, _source(args.base), _schedules(args.skills_from))
      checks = verify_adapters(written, want, base, base_hf, use_torch)
    elif args.format == "lora":
      written = write_lora(tmp, skills, idx, w, _source(args.base), notes)
      checks = verify_adapters(written, want, base, base_hf, use_torch)
    else:
      checks = _export_hf(args, tmp, base, skills, idx, w, want, tokens, use_torch, notes)
  bad = [c for c in checks if not c[2] <= args.tolerance]
  plain = ours(graphdef, params, tokens)  # how far each export moves the base: the scale of Δ
  effects = {name: _max_delta(logits, plain) for name, logits in want.items()}
  _write_readme(tmp, args, command, base, skills, idx, w, checks, notes, effects)
  if bad:
    raise ExportError(f"{tmp}: the export does not reproduce our logits: {bad}")
  if out.exists():  # --overwrite: the old export stays until the new one is in place
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)
  else:
    tmp.rename(out)
  for note in notes:
    print(f"note: {note}", file=sys.stderr)
  return {"out": out, "checks": checks, "notes": notes}


def _source(base: str) -> str | None:
  return str(pathlib.Path(base).resolve()) if pathlib.Path(base).exists() else base


def _torch_base(source, base, scratch) -> pathlib.Path:
  """A transformers directory of the base: the source itself, else our HF export of it."""
  if pathlib.Path(source).is_dir():
    return pathlib.Path(source)
  directory = pathlib.Path(scratch) / "base"
  params = {k: np.asarray(v[...]) for k, v in nnx.split(base)[1].items()}
  write_hf(directory, base.cfg, params, None, [])
  return directory


def _export_hf(args, tmp, base, skills, idx, w, want, tokens, use_torch, notes):
  graphdef, params = nnx.split(base)
  arrays = {k: np.asarray(v[...]) for k, v in params.items()}
  if skills is None:
    name = "base"
    want[name] = ours(graphdef, params, tokens)
  else:
    kernels = {t: jnp.asarray(arrays[t]) for t in skills.stacked}
    if w is not None:
      name = "mixture"
      merged = serving.merge_mixture(kernels, skills.stacked, jnp.asarray(w), skills.scale)
    else:
      name = skills.names[idx[0]]
      merged = serving.merge(kernels, _one(skills.stacked, idx[0]), skills.scale)
    arrays.update({t: np.asarray(v) for t, v in merged.items()})
  write_hf(tmp, base.cfg, arrays, args.tokenizer or args.base, notes)
  reread = loading.load_hf_dir(tmp, progress=False)
  got = ours(*nnx.split(reread), tokens)
  checks = [(name, "mdkif_jax load_hf_dir", _max_delta(got, want[name]))]
  if use_torch:
    got = _torch_logits(tmp, tokens)
    checks.append((name, "transformers AutoModelForCausalLM", _max_delta(got, want[name])))
  return checks


def _write_readme(tmp, args, command, base, skills, idx, w, checks, notes, effects) -> None:
  what = {
    "peft": "PEFT AdaLoRA adapters, one directory per skill (`PeftModel.from_pretrained`)",
    "lora": "plain LoRA (PEFT LORA format; vLLM, LoRAX), scale 1 (lora_alpha = r)",
    "hf": "a transformers checkpoint (`AutoModelForCausalLM.from_pretrained`)",
  }[args.format]
  chosen = [skills.names[s] for s in idx] if skills is not None else []
  mix = "" if w is None else ", ".join(f"{skills.names[s]}={w[s]:.4g}" for s in idx)
  lines = [
    f"# mdkif_jax export ({args.format})",
    "",
    f"{what}.",
    "",
    f"- base: `{args.base}` ({base.cfg.model_type}, {base.cfg.num_hidden_layers} layers)",
    f"- skills: {', '.join(chosen) or 'none (the base alone)'}",
    *([f"- task-level router `{args.router}`: {mix}"] if w is not None else []),
    f"- command: `{command}`",
    "",
    f"Verification: logits of {ROWS} rows x {LENGTH} tokens (seeded ids), f32, re-read from "
    f"this directory, against mdkif_jax's own (tolerance {args.tolerance:g}):",
    "",
    "| exported | read by | max abs Δlogit | its effect: max abs (ours - base) |",
    "|---|---|---|---|",
    *[f"| {n} | {r} | {d:.2e} | {effects[n]:.2e} |" for n, r, d in checks],
  ]
  if not any("transformers" in r for _, r, _ in checks):
    lines += ["", "transformers/PEFT were not installed (or --no-torch): only our reader ran."]
  lines += ["", *[f"Note: {n}" for n in notes]] if notes else []
  (tmp / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
