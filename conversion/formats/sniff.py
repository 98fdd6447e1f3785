"""What a file is, from its first bytes: which reader to use, and a clear message when it is none of ours."""

from __future__ import annotations

import os
import struct

KINDS = ("missing", "directory", "empty", "safetensors", "msgpack", "torch_zip", "torch_pickle", "unknown")
_PICKLE_PROTOCOLS = range(2, 6)  # torch.save's legacy format is a pickle, protocol 2 by default
_MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def sniff(path: str) -> str:
  """One of KINDS. Looks at 16 bytes at most; never parses the file."""
  if not os.path.lexists(path):
    return "missing"
  if os.path.isdir(path):
    return "directory"
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(16)
  except OSError:
    return "unknown"
  if not head:
    return "empty"
  if head.startswith(b"PK\x03\x04"):  # torch.save (since 1.6) writes a zip archive
    return "torch_zip"
  if head[0] == 0x80 and len(head) > 1 and head[1] in _PICKLE_PROTOCOLS:
    return "torch_pickle"
  if len(head) >= 9:
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len <= min(size - 8, _MAX_SAFETENSORS_HEADER) and head[8:9] == b"{":
      return "safetensors"
  if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):  # a msgpack map (flax writes one dict)
    return "msgpack"
  return "unknown"


def pytorch_message(path: str, kind: str, expected: str, convertible: bool) -> str:
  """Why a PyTorch pickle cannot be read where `expected` is, and what to do instead."""
  what = "a torch.save zip archive" if kind == "torch_zip" else "a pickle"
  advice = (f"if it is a valeoai MaskGIT-pytorch checkpoint, convert it first (python run.py convert --src {path} "
            f"--dst DIR --to jax|torch); other PyTorch weights: save the state_dict with "
            f"safetensors.torch.save_file and pass that .safetensors file" if convertible else
            "this project never unpickles weights; in PyTorch, save its state_dict with "
            "safetensors.torch.save_file and pass that .safetensors file instead")
  return f"{path} is a PyTorch checkpoint ({what}), not {expected}: {advice}"
