"""PyTorch pickles (`torch.save` files) read and written safely, and torch tensors <-> numpy: the weights layer's one
place for both (the seed's `.pth` / `last.ckpt` readers and `maskgit_torch.checkpoint` use it).

Safety: a checkpoint is a pickle. It is read with `torch.load(..., weights_only=True)` only, which rebuilds tensors
and plain Python types and executes nothing; a file naming any other global is refused, the global named. A caller
may map a few named globals to inert stand-in classes (`stand_ins`: e.g. a class pickled as a dict key, which
lightning does); nothing else is ever allowed. torch is imported inside the functions, never at module level, so
`conversion` imports without it.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Mapping

import numpy as np

from conversion.errors import CheckpointFormatError
from maskgit_common import fileio


# Tensors <-> numpy ------------------------------------------------------------------------------------------------
def to_numpy(t) -> np.ndarray:
  """A tensor (any device) -> np.ndarray sharing its memory where possible; bfloat16 through its bits (ml_dtypes)."""
  if not hasattr(t, "detach"):
    return np.asarray(t)
  t = t.detach().cpu()
  if str(t.dtype) == "torch.bfloat16":  # numpy has no native bfloat16
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def to_tensor(x: np.ndarray):
  """np.ndarray -> CPU tensor, sharing memory when the array is writable (never aliasing a read-only file buffer)."""
  import torch  # pylint: disable=import-outside-toplevel
  x = np.asarray(x)
  if x.dtype.name == "bfloat16":
    return torch.from_numpy(np.array(x).view(np.uint16)).view(torch.bfloat16)
  return torch.from_numpy(x if x.flags.writeable else np.array(x))


def numpy_tree(obj):
  """Every tensor inside dicts/lists/tuples -> np.ndarray, the containers kept. A class used as a dict key (a
  stand-in, see `load`) becomes the dotted name it stands for."""
  if hasattr(obj, "detach") and hasattr(obj, "numpy"):
    return to_numpy(obj)
  if isinstance(obj, Mapping):
    return {getattr(k, "STANDS_FOR", k) if isinstance(k, type) else k: numpy_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(numpy_tree(v) for v in obj)
  return obj


def torch_tree(obj):
  """The inverse of numpy_tree: np.ndarray -> tensor (`to_tensor`); numpy scalars and Python values stay as they
  are."""
  if isinstance(obj, np.ndarray):
    return to_tensor(obj)
  if isinstance(obj, Mapping):
    return {k: torch_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(torch_tree(v) for v in obj)
  return obj


# Reading and writing ---------------------------------------------------------------------------------------------
def _refusal(path: str, error: Exception) -> CheckpointFormatError:
  text = str(error)
  named = re.search(r"GLOBAL ([\w.]+)", text)
  if named:
    return CheckpointFormatError(
        f"{path}: refused: the pickle names {named.group(1)}, which is not a tensor or a plain Python type; nothing "
        f"in it was executed (PyTorch checkpoints are read with torch.load(weights_only=True) only)")
  detail = re.search(r"WeightsUnpickler error: ([^\n]*\n?[^\n]*)", text)
  reason = " ".join((detail.group(1) if detail else text.splitlines()[0]).split())
  return CheckpointFormatError(f"{path}: refused: not a plain checkpoint of tensors ({reason}); nothing in it was "
                               f"executed")


def load(path: str, what: str, stand_ins: Mapping[str, type] | None = None):
  """torch.load(path, weights_only=True) on the CPU, memory-mapped when the file allows (a zip archive); every
  failure is one CheckpointFormatError naming the file. `stand_ins` {dotted global name: inert class} lets those
  names load as the given classes (each class has a `STANDS_FOR` attribute holding its name)."""
  import torch  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{what} {path} does not exist")
  allowed = [(cls, name) for name, cls in (stand_ins or {}).items()]
  try:
    with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      mmap = zipfile.is_zipfile(path)  # torch.save's zip format maps lazily; legacy pickles cannot be mapped
      return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    raise _refusal(path, e) from None
  except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointFormatError(f"cannot read {what} {path}: truncated, damaged or not a torch checkpoint "
                                f"({type(e).__name__}: {first})") from None


def save(path: str, obj) -> str:
  """torch.save(obj) to `path` atomically (fileio)."""
  import torch  # pylint: disable=import-outside-toplevel
  return fileio.atomic_write(path, lambda f: torch.save(obj, f))
