"""MaskGIT iterative parallel decoding in JAX: the official decoder, step for step and key for key.

Official: google-research/maskgit `maskgit/libml/parallel_decode.py` and `mask_schedule.py`. At each step t of T
(starting at `start_iter`):
  1. logits = tokens_to_logits(ids)                            (B, S, K)
  2. key, k_sample = split(key); sampled = argmax(logits + gumbel(k_sample))   (the categorical draw)
     unknown positions take the sample, known ones keep their token; final_seqs[:, t] = sampled
  3. ratio = (t + 1) / T; mask_len = clip(floor(N0 * schedule(ratio, N0)), 1, #unknown - 1), N0 = initial #unknown
  4. key, k_choice = split(key); confidence = log p(sampled) + choice_temperature * (1 - ratio) * gumbel(k_choice),
     +inf at known positions; the mask_len least confident positions are masked again for the next step.

Every random draw comes from a noise provider: `PRNGNoise(key)` splits the key exactly as the official loop (the
same key gives the official tokens on the same jax), `RecordedNoise` replays recorded Gumbel draws (how torch
reproduces JAX, and how the parity runner checks both against the official record). `decode` runs the loop in a
`lax.scan` with the step index traced, as the official `lax.while_loop` does, so XLA simplifies the schedule
arithmetic the same way and the mask lengths agree bit for bit; it is jittable and never syncs with the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_common import schedules

# Known tokens get infinite confidence, so they are never masked again (the official _CONFIDENCE_OF_KNOWN_TOKENS).
CONFIDENCE_OF_KNOWN_TOKENS = jnp.inf
MASK_TOKEN_ID = -1


# Schedules ------------------------------------------------------------------------------------------------------
def schedule(ratio, total_unknown, method: str = "cosine"):
  """Mask ratio gamma(ratio) in [1e-6, 1]: the official `mask_schedule.schedule` plus the seed's schedules.

  Official methods use the official jnp expressions (so the values are the official ones on any device); the seed's
  `arccos`, `square`, `root` follow `maskgit_common.schedules.mask_ratio`.
  """
  schedules.check_method(method)
  ratio = jnp.asarray(ratio, jnp.float32)
  if method in ("uniform", "linear"):
    mask_ratio = 1. - ratio
  elif method.startswith("pow") or method in ("square", "root"):
    exponent = {"square": 2.0, "root": 0.5}.get(method) or schedules.pow_exponent(method)
    mask_ratio = 1. - ratio ** exponent
  elif method == "cosine":
    mask_ratio = jax.lax.cos(math.pi / 2. * ratio)
  elif method == "log":
    mask_ratio = -jnp.log2(ratio) / jnp.log2(total_unknown)
  elif method == "exp":
    mask_ratio = 1 - jnp.exp2(-jnp.log2(total_unknown) * (1 - ratio))
  else:  # arccos (seed)
    mask_ratio = jnp.arccos(ratio) / (math.pi / 2.)
  return jnp.clip(mask_ratio, 1e-6, 1.)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _loop_mask_ratio(step, num_iter, total_unknown, method):
  return schedule(1. * (step + 1) / num_iter, total_unknown, method)


def decode_mask_ratio(step: int, num_iter: int, total_unknown, method: str = "cosine"):
  """The mask ratio the decoding loop uses at `step`: the official expression with the step traced, as inside the
  official `lax.while_loop` (XLA folds (t + 1) / T into a multiply by 1/T there, which can differ from
  `schedule((t + 1) / T)` in the last bit); the seed's schedules use `maskgit_common.schedules`."""
  if not _official_method(method):
    return jnp.asarray(schedules.decode_mask_ratio(step, num_iter, np.asarray(total_unknown), method))
  return _loop_mask_ratio(jnp.int32(step), num_iter, jnp.asarray(total_unknown, jnp.int32), method)


def _official_method(method: str) -> bool:
  return method in ("uniform", "cosine", "log", "exp") or method.startswith("pow")


# Noise providers ------------------------------------------------------------------------------------------------
def _array_pytree(cls):
  """Registers a noise provider whose attributes are all arrays as a pytree, so it can be passed through jax.jit
  (the pipelines jit the whole decode with the provider as an argument). Unflattening skips __init__: the arrays
  were validated when the provider was built."""
  def flatten(noise):
    names = tuple(sorted(vars(noise)))
    return tuple(getattr(noise, n) for n in names), names

  def unflatten(names, leaves):
    noise = object.__new__(cls)
    vars(noise).update(zip(names, leaves))
    return noise

  jax.tree_util.register_pytree_node(cls, flatten, unflatten)
  return cls


@_array_pytree
class PRNGNoise:
  """Draws from a PRNG key with the official splitting: per step `key, k_sample = split(key)`, then
  `key, k_choice = split(key)`; Gumbel noise is jax.random.gumbel (so `argmax(logits + g)` is
  jax.random.categorical)."""

  def __init__(self, key):
    self.key = jnp.asarray(key)

  def init_state(self):
    return self.key

  def gumbel_sample(self, state, index, shape):
    del index
    state, k_sample = jax.random.split(state, 2)
    return state, jax.random.gumbel(k_sample, shape)

  def gumbel_choice(self, state, index, shape):
    del index
    state, k_choice = jax.random.split(state)
    return state, jax.random.gumbel(k_choice, shape)


@_array_pytree
class RecordedNoise:
  """Replays recorded draws: `gumbel_sample` (n, B, S, K) and `gumbel_choice` (n, B, S) for the n executed steps."""

  def __init__(self, gumbel_sample, gumbel_choice):
    self.gumbel_sample_draws = jnp.asarray(gumbel_sample, jnp.float32)
    self.gumbel_choice_draws = jnp.asarray(gumbel_choice, jnp.float32)
    if self.gumbel_sample_draws.ndim != 4 or self.gumbel_choice_draws.ndim != 3:
      raise ValueError(f"RecordedNoise: gumbel_sample must be (n, B, S, K) and gumbel_choice (n, B, S), got "
                       f"{self.gumbel_sample_draws.shape} and {self.gumbel_choice_draws.shape}")

  def init_state(self):
    return jnp.zeros((), jnp.int32)

  def _take(self, draws, index, shape, what):
    if draws.shape[0] <= 0 or tuple(draws.shape[1:]) != tuple(shape):
      raise ValueError(f"RecordedNoise.{what}: recorded draws have shape {tuple(draws.shape)}, the step needs "
                       f"(n, {', '.join(map(str, shape))})")
    return jax.lax.dynamic_index_in_dim(draws, index, keepdims=False)

  def gumbel_sample(self, state, index, shape):
    return state, self._take(self.gumbel_sample_draws, index, shape, "gumbel_sample")

  def gumbel_choice(self, state, index, shape):
    return state, self._take(self.gumbel_choice_draws, index, shape, "gumbel_choice")

  def check_steps(self, n):
    for name, draws in (("gumbel_sample", self.gumbel_sample_draws), ("gumbel_choice", self.gumbel_choice_draws)):
      if draws.shape[0] < n:
        raise ValueError(f"RecordedNoise.{name}: {draws.shape[0]} recorded steps, the decode runs {n}")


# The decoder ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeOutput:
  """Official return value `final_seqs` (B, T, S) plus every executed step's state (n = T - start_iter)."""
  final_seqs: jax.Array  # (B, T, S) int32; rows before start_iter repeat init_ids; row t = step t's samples
  step_input_ids: jax.Array  # (n, B, S) int32, -1 = unknown
  step_sampled_ids: jax.Array  # (n, B, S) int32, samples at unknown positions, inputs elsewhere
  step_mask_len: jax.Array  # (n, B, 1) int32, tokens masked again after the step
  step_masking: jax.Array  # (n, B, S) bool, True = masked again
  step_state_after: jax.Array  # (n, B, S) int32, the next step's input

  @property
  def tokens(self):
    """(B, S - 1): the final image tokens (class token dropped)."""
    return self.final_seqs[:, -1, 1:]


jax.tree_util.register_dataclass(
    DecodeOutput, data_fields=[f.name for f in dataclasses.fields(DecodeOutput)], meta_fields=[])


def mask_by_random_topk(mask_len, probs, gumbel, temperature):
  """(B, S) bool, True = mask: the official `mask_by_random_topk` with its Gumbel draw passed in.

  confidence = log(probs) + temperature * gumbel; the mask_len lowest per row are masked.
  """
  confidence = jnp.log(probs) + temperature * gumbel
  sorted_confidence = jnp.sort(confidence, axis=-1)
  cut_off = jnp.take_along_axis(sorted_confidence, mask_len.astype(jnp.int32), axis=-1)
  return confidence < cut_off


def _raw_mask_len(step, num_iter, unknown_at_start, method, seq_len):
  """floor(N0 * gamma((step + 1) / T)) as float32 (B, 1), before the clamp to [1, #unknown - 1]."""
  if _official_method(method):
    # The official expressions, traced: XLA simplifies them exactly as inside the official while_loop.
    ratio = 1. * (step + 1) / num_iter
    mask_ratio = schedule(ratio, unknown_at_start, method)
    return jnp.expand_dims(jnp.floor(unknown_at_start * mask_ratio), 1)
  # Seed schedules: the framework-free reference, tabulated over every possible N0 (0..S), shared with torch.
  table = schedules.mask_len_table(num_iter, seq_len, method)
  return jnp.asarray(table)[step, unknown_at_start][:, None]


def decode(init_ids, tokens_to_logits: Callable, noise, *, num_iter: int = 12, start_iter: int = 0,
           choice_temperature: float = 1.0, mask_schedule: str = "cosine") -> DecodeOutput:
  """The official parallel decoding (see the module docstring); same arguments and order of draws.

  Args:
    init_ids: (B, S) int: the class token, then codes or -1 (unknown).
    tokens_to_logits: ids (B, S) -> logits (B, S, K) over the image codes (the official `[..., :K]` slice).
    noise: `PRNGNoise(key)` or `RecordedNoise(gumbel_sample, gumbel_choice)`.
    num_iter, start_iter: T and the first executed step (editing starts later from partially known tokens).
    choice_temperature: Gumbel temperature of the confidence, annealed linearly to 0 at the last step.
    mask_schedule: `uniform`, `cosine`, `log`, `exp`, `powX` (official) or `linear`, `square`, `root`, `arccos`.
  """
  schedules.check_method(mask_schedule)
  if not 0 <= start_iter < num_iter:
    raise ValueError(f"decode: need 0 <= start_iter < num_iter, got start_iter={start_iter}, num_iter={num_iter}")
  ids = jnp.asarray(init_ids).astype(jnp.int32)
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {ids.shape}")
  n = num_iter - start_iter
  if isinstance(noise, RecordedNoise):
    noise.check_steps(n)
  unknown_at_start = jnp.sum(ids == MASK_TOKEN_ID, axis=-1)
  seq_len = ids.shape[1]

  def step_fn(carry, index):
    cur_ids, noise_state = carry
    step = start_iter + index
    logits = tokens_to_logits(cur_ids)
    noise_state, g_sample = noise.gumbel_sample(noise_state, index, logits.shape)
    sampled_ids = jnp.argmax(g_sample + logits, axis=-1).astype(jnp.int32)  # jax.random.categorical
    unknown_map = cur_ids == MASK_TOKEN_ID
    sampled_ids = jnp.where(unknown_map, sampled_ids, cur_ids)
    ratio = 1. * (step + 1) / num_iter
    probs = jax.nn.softmax(logits, axis=-1)
    selected_probs = jnp.squeeze(jnp.take_along_axis(probs, jnp.expand_dims(sampled_ids, -1), -1), -1)
    selected_probs = jnp.where(unknown_map, selected_probs, CONFIDENCE_OF_KNOWN_TOKENS)
    mask_len = _raw_mask_len(step, num_iter, unknown_at_start, mask_schedule, seq_len)
    # Keep at least one prediction this round and mask at least one for the next (official clamp).
    mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown_map, axis=-1, keepdims=True) - 1, mask_len))
    noise_state, g_choice = noise.gumbel_choice(noise_state, index, selected_probs.shape)
    masking = mask_by_random_topk(mask_len, selected_probs, g_choice, choice_temperature * (1. - ratio))
    next_ids = jnp.where(masking, MASK_TOKEN_ID, sampled_ids)
    record = (cur_ids, sampled_ids, mask_len.astype(jnp.int32), masking, next_ids)
    return (next_ids, noise_state), record

  _, records = jax.lax.scan(step_fn, (ids, noise.init_state()), jnp.arange(n, dtype=jnp.int32))
  step_input_ids, step_sampled_ids, step_mask_len, step_masking, step_state_after = records
  before = jnp.tile(ids[:, None, :], (1, start_iter, 1))
  final_seqs = jnp.concatenate([before, jnp.swapaxes(step_sampled_ids, 0, 1)], axis=1)
  return DecodeOutput(final_seqs, step_input_ids, step_sampled_ids, step_mask_len, step_masking, step_state_after)


# Options (configs.SamplerConfig) --------------------------------------------------------------------------------
NULL_CLASS_TOKEN = -1  # the unconditional pass's class token: the mask id (maskgit_common.masking, class dropout)


def guided_logits(tokens_to_logits, ids, weight):
  """Classifier-free guidance (1 + w) cond - w uncond from ONE call of tokens_to_logits on 2B rows: the first B
  are `ids`, the last B the same with the class token replaced by the null class (the mask id -1)."""
  null = ids.at[:, 0].set(NULL_CLASS_TOKEN)
  cond, uncond = jnp.split(tokens_to_logits(jnp.concatenate([ids, null], axis=0)), 2, axis=0)
  return (1 + weight) * cond - weight * uncond


def decode_with_config(init_ids, tokens_to_logits: Callable, noise, sampler_config, *, num_iter=None,
                       start_iter=None) -> DecodeOutput:
  """Decoding with the options of a `configs.SamplerConfig` (or a whole MaskGITConfig); identical in both backends.

  With the default options this is exactly `decode` (the official decoder). Otherwise every per-step number comes
  from `maskgit_common.schedules.decode_plan` and every draw from `noise` (the same two Gumbel draws per step as
  the official loop, so a RecordedNoise of shape (n, B, S, K) / (n, B, S) drives any option):
    - guidance: `tokens_to_logits` is called once per step on 2B rows (see `guided_logits`);
    - softmax_temperature divides the (guided) logits before the categorical draw and the confidence;
    - the confidence is a_t log p(sample) + b_t g_t (see `schedules.confidence_weights`), or -Halton rank;
    - mask lengths come from the configured schedule or `tokens_per_step`, with the official clamp.
  num_iter / start_iter override the config's (e.g. start_iter=edit_start_iter for editing).
  """
  cfg = getattr(sampler_config, "sampler", sampler_config)
  num_iter = cfg.num_iter if num_iter is None else num_iter
  start_iter = cfg.start_iter if start_iter is None else start_iter
  if cfg.is_official:
    return decode(init_ids, tokens_to_logits, noise, num_iter=num_iter, start_iter=start_iter,
                  choice_temperature=cfg.choice_temperature, mask_schedule=cfg.mask_schedule)
  if not 0 <= start_iter < num_iter:
    raise ValueError(f"decode_with_config: need 0 <= start_iter < num_iter, got {start_iter}, {num_iter}")
  ids = jnp.asarray(init_ids).astype(jnp.int32)
  n = num_iter - start_iter
  if isinstance(noise, RecordedNoise):
    noise.check_steps(n)
  plan = {k: jnp.asarray(v) for k, v in schedules.decode_plan(cfg, num_iter, start_iter, ids.shape[1]).items()}
  unknown_at_start = jnp.sum(ids == MASK_TOKEN_ID, axis=-1)

  def step_fn(carry, index):
    cur_ids, noise_state = carry
    step = start_iter + index
    if cfg.guidance_scale > 0:
      logits = guided_logits(tokens_to_logits, cur_ids, plan["guidance"][index])
    else:
      logits = tokens_to_logits(cur_ids)
    if cfg.softmax_temperature != 1:
      logits = logits / jnp.float32(cfg.softmax_temperature)
    noise_state, g_sample = noise.gumbel_sample(noise_state, index, logits.shape)
    sampled_ids = jnp.argmax(g_sample + logits, axis=-1).astype(jnp.int32)
    unknown_map = cur_ids == MASK_TOKEN_ID
    sampled_ids = jnp.where(unknown_map, sampled_ids, cur_ids)
    probs = jax.nn.softmax(logits, axis=-1)
    selected_probs = jnp.squeeze(jnp.take_along_axis(probs, jnp.expand_dims(sampled_ids, -1), -1), -1)
    mask_len = plan["mask_len"][step, unknown_at_start][:, None]
    mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown_map, axis=-1, keepdims=True) - 1, mask_len))
    mask_len = jnp.nan_to_num(mask_len).astype(jnp.int32)
    noise_state, g_choice = noise.gumbel_choice(noise_state, index, selected_probs.shape)
    if cfg.order == "halton":
      confidence = jnp.broadcast_to(-plan["halton_rank"], selected_probs.shape)
    else:
      a, b = plan["conf_log"][index], plan["conf_noise"][index]
      confidence = jnp.where(a > 0, a * jnp.log(selected_probs), 0.) + b * g_choice
    confidence = jnp.where(unknown_map, confidence, CONFIDENCE_OF_KNOWN_TOKENS)
    cut_off = jnp.take_along_axis(jnp.sort(confidence, axis=-1), mask_len, axis=-1)
    masking = confidence < cut_off
    next_ids = jnp.where(masking, MASK_TOKEN_ID, sampled_ids)
    return (next_ids, noise_state), (cur_ids, sampled_ids, mask_len, masking, next_ids)

  _, records = jax.lax.scan(step_fn, (ids, noise.init_state()), jnp.arange(n, dtype=jnp.int32))
  before = jnp.tile(ids[:, None, :], (1, start_iter, 1))
  final_seqs = jnp.concatenate([before, jnp.swapaxes(records[1], 0, 1)], axis=1)
  return DecodeOutput(final_seqs, *records)
