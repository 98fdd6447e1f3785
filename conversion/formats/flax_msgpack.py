"""The flax `serialization.to_bytes` checkpoint container, read and written without flax (numpy + msgpack only).

The released MaskGIT checkpoints (and our JAX exports) are `flax.serialization.to_bytes({"params": ...})`: one
msgpack map whose leaves use msgpack ext types (flax/serialization.py, `_MsgpackExtType`):
  1 ndarray   ext data = msgpack of (shape, dtype name, C-order raw bytes)
  2 complex   ext data = msgpack of (real, imag)
  3 npscalar  a numpy scalar, packed like a 0-d ndarray
Dict keys are strings (flax's `to_state_dict` applies `str()`; lists and tuples become {"0": ..., "1": ...}).
Arrays over 2**30 bytes are split into a `{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}` map.

`write_msgpack` produces the same bytes as `flax.serialization.to_bytes` for the same tree (keys are kept in the
tree's own order, as flax does), streaming leaf by leaf so a large checkpoint is never held twice in memory.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import msgpack
import numpy as np

from conversion.errors import CheckpointFormatError
from conversion.formats.sniff import pytorch_message, sniff
from maskgit_common import fileio

_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_CHUNK_MARKER = "__msgpack_chunked_array__"
# flax/serialization.py MAX_CHUNK_SIZE: msgpack's per-object limit is 2**31 - 1, flax leaves a margin.
_MAX_CHUNK_SIZE = 2 ** 30


# Reading ---------------------------------------------------------------------------------------------------------
def _dtype_from_name(name: bytes) -> np.dtype:
  text = name.decode("ascii") if isinstance(name, bytes) else name
  try:
    return np.dtype(text)
  except TypeError:
    if text == "bfloat16":  # flax maps it to jnp.bfloat16; ml_dtypes provides the same numpy dtype without jax.
      import ml_dtypes  # pylint: disable=import-outside-toplevel
      return np.dtype(ml_dtypes.bfloat16)
    raise


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  # Like flax: a read-only view on the unpacked bytes (no extra copy).
  return np.frombuffer(buffer, dtype=_dtype_from_name(dtype_name)).reshape(shape, order="C")


def _ext_hook(code: int, data: bytes):
  if code == _EXT_NDARRAY:
    return _ndarray_from_bytes(data)
  if code == _EXT_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  if code == _EXT_NPSCALAR:
    return _ndarray_from_bytes(data)[()]
  raise ValueError(f"unknown msgpack ext type {code}")


def _unchunk(node):
  if isinstance(node, dict):
    if node.get(_CHUNK_MARKER) is True:
      shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
      chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
      return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in node.items()}
  return node


def read_msgpack(path: str) -> dict:
  """Reads a flax `to_bytes` file into a nested dict of numpy arrays (read-only views), without flax.

  Raises CheckpointFormatError naming `path` when the file is missing, truncated, a PyTorch pickle, or not such a
  container.
  """
  kind = sniff(path)
  if kind in ("torch_zip", "torch_pickle"):
    from conversion import formats  # pylint: disable=import-outside-toplevel  (the registry imports this module)
    raise CheckpointFormatError(pytorch_message(path, kind, "a flax msgpack checkpoint", formats.reads_pytorch()))
  if kind == "directory":
    raise CheckpointFormatError(f"{path} is a directory; expected a flax msgpack checkpoint file")
  try:
    size = os.path.getsize(path)
    f = open(path, "rb")
  except OSError as e:
    raise CheckpointFormatError(f"cannot read checkpoint {path}: {e.strerror}") from None
  with f:
    # Streams the file: only the tree being built and one leaf's bytes are held, never the whole file twice.
    unpacker = msgpack.Unpacker(f, read_size=1 << 20, raw=False, strict_map_key=False, ext_hook=_ext_hook,
                                max_buffer_size=min(max(size, 1 << 20), 2 ** 32 - 1))
    try:
      tree = unpacker.unpack()
    except msgpack.OutOfData:
      raise CheckpointFormatError(f"{path} is truncated or empty ({size} bytes): not a complete flax msgpack "
                                  f"checkpoint") from None
    except Exception as e:  # msgpack raises several types (FormatError, StackError, ValueError, ...).
      raise CheckpointFormatError(f"{path} is not a flax msgpack checkpoint ({type(e).__name__}: {e})") from None
    try:
      unpacker.unpack()
      trailing = True
    except msgpack.OutOfData:
      trailing = False
    except Exception:  # pylint: disable=broad-except
      trailing = True
  if trailing:
    raise CheckpointFormatError(f"{path} has extra data after the msgpack checkpoint (corrupt or concatenated)")
  if not isinstance(tree, dict):
    raise CheckpointFormatError(f"{path} holds a msgpack {type(tree).__name__}, not a dict of parameters")
  return _unchunk(tree)


# Writing ---------------------------------------------------------------------------------------------------------
def _ndarray_to_bytes(arr: np.ndarray) -> bytes:
  if arr.dtype.hasobject or arr.dtype.isalignedstruct:
    raise ValueError("object and structured dtypes cannot be serialized")
  return msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _ext_pack(x):
  """msgpack `default` hook: the same ext types as flax's `_msgpack_ext_pack`."""
  if isinstance(x, np.ndarray):
    return msgpack.ExtType(_EXT_NDARRAY, _ndarray_to_bytes(x))
  if isinstance(x, np.generic):
    return msgpack.ExtType(_EXT_NPSCALAR, _ndarray_to_bytes(np.asarray(x)))
  if isinstance(x, complex):
    return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb((x.real, x.imag)))
  return x


def _state_dict(node):
  """flax `to_state_dict`: string keys, lists/tuples as {"0": ...}; array-likes (jax, torch) become numpy."""
  if isinstance(node, Mapping):
    keys = [str(k) for k in node]
    if len(set(keys)) != len(keys):
      raise ValueError(f"dict keys do not have unique string forms: {list(node)}")
    return {str(k): _state_dict(v) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return {str(i): _state_dict(v) for i, v in enumerate(node)}
  if isinstance(node, (np.ndarray, np.generic, str, bytes, bool, int, float, complex, type(None))):
    if isinstance(node, np.ndarray) and node.size * node.dtype.itemsize > _MAX_CHUNK_SIZE:
      return _chunk(node)
    return node
  if hasattr(node, "__array__"):
    return _state_dict(np.asarray(node))
  raise TypeError(f"cannot serialize a {type(node).__name__} leaf")


def _chunk(arr: np.ndarray) -> dict:
  """flax `_chunk`: oversized arrays become a map of flat chunks."""
  size = max(1, int(_MAX_CHUNK_SIZE / arr.dtype.itemsize))
  flat = arr.reshape(-1)
  chunks = [flat[i:i + size] for i in range(0, flat.size, size)]
  return {_CHUNK_MARKER: True, "shape": {str(i): d for i, d in enumerate(arr.shape)},
          "chunks": {str(i): c for i, c in enumerate(chunks)}}


def _write_node(f, packer: msgpack.Packer, node) -> None:
  # A map is its header followed by (key, value) pairs, so writing pair by pair gives msgpack.packb's bytes.
  if isinstance(node, dict):
    f.write(packer.pack_map_header(len(node)))
    for key, value in node.items():
      f.write(packer.pack(key))
      _write_node(f, packer, value)
  else:
    f.write(packer.pack(node))


def write_msgpack(path: str, tree: Mapping[str, Any]) -> None:
  """Writes `tree` exactly as `flax.serialization.to_bytes(tree)` would, atomically (temp file + os.replace)."""
  state = _state_dict(tree)

  def write(f):
    # flax: msgpack.packb(tree, default=_msgpack_ext_pack, strict_types=True) (use_bin_type is the default).
    packer = msgpack.Packer(default=_ext_pack, strict_types=True, use_bin_type=True, autoreset=True)
    _write_node(f, packer, state)

  fileio.atomic_write(path, write)
