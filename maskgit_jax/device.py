"""The one place the JAX backend turns a `--device` value into a jax.Device (pipelines and trainers).

JAX places arrays on its default backend; a named device is honoured by committing the weights (and hence every
computation on them) to it, and a device this jaxlib cannot reach is an error, never a silent fall back to the CPU.
"""

from __future__ import annotations

import jax

from maskgit_common.errors import UserError

DEVICE_HELP = "auto (JAX's default backend), cpu, cuda / gpu (or cuda:N), tpu (or tpu:N)"
_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}


class DeviceError(UserError, ValueError):
  """A `--device` value that is not a device, or one this jaxlib has no backend for."""


def resolve(device: str = "auto") -> jax.Device:
  """'auto' -> jax.devices()[0]; 'cpu' | 'cuda' | 'gpu' | 'tpu' (optionally ':N') -> that device, or DeviceError."""
  device = str(device)
  if device == "auto":
    return jax.devices()[0]
  name, _, index = device.partition(":")
  if name not in _PLATFORMS or (index and not index.isdigit()):
    raise DeviceError(f"--device {device!r} is not a device; use {DEVICE_HELP}")
  try:
    devices = jax.devices(_PLATFORMS[name])
  except RuntimeError:
    raise DeviceError(f"--device {device}: this jaxlib ({jax.__version__}, backends: "
                      f"{', '.join(sorted({d.platform for d in jax.devices()}))}) has no {name} backend; install "
                      f"the matching jax build (e.g. jax[cuda13]) or use cpu / auto") from None
  i = int(index or 0)
  if i >= len(devices):
    raise DeviceError(f"--device {device}: JAX sees {len(devices)} {name} device(s)")
  return devices[i]
