"""A checkpoint's extras (what a source format holds besides the model weights: the seed's iter, epoch, AdamW state,
lightning entries; `conversion/formats/seed.py` lists them) kept in our torch and JAX directories, framework-free:

  extras.json          the tree's structure: JSON values as they are, and tagged objects for what JSON lacks
                       ({"dict": [[key, value], ...]} for dicts, so integer keys and the order survive;
                       {"tuple": [...]}; {"array": NAME} for an array, "array0" for a 0-d one, "scalar" for a
                       numpy scalar)
  extras.safetensors   the arrays, by NAME (the leaf's path in the tree, made unique)

so that reading returns the tree exactly as written: the same containers, key types, order, dtypes and bytes
(Python floats round-trip exactly through JSON). Nothing is unpickled. Absent when a checkpoint has no extras.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from conversion.errors import CheckpointFormatError, ConversionError
from conversion.formats.safetensors_numpy import read_safetensors, write_safetensors
from maskgit_common import fileio

JSON_FILE, ARRAYS_FILE = "extras.json", "extras.safetensors"
FILES = (JSON_FILE, ARRAYS_FILE)
_KEY_TYPES = (str, int, float, bool, type(None))


def _encode(node, path: str, arrays: dict):
  if isinstance(node, (np.ndarray, np.generic)):
    name = path if path not in arrays else f"{path}#{len(arrays)}"  # a key holding "/" could repeat a path
    arrays[name] = np.asarray(node)
    kind = "scalar" if isinstance(node, np.generic) else "array0" if node.ndim == 0 else "array"
    return {kind: name}
  if isinstance(node, Mapping):
    bad = [k for k in node if not isinstance(k, _KEY_TYPES)]
    if bad:
      raise ConversionError(f"extras {path or '/'}: key {bad[0]!r} cannot be stored (keys are str, int, float, bool "
                            f"or None)")
    return {"dict": [[k, _encode(v, f"{path}/{k}", arrays)] for k, v in node.items()]}
  if isinstance(node, tuple):
    return {"tuple": [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(node)]}
  if isinstance(node, list):
    return [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(node)]
  if isinstance(node, (str, int, float, bool, type(None))):
    return node
  raise ConversionError(f"extras {path}: a {type(node).__name__} cannot be stored (arrays, numbers, strings, None, "
                        f"and dicts/lists/tuples of them)")


def _decode(node, arrays: dict, source: str):
  if isinstance(node, list):
    return [_decode(v, arrays, source) for v in node]
  if not isinstance(node, dict):
    return node
  (tag, value), = node.items()
  if tag in ("array", "array0", "scalar"):
    if value not in arrays:
      raise CheckpointFormatError(f"{source}: {JSON_FILE} names array {value!r}, which {ARRAYS_FILE} lacks")
    # safetensors stores a 0-d array as shape (1,): the tag says which it was.
    array = arrays[value] if tag == "array" else arrays[value].reshape(())
    return array[()] if tag == "scalar" else array
  if tag == "tuple":
    return tuple(_decode(v, arrays, source) for v in value)
  return {k: _decode(v, arrays, source) for k, v in value}


def write_extras(directory: str, extras: Mapping) -> None:
  """Writes `extras` (a tree of dicts, lists, tuples, arrays and plain values) into `directory` (a temporary
  directory of fileio.atomic_directory); nothing when it is empty."""
  if not extras:
    return
  arrays = {}
  tree = _encode(dict(extras), "", arrays)
  fileio.atomic_write_json(os.path.join(directory, JSON_FILE), tree, indent=None)
  if arrays:
    write_safetensors(os.path.join(directory, ARRAYS_FILE), arrays)


def read_extras(directory: str) -> dict:
  """The extras stored in `directory`, {} when there are none."""
  path = os.path.join(directory, JSON_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      tree = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from None
  arrays_path = os.path.join(directory, ARRAYS_FILE)
  arrays = read_safetensors(arrays_path) if os.path.isfile(arrays_path) else {}
  try:
    return _decode(tree, arrays, directory)
  except (ValueError, TypeError, AttributeError) as e:  # a hand-edited file that is not what write_extras wrote
    raise CheckpointFormatError(f"{path}: not an extras file written by this project ({e})") from None

