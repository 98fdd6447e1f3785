"""MaskGIT iterative parallel decoding in PyTorch, step for step the official decoder (see maskgit_jax/sampler.py).

Official: google-research/maskgit `maskgit/libml/parallel_decode.py`. Per step t of T (from `start_iter`): logits
-> categorical sample argmax(logits + Gumbel) at unknown positions -> mask_len = clip(floor(N0 * gamma((t+1)/T)),
1, #unknown - 1) -> confidence log p(sample) + choice_temperature * (1 - (t+1)/T) * Gumbel (+inf where known) ->
the mask_len least confident positions are masked again.

Randomness comes from a noise provider: `GeneratorNoise(generator)` (torch's own draws) or `RecordedNoise` (draws
recorded from JAX or the official code; with them torch reproduces the official token trajectory exactly).

The mask lengths are integers computed on the host before the loop, for every step and every possible initial
unknown count N0 (0..S), by `maskgit_common.schedules.decode_mask_len`, which replays the official loop's float32
arithmetic as XLA runs it; the loop gathers from that table, so it never syncs with the host.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from maskgit_common import schedules

CONFIDENCE_OF_KNOWN_TOKENS = float("inf")
MASK_TOKEN_ID = -1


# Schedules ------------------------------------------------------------------------------------------------------
def schedule(ratio, total_unknown, method: str = "cosine") -> torch.Tensor:
  """Mask ratio gamma(ratio) in [1e-6, 1], float32: `maskgit_common.schedules.mask_ratio` (the official values).

  Evaluated on the host in numpy (exact replay of the official float32 arithmetic), returned on ratio's device.
  """
  device = ratio.device if isinstance(ratio, torch.Tensor) else torch.device("cpu")
  out = schedules.mask_ratio(_to_numpy(ratio), _to_numpy(total_unknown), method)
  return torch.from_numpy(np.ascontiguousarray(out)).to(device)


def decode_mask_ratio(step: int, num_iter: int, total_unknown, method: str = "cosine") -> torch.Tensor:
  """The mask ratio the official decoding loop uses at `step` (`schedules.decode_mask_ratio`)."""
  return torch.from_numpy(np.ascontiguousarray(
      schedules.decode_mask_ratio(step, num_iter, _to_numpy(total_unknown), method)))


def _to_numpy(x):
  return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# Noise providers ------------------------------------------------------------------------------------------------
def gumbel(shape, generator: torch.Generator, device=None) -> torch.Tensor:
  """-log(-log(U)), U uniform in [tiny, 1) (jax.random.gumbel's formula), float32."""
  u = torch.rand(shape, generator=generator, device=device or generator.device, dtype=torch.float32)
  # In place: the same values as -log(-log(max(u, tiny))) without four temporaries (per-op cost matters at batch 1).
  return u.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


class GeneratorNoise:
  """Draws from a torch.Generator, in the official order: per step the categorical noise, then the choice noise."""

  def __init__(self, generator: torch.Generator):
    self.generator = generator

  def gumbel_sample(self, index, shape, device):
    del index
    return gumbel(shape, self.generator, device)

  def gumbel_choice(self, index, shape, device):
    del index
    return gumbel(shape, self.generator, device)


class RecordedNoise:
  """Replays recorded draws: `gumbel_sample` (n, B, S, K) and `gumbel_choice` (n, B, S) for the n executed steps."""

  def __init__(self, gumbel_sample, gumbel_choice):
    self.gumbel_sample_draws = torch.as_tensor(gumbel_sample, dtype=torch.float32)
    self.gumbel_choice_draws = torch.as_tensor(gumbel_choice, dtype=torch.float32)
    if self.gumbel_sample_draws.ndim != 4 or self.gumbel_choice_draws.ndim != 3:
      raise ValueError(f"RecordedNoise: gumbel_sample must be (n, B, S, K) and gumbel_choice (n, B, S), got "
                       f"{tuple(self.gumbel_sample_draws.shape)} and {tuple(self.gumbel_choice_draws.shape)}")

  def to(self, device) -> "RecordedNoise":
    """The same draws on `device`, moved once before the loop (not one host-to-device copy per step)."""
    return RecordedNoise(self.gumbel_sample_draws.to(device), self.gumbel_choice_draws.to(device))

  @staticmethod
  def _take(draws, index, shape, device, what):
    if tuple(draws.shape[1:]) != tuple(shape):
      raise ValueError(f"RecordedNoise.{what}: recorded draws have shape {tuple(draws.shape)}, the step needs "
                       f"(n, {', '.join(map(str, shape))})")
    return draws[index].to(device)

  def gumbel_sample(self, index, shape, device):
    return self._take(self.gumbel_sample_draws, index, shape, device, "gumbel_sample")

  def gumbel_choice(self, index, shape, device):
    return self._take(self.gumbel_choice_draws, index, shape, device, "gumbel_choice")

  def check_steps(self, n):
    for name, draws in (("gumbel_sample", self.gumbel_sample_draws), ("gumbel_choice", self.gumbel_choice_draws)):
      if draws.shape[0] < n:
        raise ValueError(f"RecordedNoise.{name}: {draws.shape[0]} recorded steps, the decode runs {n}")


# The decoder ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeOutput:
  """Official return value `final_seqs` (B, T, S) plus every executed step's state (n = T - start_iter)."""
  final_seqs: torch.Tensor  # (B, T, S); rows before start_iter repeat init_ids; row t = step t's samples
  step_input_ids: torch.Tensor  # (n, B, S), -1 = unknown
  step_sampled_ids: torch.Tensor  # (n, B, S), samples at unknown positions, inputs elsewhere
  step_mask_len: torch.Tensor  # (n, B, 1), tokens masked again after the step
  step_masking: torch.Tensor  # (n, B, S) bool, True = masked again
  step_state_after: torch.Tensor  # (n, B, S), the next step's input

  @property
  def tokens(self):
    """(B, S - 1): the final image tokens (class token dropped)."""
    return self.final_seqs[:, -1, 1:]


def mask_by_random_topk(mask_len, probs, gumbel_noise, temperature):
  """(B, S) bool, True = mask: confidence = log(probs) + temperature * gumbel; the mask_len lowest per row."""
  confidence = torch.log(probs) + temperature * gumbel_noise
  sorted_confidence, _ = torch.sort(confidence, dim=-1)
  cut_off = torch.gather(sorted_confidence, -1, mask_len.long())
  return confidence < cut_off


def clamp_mask_len(raw, unknown_map):
  """Official clamp: keep >= 1 prediction this round, mask >= 1 for the next; NaN (log schedule, N0 <= 1) -> 0."""
  unknown_now = unknown_map.sum(-1, keepdim=True).to(raw.dtype)
  mask_len = torch.maximum(torch.ones_like(raw), torch.minimum(unknown_now - 1, raw))
  return torch.nan_to_num(mask_len, nan=0.0).long()


def selected_probs(logits, sampled_ids):
  """softmax(logits) at `sampled_ids` (B, S), as jax.nn.softmax (exp(x - max) / sum) then take_along_axis, bit for
  bit: gathering exp(x - max) first and dividing by the same sum afterwards rounds exactly as gathering from the
  normalised probabilities, without dividing all K of them.
  Ids outside [0, K) (the class token) are clamped; callers discard those positions."""
  e = torch.exp(logits - logits.amax(-1, keepdim=True))
  index = sampled_ids.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
  return (torch.gather(e, -1, index) / e.sum(-1, keepdim=True)).squeeze(-1)


def sample_tokens(logits, cur_ids, g_sample):
  """Categorical samples argmax(logits + Gumbel) at unknown positions, the input elsewhere -> (ids, unknown_map)."""
  unknown_map = cur_ids == MASK_TOKEN_ID
  return torch.where(unknown_map, torch.argmax(g_sample + logits, dim=-1), cur_ids), unknown_map


def decode_step(logits, cur_ids, g_sample, g_choice, raw_mask_len, temperature):
  """One official step from its logits -> (sampled_ids, mask_len, masking, next_ids).

  Tensors only (the raw mask length (B, 1) and the choice temperature (0-d) come from host tables made before the
  loop), so torch.compile turns it into the same small graph for every step (MaskGIT(..., torch_compile=True)).
  """
  sampled_ids, unknown_map = sample_tokens(logits, cur_ids, g_sample)
  # Known positions (the class token among them) get +inf: never masked again.
  probs = selected_probs(logits, sampled_ids).masked_fill_(~unknown_map, float("inf"))
  mask_len = clamp_mask_len(raw_mask_len, unknown_map)
  masking = mask_by_random_topk(mask_len, probs, g_choice, temperature)
  next_ids = sampled_ids.masked_fill(masking, MASK_TOKEN_ID)
  return sampled_ids, mask_len, masking, next_ids


def decode(init_ids, tokens_to_logits: Callable, noise, *, num_iter: int = 12, start_iter: int = 0,
           choice_temperature: float = 1.0, mask_schedule: str = "cosine",
           step_fn: Callable = decode_step) -> DecodeOutput:
  """The official parallel decoding (module docstring); same arguments as maskgit_jax.sampler.decode.

  Args:
    init_ids: (B, S) integer tensor: the class token, then codes or -1 (unknown).
    tokens_to_logits: ids (B, S) int64 -> logits (B, S, K) over the image codes.
    noise: `GeneratorNoise(generator)` or `RecordedNoise(gumbel_sample, gumbel_choice)`.
    step_fn: `decode_step` or a compiled version of it.
  """
  schedules.check_method(mask_schedule)
  if not 0 <= start_iter < num_iter:
    raise ValueError(f"decode: need 0 <= start_iter < num_iter, got start_iter={start_iter}, num_iter={num_iter}")
  ids = torch.as_tensor(init_ids).long()
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {tuple(ids.shape)}")
  n = num_iter - start_iter
  device = ids.device
  if isinstance(noise, RecordedNoise):
    noise.check_steps(n)
    noise = noise.to(device)
  # Host tables, made once: every step's raw mask length for these rows, and the choice temperatures.
  unknown_at_start = (ids == MASK_TOKEN_ID).sum(-1)
  table = torch.from_numpy(schedules.mask_len_table(num_iter, ids.shape[1], mask_schedule)).to(device)
  raw_mask_len = table[:, unknown_at_start].unsqueeze(-1)  # (T, B, 1)
  temperatures = torch.from_numpy(np.array(
      [schedules.loop_choice_temperature(t, num_iter, choice_temperature) for t in range(num_iter)],
      np.float32)).to(device)
  records = {k: [] for k in ("input", "sampled", "mask_len", "masking", "after")}
  cur_ids = ids
  for index in range(n):
    step = start_iter + index
    logits = tokens_to_logits(cur_ids).float()
    # The official order of draws: the categorical noise, then the choice noise.
    g_sample = noise.gumbel_sample(index, tuple(logits.shape), device)
    g_choice = noise.gumbel_choice(index, tuple(logits.shape[:-1]), device)
    sampled_ids, mask_len, masking, next_ids = step_fn(logits, cur_ids, g_sample, g_choice, raw_mask_len[step],
                                                       temperatures[step])
    for key, value in zip(records, (cur_ids, sampled_ids, mask_len, masking, next_ids)):
      records[key].append(value)
    cur_ids = next_ids
  return _stack_output(ids, start_iter, records)


def _stack_output(ids, start_iter: int, records: dict) -> DecodeOutput:
  """Per-step lists -> DecodeOutput; rows of final_seqs before start_iter repeat the initial ids (official)."""
  stacked = {k: torch.stack(v) for k, v in records.items()}
  before = ids.unsqueeze(1).expand(-1, start_iter, -1)
  final_seqs = torch.cat([before, stacked["sampled"].transpose(0, 1)], dim=1)
  return DecodeOutput(final_seqs, stacked["input"], stacked["sampled"], stacked["mask_len"], stacked["masking"],
                      stacked["after"])


# Options (configs.SamplerConfig) --------------------------------------------------------------------------------
NULL_CLASS_TOKEN = -1  # the unconditional pass's class token: the mask id (maskgit_common.masking, class dropout)


def guided_logits(tokens_to_logits, ids, weight):
  """Classifier-free guidance (1 + w) cond - w uncond from ONE call of tokens_to_logits on 2B rows: the first B
  are `ids`, the last B the same with the class token replaced by the null class (the mask id -1)."""
  null = ids.clone()
  null[:, 0] = NULL_CLASS_TOKEN
  cond, uncond = tokens_to_logits(torch.cat([ids, null], dim=0)).float().chunk(2, dim=0)
  return (1 + weight) * cond - weight * uncond


def decode_with_config(init_ids, tokens_to_logits: Callable, noise, sampler_config, *, num_iter=None,
                       start_iter=None, step_fn: Callable = decode_step) -> DecodeOutput:
  """Decoding with the options of a `configs.SamplerConfig` (or a whole MaskGITConfig); see
  maskgit_jax.sampler.decode_with_config. Defaults: exactly `decode` (with `step_fn`, which only that path uses)."""
  cfg = getattr(sampler_config, "sampler", sampler_config)
  num_iter = cfg.num_iter if num_iter is None else num_iter
  start_iter = cfg.start_iter if start_iter is None else start_iter
  if cfg.is_official:
    return decode(init_ids, tokens_to_logits, noise, num_iter=num_iter, start_iter=start_iter,
                  choice_temperature=cfg.choice_temperature, mask_schedule=cfg.mask_schedule, step_fn=step_fn)
  if not 0 <= start_iter < num_iter:
    raise ValueError(f"decode_with_config: need 0 <= start_iter < num_iter, got {start_iter}, {num_iter}")
  ids = torch.as_tensor(init_ids).long()
  n = num_iter - start_iter
  device = ids.device
  if isinstance(noise, RecordedNoise):
    noise.check_steps(n)
    noise = noise.to(device)
  plan = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
          for k, v in schedules.decode_plan(cfg, num_iter, start_iter, ids.shape[1]).items()}
  unknown_at_start = (ids == MASK_TOKEN_ID).sum(-1)
  records = {k: [] for k in ("input", "sampled", "mask_len", "masking", "after")}
  cur_ids = ids
  softmax_temperature = torch.tensor(cfg.softmax_temperature, dtype=torch.float32, device=device)  # made once
  for index in range(n):
    step = start_iter + index
    if cfg.guidance_scale > 0:
      logits = guided_logits(tokens_to_logits, cur_ids, plan["guidance"][index])
    else:
      logits = tokens_to_logits(cur_ids).float()
    if cfg.softmax_temperature != 1:
      logits = logits / softmax_temperature
    g_sample = noise.gumbel_sample(index, tuple(logits.shape), device)
    sampled_ids, unknown_map = sample_tokens(logits, cur_ids, g_sample)
    probs = selected_probs(logits, sampled_ids)
    mask_len = clamp_mask_len(plan["mask_len"][step, unknown_at_start].unsqueeze(-1), unknown_map)
    g_choice = noise.gumbel_choice(index, tuple(probs.shape), device)
    if cfg.order == "halton":
      confidence = (-plan["halton_rank"]).expand_as(probs)
    else:
      a, b = plan["conf_log"][index], plan["conf_noise"][index]
      confidence = torch.where(a > 0, a * torch.log(probs), torch.zeros_like(probs)) + b * g_choice
    confidence = confidence.masked_fill(~unknown_map, CONFIDENCE_OF_KNOWN_TOKENS)
    cut_off = torch.gather(torch.sort(confidence, dim=-1)[0], -1, mask_len)
    masking = confidence < cut_off
    next_ids = sampled_ids.masked_fill(masking, MASK_TOKEN_ID)
    for key, value in zip(records, (cur_ids, sampled_ids, mask_len, masking, next_ids)):
      records[key].append(value)
    cur_ids = next_ids
  return _stack_output(ids, start_iter, records)
