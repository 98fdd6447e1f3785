"""Checkpoint conversion between the official/JAX flax layout and PyTorch (one table, both directions).

Never imports jax or flax: official msgpack files are read with `maskgit_common.msgpack_io`. `conversion.table` is
numpy only; the names from `conversion.convert` (which needs torch) are imported on first use, so the JAX backend
can read torch checkpoints through the table without importing torch.
"""

import importlib

from conversion.table import TRANSFORMS, Rule, param_table

# `conversion.convert` is always the submodule (its `convert()` function: `conversion.convert.convert`).
_FROM_CONVERT = ("ConversionError", "check_config", "infer_config", "jax_to_torch", "torch_to_jax")

__all__ = ["Rule", "TRANSFORMS", "param_table", *_FROM_CONVERT]


def __getattr__(name):
  if name in _FROM_CONVERT:
    return getattr(importlib.import_module("conversion.convert"), name)
  raise AttributeError(f"module 'conversion' has no attribute {name!r}")
