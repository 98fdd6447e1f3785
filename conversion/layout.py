"""Canonical weights and the torch layout.

The canonical in-memory form of a model part is a flat dict {flax path: np.ndarray} ("params/encoder/Conv_0/kernel"),
the official tree for the official family. `to_torch_layout` / `from_torch_layout` move a part between that and
{torch state_dict key: np.ndarray} through the part's table, checking keys and shapes first (one ConversionError
listing every problem). With `consume=True` each source array is dropped from the input dict once converted, so a
conversion holds about one copy of the part, not two.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from conversion import checks as check_lib
from conversion.rules import to_jax, to_torch
from conversion.tables import param_table


def ordered(config, part: str, flat: Mapping) -> dict:
  """The part's arrays in flax's serialization order (what makes a written msgpack byte-identical to flax's)."""
  return {r.jax_path: flat[r.jax_path] for r in param_table(config, part)}


def to_torch_layout(config, part: str, flat: dict, *, consume: bool = False, source: str = "") -> dict:
  """Canonical {flax path: array} -> {torch key: contiguous array}; `consume` empties `flat` as it goes.

  `source` (a file name) is named in the error when the weights do not fit the config.
  """
  check_lib.check_config(config, {part: flat}, layout="jax", sources={part: source})
  state = {}
  for rule in param_table(config, part):
    x = flat.pop(rule.jax_path) if consume else flat[rule.jax_path]
    state[rule.torch_key] = to_torch(rule, np.asarray(x))
  return state


def from_torch_layout(config, part: str, state: dict, *, consume: bool = False, source: str = "") -> dict:
  """{torch key: array} -> canonical {flax path: contiguous array} in flax order; `consume` empties `state`."""
  check_lib.check_config(config, {part: state}, layout="torch", sources={part: source})
  flat = {}
  for rule in param_table(config, part):
    x = state.pop(rule.torch_key) if consume else state[rule.torch_key]
    flat[rule.jax_path] = to_jax(rule, np.asarray(x))
  return flat
