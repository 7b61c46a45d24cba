"""The text form of `mdkif_jax.inspect`'s report (its `--json` form is the dict itself)."""

from __future__ import annotations

from collections import defaultdict

from mdkif_jax import reporting

SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32", "bool": "bool"}


def size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError


def tree_lines(leaves: list[dict]) -> list[str]:
  """One line per container of arrays: its arrays as dtype[shape], and their bytes."""
  groups: dict[str, list[dict]] = defaultdict(list)
  for leaf in leaves:
    parent, _, name = leaf["path"].rpartition(".")
    groups[parent].append({**leaf, "name": name})
  width = max((len(p) for p in groups), default=0)
  out = []
  for parent, group in groups.items():
    arrays = "  ".join(
      f"{g['name']} {SHORT.get(g['dtype'], g['dtype'])}[{','.join(map(str, g['shape']))}]"
      for g in group
    )
    out.append(f"{parent or '.':{width}s}  {arrays}  ({size(sum(g['bytes'] for g in group))})")
  return out


def model_line(m: dict | None) -> str:
  if not m:
    return "unknown"
  return (
    f"{m.get('model_type')}: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
    f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} kv x {m.get('head_dim')}), "
    f"mlp {m['intermediate_size']}, vocab {m['vocab_size']}"
    + (", tied embeddings" if m.get("tie_word_embeddings") else "")
  )


def items_lines(rep: dict) -> list[str]:
  out = ["items (from Orbax's tree metadata):"]
  for name, item in rep["items"].items():
    if "leaves" in item:
      out.append(
        f"  {name}: {item['arrays']} arrays, {size(item['bytes'])} "
        f"({size(item['disk_bytes'])} on disk)"
      )
      out += ["    " + line for line in tree_lines(item["leaves"])]
    else:
      out.append(f"  {name}: JSON, {size(item['disk_bytes'])} on disk")
  out.append(f"total: {size(rep['bytes'])} of arrays, {size(rep['disk_bytes'])} on disk")
  return out


def damage_lines(rep: dict) -> list[str]:
  if not rep["damaged"]:
    return ["damaged: none"]
  return ["DAMAGED:"] + [f"  {d['step_dir']}: {d['item']}: {d['why']}" for d in rep["damaged"]]


def damage_line(rep: dict) -> str | None:
  """One line (for stderr) naming every damaged item, or None."""
  if not rep["damaged"]:
    return None
  parts = [f"{d['step_dir']}: {d['item']}: {d['why']}" for d in rep["damaged"]]
  return "error: DamagedCheckpointError: " + " ".join("; ".join(parts).split())


def header(rep: dict) -> list[str]:
  return [
    f"{rep['kind']} run {rep['workdir']}",
    f"checkpoint steps: {', '.join(map(str, rep['steps'])) or 'none'} "
    f"(set aside as damaged: {', '.join(rep['set_aside']) or 'none'})",
    f"step {rep['step']} ({rep['step_dir']})",
  ]


def rank_lines(rep: dict) -> list[str]:
  if "ranks" not in rep:
    return ["kept rank per layer x module: unreadable (see DAMAGED)"]
  phase = rep.get("phase") or {}
  out = ["kept rank per layer x module (from the masks):"]
  targets = rep["targets"]
  for s, by_target in rep["ranks"].items():
    budget = phase.get("scheduled_budget", "?")
    out.append(
      f"  {s}: mean rank {rep['mean_rank'][s]:.2f}, kept {rep['kept'][s]} "
      f"(scheduled budget {budget})"
    )
    out.append("    layer " + "".join(f"{t:>6s}" for t in targets))
    for layer in range(len(by_target[targets[0]])):
      out.append(f"    {layer:5d} " + "".join(f"{by_target[t][layer]:6d}" for t in targets))
  return out


def stage1_lines(rep: dict) -> list[str]:
  out = header(rep)
  out.append(f"model: {model_line(rep.get('model'))}")
  out.append(f"skills: {', '.join(rep.get('skills') or ['unknown'])}")
  out.append(
    f"adapter targets: {', '.join(rep.get('targets') or ['unknown'])} "
    f"(init_r {rep.get('init_r')}, scale {rep.get('scale') or 0:.4g})"
  )
  s = rep.get("schedule")
  if s:
    out.append(
      f"AdaLoRA schedule: total_step {s['total_step']}, tinit {s['tinit']}, tfinal "
      f"{s['tfinal']}, delta_t {s['delta_t']}; budget per skill {s['init_budget']} -> "
      f"{s['target_budget']} ({s['matrices']} matrices, rank {s['init_r']} -> {s['target_r']})"
    )
    phase = rep["phase"]
    out.append(
      f"phase at step {rep['step']}: {phase['name']}; scheduled budget {phase['scheduled_budget']}"
    )
  else:
    out.append("AdaLoRA schedule: not recorded in this checkpoint")
  accum = (s or {}).get("grad_accum_steps", 1)
  out.append(f"optimizer step: {rep['optimizer_step']} updates ({accum} micro-batch(es) each)")
  data = rep.get("data_position")
  if data:
    out.append(
      "data position: "
      + "; ".join(
        f"{k} example {v.get('position')} of {v.get('num_examples')} "
        f"(epoch {v.get('position', 0) // max(v.get('num_examples', 1), 1)})"
        for k, v in data.items()
      )
    )
  bad = rep.get("bad_steps")
  out.append(
    "bad (non-finite) steps: "
    + (
      f"{bad['count']} (metrics.jsonl at step {bad['at_step']}; counted since the run's last start)"
      if bad
      else "unknown (no metrics.jsonl row)"
    )
  )
  return out + rank_lines(rep) + items_lines(rep) + damage_lines(rep)


def router_lines(rep: dict) -> list[str]:
  out = header(rep)
  out.append(f"model: {model_line(rep.get('model'))}")
  out.append(f"task: {rep.get('task')}; method: {rep.get('method')}")
  if rep.get("rows"):
    out.append(", ".join(f"{k}: {v}" for k, v in rep["rows"].items()))
  if "weights" in rep:
    label = " (the gate: mean over scored rows)" if rep.get("method") == "gate" else ""
    out.append(f"weights per skill{label}:")
    out += [f"  {s:8s} {w:+.4f}" for s, w in rep["weights"].items()]
  for name, layer in rep.get("gate_layers", {}).items():
    out.append(
      f"gate layer {name}: kernel {layer['kernel']}, norm {layer['kernel_norm']:.4f}"
      + (", per skill:" if "per_skill" in layer else "")
    )
    out += [
      f"  {s:8s} kernel norm {v['kernel_norm']:.4f}, bias {v['bias']:+.4f}"
      for s, v in layer.get("per_skill", {}).items()
    ]
  if rep.get("scores"):
    out += ["scores (metrics.jsonl):", reporting.format_table(rep["scores"])]
  else:
    out.append("scores: none recorded")
  return out + items_lines(rep) + damage_lines(rep)


def evaluation_lines(rep: dict) -> list[str]:
  out = [f"evaluation run {rep['workdir']}"]
  done = sum(len(c) for c in rep["cells"].values())
  out.append(
    f"finished cells: {done} ({', '.join(f'{t}: {len(c)}' for t, c in rep['cells'].items())})"
  )
  left = rep.get("remaining")
  if left and left["count"]:
    per_task = ", ".join(f"{t}: {len(c)}" for t, c in left["cells"].items())
    line = f"remaining: {left['count']} of {left['of']} cells ({per_task})"
    if left["minutes"] is not None:
      line += (
        f"; about {left['minutes'] / 60:.1f} h of cell time if each takes its method's "
        "median minutes so far (one process computes one cell at a time)"
      )
    out.append(line)
  if rep.get("table"):
    return out + rep["table"] + damage_lines(rep)
  out.append("results: none yet (no readable results.json); the finished cells, minutes in ():")
  for task, t in rep.get("cell_scores", {}).items():
    cells = ", ".join(f"{m} {c['score']:.3f} ({c['minutes']:.1f})" for m, c in t["cells"].items())
    out.append(f"  {task} ({t['metric']}): {cells}")
  return out + damage_lines(rep)


def lines(rep: dict) -> list[str]:
  if rep["kind"] == "evaluation":
    return evaluation_lines(rep)
  if "runs" in rep:
    return [line for r in rep["runs"] for line in stage1_lines(r) + [""]]
  return router_lines(rep) if rep["kind"] == "router" else stage1_lines(rep)
