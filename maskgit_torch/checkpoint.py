"""Torch checkpoint directories: config.json + tokenizer.safetensors + transformer.safetensors.

Weights are safetensors only (never pickle). Writes are atomic: the directory is assembled beside the destination
and renamed into place, so an interrupted save never leaves a half-written checkpoint, and an existing non-empty
directory is only replaced when `overwrite=True`. Official msgpack checkpoints are read through `conversion`.
"""

from __future__ import annotations

import os
from typing import Mapping

import safetensors
import safetensors.torch
import torch
from torch import nn

from configs import ConfigError, MaskGITConfig
from maskgit_common import fileio
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer
from maskgit_common.errors import UserError

CONFIG_FILE = "config.json"
WEIGHT_FILES = {"tokenizer": "tokenizer.safetensors", "transformer": "transformer.safetensors"}
_MODULES = {"tokenizer": VQVAE, "transformer": Transformer}


class CheckpointError(UserError, ValueError):
  """A checkpoint directory or file is missing, malformed, or does not match its config; the message says which."""


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
  with fileio.atomic_directory(directory, overwrite=overwrite) as tmp:
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
