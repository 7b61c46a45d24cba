"""One Orbax checkpoint step read without restoring it: the JSON items, the state's tree
metadata (each array's shape, dtype and bytes), whether the array files the OCDBT index points
into are whole (by their sizes), and a partial restore of one subtree (stage 1's masks)."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from mdkif_jax.peft import adalora

ALLOCATOR_FIELDS = set(adalora.AdaLoraState._fields)  # Orbax stores the NamedTuple as a dict


def damage(where: pathlib.Path, item: str, why: Exception | str) -> dict:
  """A report's record of one damaged item: where, which item, what is wrong (one line)."""
  if isinstance(why, Exception):  # its first line, without tensorstore's long spec
    first = (str(why).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    why = f"{type(why).__name__}: {first[:300]}"
  return {"step_dir": str(where), "item": item, "why": why}


def _disk_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def leaf_table(tree: Any) -> list[dict]:
  """One row per array of an Orbax metadata tree: path, shape, dtype and bytes."""
  rows = []
  for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    shape = [int(d) for d in getattr(m, "shape", None) or ()]
    dtype = np.dtype(m.dtype) if getattr(m, "dtype", None) is not None else None
    nbytes = math.prod(shape) * dtype.itemsize if dtype is not None else 0
    name = dtype.name if dtype is not None else type(m).__name__
    rows.append({"path": ".".join(keys), "shape": shape, "dtype": name, "bytes": nbytes})
  return rows


def allocator_path(tree: Any, path: tuple = ()) -> tuple | None:
  """Where the AdaLoraState sits in the state tree (under chain or MultiSteps), or None."""
  if isinstance(tree, dict):
    if set(tree) >= ALLOCATOR_FIELDS:
      return path
    children = tree.items()
  elif isinstance(tree, list | tuple):
    children = enumerate(tree)
  else:
    return None
  for k, child in children:
    found = allocator_path(child, (*path, k))
    if found is not None:
      return found
  return None


def _at(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _only(tree: Any, path: tuple, leaf: Any) -> Any:
  """`tree`'s containers along `path` holding `leaf` there and nothing else (None elsewhere:
  a partial restore reads no other array)."""
  if not path:
    return leaf
  k, rest = path[0], path[1:]
  if isinstance(tree, dict):
    return {k: _only(tree[k], rest, leaf)}
  out = [None] * len(tree)
  out[k] = _only(tree[k], rest, leaf)
  return out


def restore_subtree(state_dir: pathlib.Path, tree: Any, path: tuple) -> Any:
  """The arrays of the subtree at `path` as numpy, and no other array of the item."""
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), _at(tree, path))
  item = _only(tree, path, target)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restore = ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
  handler = ocp.PyTreeCheckpointHandler()
  out = _at(handler.restore(state_dir.absolute(), args=restore), path)  # Orbax: absolute only
  if not all(isinstance(x, np.ndarray) for x in jax.tree.leaves(out)):
    # a partial restore hands back the target itself for a key it did not find
    raise ValueError(f"{'.'.join(map(str, path))}: not in the checkpoint")
  return out


def short_array_files(state_dir: pathlib.Path) -> list[str]:
  """The array files the state's OCDBT index points into that are missing or shorter than it
  says (a killed copy, a full disk), found from the index and file sizes: no array is read."""
  base = ts.KvStore.open(f"file://{state_dir}/").result()
  nodes = [ts.ocdbt.dump(base).result()["versions"][-1]["root"].get("location")]
  need: dict[pathlib.Path, tuple[int, set]] = {}
  while nodes:
    node = nodes.pop()
    for entry in ts.ocdbt.dump(base, node).result()["entries"] if node else []:
      nodes += [v for v in entry.values() if isinstance(v, str) and v.startswith("btreenode:")]
      ref = entry.get("indirect_value", "")
      if ref.startswith("value:"):  # value:<prefix>:<file>:<offset>:<length>
        prefix, file, offset, length = ref.removeprefix("value:").rsplit(":", 3)
        end, names = need.get(state_dir / prefix / file, (0, set()))
        names.add(entry["key"].decode(errors="replace").split("/")[0])
        need[state_dir / prefix / file] = (max(end, int(offset) + int(length)), names)
  problems = []
  for path, (end, names) in sorted(need.items()):
    have = path.stat().st_size if path.is_file() else None
    if have is None or have < end:
      what = "missing" if have is None else f"{have} of its {end} bytes"
      held = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
      problems.append(f"{path.relative_to(state_dir)} {what} (holds {held})")
  return problems


def read_step(step_dir: pathlib.Path) -> tuple[dict, list[dict]]:
  """(what one step holds, the damage found), no array read: the JSON items, the state's tree
  metadata with each array's shape, dtype and bytes, and whether its array files are whole."""
  got: dict[str, Any] = {"items": {}}
  damaged = []

  def check(item: str, read) -> Any:
    try:
      return read((step_dir / item.split()[0]).absolute())  # Orbax refuses relative paths
    except Exception as e:  # Orbax, tensorstore and JSON raise many types for damaged files
      damaged.append(damage(step_dir, item, e))
      return None

  for item in ("data", "meta"):
    got[item] = check(
      item, lambda d: ocp.JsonCheckpointHandler().restore(d, ocp.args.JsonRestore())
    )
    if got[item] is not None and not isinstance(got[item], dict):
      damaged.append(damage(step_dir, item, "not a JSON object"))
      got[item] = None
    if got[item] is not None:
      got["items"][item] = {"disk_bytes": _disk_bytes(step_dir / item)}
  got["tree"] = check("state", lambda d: ocp.PyTreeCheckpointHandler().metadata(d).tree)
  if got["tree"] is not None:
    leaves = leaf_table(got["tree"])
    got["items"]["state"] = {
      "arrays": len(leaves),
      "bytes": sum(r["bytes"] for r in leaves),
      "disk_bytes": _disk_bytes(step_dir / "state"),
      "leaves": leaves,
    }
    short = check("state arrays", short_array_files) or []
    if short:
      damaged.append(damage(step_dir, "state arrays", "; ".join(short)))
  got["bytes"] = sum(e.get("bytes", 0) for e in got["items"].values())
  got["disk_bytes"] = _disk_bytes(step_dir)
  return got, damaged
