"""The one key / shape / dtype check of model weights against a config, and its one message format.

`check` returns one line per problem:
  missing: KEY (expected shape S)
  unexpected: KEY (shape S)
  wrong shape: KEY: got S, expected S
  wrong dtype: KEY: got D, expected a floating point type
`message` turns them into one paragraph naming the part, the layout, the file and, where the shapes tell, the config
fields that differ; `check_config` raises one ConversionError holding the paragraphs of every part. Values only need
`.shape` and `.dtype` (numpy arrays, torch tensors, jax ShapeDtypeStructs): nothing is imported to check them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from conversion.errors import ConversionError
from conversion.rules import torch_shape
from conversion.tables import param_table, table
from conversion.tree import as_flat

LAYOUTS = ("jax", "torch")
# Config fields that live on the whole config, not on a part's section: how a message names them.
_DERIVED = {"seq_len": "seq_len (= (image_size / downsample_factor) ** 2 + 1)",
            "vocab_size": "vocab_size (= codebook_size + num_class + 1)"}


def _floating(value) -> bool:
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    dtype = np.asarray(value).dtype  # a stray scalar leaf
  if hasattr(dtype, "is_floating_point"):  # torch.dtype
    return bool(dtype.is_floating_point)
  dtype = np.dtype(dtype)
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def compare(expected: Mapping[str, tuple], got: Mapping) -> list[str]:
  """Every missing, unexpected, mis-shaped and non-floating entry of `got` against {key: expected shape}, in the one
  message format (for weights without a table too, e.g. a feature extractor's state dict)."""
  shapes = {k: tuple(np.shape(v)) for k, v in got.items()}
  problems = [f"missing: {k} (expected shape {s})" for k, s in expected.items() if k not in shapes]
  problems += [f"unexpected: {k} (shape {s})" for k, s in shapes.items() if k not in expected]
  problems += [f"wrong shape: {k}: got {shapes[k]}, expected {s}" for k, s in expected.items()
               if k in shapes and shapes[k] != s]
  problems += [f"wrong dtype: {k}: got {getattr(got[k], 'dtype', type(got[k]).__name__)}, expected a floating "
               f"point type" for k in expected if k in got and not _floating(got[k])]
  return problems


def check(config, part: str, flat: Mapping, layout: str = "jax") -> list[str]:
  """Every missing, unexpected, mis-shaped and non-floating entry of `flat` for this config (empty: it fits).

  layout "jax": flat flax paths ("params/..."), the canonical form; "torch": state_dict keys and torch shapes.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  rules = param_table(config, part)
  expected = ({r.jax_path: tuple(r.shape) for r in rules} if layout == "jax"
              else {r.torch_key: torch_shape(r) for r in rules})
  return compare(expected, flat)


def differences(config, part: str, flat: Mapping) -> list[str]:
  """The config fields a canonical tree's shapes imply differently from `config` (best effort: [] when the tree is
  too damaged to tell, or the family cannot read fields from shapes). Lets an error name the field, not only keys."""
  fields = table(config, part).fields
  if fields is None:
    return []
  try:
    implied = fields(flat)
  except ConversionError:
    return []
  section, out = getattr(config, part), []
  for name, value in implied.items():
    if hasattr(section, name):
      label, ours = f"{part}.{name}", getattr(section, name)
    else:
      label, ours = _DERIVED.get(name, name), getattr(config, name)
    if ours != value:
      out.append(f"{label}: the config has {ours!r}, the checkpoint implies {value!r}")
  return out


def message(config, part: str, flat: Mapping, layout: str = "jax", source: str = "") -> str | None:
  """None when `flat` fits `config`, else one paragraph: part, layout, file, counts, differing fields, problems."""
  problems = check(config, part, flat, layout)
  if not problems:
    return None
  fields = differences(config, part, flat) if layout == "jax" else []
  kinds = {kind: sum(p.startswith(kind) for p in problems) for kind in ("missing", "unexpected", "wrong")}
  where = f" ({source})" if source else ""
  return (f"{part} {'official/JAX' if layout == 'jax' else 'torch'} parameters{where} do not match the config: "
          f"{kinds['missing']} missing, {kinds['unexpected']} unexpected, {kinds['wrong']} mis-shaped/typed"
          + "".join(f"\n  config field {d}" for d in fields) + "\n  " + "\n  ".join(problems))


def guess_layout(flat: Mapping) -> str:
  """"jax" for flax paths or a nested tree, "torch" for dotted state_dict keys."""
  if any(isinstance(v, Mapping) for v in flat.values()) or any("/" in k for k in flat):
    return "jax"
  return "torch"


def check_config(config, parts: Mapping[str, Mapping], layout: str | None = None,
                 sources: Mapping[str, str] | None = None) -> None:
  """Checks {part: weights} against `config`; raises ONE ConversionError with the paragraph of every bad part.

  Weights are canonical flat dicts, nested flax trees, or torch state dicts (`layout` None: told from the keys).
  """
  messages = []
  for part, weights in parts.items():
    if weights is None:
      continue
    kind = layout or guess_layout(weights)
    flat = as_flat(weights) if kind == "jax" else weights
    text = message(config, part, flat, kind, (sources or {}).get(part, ""))
    if text:
      messages.append(text)
  if messages:
    raise ConversionError("\n".join(messages))
