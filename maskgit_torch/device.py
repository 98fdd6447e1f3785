"""The one place the torch backend turns a `--device` value into a torch.device (pipelines and trainers), and what
it knows about the CPU it runs on: its ISA features and the kernel choices measured on it."""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

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
_MIN_ROUND_S, _MAX_CALLS = 5e-4, 200  # a timed round of a candidate lasts this long (in at most this many calls)


def _pinned(name: str) -> str | None:
  for item in os.environ.get(KERNEL_ENV, "").split(","):
    key, _, value = item.partition("=")
    if key.strip() == name and value.strip():
      return value.strip()
  return None


def fastest(name: str, candidates: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
            repeats: int = 5, shape: str | None = None) -> str:
  """The key of the fastest of `candidates` (functions computing the same values) on inputs like x, measured once
  per process and input size class on the running CPU, or pinned by $MASKGIT_TORCH_KERNELS ("name=key,...").
  Element-wise kernels are timed on a slice of x and keyed by its size class; kernels whose speed depends on the
  shape (a GEMM) pass `shape`, a label of it, and are timed on x itself, once per label.

  Interleaved rounds, the minimum of `repeats` per candidate, on up to 2^20 elements of x (read only); a round
  repeats a candidate until it lasts ~0.5 ms (up to 200 calls: a single call of microseconds is within the timer's
  jitter). The winner differs between CPUs (the torch GELU: F.gelu's tanh form was faster on an AVX-512 + AMX Xeon,
  x * sigmoid(2u) on an AVX2 EPYC; on an AVX-512 Xeon without AMX the two are close and either wins from run to
  run), so no machine's answer is written into the code. `kernel_choices()` lists what was chosen.
  """
  pinned = _pinned(name)
  if pinned is not None:
    if pinned not in candidates:
      raise DeviceError(f"${KERNEL_ENV}: {name}={pinned} is not one of {sorted(candidates)}")
    return pinned
  key = (name, shape or f"< {2 ** min(x.numel(), _SAMPLE).bit_length()} elements")
  if key not in _CHOICES:
    sample = x if shape else x.contiguous().reshape(-1)[:_SAMPLE]

    def seconds(fn, calls=1):
      start = time.perf_counter()
      for _ in range(calls):
        fn(sample)
      return (time.perf_counter() - start) / calls

    for fn in candidates.values():
      seconds(fn)  # warm-up: allocations, lazy initialisation (e.g. MKL's packing)
    calls = {k: max(1, min(_MAX_CALLS, round(_MIN_ROUND_S / max(seconds(fn), 1e-9)))) for k, fn in candidates.items()}
    best = {k: float("inf") for k in candidates}
    for _ in range(repeats):
      for k, fn in candidates.items():
        best[k] = min(best[k], seconds(fn, calls[k]))
    _CHOICES[key] = min(best, key=best.get)
  return _CHOICES[key]


def kernel_choices() -> dict:
  """{"name (< N elements)": chosen key} for every choice `fastest` made in this process."""
  return {f"{name} ({label})": k for (name, label), k in sorted(_CHOICES.items())}


# MKL's packed GEMM -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mkl_packing() -> bool:
  try:  # private ops (torch's inductor uses them for frozen CPU graphs): absent from builds without MKL
    return torch.backends.mkl.is_available() and bool(torch.ops.mkl._mkl_linear and
                                                      torch.ops.mkl._mkl_reorder_linear_weight)
  except (AttributeError, RuntimeError):
    return False


PACKED_MAX_ROWS = 4096


class PackedLinear:
  """F.linear(x, weight, bias) for float32 CPU inference, through MKL's packed sgemm where that measures faster.

  Plain sgemm repacks the weight into its kernels' panel layout on every call; `cblas_sgemm_pack` does it once for
  a (rows, N, K) and `cblas_sgemm_compute` then streams the packed copy. Measured on a 2-core AVX-512 Xeon for the
  96 GEMMs of one ImageNet-256 transformer forward: 445 -> 365 ms at batch 1 (257 rows), 1655 -> 1608 ms at batch
  4, so it is chosen per GEMM shape by `fastest("linear", ...)` on the running CPU (pin it off with
  $MASKGIT_TORCH_KERNELS=linear=addmm). The same dot products; MKL may block the K sum otherwise (measured <= 3e-5 on
  outputs of size ~50, float32 rounding). The packed copy (as large as the weight: +656 MiB for the ImageNet
  transformer) is kept for the last row count seen, and made again when the weight is replaced or changed in place
  (its data pointer or version changes) or the row count changes. Autograd, autocast, other devices and dtypes,
  weights made in inference mode (no version counter to watch) and torch.compile take F.linear. Not pickled or
  copied. Above PACKED_MAX_ROWS rows plain sgemm is taken without measuring: there its own packing is a small share
  of the work (the same 96 GEMMs, 24 layers' worth: 0% at 4112 rows, 2% at 16448, vs 11% at 2056), and timing
  both would cost seconds per shape.
  """

  def __init__(self):
    self._cache = None  # ((data_ptr, version, rows), packed weight)
    self._choice = None  # ((rows, weight shape, $MASKGIT_TORCH_KERNELS), fastest()'s key): the per-call path

  def __deepcopy__(self, memo):
    return PackedLinear()  # MKL's packed tensors are opaque (no storage to copy); a copy packs its own

  def __getstate__(self):
    return {"_cache": None, "_choice": None}

  @staticmethod
  def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a call takes the measured choice (float32 CPU inference, MKL present), not plain F.linear."""
    return (not torch.compiler.is_compiling()  # first: under torch.compile nothing else here is traced
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")  # bfloat16 autocast: MKL's op has no autocast rule
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not weight.is_inference() and _mkl_packing())

  def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    if not self.applies(x, weight) or rows > PACKED_MAX_ROWS:
      return F.linear(x, weight, bias)
    if self._kernel(x, weight, bias, rows) == "mkl_packed":
      return self._packed(x, weight, bias, rows)
    return F.linear(x, weight, bias)

  def _kernel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> str:
    """fastest()'s choice for this GEMM shape, remembered here for the last shape and pin seen: a lookup through
    fastest() costs ~3 us a call, a third of a small model's GEMM (17 x 32 -> 32: 9 us), measured here."""
    key = (rows, weight.shape, os.environ.get(KERNEL_ENV))
    if self._choice is None or self._choice[0] != key:
      candidates = {"addmm": lambda t: F.linear(t, weight, bias),
                    "mkl_packed": lambda t: self._packed(t, weight, bias, rows)}
      shape = f"{rows} x {weight.shape[1]} -> {weight.shape[0]}"
      self._choice = (key, fastest("linear", candidates, x, shape=shape))
    return self._choice[1]

  def _packed(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, rows)  # pylint: disable=protected-access
    cache = self._cache
    if cache is None or cache[0] != key:
      with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
        cache = self._cache = (key, torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), rows))
    return torch.ops.mkl._mkl_linear(x, cache[1], weight, bias, rows)


def hooked(module: torch.nn.Module) -> bool:
  """Whether forward hooks watch `module` or a submodule (parity_tests.intermediates): the fast inference paths,
  which skip or fuse submodule calls, then give way to the module-by-module forward the hooks expect."""
  # pylint: disable=protected-access
  everywhere = torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
  return bool(everywhere or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()))
