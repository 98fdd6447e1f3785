"""Official-layout flax msgpack checkpoints: load (with a full tree check), atomic save, init and expected shapes.

A checkpoint file is the flax `serialization.to_bytes` encoding of `{"params": {...}}` with float32 leaves, the
container of the released MaskGIT checkpoints. Every failure is a `CheckpointError` that names the file.
Checkpoint directories (DESIGN §4: config.json + weights) are read in either layout: official msgpack as is, torch
safetensors through the conversion table (numpy only: this module never imports torch).
"""

import os
from typing import Any, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from configs import PRESETS, ConfigError, MaskGITConfig
from conversion import table
from maskgit_common import fileio, msgpack_io
from maskgit_jax.tokenizer import VQVAE
from maskgit_jax.transformer import Transformer
from maskgit_common.errors import UserError

MODELS = ("tokenizer", "transformer")


class CheckpointError(UserError, ValueError):
  """A checkpoint file is missing, unreadable, or does not hold the expected parameter tree."""


def _shape_dtype(leaf) -> tuple[tuple, Any]:
  """(shape, dtype or None) of an array, a ShapeDtypeStruct, or a bare shape tuple."""
  if isinstance(leaf, (tuple, list)):
    return tuple(leaf), None
  if hasattr(leaf, "shape"):
    return tuple(leaf.shape), np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else None
  return None, type(leaf).__name__  # not an array at all (e.g. a scalar stored in the file)


def compare_trees(found: Mapping, expected: Mapping) -> list[str]:
  """Every missing, unexpected, mis-shaped and mis-typed leaf path, one line each (empty when they agree)."""
  found, expected = msgpack_io.flatten(found), msgpack_io.flatten(expected)
  problems = []
  for path in sorted(set(expected) - set(found)):
    shape, dtype = _shape_dtype(expected[path])
    problems.append(f"missing    {path}: expected {shape}" + (f" {dtype}" if dtype else ""))
  for path in sorted(set(found) - set(expected)):
    shape, dtype = _shape_dtype(found[path])
    problems.append(f"unexpected {path}: {shape} {dtype}")
  for path in sorted(set(found) & set(expected)):
    (shape, dtype), (want_shape, want_dtype) = _shape_dtype(found[path]), _shape_dtype(expected[path])
    if shape != want_shape:
      problems.append(f"shape      {path}: file has {shape}, expected {want_shape}")
    elif want_dtype is not None and dtype != want_dtype:
      problems.append(f"dtype      {path}: file has {dtype}, expected {want_dtype}")
  return problems


def load_msgpack_params(path: str, expected=None, *, expected_tree=None) -> dict:
  """Reads an official-layout msgpack checkpoint -> {"params": nested dict of np.ndarray}.

  Args:
    path: the .msgpack file.
    expected: optional tree of arrays / ShapeDtypeStructs / shape tuples, with or without the top-level "params"
      key (e.g. `expected_shapes(config, "transformer")`). Every leaf is compared; a mismatch raises ONE
      CheckpointError listing every missing, unexpected and mis-shaped path with both shapes.
    expected_tree: the same as `expected` (the name docs/API.md uses).
  """
  if expected is None:
    expected = expected_tree
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint file not found: {path}")
  if os.path.isdir(path):
    raise CheckpointError(f"{path} is a directory; expected a flax msgpack checkpoint file")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror}") from None
  if not data:
    raise CheckpointError(f"{path} is empty; expected a flax msgpack checkpoint")
  try:
    variables = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types (ExtraData, ValueError, ...); report them all the same way
    raise CheckpointError(f"{path} is not a readable flax msgpack checkpoint (truncated, corrupted or another "
                          f"format): {type(e).__name__}: {e}") from None
  if not isinstance(variables, dict) or "params" not in variables:
    keys = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
    raise CheckpointError(f"{path} does not hold a flax variables dict with a 'params' key (found {keys})")
  if expected is not None:
    if "params" not in expected:
      expected = {"params": expected}
    problems = compare_trees({"params": variables["params"]}, expected)
    if problems:
      raise CheckpointError(f"{path}: the parameter tree does not match the config ({len(problems)} problems):\n  "
                            + "\n  ".join(problems))
  return {"params": variables["params"]}


def save_msgpack_params(path: str, variables) -> None:
  """Writes flax `to_bytes(variables)` atomically (temp file in the same directory + os.replace)."""
  fileio.atomic_write(path, flax.serialization.to_bytes(variables))


def _model_and_input(config: MaskGITConfig, which: str):
  if which == "tokenizer":
    return VQVAE(config), jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  if which == "transformer":
    return Transformer(config), jnp.zeros((1, config.seq_len), jnp.int32)
  raise ValueError(f"which must be one of {MODELS}, got {which!r}")


def init_variables(config: MaskGITConfig, which: str, rng: jax.Array) -> dict:
  """Freshly initialised {"params": ...} for "tokenizer" or "transformer", with the official initializers."""
  model, dummy = _model_and_input(config, which)
  return dict(model.init(rng, dummy))


def expected_shapes(config: MaskGITConfig, which: str) -> dict:
  """{"params": tree of jax.ShapeDtypeStruct} for the config, via jax.eval_shape (nothing is allocated)."""
  return jax.eval_shape(lambda: init_variables(config, which, jax.random.PRNGKey(0)))


# Checkpoint directories -------------------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
MSGPACK_FILES = {"tokenizer": "tokenizer.msgpack", "transformer": "transformer.msgpack"}
SAFETENSORS_FILES = {"tokenizer": "tokenizer.safetensors", "transformer": "transformer.safetensors"}


def load_safetensors_params(path: str, config: MaskGITConfig, which: str) -> dict:
  """A torch checkpoint file (safetensors) -> {"params": ...} in the official layout, via `conversion.table`.

  Every missing, unexpected and mis-shaped key is listed in one CheckpointError.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  try:
    state = safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types for truncated / foreign files
    raise CheckpointError(f"cannot read safetensors file {path}: {type(e).__name__}: {e}") from None
  rules = table.param_table(config, which)
  expected = {r.torch_key: table.torch_shape(r) for r in rules}
  problems = [f"missing    {k}: expected {s}" for k, s in expected.items() if k not in state]
  problems += [f"unexpected {k}: {state[k].shape}" for k in state if k not in expected]
  problems += [f"shape      {k}: file has {state[k].shape}, expected {s}" for k, s in expected.items()
               if k in state and tuple(state[k].shape) != tuple(s)]
  if problems:
    raise CheckpointError(f"{path}: the {which} weights do not match the config ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))
  return msgpack_io.unflatten({r.jax_path: table.to_jax(r, state[r.torch_key]) for r in rules})


def _match_preset(path: str, which: str) -> MaskGITConfig | None:
  params = load_msgpack_params(path)
  matches = [make() for make in PRESETS.values() if not compare_trees(params, expected_shapes(make(), which))]
  return matches[0] if len(matches) == 1 else None


def load_checkpoint_dir(directory: str) -> tuple[MaskGITConfig, dict, dict | None]:
  """A checkpoint directory of either layout -> (config, tokenizer variables, transformer variables or None).

  Accepts config.json + tokenizer/transformer .msgpack (JAX export, official layout) or .safetensors (torch). A
  directory of released official files without config.json is accepted when its shapes match exactly one preset;
  otherwise convert it first (`python run.py convert --to jax` infers the config and writes config.json).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  names = set(os.listdir(directory))
  msgpack = {w: os.path.join(directory, f) for w, f in MSGPACK_FILES.items() if f in names}
  tensors = {w: os.path.join(directory, f) for w, f in SAFETENSORS_FILES.items() if f in names}
  if msgpack and tensors:
    raise CheckpointError(f"{directory} is ambiguous: it holds both .msgpack and .safetensors weights")
  if not msgpack and not tensors:
    raise CheckpointError(f"{directory} holds no weights: expected tokenizer/transformer .msgpack or .safetensors")
  config_path = os.path.join(directory, CONFIG_FILE)
  if os.path.isfile(config_path):
    try:
      config = MaskGITConfig.load(config_path)
    except ConfigError as e:
      raise CheckpointError(str(e)) from None
  elif msgpack and "tokenizer" in msgpack and (config := _match_preset(msgpack["tokenizer"], "tokenizer")):
    pass
  else:
    raise CheckpointError(f"{directory} has no {CONFIG_FILE} and its shapes match no preset: convert it with "
                          f"`python run.py convert --src {directory} --dst DIR --to jax`, which infers the config")
  variables = {}
  for which in MODELS:
    if which in msgpack:
      variables[which] = load_msgpack_params(msgpack[which], expected_shapes(config, which))
    elif which in tensors:
      variables[which] = load_safetensors_params(tensors[which], config, which)
  if "tokenizer" not in variables:
    raise CheckpointError(f"{directory} holds no tokenizer weights")
  return config, variables["tokenizer"], variables.get("transformer")
