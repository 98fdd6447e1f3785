"""Canonical weights <-> flax: variables and modules for a config (mirrors `maskgit_torch/checkpoint.py`).

Reading and writing files, formats, key/shape checks and config inference are the weights layer's (`conversion`);
this module only turns its canonical weights (flat flax paths -> np.ndarray, the official tree) into flax variables
{"params": ...} and back. The official tree needs no renaming: the flat paths are the variables' own paths.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import conversion
from conversion import PARTS, CheckpointError  # noqa: F401  (CheckpointError: the one checkpoint error, re-exported)
from configs import MaskGITConfig
from maskgit_jax import families


def make_model(config: MaskGITConfig, part: str, **kwargs):
  """The flax module of `part` for the config's family (families.model_class); its variables come from
  `init_variables` or `from_flat`."""
  return families.model_class(config, part)(config, **kwargs)


def _dummy_input(config: MaskGITConfig, part: str):
  if part == "tokenizer":
    return jnp.zeros((1, config.image_size, config.image_size, config.tokenizer.in_channels), jnp.float32)
  return jnp.zeros((1, config.seq_len), jnp.int32)


def init_variables(config: MaskGITConfig, part: str, rng: jax.Array) -> dict:
  """Freshly initialised {"params": ...} for `part`, with its family's initializers."""
  return dict(make_model(config, part).init(rng, _dummy_input(config, part)))


def expected_shapes(config: MaskGITConfig, part: str) -> dict:
  """{"params": tree of jax.ShapeDtypeStruct} of the module, via jax.eval_shape (nothing allocated)."""
  return jax.eval_shape(lambda: init_variables(config, part, jax.random.PRNGKey(0)))


def from_flat(config: MaskGITConfig, part: str, flat: Mapping) -> dict:
  """Canonical weights -> flax variables {"params": nested numpy}, in flax's key order; ConversionError listing
  every mismatch."""
  conversion.check_config(config, {part: flat}, layout="jax")
  return conversion.unflatten(conversion.ordered(config, part, flat))


def to_flat(config: MaskGITConfig, part: str, variables: Mapping) -> dict:
  """Flax variables (nested {"params": ...}, on any device) -> canonical weights (host numpy), checked."""
  flat = {k: np.asarray(v) for k, v in conversion.flatten(jax.device_get(dict(variables))).items()}
  conversion.check_config(config, {part: flat}, layout="jax")
  return flat


def load_checkpoint(path: str, config=None, *, parts: Sequence[str] = PARTS,
                    overrides: Sequence[str] = ()) -> tuple[MaskGITConfig, dict]:
  """Any checkpoint `conversion.read` accepts -> (config, {part: flax variables (host numpy)}).

  Every part in `parts` must be present (CheckpointError naming the missing model otherwise).
  """
  checkpoint = conversion.read(path, config, parts=parts, require=parts, overrides=overrides)
  return checkpoint.config, {p: from_flat(checkpoint.config, p, flat) for p, flat in checkpoint.parts.items()}


def save_checkpoint(directory: str, config: MaskGITConfig, models: Mapping, *, overwrite: bool = False,
                    protect: Sequence[str] = ()) -> str:
  """Writes {part: flax variables} as a JAX checkpoint directory (config.json + official-layout msgpack),
  atomically; the msgpack files are exactly flax `to_bytes(variables)`."""
  flats = {p: to_flat(config, p, v) for p, v in models.items() if v is not None}
  return conversion.write(directory, config, flats, format="jax", overwrite=overwrite, protect=protect)
