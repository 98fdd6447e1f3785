"""read / write / convert: any checkpoint format in, canonical weights out, and back to a format on disk.

Every write goes through `fileio.atomic_directory`: the destination appears whole or not at all, an existing one is
replaced only with `overwrite` and only when this project wrote it, and a destination that is or holds the source
(or the current directory) is refused. Every problem of every part is listed in one ConversionError.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from configs import PRESETS, MaskGITConfig
from conversion import formats
from conversion.checks import check_config, message
from conversion.errors import CheckpointError, ConversionError, raise_all
from conversion.formats.common import CONFIG_FILE, materialize, read_config, read_config_file
from conversion.infer import infer_config
from conversion.tables import PARTS
from conversion.tree import as_flat
from maskgit_common import fileio


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint read into memory: canonical weights per part (flat flax paths -> np.ndarray), and `extras`, what
  the source holds besides the weights ({part: {...}}, e.g. the seed's AdamW state: conversion/formats/seed.py),
  read on first access (sampling never pays for an optimizer state)."""
  config: MaskGITConfig
  parts: dict
  format: str  # the FORMATS name it was read from
  paths: dict  # {part: file it came from}
  _extras: object = dataclasses.field(default_factory=dict, repr=False)  # a dict, or a function that reads it

  @property
  def extras(self) -> dict:
    self._extras = materialize(self._extras)
    return self._extras


@dataclasses.dataclass
class Converted:
  """What `convert` wrote."""
  config: MaskGITConfig
  source_format: str
  parts: tuple  # the parts written, in PARTS order
  dst: str
  removed: list  # leftovers of killed conversions removed beside dst

  def summary(self, to: str) -> str:
    config = self.config
    text = (f"wrote {self.dst}: {to} checkpoint of {config.name} ({config.image_size}px, {config.num_class} classes) "
            f"from {self.source_format} weights: {' + '.join(self.parts)}")
    absent = [p for p in PARTS if p not in self.parts]
    if absent:
      text += (f". The source holds no {' and no '.join(absent)}: sampling and editing need both models, so add "
               f"the {' and '.join(absent)} before using {self.dst} for them")
    for path in self.removed:
      text += f"\nremoved {path}, left by an interrupted conversion"
    return text


def resolve_config(config) -> MaskGITConfig | None:
  """A MaskGITConfig, a preset name, a config.json path or a directory holding one (None stays None)."""
  if config is None or isinstance(config, MaskGITConfig):
    return config
  if isinstance(config, str) and config in PRESETS:
    return PRESETS[config]()
  if isinstance(config, str) and os.path.isfile(config):
    return read_config_file(config)
  if isinstance(config, str) and os.path.isfile(os.path.join(config, CONFIG_FILE)):
    return read_config(config)
  raise ConversionError(f"config must be a MaskGITConfig, a preset name {sorted(PRESETS)} or a config.json path, "
                        f"got {config!r}")


def _open(path: str, config):
  """(config or None, format module, {part: file}, {part: flat or loader}, extras)."""
  fmt, files = formats.detect(path)
  file_config, parts, extras = fmt.read(path, config)
  paths = {p: files.get(p, next(iter(files.values()))) for p in parts}
  return config or file_config, fmt, paths, parts, extras


def _load_all(parts: Mapping, errors: list) -> dict:
  """Materialises every part, collecting unreadable files into `errors` instead of stopping at the first."""
  loaded = {}
  for part, value in parts.items():
    try:
      loaded[part] = materialize(value)
    except ConversionError as e:  # an unreadable file, or torch keys that do not fit the config
      errors.append(e)
  return loaded


def _missing(path: str, fmt, present: Sequence[str], required: Sequence[str]) -> CheckpointError | None:
  absent = [p for p in required if p not in present]
  if not absent:
    return None
  names = getattr(fmt, "FILES", {})
  expected = " and no ".join(f"{p} ({names[p]})" if p in names else p for p in absent)
  holds = f"only the {' and '.join(present)}" if present else "no model"
  why = " (sampling and editing use both)" if set(required) >= set(PARTS) else ""
  return CheckpointError(f"{path} holds no {expected}: it holds {holds} ({fmt.DESCRIPTION}); this needs the "
                         f"{' and the '.join(required)}{why}")


def read(path: str, config=None, *, parts: Sequence[str] | None = None, require: Sequence[str] = (),
         overrides: Sequence[str] = ()) -> Checkpoint:
  """Reads any checkpoint `formats` knows -> Checkpoint with canonical weights, every part checked.

  config: a MaskGITConfig, preset name or config.json path, used instead of the one stored with the weights; without
    either the config is inferred from the shapes. overrides ("sampler.num_iter=12", ...) then apply to it; one that
    changes a parameter shape fails with the list of mismatched parameters.
  parts: which parts to load (default all present); require: parts that must be present (CheckpointError naming
    the missing model otherwise).
  """
  path = os.fspath(path)
  config, fmt, paths, lazy, extras = _open(path, resolve_config(config))
  error = _missing(path, fmt, list(lazy), require)
  if error:
    raise error
  wanted = {p: v for p, v in lazy.items() if parts is None or p in parts}
  errors = []
  loaded = _load_all(lazy if config is None else wanted, errors)
  if config is None:
    raise_all(errors)  # the shapes of every part decide the config
    config = infer_config(loaded.get("tokenizer"), loaded.get("transformer"))
  if overrides:
    config = config.with_overrides(list(overrides))
  loaded = {p: loaded[p] for p in PARTS if p in wanted and p in loaded}
  errors += [m for p, flat in loaded.items() if (m := message(config, p, flat, "jax", paths[p]))]
  raise_all(errors)
  return Checkpoint(config, loaded, fmt.NAME, {p: paths[p] for p in loaded}, extras)


def write(dst: str, config: MaskGITConfig, parts: Mapping[str, Mapping], format: str = "torch", *,
          overwrite: bool = False, protect: Sequence[str] = (), extras: Mapping | None = None) -> str:
  """Writes canonical weights {part: flat (or nested flax tree)} as directory `dst` in `format`, atomically.

  Checks every part first (one ConversionError listing everything; nothing written). The caller's dicts are not
  modified. Returns the absolute path written.
  """
  writer = formats.writer(format)
  flats = {p: as_flat(w) for p, w in parts.items() if w is not None}
  if not flats:
    raise ConversionError(f"nothing to write to {dst}: give the tokenizer, the transformer or both")
  check_config(config, flats, layout="jax")
  dst = os.path.abspath(dst)
  with fileio.atomic_directory(dst, overwrite=overwrite, protect=protect) as tmp:
    writer.write(tmp, config, {p: dict(flats[p]) for p in PARTS if p in flats}, dict(extras or {}))
  return dst


def _checked_loader(config, part: str, value, path: str, errors: list):
  """A loader for the writer that checks the part and, after any failure, only checks (returns {}: skipped)."""
  def load():
    try:
      flat = materialize(value)
    except ConversionError as e:  # an unreadable file, or torch keys that do not fit the config
      errors.append(e)
      return {}
    problem = message(config, part, flat, "jax", path)
    if problem or errors:
      errors.extend([problem] if problem else [])
      return {}
    return flat
  return load


def convert(src: str, dst: str, to: str = "torch", config=None, overwrite: bool = False) -> Converted:
  """Converts any checkpoint `read` accepts into directory `dst` in format `to` ("torch" or "jax").

  One part at a time, each source array dropped once converted (peak memory ~ one copy of the largest part). A
  refused destination costs nothing: it is checked before anything is read. On any error nothing at `dst` changes.
  """
  writer = formats.writer(to)
  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  try:
    fileio.check_replaceable(dst, overwrite=overwrite, protect=(src,))
  except fileio.DestinationError as e:
    raise ConversionError(f"{e}; nothing was written") from None
  config, fmt, paths, lazy, extras = _open(src, resolve_config(config))
  errors = []
  if config is None:  # the shapes decide: every part is read now (and reused below)
    lazy = _load_all(lazy, errors)
    raise_all(errors)
    config = infer_config(lazy.get("tokenizer"), lazy.get("transformer"))
  removed = fileio.remove_stale_temporaries(dst)
  loaders = {p: _checked_loader(config, p, lazy.pop(p), paths[p], errors) for p in PARTS if p in lazy}
  with fileio.atomic_directory(dst, overwrite=overwrite, protect=(src, *paths.values())) as tmp:
    writer.write(tmp, config, loaders, extras)
    raise_all(errors)  # inside the block: the temporary goes, dst stays as it was
  return Converted(config, fmt.NAME, tuple(loaders), dst, removed)

