"""Torch checkpoint directories: config.json + tokenizer.safetensors + transformer.safetensors.

Weights are safetensors only (never pickle). Writes are atomic: the directory is assembled beside the destination
and renamed into place, so an interrupted save never leaves a half-written checkpoint, and an existing non-empty
directory is only replaced when `overwrite=True`. Official msgpack checkpoints are read through `conversion`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Mapping

import safetensors
import safetensors.torch
import torch
from torch import nn

from configs import ConfigError, MaskGITConfig
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHT_FILES = {"tokenizer": "tokenizer.safetensors", "transformer": "transformer.safetensors"}
_MODULES = {"tokenizer": VQVAE, "transformer": Transformer}


class CheckpointError(ValueError):
  """A checkpoint directory or file is missing, malformed, or does not match its config; the message says which."""


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
  """Yields a temporary directory beside `path`; on success it replaces `path`, on error it is removed.

  An existing non-empty `path` is refused unless `overwrite`; then it is moved aside and deleted only after the new
  directory is in place, so nothing is lost if anything fails.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise CheckpointError(f"destination {path} exists and is not a directory")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise CheckpointError(f"destination {path} exists and is not empty; choose another directory or pass "
                          f"overwrite=True")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it the permissions a plain mkdir would
  try:
    yield tmp
    for name in os.listdir(tmp):  # files written through mkstemp (atomic writers) are private; make them ordinary
      if os.path.isfile(os.path.join(tmp, name)):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    backup = None
    if os.path.isdir(path):
      if os.listdir(path):
        backup = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
        os.rename(path, os.path.join(backup, "old"))
      else:
        os.rmdir(path)
    try:
      os.rename(tmp, path)
    except BaseException:
      if backup is not None:
        os.rename(os.path.join(backup, "old"), path)
      raise
    if backup is not None:
      shutil.rmtree(backup, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _state_dict_of(module_or_state) -> dict:
  if isinstance(module_or_state, nn.Module):
    return module_or_state.state_dict()
  if isinstance(module_or_state, Mapping):
    return dict(module_or_state)
  raise CheckpointError(f"expected an nn.Module or a state dict, got {type(module_or_state).__name__}")


def _empty_module(config: MaskGITConfig, which: str) -> nn.Module:
  with torch.device("meta"):  # shapes only: no memory, no random init cost
    return _MODULES[which](config)


def check_state_dict(config: MaskGITConfig, which: str, state_dict: Mapping, source: str = "") -> None:
  """Raises CheckpointError listing every missing, unexpected and mis-shaped key at once."""
  expected = {k: tuple(v.shape) for k, v in _empty_module(config, which).state_dict().items()}
  got = {k: tuple(v.shape) for k, v in state_dict.items()}
  problems = [f"missing: {k} (expected shape {s})" for k, s in expected.items() if k not in got]
  problems += [f"unexpected: {k} (shape {s})" for k, s in got.items() if k not in expected]
  problems += [f"wrong shape: {k}: got {got[k]}, expected {s}" for k, s in expected.items()
               if k in got and got[k] != s]
  if problems:
    where = f" in {source}" if source else ""
    raise CheckpointError(f"{which} weights{where} do not match the config ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))


def write_state_dict(path: str, state_dict: Mapping, which: str) -> None:
  """One safetensors file (contiguous CPU tensors; metadata records which model it holds)."""
  tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
  safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "maskgit": which})


def read_state_dict(path: str, device: str = "cpu") -> dict:
  try:
    return safetensors.torch.load_file(path, device=str(device))
  except (OSError, safetensors.SafetensorError) as e:
    raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def save_checkpoint_dir(directory: str, config: MaskGITConfig, tokenizer=None, transformer=None,
                        overwrite: bool = False) -> None:
  """Writes config.json plus the given models (modules or state dicts) as safetensors, atomically."""
  models = {name: _state_dict_of(m) for name, m in (("tokenizer", tokenizer), ("transformer", transformer))
            if m is not None}
  if not models:
    raise CheckpointError("save_checkpoint_dir needs a tokenizer, a transformer, or both")
  for which, state in models.items():
    check_state_dict(config, which, state)
  with atomic_directory(directory, overwrite) as tmp:
    config.save(os.path.join(tmp, CONFIG_FILE))
    for which, state in models.items():
      write_state_dict(os.path.join(tmp, WEIGHT_FILES[which]), state, which)


def load_checkpoint_dir(directory: str, device: str | torch.device = "cpu"):
  """Reads a torch checkpoint directory -> (config, VQVAE or None, Transformer or None), modules in eval mode."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a torch checkpoint directory (official msgpack "
                          f"checkpoints are converted with `python run.py convert --to torch`)")
  try:
    config = MaskGITConfig.load(config_path)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None
  present = {w: os.path.join(directory, f) for w, f in WEIGHT_FILES.items()
             if os.path.isfile(os.path.join(directory, f))}
  if not present:
    raise CheckpointError(f"{directory} holds neither {WEIGHT_FILES['tokenizer']} nor "
                          f"{WEIGHT_FILES['transformer']}")
  modules = {}
  for which, path in present.items():
    state = read_state_dict(path, device)
    check_state_dict(config, which, state, path)
    module = _empty_module(config, which)
    module.load_state_dict(state, strict=True, assign=True)
    modules[which] = module.eval()
  return config, modules.get("tokenizer"), modules.get("transformer")
