"""The official checkpoints as released: a directory holding a flax msgpack tokenizer and/or transformer.

Names read: the released `tokenizer_<name>_checkpoint` and `maskgit_<name>_checkpoint` (e.g. imagenet256, as
downloaded), or tokenizer.msgpack / transformer.msgpack without our config.json (the golden fixtures' layout). The
config comes from a config.json beside them (ours, or an official ConfigDict dump), else from the caller, else from
the shapes (`conversion.infer`).
"""

from __future__ import annotations

import os
import re

from conversion.errors import ConversionError
from conversion.formats.common import config_kind, read_config
from conversion.formats.flax_msgpack import read_msgpack
from conversion.tree import as_flat

NAME = "official"
DESCRIPTION = ("the official flax msgpack checkpoints (tokenizer_<name>_checkpoint + maskgit_<name>_checkpoint as "
               "released, or tokenizer.msgpack + transformer.msgpack)")
RELEASED = {"tokenizer": re.compile(r"^tokenizer_\w+_checkpoint$"),
            "transformer": re.compile(r"^(maskgit|transformer)_\w+_checkpoint$")}
PLAIN = {"tokenizer": "tokenizer.msgpack", "transformer": "transformer.msgpack"}


def detect(path: str) -> dict | None:
  if not os.path.isdir(path):
    return None
  names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
  plain_ok = config_kind(path) != "ours"  # beside our config.json, *.msgpack is a JAX export (jax_dir)
  found = {}
  for part, pattern in RELEASED.items():
    hits = [n for n in names if pattern.match(n) or (plain_ok and n == PLAIN[part])]
    if len(hits) > 1:
      raise ConversionError(f"{path} is ambiguous: several {part} checkpoints {hits}; pass one file, or keep one "
                            f"per directory")
    if hits:
      found[part] = os.path.join(path, hits[0])
  return found or None


def read(path: str, config=None):
  del config  # the weights are already canonical: no table needed to read them
  return read_config(path), {part: (lambda file=file: as_flat(read_msgpack(file)))
                             for part, file in detect(path).items()}, {}
