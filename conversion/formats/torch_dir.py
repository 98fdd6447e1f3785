"""Our torch checkpoint directory: config.json + tokenizer.safetensors and/or transformer.safetensors (torch keys),
and the source's extras where it had any (conversion/formats/extras.py)."""

from __future__ import annotations

import os

from conversion.errors import PASS_CONFIG, ConversionError
from conversion.formats.extras import read_extras
from conversion.formats.common import CONFIG_FILE, read_config, write_directory
from conversion.formats.safetensors_numpy import read_safetensors, write_safetensors
from conversion.layout import from_torch_layout, to_torch_layout

NAME = "torch"
DESCRIPTION = "a torch checkpoint directory (config.json + tokenizer.safetensors / transformer.safetensors)"
FILES = {"tokenizer": "tokenizer.safetensors", "transformer": "transformer.safetensors"}


def detect(path: str) -> dict | None:
  if not os.path.isdir(path):
    return None
  found = {part: os.path.join(path, name) for part, name in FILES.items() if os.path.isfile(os.path.join(path, name))}
  return found or None


def _loader(config, part: str, path: str):
  return lambda: from_torch_layout(config, part, read_safetensors(path), consume=True, source=path)


def read(path: str, config=None):
  file_config = read_config(path)
  use = config or file_config
  if use is None:
    raise ConversionError(f"{path} has torch weights but no {CONFIG_FILE}; {PASS_CONFIG}")
  return file_config, {part: _loader(use, part, file) for part, file in detect(path).items()}, lambda: read_extras(path)


def write(tmp: str, config, parts: dict, extras: dict) -> None:
  # consume: the canonical arrays are released as their torch-layout copies are made (one part's peak, not two)
  write_directory(tmp, config, parts, extras, lambda part, flat: write_safetensors(
      os.path.join(tmp, FILES[part]), to_torch_layout(config, part, flat, consume=True)))
