"""One weights file: a flax msgpack (.msgpack or a released `*_checkpoint`) or a .safetensors with torch keys.

Which part it holds is read from its keys; what it is from its first bytes, not its name. Its config comes from the
caller, else (msgpack) from the shapes: a preset the part fits exactly.
"""

from __future__ import annotations

import os

from conversion.errors import PASS_CONFIG, ConversionError
from conversion.formats.flax_msgpack import read_msgpack
from conversion.formats.official_dir import RELEASED
from conversion.formats.safetensors_numpy import read_safetensors
from conversion.formats.sniff import sniff
from conversion.layout import from_torch_layout
from conversion.tables import part_of
from conversion.tree import as_flat

NAME = "file"
DESCRIPTION = "one weights file (a flax msgpack / released *_checkpoint file, or a .safetensors with torch keys)"
def _named_like_weights(path: str) -> bool:
  name = os.path.basename(path)
  return name.endswith((".msgpack", ".safetensors")) or any(p.match(name) for p in RELEASED.values())


def detect(path: str) -> dict | None:
  """Files that are msgpack or safetensors; damaged ones too when their name says so, so the codec's message says
  what is wrong with them. PyTorch pickles and other files are left to the formats that read them."""
  if not os.path.isfile(path):
    return None
  kind = sniff(path)
  return {"file": path} if kind in ("safetensors", "msgpack") or _named_like_weights(path) else None


def _part(keys, path: str) -> str:
  part = part_of(keys)
  if part is None:
    roots = sorted({k.replace("params/", "", 1).split("/")[0].split(".")[0] for k in keys})
    raise ConversionError(f"{path} holds neither a MaskGIT tokenizer nor a transformer (top-level names: "
                          f"{roots[:8]})")
  return part


def read(path: str, config=None):
  kind = sniff(path)
  if kind == "safetensors" or (kind == "unknown" and path.endswith(".safetensors")):
    state = read_safetensors(path)
    part = _part(state, path)
    if config is None:
      raise ConversionError(f"{path} is a single torch {part} file: its config cannot be inferred alone; "
                            f"{PASS_CONFIG}")
    return None, {part: lambda: from_torch_layout(config, part, state, consume=True, source=path)}, {}
  flat = as_flat(read_msgpack(path))
  return None, {_part(flat, path): flat}, {}
