"""The one place the torch backend turns a `--device` value into a torch.device (pipelines and trainers), and what
it knows about the CPU it runs on: its ISA features and the kernel choices measured on it."""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Mapping

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


# The CPU ---------------------------------------------------------------------------------------------------------
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset:
  """The ISA extensions of this CPU that matter to torch's float32/bfloat16 kernels (names as Linux's
  /proc/cpuinfo spells them); elsewhere, what torch's own cpuinfo reports."""
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split()) & frozenset(_ISA_FLAGS)
  except OSError:
    pass
  probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
            "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
  return frozenset(flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)())


def cpu_isa() -> str:
  """One line for benchmark headers: torch's vector kernels' level and the bfloat16/AMX units."""
  features = cpu_features()
  units = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16") if f in features]
  return f"{torch.backends.cpu.get_cpu_capability()} kernels, " + (", ".join(units) if units else "no VNNI/BF16/AMX")


def native_cpu_bfloat16() -> bool:
  """Whether this CPU computes in bfloat16 natively (AVX512-BF16 dot products or AMX-BF16 tiles, which oneDNN uses
  for bfloat16 matmuls and convolutions); without them oneDNN emulates bfloat16 with float32 arithmetic and
  conversions, slower than float32 itself. (oneDNN's own `_is_mkldnn_bf16_supported` is also true on plain
  AVX-512, where it emulates.)"""
  return bool({"avx512_bf16", "amx_bf16"} & cpu_features())


# Kernel choices measured on this CPU -----------------------------------------------------------------------------
_CHOICES: dict = {}
KERNEL_ENV = "MASKGIT_TORCH_KERNELS"  # e.g. "gelu=tanh": pins a choice (reproducible runs, tests)
_SAMPLE = 1 << 20  # elements a micro-benchmark runs on: large enough for the kernels' throughput, ~1 ms a call


def _pinned(name: str) -> str | None:
  for item in os.environ.get(KERNEL_ENV, "").split(","):
    key, _, value = item.partition("=")
    if key.strip() == name and value.strip():
      return value.strip()
  return None


def fastest(name: str, candidates: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
            repeats: int = 5) -> str:
  """The key of the fastest of `candidates` (functions computing the same values) on inputs like x, measured once
  per process and input size class on the running CPU, or pinned by $MASKGIT_TORCH_KERNELS ("name=key,...").

  Interleaved rounds, the minimum of `repeats` per candidate, on up to 2^20 elements of x (read only): the winner
  differs between CPUs (the torch GELU: F.gelu's tanh form was faster on an AVX-512 + AMX Xeon, x * sigmoid(2u)
  on an AVX-512 Xeon without AMX and on an AVX2 EPYC), so no machine's answer is written into the code.
  `kernel_choices()` lists what was chosen.
  """
  pinned = _pinned(name)
  if pinned is not None:
    if pinned not in candidates:
      raise DeviceError(f"${KERNEL_ENV}: {name}={pinned} is not one of {sorted(candidates)}")
    return pinned
  size_class = min(x.numel(), _SAMPLE).bit_length()
  key = (name, size_class)
  if key not in _CHOICES:
    sample = x.reshape(-1)[:_SAMPLE] if x.is_contiguous() else x.contiguous().reshape(-1)[:_SAMPLE]
    best = {k: float("inf") for k in candidates}
    for round_ in range(repeats + 1):  # round 0 warms up (allocations, lazy initialisation)
      for k, fn in candidates.items():
        start = time.perf_counter()
        fn(sample)
        if round_:
          best[k] = min(best[k], time.perf_counter() - start)
    _CHOICES[key] = min(best, key=best.get)
  return _CHOICES[key]


def kernel_choices() -> dict:
  """{"name (< N elements)": chosen key} for every choice `fastest` made in this process."""
  return {f"{name} (< {2 ** size_class} elements)": k for (name, size_class), k in sorted(_CHOICES.items())}


def hooked(module: torch.nn.Module) -> bool:
  """Whether forward hooks watch `module` or a submodule (parity_tests.intermediates): the fast inference paths,
  which skip or fuse submodule calls, then give way to the module-by-module forward the hooks expect."""
  # pylint: disable=protected-access
  everywhere = torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
  return bool(everywhere or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()))
