"""Checkpoint formats: one module per format, registered in `FORMATS` (adding a format is one module + one line).

A format module has
  NAME, DESCRIPTION              its name (`conversion.write(..., format=NAME)`) and what it is, for messages;
  detect(path) -> dict | None    the files it would read ({part or label: file}) when `path` is in this format;
  read(path, config=None) -> (config or None, {part: flat}, extras)
                                 canonical weights (flat flax paths, numpy) per part; a part may be a zero-argument
                                 function that loads it, so a converter holds one part at a time. The config is the
                                 one stored with the weights (None: the caller's, else inferred from the shapes);
                                 `config` is what the caller gave, for formats that need it to read (torch keys).
                                 extras: {part: {...}} the source holds besides the weights (the seed's AdamW state,
                                 ...), or a zero-argument function reading them;
  write(tmp, config, parts, extras)   optional: writes the parts (flat dicts or loaders, each materialised once; an
                                 empty one is skipped), the config and the extras (a dict or a function: keep what
                                 the format can hold) into `tmp`, a directory `fileio` then publishes;
  READS_PYTORCH = True           optional: the format reads PyTorch pickles (so messages can say "convert it").
Detection must be unambiguous: a path more than one format claims is refused, naming them.
"""

from __future__ import annotations

import os

from conversion.errors import CheckpointError, ConversionError
from conversion.formats import jax_dir, official_dir, seed, single_file, torch_dir
from conversion.formats.sniff import pytorch_message, sniff

FORMATS = {f.NAME: f for f in (torch_dir, jax_dir, official_dir, single_file, seed)}


def writers() -> list[str]:
  return [name for name, f in FORMATS.items() if hasattr(f, "write")]


def writer(name: str):
  if name not in writers():
    raise ConversionError(f"cannot write format {name!r}; formats written: {writers()}")
  return FORMATS[name]


def reads_pytorch() -> bool:
  return any(getattr(f, "READS_PYTORCH", False) for f in FORMATS.values())


def _nothing_here(path: str) -> CheckpointError:
  kind = sniff(path)
  if kind == "missing":
    return CheckpointError(f"checkpoint {path} does not exist")
  if kind in ("torch_zip", "torch_pickle"):
    return CheckpointError(pytorch_message(path, kind, "a checkpoint format this project reads", reads_pytorch()))
  expected = "; ".join(f.DESCRIPTION for f in FORMATS.values())
  if kind == "directory":
    names = sorted(os.listdir(path))
    return ConversionError(f"{path} holds no MaskGIT checkpoint; expected {expected}. Found {names[:20]}")
  return ConversionError(f"{path} is not a checkpoint this project reads ({kind}); expected {expected}")


def detect(path: str):
  """(format module, {part or label: file}) for `path`; CheckpointError when no format or several claim it."""
  claims = {}
  for name, f in FORMATS.items():
    files = f.detect(path)
    if files:
      claims[name] = files
  if not claims:
    raise _nothing_here(path)
  if len(claims) > 1:
    held = "; ".join(f"{FORMATS[n].DESCRIPTION}: {sorted(os.path.basename(p) for p in files.values())}"
                     for n, files in claims.items())
    raise ConversionError(f"{path} is ambiguous: it holds {held}. Pass one file, or a directory with one format")
  (name, files), = claims.items()
  return FORMATS[name], files
