"""Canonical weights <-> torch: modules and state dicts for a config (mirrors `maskgit_jax/checkpoint.py`).

Reading and writing files, formats, key/shape checks and config inference are the weights layer's (`conversion`);
this module only turns its canonical weights (flat flax paths -> np.ndarray) into torch tensors and modules, and back.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

import conversion
from conversion import PARTS, CheckpointError  # noqa: F401  (CheckpointError: the one checkpoint error, re-exported)
from conversion.formats.torch_pickle import to_numpy, to_tensor
from configs import MaskGITConfig
from maskgit_torch import families


def make_model(config: MaskGITConfig, part: str, **kwargs) -> nn.Module:
  """The module of `part` for the config's family (families.model_class), initialised as that family's reference
  code does, from torch's global RNG."""
  return families.model_class(config, part)(config, **kwargs)


def expected_shapes(config: MaskGITConfig, part: str) -> dict:
  """{state_dict key: shape} of the module (built on the meta device: nothing allocated)."""
  with torch.device("meta"):
    return {k: tuple(v.shape) for k, v in make_model(config, part).state_dict().items()}


def _state_dict(config: MaskGITConfig, part: str, flat: dict, consume: bool) -> dict:
  state = conversion.to_torch_layout(config, part, flat, consume=consume)
  return {k: to_tensor(state.pop(k)) for k in list(state)}


def from_flat(config: MaskGITConfig, part: str, flat: dict) -> dict:
  """Canonical weights -> torch state_dict {key: CPU tensor}; ConversionError listing every mismatch."""
  return _state_dict(config, part, flat, consume=False)


def to_flat(config: MaskGITConfig, part: str, weights) -> dict:
  """An nn.Module or a state dict -> canonical weights (numpy; identity-layout arrays may share the tensors' memory)."""
  state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
  return conversion.from_torch_layout(config, part, {k: to_numpy(v) for k, v in state.items()})


def _module_from_flat(config: MaskGITConfig, part: str, flat: dict) -> nn.Module:
  """Canonical weights (consumed: one copy in memory) -> the part's module in eval mode; no random init (built on
  the meta device, the weights assigned)."""
  with torch.device("meta"):
    module = make_model(config, part)
  module.load_state_dict(_state_dict(config, part, flat, consume=True), strict=True, assign=True)
  return module.eval()


def load_checkpoint(path: str, config=None, *, parts: Sequence[str] = PARTS, overrides: Sequence[str] = (),
                    device: str | torch.device = "cpu") -> tuple[MaskGITConfig, dict]:
  """Any checkpoint `conversion.read` accepts -> (config, {part: nn.Module in eval mode on `device`}).

  Every part in `parts` must be present (CheckpointError naming the missing model otherwise).
  """
  checkpoint = conversion.read(path, config, parts=parts, require=parts, overrides=overrides)
  modules = {p: _module_from_flat(checkpoint.config, p, checkpoint.parts.pop(p)).to(device)
             for p in list(checkpoint.parts)}
  return checkpoint.config, modules


def save_checkpoint(directory: str, config: MaskGITConfig, models: Mapping, *, overwrite: bool = False,
                    protect: Sequence[str] = ()) -> str:
  """Writes {part: nn.Module or state dict} as a torch checkpoint directory (config.json + safetensors), atomically."""
  flats = {p: to_flat(config, p, m) for p, m in models.items() if m is not None}
  return conversion.write(directory, config, flats, format="torch", overwrite=overwrite, protect=protect)
