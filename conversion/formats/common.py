"""What the formats share: the config.json beside the weights, parts that load on first use, and the writer of
our own torch and JAX directories."""

from __future__ import annotations

import json
import os

from configs import ConfigError, MaskGITConfig
from conversion.errors import ConversionError
from conversion.formats.extras import write_extras

CONFIG_FILE = "config.json"


def _json_kind(path: str) -> str:
  """"ours" (configs/schema.py), "official" (a ConfigDict dump with vqvae/transformer sections, as the golden
  fixtures keep) or "unknown"."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return "unknown"
  if not isinstance(data, dict):
    return "unknown"
  if "vqvae" in data and "transformer" in data:
    return "official"
  return "ours" if "tokenizer" in data or "transformer" in data else "unknown"


def config_kind(directory: str) -> str | None:
  """The kind of the config.json in `directory` (see `_json_kind`), None when there is none."""
  path = os.path.join(directory, CONFIG_FILE)
  return _json_kind(path) if os.path.isfile(path) else None


def read_config_file(path: str) -> MaskGITConfig:
  """A config.json: ours, or an official ConfigDict dump (named after its directory)."""
  try:
    if _json_kind(path) == "official":
      with open(path) as f:
        return MaskGITConfig.from_official(json.load(f), name=os.path.basename(os.path.dirname(os.path.abspath(path))))
    return MaskGITConfig.load(path)
  except (ConfigError, OSError, ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"cannot use {path}: {e}") from None


def read_config(directory: str) -> MaskGITConfig | None:
  """The config.json in `directory`, None when there is none."""
  path = os.path.join(directory, CONFIG_FILE)
  return read_config_file(path) if os.path.isfile(path) else None


def materialize(value) -> dict:
  """A part as a reader returns it: the flat dict itself, or a zero-argument function that loads it (so a
  converter holds one part at a time)."""
  return value() if callable(value) else value


def write_directory(tmp: str, config, parts: dict, extras: dict, write_part) -> None:
  """What our torch and JAX directories hold, written into `tmp`: config.json, the extras (e.g. the seed's iter,
  epoch and AdamW state: kept for writing back) and each part through `write_part(part, flat)`, one part in memory
  at a time. A part that failed its checks is empty and skipped: the conversion raises once every part is checked."""
  config.save(os.path.join(tmp, CONFIG_FILE))
  write_extras(tmp, materialize(extras))
  for part, value in parts.items():
    flat = materialize(value)
    if flat:
      write_part(part, flat)
