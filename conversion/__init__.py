"""Checkpoint conversion between the official/JAX flax layout and PyTorch (one table, both directions).

Never imports jax or flax: official msgpack files are read with `maskgit_common.msgpack_io`.
"""

from conversion.convert import (ConversionError, check_config, convert, infer_config, jax_to_torch,
                                torch_to_jax)
from conversion.table import TRANSFORMS, Rule, param_table

__all__ = ["ConversionError", "Rule", "TRANSFORMS", "check_config", "convert", "infer_config", "jax_to_torch",
           "param_table", "torch_to_jax"]
