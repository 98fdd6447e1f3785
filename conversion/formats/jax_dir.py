"""Our JAX export directory: config.json (ours) + tokenizer.msgpack and/or transformer.msgpack in the official layout
(and the source's extras where it had any: conversion/formats/extras.py).

The msgpack files are flax `to_bytes({"params": ...})` with keys in flax's order, so an export of official weights
is byte-identical to the released files.
"""

from __future__ import annotations

import os

from conversion.formats.extras import read_extras
from conversion.formats.common import config_kind, read_config, write_directory
from conversion.formats.flax_msgpack import read_msgpack, write_msgpack
from conversion.layout import ordered
from conversion.tree import as_flat, unflatten

NAME = "jax"
DESCRIPTION = "a JAX checkpoint directory (config.json + tokenizer.msgpack / transformer.msgpack)"
FILES = {"tokenizer": "tokenizer.msgpack", "transformer": "transformer.msgpack"}


def detect(path: str) -> dict | None:
  if not os.path.isdir(path) or config_kind(path) != "ours":  # without our config.json: the official format
    return None
  found = {part: os.path.join(path, name) for part, name in FILES.items() if os.path.isfile(os.path.join(path, name))}
  return found or None


def read(path: str, config=None):
  del config  # the weights are already canonical: no table needed to read them
  return read_config(path), {part: (lambda file=file: as_flat(read_msgpack(file)))
                             for part, file in detect(path).items()}, lambda: read_extras(path)


def write(tmp: str, config, parts: dict, extras: dict) -> None:
  write_directory(tmp, config, parts, extras, lambda part, flat: write_msgpack(
      os.path.join(tmp, FILES[part]), unflatten(ordered(config, part, flat))))
