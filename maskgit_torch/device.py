"""The one place the torch backend turns a `--device` value into a torch.device (pipelines and trainers)."""

from __future__ import annotations

import os

import torch

from maskgit_common.errors import UserError

DEVICE_HELP = "auto (a GPU when there is one, else the CPU), cpu, cuda (gpu) or cuda:N"


class DeviceError(UserError, ValueError):
  """A `--device` value that is not a device, or one this machine does not have."""


def resolve(device: str | torch.device = "auto") -> torch.device:
  """'auto' -> cuda (this process's LOCAL_RANK GPU under torchrun) when available, else cpu; otherwise the named
  device, refused when it is not a torch device or not present here."""
  if str(device) == "auto":
    if torch.cuda.is_available():
      return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
  if str(device) == "tpu":
    raise DeviceError("--device tpu: the torch backend does not run on TPUs (out of scope); use --backend jax there")
  try:
    resolved = torch.device("cuda" + str(device)[3:] if str(device).startswith("gpu") else device)
  except (RuntimeError, TypeError):
    raise DeviceError(f"--device {device!r} is not a device; use {DEVICE_HELP}") from None
  if resolved.type not in ("cpu", "cuda"):
    raise DeviceError(f"--device {device!r}: the torch backend runs on cpu or cuda; use {DEVICE_HELP}")
  if resolved.type == "cuda":
    if not torch.cuda.is_available():
      raise DeviceError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                        f"use cpu or auto")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
      raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
  return resolved


def native_cpu_bfloat16() -> bool:
  """Whether this CPU has bfloat16 arithmetic (oneDNN uses AVX512-BF16 or AMX); otherwise it is emulated."""
  try:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # pylint: disable=protected-access
  except (AttributeError, RuntimeError):  # a build without oneDNN
    return False
