"""safetensors files as {key: np.ndarray} through `safetensors.numpy` (bfloat16 through ml_dtypes); never pickle."""

from __future__ import annotations

import numpy as np
import safetensors
import safetensors.numpy

from conversion.errors import CheckpointFormatError
from conversion.formats.sniff import pytorch_message, sniff

# One metadata entry only: safetensors keeps metadata in a hash map whose order changes from run to run, so two
# entries would make the same weights give different bytes. "format": "pt" is what PyTorch loaders expect.
METADATA = {"format": "pt"}


def read_safetensors(path: str) -> dict:
  """{key: np.ndarray}; CheckpointFormatError naming `path` when it is missing, damaged or a PyTorch pickle."""
  kind = sniff(path)
  if kind in ("torch_zip", "torch_pickle"):
    from conversion import formats  # pylint: disable=import-outside-toplevel  (the registry imports this module)
    raise CheckpointFormatError(pytorch_message(path, kind, "a safetensors file", formats.reads_pytorch()))
  try:
    # pread, not the default mmap: a mapped file's pages stay resident beside the arrays copied out of them, which
    # doubled the peak memory of reading a part (measured: 828 vs 428 MiB for a 400 MiB file).
    return safetensors.numpy.load_file(path, backend="pread")
  except (OSError, safetensors.SafetensorError, ValueError, KeyError) as e:
    raise CheckpointFormatError(f"cannot read safetensors file {path} (missing, truncated or another format): "
                                f"{type(e).__name__}: {e}") from None


def write_safetensors(path: str, state: dict) -> None:
  """Writes {key: array} (C-contiguous copies where needed), byte-identical for the same weights run to run.

  Only ever called inside `fileio.atomic_directory` (which fsyncs and lists every file), so the library writes the
  file itself, streaming, instead of building the whole file in memory first.
  """
  tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
  safetensors.numpy.save_file(tensors, path, metadata=METADATA)
