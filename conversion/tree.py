"""Flat paths <-> nested trees: the canonical weights are flat {"params/a/b": array}; flax files hold the tree."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
  """{"params": {"a": {"b": x}}} -> {"params/a/b": x}, in the tree's order."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{"params/a/b": x} -> {"params": {"a": {"b": x}}}, in the order the paths come."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"path {path!r} runs through a leaf")
    if parts[-1] in node:
      raise ValueError(f"path {path!r} is given twice or is also a prefix of another path")
    node[parts[-1]] = value
  return tree


def as_flat(tree_or_flat: Mapping) -> dict:
  """Nested {'params': ...}, nested without the 'params' level, or already flat -> flat 'params/...' paths."""
  if any(isinstance(v, Mapping) for v in tree_or_flat.values()):
    flat = flatten(tree_or_flat)
  else:
    flat = dict(tree_or_flat)
  if flat and not any(k.startswith("params/") for k in flat):
    flat = {f"params/{k}": v for k, v in flat.items()}
  return flat
