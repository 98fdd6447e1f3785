"""Resumable training state in PyTorch: one safetensors file per checkpoint, for both trainers (no pickle).

`state.safetensors` inside a checkpoint directory (maskgit_common.training.CheckpointDir) holds
  model/<name>                    the module's state_dict
  optimizer/<param name>/<key>    the optimizer's per-parameter state (Adam: step, exp_avg, exp_avg_sq)
  <group>/<name>                  any extra float tensors by group, e.g. ema/<param name> (the polyak weights)
Step, data position and RNG scheme are in the checkpoint's manifest. The JAX trainers' counterpart is
maskgit_jax/train_state.py (an orbax PyTree); these are the project's two resumable-state formats.
"""

from __future__ import annotations

import os

import safetensors.torch
import torch

STATE_FILE = "state.safetensors"


def save(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
  """Writes model, optimizer and `extra` tensors (group -> {name: tensor}) to directory/state.safetensors."""
  tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
  names = {id(p): n for n, p in model.named_parameters()}
  for p, state in optimizer.state.items():
    for key, value in state.items():
      tensors[f"optimizer/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
  for group, values in (extra or {}).items():
    tensors.update({f"{group}/{k}": v.detach().cpu().contiguous() for k, v in values.items()})
  safetensors.torch.save_file(tensors, os.path.join(directory, STATE_FILE))


def restore(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
  """Loads `save`'s file into model, optimizer and the `extra` tensors (copied in place), bit for bit."""
  device = next(model.parameters()).device
  tensors = safetensors.torch.load_file(os.path.join(directory, STATE_FILE), device=str(device))
  model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
  for group, values in (extra or {}).items():
    with torch.no_grad():
      for name, value in values.items():
        value.copy_(tensors[f"{group}/{name}"])
  state = {}
  for index, (name, _) in enumerate(model.named_parameters()):
    prefix = f"optimizer/{name}/"
    entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if entry:
      # torch keeps Adam's `step` on the CPU (a float tensor); the moments live beside their parameter.
      state[index] = {k: (v.cpu() if k == "step" else v) for k, v in entry.items()}
  optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
