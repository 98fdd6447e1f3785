"""The per-step numbers of the seed's and Halton-MaskGIT's decoders, as their torch code computes them (numpy).

Both references compute their schedules with torch float32 ops on the CPU; reproducing their integer counts needs
the same roundings, so this module replays them:
  - `torch.linspace` (aten's CPU kernel, vectorised builds: AVX2/AVX512): element i is `start + step * i` for the
    first half and `end - step * (steps - 1 - i)` for the rest, each a fused multiply-add (the kernels are compiled
    with FMA contraction); `step = (end - start) / (steps - 1)` in float32. The plain-C build
    (ATEN_CPU_CAPABILITY=default) rounds without FMA and can differ in the last bit;
  - `Tensor.sum()` over float32 (aten's cascade sum): 8-lane vector partial sums in groups of 4 vectors, the tail
    and then the 8 lanes added in order (scalar 4-way interleaving below 8 elements);
  - `torch.round` is round-half-to-even (numpy's `rint`);
  - cos, arccos and sqrt are correctly rounded float32 values here, while torch's vectorised CPU kernels can be one
    ulp off (the counts below are rounded from them; the tests check the counts equal torch's for every shape,
    T in 1..64 and many grid sizes).
"""

from __future__ import annotations

import math

import numpy as np

from maskgit_common import schedules

_F32 = np.float32
SEED_SCHEDULES = ("root", "linear", "square", "cosine", "arccos")  # Trainer/vit.py adap_sche


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """(steps,) float32 equal to `torch.linspace(start, end, steps)` on a vectorised CPU build (module docstring)."""
  start, end = _F32(start), _F32(end)
  if steps == 1:
    return np.array([start], _F32)
  step = _F32((end - start) / _F32(steps - 1))
  i = np.arange(steps)
  first = schedules._fma(np.full(steps, step), i.astype(_F32), np.full(steps, start))
  second = schedules._fma(np.full(steps, -step), (steps - 1 - i).astype(_F32), np.full(steps, end))
  return np.where(i < steps // 2, first, second).astype(_F32)


def _interleaved_sum(items: list) -> np.ndarray:
  """aten's `row_sum`: 4 interleaved accumulators (with its cascade levels), the leftovers into the first, then
  the accumulators added in order. `items` are float32 scalars or equal-shaped vectors."""
  def add(a, b):
    return (a + b).astype(_F32)

  zero = np.zeros(np.shape(items[0]) if items else (), _F32)
  rows = len(items) // 4
  levels = [[zero] * 4 for _ in range(4)]
  step = 1 << max(4, (math.ceil(math.log2(rows)) if rows > 1 else 0) // 4)
  i = 0
  while i + step <= rows:  # every `step` rows the level-0 partials move up (aten's multi_row_sum)
    for _ in range(step):
      levels[0] = [add(levels[0][k], items[4 * i + k]) for k in range(4)]
      i += 1
    for j in range(1, 4):
      levels[j] = [add(levels[j][k], levels[j - 1][k]) for k in range(4)]
      levels[j - 1] = [zero] * 4
      if i & ((step - 1) << (j * int(math.log2(step)))):
        break
  for i in range(i, rows):
    levels[0] = [add(levels[0][k], items[4 * i + k]) for k in range(4)]
  acc = levels[0]
  for j in range(1, 4):
    acc = [add(acc[k], levels[j][k]) for k in range(4)]
  for item in items[4 * rows:]:
    acc[0] = add(acc[0], item)
  for k in range(1, 4):
    acc[0] = add(acc[0], acc[k])
  return acc[0]


def torch_sum(x) -> np.float32:
  """`torch.as_tensor(x, dtype=float32).sum()` for a 1-D array, with aten's order of additions (module docstring)."""
  x = np.asarray(x, _F32).reshape(-1)
  lanes = 8
  if len(x) < lanes:
    return _F32(_interleaved_sum(list(x))) if len(x) else _F32(0)
  vectors = len(x) // lanes
  partial = _interleaved_sum([x[lanes * i:lanes * (i + 1)] for i in range(vectors)])
  total = _F32(0)
  for value in list(x[vectors * lanes:]) + list(partial):
    total = _F32(total + value)
  return total


def seed_counts(num_iter: int, mode: str, num_tokens: int) -> np.ndarray:
  """(T,) int32: the seed's `adap_sche(step, mode)` (Trainer/vit.py), the tokens revealed at each step.

  r = linspace(1, 0, T); val = 1 - r**.5 (root), 1 - r (linear), 1 - r**2 (square), cos(r pi/2) (cosine: it
  increases over the steps) or arccos(r) / (pi/2) (arccos); s = round(val / sum(val) * L) half to even, zeros
  raised to 1, the last entry absorbing L - sum(s) (it can be <= 0 when the ones overshoot; the seed's loop stops
  before it, once every token is known). T = 1 has no schedule (0 / 0 in the seed): callers require T >= 2.
  """
  if mode not in SEED_SCHEDULES:
    raise ValueError(f"seed schedule must be one of {list(SEED_SCHEDULES)}, got {mode!r}")
  r = torch_linspace(1.0, 0.0, num_iter)
  with np.errstate(invalid="ignore", divide="ignore"):
    if mode == "root":
      val = _F32(1) - np.sqrt(r)
    elif mode == "linear":
      val = _F32(1) - r
    elif mode == "square":
      val = _F32(1) - r * r
    elif mode == "cosine":  # torch: (r * pi) * 0.5, then cos
      val = np.cos((r * _F32(math.pi)).astype(np.float64) * 0.5).astype(_F32)
    else:
      val = (np.arccos(r.astype(np.float64)).astype(_F32) / _F32(math.pi * 0.5)).astype(_F32)
    s = np.rint((val.astype(_F32) / torch_sum(val)).astype(_F32) * _F32(num_tokens)).astype(_F32)
  s[s == 0] = 1
  s[-1] = _F32(s[-1] + _F32(_F32(num_tokens) - torch_sum(s)))
  return s.astype(np.int32)


def halton_counts(num_iter: int, num_tokens: int) -> np.ndarray:
  """(T,) int64: Halton-MaskGIT's cumulative count after each step (Sampler/halton_sampler.py l.100-103):
  r = max(i + 1, int(N * (1 - arccos((i + 1) / T) / (pi / 2)))), all in float32 as its torch code (the ratio a
  0-d float32 tensor, int() truncating). Step i writes the cells order[r_{i-1}:r_i] (l.106)."""
  out = []
  for i in range(num_iter):
    ratio = _F32((i + 1) / num_iter)
    angle = _F32(np.arccos(np.float64(ratio)))
    fraction = _F32(_F32(1) - _F32(angle / _F32(math.pi * 0.5)))
    out.append(max(i + 1, int(_F32(fraction * _F32(num_tokens)))))
  return np.asarray(out, np.int64)


def torch_pow(x, exponent: float) -> np.ndarray:
  """float32 `tensor ** exponent` as aten computes it: the special cases it dispatches (0, 1, 2, 3, -1, -2, +-0.5)
  and otherwise the double-precision power of the float32 value, rounded."""
  x = np.asarray(x, _F32)
  special = {0.0: lambda v: np.ones_like(v), 1.0: lambda v: v, 2.0: lambda v: v * v, 3.0: lambda v: v * v * v,
             -1.0: lambda v: _F32(1) / v, -2.0: lambda v: _F32(1) / (v * v), 0.5: np.sqrt,
             -0.5: lambda v: _F32(1) / np.sqrt(v)}
  if float(exponent) in special:
    return np.asarray(special[float(exponent)](x), _F32)
  return (x.astype(np.float64) ** float(exponent)).astype(_F32)


def halton_temperatures(num_iter: int, t_min: float, t_max: float, power: float, warmup: int) -> np.ndarray:
  """(T,) float32 Halton-MaskGIT's softmax scale per step: linspace(sm_temp_min, sm_temp_max, T) (l.42) to the
  power temp_pow (l.113), halved during the first temp_warmup steps (l.114-115); logits are multiplied by it."""
  temps = torch_pow(torch_linspace(t_min, t_max, num_iter), power)
  temps[:warmup] = temps[:warmup] * _F32(0.5)
  return temps.astype(_F32)
