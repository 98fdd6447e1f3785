"""Mask schedules as plain numpy float32: the reference both backends and the training masks share.

`mask_ratio(ratio, total_unknown, method)` reproduces the official `maskgit/libml/mask_schedule.schedule` bit for
bit as the golden fixtures record it (official code, jax on CPU, float32), plus three curves named after the seed's
shapes (`arccos`, `square`, `root`; `linear` is the official alias of `uniform`), which the official decoder uses
the official way, floor(N0 * gamma((t + 1) / T)) tokens re-masked: they share the seed's names, not its per-step
counts (those are `maskgit_common.seed_schedules.seed_counts`, sampler.decoder=seed). Every result is clipped to
[1e-6, 1] as the official code does.

Bit-exactness needs the transcendental functions of XLA's CPU backend, not numpy's (which differ by an ulp on about
a third of the inputs):
  - `cos` and `pow` are the C library's `cosf` and `powf` (XLA CPU calls them through LLVM); we call the same ones;
  - `log` and `exp` are XLA's own vectorised float32 approximations (Cephes polynomials), whose multiply-adds the
    CPU code generator contracts into fused multiply-adds; `_xla_log` / `_xla_exp` replay them operation for
    operation, with an exactly rounded float32 FMA;
  - `jnp.log2(x)` is `log(x) / log(2)`, which XLA folds to `log(x) * 1.442695f`; `jnp.exp2(x)` is
    `exp(0.6931472f * x)`;
  - XLA rewrites `a / broadcast(b)` as `a * broadcast(1 / b)`, so the official `log` schedule divides exactly when
    `total_unknown` has the full output shape (the decoder: a scalar ratio over (B,) counts) and multiplies by the
    reciprocal when it is broadcast (a grid of ratios against a column of counts); `_divide` follows the same rule.
Where libm is not loadable (non-glibc platforms) `cos` and `pow` fall back to correctly rounded float64 values,
which can differ from XLA in the last bit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np

# Official methods; `powX` takes any exponent X > 0 (configs.schema.check_schedule_name validates names).
OFFICIAL_METHODS = ("uniform", "linear", "cosine", "log", "exp")
SEED_METHODS = ("arccos", "square", "root")

_F32 = np.float32
_HALF_PI = _F32(math.pi / 2.0)  # the official `math.pi / 2. * ratio` multiplies a float32 ratio by this
_INV_LN2 = _F32(1.0) / _F32(math.log(2.0))  # XLA folds `log(x) / log(2)` into this multiply
_LN2 = _F32(math.log(2.0))  # jax lowers exp2(x) to exp(ln2 * x)


def _bits(value: int) -> np.float32:
  return np.array([value], np.uint32).view(np.float32)[0]


# XLA CPU float32 log (Cephes logf): x = m * 2^e, m in [sqrt(1/2), sqrt(2)), log(1 + (m - 1)) by a polynomial.
_LOG_SQRT_HALF = _bits(0x3F3504F3)
_LOG_P = [_bits(b) for b in (0x3D9021BB, 0xBDEBD1B8, 0xBDFE5D4F, 0x3E11E9BF, 0x3E4CCEAC, 0xBE7FFFFC,
                             0x3DEF251A, 0xBE2AAE50, 0x3EAAAAAA)]
_LN2_HI, _LN2_LO = _bits(0x3F318000), _bits(0xB95E8083)
# XLA CPU float32 exp (Cephes expf): exp(x) = 2^n * exp(r), |r| <= ln2 / 2.
_LOG2E = _bits(0x3FB8AA3B)
_EXP_P = [_bits(b) for b in (0x39506967, 0x3AB743CE, 0x3C088908, 0x3D2AA9C1, 0x3E2AAAAA)]


def _fma(a, b, c) -> np.ndarray:
  """float32 fused multiply-add, rounded once (XLA's CPU code generator contracts a * b + c into one FMA).

  a * b is exact in float64; TwoSum gives the exact rounding error of the float64 sum, and a sum that lands on a
  float32 rounding midpoint is nudged toward the error, so the single float32 rounding is the true one.
  """
  p = np.asarray(a, _F32).astype(np.float64) * np.asarray(b, _F32).astype(np.float64)
  c = np.asarray(c, _F32).astype(np.float64)
  s = p + c
  bp = s - c
  err = (p - bp) + (c - (s - bp))
  rounded = s.astype(_F32).astype(np.float64)
  # A float32 rounding midpoint lies exactly halfway between two float32 neighbours of s.
  other = np.where(rounded > s, np.nextafter(rounded.astype(_F32), _F32(-np.inf)),
                   np.nextafter(rounded.astype(_F32), _F32(np.inf))).astype(np.float64)
  midpoint = (s - rounded) == (other - rounded) / 2
  s = np.where(midpoint & (err != 0) & np.isfinite(s), np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
  return s.astype(_F32)


def _xla_log(x) -> np.ndarray:
  """Natural log exactly as XLA's CPU backend computes it in float32."""
  x = np.asarray(x, _F32)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    tiny = np.finfo(_F32).tiny
    clamped = np.where(x > tiny, x, tiny).astype(_F32)  # NaN and subnormals clamp too, then get patched below
    bits = clamped.view(np.uint32)
    exponent = (bits >> np.uint32(23)).astype(np.int32) - np.int32(127)
    mantissa = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(_F32)  # in [0.5, 1)
    e = _F32(1) + exponent.astype(_F32)
    small = mantissa < _LOG_SQRT_HALF
    e = e - np.where(small, _F32(1), _F32(0))
    m = (mantissa - _F32(1)) + np.where(small, mantissa, _F32(0))  # m - 1, or 2m - 1 below sqrt(1/2)
    m2 = m * m
    m3 = m2 * m
    c = _LOG_P
    q0 = _fma(_fma(m, c[0], c[1]), m, c[6])
    q1 = _fma(_fma(m, c[2], c[3]), m, c[7])
    q2 = _fma(_fma(m, c[4], c[5]), m, c[8])
    y = _fma(_fma(_fma(q0, m3, q1), m3, q2), m3, _LN2_LO * e)
    out = _fma(e, _LN2_HI, _fma(-m2, _F32(0.5), m) + y)
    out = np.where(x <= 0, np.nan, out)
    out = np.where(np.isnan(x), np.nan, out)
    out = np.where(x == 0, -np.inf, out)
    out = np.where(x == np.inf, np.inf, out)
  return out.astype(_F32)


def _xla_exp(x) -> np.ndarray:
  """exp exactly as XLA's CPU backend computes it in float32."""
  x = np.asarray(x, _F32)
  with np.errstate(invalid="ignore", over="ignore"):
    x = np.where(x < _F32(-87.8), _F32(-87.8), x).astype(_F32)
    x = np.where(x > _F32(88.8), _F32(88.8), x).astype(_F32)
    n = np.floor(_fma(x, _LOG2E, _F32(0.5))).astype(_F32)
    n = np.clip(n, _F32(-127), _F32(127)).astype(_F32)
    r = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
    y = _fma(r, _EXP_P[0], _EXP_P[1])
    for c in _EXP_P[2:]:
      y = _fma(y, r, c)
    y = _fma(y, r, _F32(0.5))
    y = _fma(y, r * r, r) + _F32(1)
    scale = ((np.nan_to_num(n).astype(np.int32) + np.int32(127)) << np.int32(23)).view(_F32)
    return (y * scale).astype(_F32)


def _load_libm():
  try:
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    functions = {"cos": libm.cosf, "pow": libm.powf}
  except (OSError, AttributeError):
    return {}
  functions["cos"].argtypes = [ctypes.c_float]
  functions["pow"].argtypes = [ctypes.c_float, ctypes.c_float]
  for f in functions.values():
    f.restype = ctypes.c_float
  return functions


_LIBM = _load_libm()


def _libm_elementwise(name, x, *args) -> np.ndarray:
  x = np.asarray(x, _F32)
  if name not in _LIBM:
    fallback = {"cos": np.cos, "pow": np.power}[name]
    return fallback(x.astype(np.float64), *args).astype(_F32)
  f = _LIBM[name]
  return np.array([f(float(v), *args) for v in x.reshape(-1)], _F32).reshape(x.shape)


def _xla_cos(x) -> np.ndarray:
  """cos as XLA's CPU backend computes it in float32: the C library's cosf."""
  return _libm_elementwise("cos", x)


def _xla_pow(x, exponent: float) -> np.ndarray:
  """x ** exponent (a Python float, as in the official `ratio**exponent`) as XLA's CPU backend: powf."""
  return _libm_elementwise("pow", x, float(_F32(exponent)))


def _divide(a, b) -> np.ndarray:
  """a / b as XLA computes it: by the reciprocal when b is broadcast to the output shape (see the module doc)."""
  a, b = np.asarray(a, _F32), np.asarray(b, _F32)
  if np.broadcast_shapes(a.shape, b.shape) != b.shape:
    return (a * (_F32(1) / b)).astype(_F32)
  return (a / b).astype(_F32)


def log2(x) -> np.ndarray:
  """`jnp.log2` on XLA CPU: log(x) * (1 / log 2)."""
  return (_xla_log(x) * _INV_LN2).astype(_F32)


def exp2(x) -> np.ndarray:
  """`jnp.exp2` on XLA CPU: exp(log 2 * x)."""
  return _xla_exp(_LN2 * np.asarray(x, _F32))


def pow_exponent(method: str) -> float:
  """The exponent X of a `powX` schedule name (ValueError if the name is not one)."""
  try:
    exponent = float(method[3:]) if method.startswith("pow") else -1.0
  except ValueError:
    exponent = -1.0
  if not exponent > 0:
    raise ValueError(f"mask schedule {method!r}: 'powX' needs a positive number X, e.g. 'pow2.5'")
  return exponent


def check_method(method: str) -> None:
  """ValueError naming the allowed schedules unless `method` is one."""
  if isinstance(method, str) and method.startswith("pow"):
    pow_exponent(method)
    return
  if method not in OFFICIAL_METHODS + SEED_METHODS:
    raise ValueError(f"unknown mask schedule {method!r}; expected one of "
                     f"{list(OFFICIAL_METHODS + SEED_METHODS)} or 'powX' (X > 0)")


def mask_ratio(ratio, total_unknown, method: str = "cosine") -> np.ndarray:
  """Fraction of the initially unknown tokens that stay masked after a step, float32, clipped to [1e-6, 1].

  Args:
    ratio: progress r in [0, 1], e.g. (t + 1) / T at decoding step t (any shape).
    total_unknown: the number of tokens unknown at the start, N0 (broadcasts with `ratio`); only `log` and `exp`
      use it.
    method: `uniform` / `linear` (1 - r), `cosine` (cos(pi/2 r)), `powX` (1 - r^X), `square` (1 - r^2), `root`
      (1 - sqrt r), `log` (-log2 r / log2 N0), `exp` (1 - 2^(-log2 N0 (1 - r))), `arccos` (arccos(r) / (pi/2),
      the seed's schedule).
  """
  check_method(method)
  r = np.asarray(ratio, _F32)
  one = _F32(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    if method in ("uniform", "linear"):
      out = one - r
    elif method.startswith("pow") or method in ("square", "root"):
      exponent = {"square": 2.0, "root": 0.5}.get(method) or pow_exponent(method)
      out = one - _xla_pow(r, exponent)
    elif method == "cosine":
      out = _xla_cos(_HALF_PI * r)
    elif method == "arccos":
      # Seed schedule: the arccos of r, normalised to [0, 1] (float64 inside, rounded once).
      out = (np.arccos(r.astype(np.float64)) / (math.pi / 2.0)).astype(_F32)
    else:
      n = log2(np.asarray(total_unknown, _F32))
      if method == "log":
        out = _divide(-log2(r), n)
      else:  # exp
        out = one - exp2(-n * (one - r))
  return np.clip(np.asarray(out, _F32), _F32(1e-6), one).astype(_F32)


def decode_mask_ratio(step: int, num_iter: int, total_unknown, method: str = "cosine") -> np.ndarray:
  """The mask ratio the official decoder uses at `step` of `num_iter`, as its jitted loop computes it on XLA CPU.

  The official loop evaluates `schedule(1. * (step + 1) / num_iter, N0, method)` inside `lax.while_loop`, where XLA
  simplifies the arithmetic before running it: the division by the constant num_iter becomes a multiply by the
  float32 reciprocal c = 1/T, constants are folded together (`pi/2 * s * c` -> `s * (pi/2 * c)`,
  `(s * c)^2` -> `s^2 * c^2`), and `1 - a * b` becomes one fused multiply-add. The results differ from
  `mask_ratio((step + 1) / T, ...)` in the last bit for some steps, which can move floor(N0 * ratio) by one token;
  this function replays the loop's arithmetic so mask lengths match the official decoder exactly. Schedules that
  are not official use `mask_ratio` at (step + 1) / T (there is no official loop to follow).

  Returns float32 of total_unknown's shape (for log/exp) or a scalar array.
  """
  check_method(method)
  s = _F32(step + 1)
  c = _F32(1) / _F32(num_iter)
  one = _F32(1)
  n0 = np.asarray(total_unknown, _F32)
  with np.errstate(divide="ignore", invalid="ignore"):
    if method in ("uniform", "linear", "pow1"):
      out = _fma(-s, c, one)
    elif method == "cosine":
      out = _xla_cos(s * (_HALF_PI * c))
    elif method == "pow2":
      out = _fma(-(s * s), c * c, one)
    elif method == "pow3":
      out = _fma(-(s * (s * s)), c * c * c, one)
    elif method.startswith("pow"):
      out = one - _xla_pow(s * c, pow_exponent(method))
    elif method == "log":
      out = (-(_xla_log(s * c) * _INV_LN2)) / (_xla_log(n0) * _INV_LN2)
    elif method == "exp":
      out = one - _xla_exp((-(_xla_log(n0) * _INV_LN2) * _fma(-s, c, one)) * _LN2)
    else:
      out = mask_ratio(s / _F32(num_iter), n0, method)
  return np.clip(np.asarray(out, _F32), _F32(1e-6), one).astype(_F32)


def decode_mask_len(step: int, num_iter: int, total_unknown, method: str = "cosine") -> np.ndarray:
  """floor(N0 * decode_mask_ratio) in float32, as int32, before the official clamp to [1, #unknown - 1]."""
  n0 = np.asarray(total_unknown, _F32)
  return np.floor(n0 * decode_mask_ratio(step, num_iter, total_unknown, method)).astype(np.int32)


# Sampler options (configs.SamplerConfig): every per-step number of a decode, computed once on the host. ----------
def mask_len_table(num_iter: int, seq_len: int, method: str = "cosine", tokens_per_step=()) -> np.ndarray:
  """(T, S + 1) float32: floor(N0 * gamma_t) for every step t and every initial unknown count N0 in 0..S.

  Official and seed-named schedules use `decode_mask_ratio` (the official loop's arithmetic). A custom schedule
  (`tokens_per_step`, tokens revealed at each step, summing to the number of image tokens L) is exact integer
  arithmetic, floor(N0 * (L - revealed_t) / L): a generation from all-unknown (N0 = L) keeps exactly
  L - revealed_t tokens unknown after step t, and an edit (fewer unknown tokens) reveals the same fractions. (A
  float32 ratio 1 - revealed / L floored after the product misses some counts, e.g. 97 of the 575 at L = 576.) The
  official clamp to [1, #unknown - 1] is applied in the loop.
  """
  n0 = np.arange(seq_len + 1)
  if len(tokens_per_step):
    total = int(np.sum(tokens_per_step))
    remaining = total - np.cumsum(np.asarray(tokens_per_step, np.int64))
    return (n0[None, :] * remaining[:, None] // total).astype(_F32)
  rows = []
  with np.errstate(invalid="ignore"):
    for t in range(num_iter):
      ratio = decode_mask_ratio(t, num_iter, n0, method)
      rows.append(np.broadcast_to(np.floor(n0.astype(_F32) * ratio), n0.shape))
  return np.stack(rows).astype(_F32)


def loop_choice_temperature(step: int, num_iter: int, choice_temperature: float) -> np.float32:
  """choice_temperature * (1 - (t + 1) / T) as the official loop computes it (ratio = (t + 1) * (1/T), fused)."""
  s, c = _F32(step + 1), _F32(1) / _F32(num_iter)
  return _F32(choice_temperature) * _fma(-s, c, _F32(1))


# Confidence modes: confidence = a_t * log p(sample) + b_t * gumbel_t (a_t = 0 drops the model's confidence).
RANDOMIZE_MODES = ("official", "linear", "warm_up", "random", "none")


def confidence_weights(num_iter: int, start_iter: int, choice_temperature: float, randomize: str = "official",
                       anneal: str = "linear") -> tuple[np.ndarray, np.ndarray]:
  """Per executed step (a_t, b_t), float32 (n,), of confidence = a_t log p + b_t g, g ~ Gumbel.

  randomize: `official` (b = choice_temperature * (1 - (t+1)/T), the official annealing; with anneal=`constant`
  b = choice_temperature), and seed-style modes on the official re-masking loop (float32; the seed's exact rules
  are sampler.decoder=seed): `linear` (b = choice_temperature * (1 - t/(T-1)), reaching 0 at the last step),
  `warm_up` (a random order for the first 2 steps, then the model's log-confidence), `random` (a random order at
  every step: ordering by a Gumbel draw is ordering by a uniform one), `none` (confidence only).
  """
  if randomize not in RANDOMIZE_MODES:
    raise ValueError(f"randomize must be one of {list(RANDOMIZE_MODES)}, got {randomize!r}")
  a, b = [], []
  for t in range(start_iter, num_iter):
    if randomize == "official":
      a.append(1), b.append(loop_choice_temperature(t, num_iter, choice_temperature) if anneal == "linear"
                            else _F32(choice_temperature))
    elif randomize == "linear":
      frac = _F32(t) / _F32(max(num_iter - 1, 1))
      a.append(1), b.append(_F32(choice_temperature) * (_F32(1) - frac))
    elif randomize == "warm_up":
      a.append(0 if t < 2 else 1), b.append(1 if t < 2 else 0)
    elif randomize == "random":
      a.append(0), b.append(1)
    else:
      a.append(1), b.append(0)
  return np.asarray(a, _F32), np.asarray(b, _F32)


def guidance_weights(num_iter: int, start_iter: int, scale: float, schedule: str = "constant") -> np.ndarray:
  """(n,) float32 classifier-free guidance weight w_t: constant, or `linear` from 0 to scale (the seed's t/(T-1))."""
  if schedule not in ("constant", "linear"):
    raise ValueError(f"guidance schedule must be 'constant' or 'linear', got {schedule!r}")
  steps = np.arange(start_iter, num_iter, dtype=np.float64)
  if schedule == "linear":
    return (scale * steps / max(num_iter - 1, 1)).astype(_F32)
  return np.full(steps.shape, scale, _F32)
