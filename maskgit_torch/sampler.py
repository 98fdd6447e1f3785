"""MaskGIT iterative parallel decoding in PyTorch: one decode loop, step for step the JAX one (maskgit_jax/sampler.py).

Every decoder is a plan for the loop (maskgit_common/decode_plan.py): the official decoder (google-research/maskgit
`parallel_decode.decode`, with the options of configs.SamplerConfig), the seed's `MaskGIT.sample` (valeoai
MaskGIT-pytorch v1) and Halton-MaskGIT's `HaltonSampler`. Each step: logits -> categorical draw -> confidence ->
which tokens become known (official: the mask_len least confident are masked again; seed: the t most confident
are revealed; Halton: the cells of rank below the step's cumulative count are revealed).

Randomness comes from a noise provider (maskgit_torch/noise.py): `GeneratorNoise(generator)` or `RecordedNoise`
(recorded draws; with them torch reproduces the official, seed and Halton trajectories exactly). Every per-step
number is a host table made before the loop and moved to the device once, so the loop never syncs with the host
(the seed's early stop is known before the loop from the initial unknown counts: one transfer).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from maskgit_common import decode_plan, schedules
from maskgit_common.token_layout import token_layout
from maskgit_torch.noise import GeneratorNoise, RecordedNoise, gumbel  # noqa: F401  (the public providers)

CONFIDENCE_OF_KNOWN_TOKENS = float("inf")
MASK_TOKEN_ID = -1
NULL_CLASS_TOKEN = -1  # the official unconditional pass's class token: the mask id (maskgit_common.masking)


# Schedules ------------------------------------------------------------------------------------------------------
def schedule(ratio, total_unknown, method: str = "cosine") -> torch.Tensor:
  """Mask ratio gamma(ratio) in [1e-6, 1], float32: `maskgit_common.schedules.mask_ratio` (the official values),
  evaluated on the host in numpy (exact replay of the official float32 arithmetic), returned on ratio's device."""
  device = ratio.device if isinstance(ratio, torch.Tensor) else torch.device("cpu")
  out = schedules.mask_ratio(_to_numpy(ratio), _to_numpy(total_unknown), method)
  return torch.from_numpy(np.ascontiguousarray(out)).to(device)


def decode_mask_ratio(step: int, num_iter: int, total_unknown, method: str = "cosine") -> torch.Tensor:
  """The mask ratio the official decoding loop uses at `step` (`schedules.decode_mask_ratio`)."""
  return torch.from_numpy(np.ascontiguousarray(
      schedules.decode_mask_ratio(step, num_iter, _to_numpy(total_unknown), method)))


def _to_numpy(x):
  return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# The decode output ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeOutput(decode_plan.DecodeOutputViews):
  """Official return value `final_seqs` (B, T, S) plus every step's state (n = T - start_iter, S positions in the
  layout's order; rows of steps after the seed's early stop repeat the state)."""
  final_seqs: torch.Tensor  # (B, T, S); rows before start_iter repeat init_ids; row t: official = step t's samples,
  # seed / Halton = the tokens after step t
  step_input_ids: torch.Tensor  # (n, B, S) the model's input
  step_sampled_ids: torch.Tensor  # (n, B, S) draws at unknown positions, inputs elsewhere
  step_mask_len: torch.Tensor  # (n, B, 1) official: tokens masked again; seed / Halton: tokens unknown after
  step_masking: torch.Tensor  # (n, B, S) bool, True = unknown after the step
  step_state_after: torch.Tensor  # (n, B, S) the next step's input
  step_unknown: torch.Tensor  # (n, B, S) bool, True = unknown at the start of the step
  step_predictions: torch.Tensor  # (n, B, S) the categorical draw at every position (the seed's l_codes)
  step_count: torch.Tensor  # (n, B) tokens the step's rule commits: official #unknown - mask_len, seed t (after
  # the batch clip), Halton the step's cells (r_t - r_{t-1})
  steps_run: torch.Tensor  # () executed steps (the seed stops once every token is known)
  final_tokens: torch.Tensor  # (B, L) image tokens of the result (clamped to [0, K-1] where the layout says K)
  class_position: int = 0


# One step -------------------------------------------------------------------------------------------------------
def selected_probs(logits, sampled_ids):
  """softmax(logits) at `sampled_ids`, as jax.nn.softmax (exp(x - max) / sum) then take_along_axis, bit for bit:
  gathering exp(x - max) first and dividing by the same sum afterwards rounds exactly as gathering from the
  normalised probabilities, without dividing all K of them. Ids outside [0, K) are clamped."""
  e = torch.exp(logits - logits.amax(-1, keepdim=True))
  index = sampled_ids.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
  return (torch.gather(e, -1, index) / e.sum(-1, keepdim=True)).squeeze(-1)


def clamp_mask_len(raw, unknown_map):
  """Official clamp: keep >= 1 prediction this round, mask >= 1 for the next; NaN (log schedule, N0 <= 1) -> 0."""
  unknown_now = unknown_map.sum(-1, keepdim=True).to(raw.dtype)
  mask_len = torch.maximum(torch.ones_like(raw), torch.minimum(unknown_now - 1, raw))
  return torch.nan_to_num(mask_len, nan=0.0).long()


def _top_k_draw(scores, g, k):
  """argmax(scores + g) among the k highest scores (ids of the full width)."""
  values, ids = torch.topk(scores, k, dim=-1)
  return torch.gather(ids, -1, torch.argmax(values + torch.gather(g, -1, ids), dim=-1, keepdim=True)).squeeze(-1)


def categorical(rule, logits, g):
  """(draws (B, L), p(draw) (B, L)): argmax(logits + g) with the official selected_probs, or (the seed, Halton)
  argmax(log softmax + g) and softmax at the draw; top_k draws among the k most likely (Halton: renormalised)."""
  if rule.categorical == "logits":
    pred = torch.argmax(g + logits, dim=-1) if not rule.top_k else _top_k_draw(logits, g, rule.top_k)
    return pred, selected_probs(logits, pred)
  prob = torch.softmax(logits, -1)
  if rule.top_k:  # Halton-MaskGIT l.130-134: topk(prob), renormalised, then sampled
    values, ids = torch.topk(prob, rule.top_k, dim=-1)
    values = values / values.sum(-1, keepdim=True)
    pick = torch.argmax(torch.log(values) + torch.gather(g, -1, ids), dim=-1, keepdim=True)
    pred = torch.gather(ids, -1, pick).squeeze(-1)
  else:
    pred = torch.argmax(torch.log(prob) + g, dim=-1)
  return pred, torch.gather(prob, -1, pred.unsqueeze(-1)).squeeze(-1)


def confidence(rule, probs, draws, params):
  """The confidence of each draw (the seed's `linear` in float64, as its numpy noise makes it)."""
  if rule.confidence == "weighted":
    a, b = params["conf_log"], params["conf_noise"]
    return torch.where(a > 0, a * torch.log(probs), torch.zeros_like(probs)) + b * draws["gumbel_choice"]
  if rule.confidence == "halton_rank":
    return -params["rank"].to(probs.dtype).expand_as(probs)
  if rule.confidence == "linear64":  # log(conf) + (r_temp * N) * (1 - i / (T - 1))
    return torch.log(probs).double() + (params["noise_scale"] * draws["gumbel_choice"]) * params["noise_keep"]
  if "uniform_choice" in draws:  # warm_up (first two steps), random
    return draws["uniform_choice"]
  return probs  # warm_up later, none: the raw probability


def decode_step(rule, logits, codes, unknown, draws, params):
  """One step from its logits -> (draws, codes after, unknown after, mask_len (B, 1), count (B,)).

  Tensors in and out (the plan's numbers for the step are 0-d / (B, 1) tensors in `params`, `rule` a constant),
  so torch.compile turns it into the same small graph for every step (MaskGIT(..., torch_compile=True)).
  """
  pred, probs = categorical(rule, logits, draws["gumbel_sample"])
  if rule.selection == "rank":  # Halton: the cells of rank < the cumulative count (order[prev:r], l.106-110)
    reveal = unknown & (params["rank"] < params["count"])
    return pred, torch.where(reveal, pred, codes), unknown & ~reveal, None, params["step_cells"].expand(len(codes))
  conf = confidence(rule, probs, draws, params)
  if rule.selection == "remask":  # official: the mask_len least confident are masked again
    conf = conf.masked_fill(~unknown, CONFIDENCE_OF_KNOWN_TOKENS)
    mask_len = clamp_mask_len(params["mask_len"], unknown)
    padded = torch.cat([torch.sort(conf, dim=-1)[0], torch.full_like(conf[:, :1], float("inf"))], dim=-1)
    masking = conf < torch.gather(padded, -1, mask_len)  # the pad: the class token's +inf of the official loop
    after = torch.where(unknown, pred, codes).masked_fill(masking, params["mask_id"])
    return pred, after, masking, mask_len, (unknown.sum(-1, keepdim=True) - mask_len).squeeze(-1)
  # The seed: t (the step's count clipped by the unknown tokens of the whole batch, known before the loop) top
  # indices of torch.topk, as the seed takes them (its order among tied values); the code is written where
  # conf >= the t-th largest (ties included), the mask cleared at exactly those t (FORMAT.md quirks 13, 14).
  conf = conf.masked_fill(~unknown, float("-inf"))
  t = params["t"]
  threshold, top = torch.topk(conf, t, dim=-1)
  written = unknown & (conf >= threshold[:, -1:])
  count = torch.full((len(codes),), t, dtype=torch.long, device=codes.device)
  return pred, torch.where(written, pred, codes), unknown.scatter(-1, top, False), None, count


# The loop -------------------------------------------------------------------------------------------------------
def _with_class(codes, class_tokens, position):
  return torch.cat([codes[:, :position], class_tokens[:, None], codes[:, position:]], dim=1)


def _logits(plan, step, tokens_to_logits, seq, tables):
  """The step's logits over the image positions and sample width: guidance, then the softmax temperature."""
  rule, batch = plan.rule, len(seq)
  if rule.guidance:  # one call on 2B rows: the conditional rows, then the same with the null class
    null = seq.clone()
    null[:, rule.class_position] = rule.null_class_id
    cond, uncond = tokens_to_logits(torch.cat([seq, null], dim=0)).float().split(batch, dim=0)
    logits = tables["cond_weight"][step] * cond - tables["uncond_weight"][step] * uncond
  else:
    logits = tokens_to_logits(seq).float()
  if logits.shape[1] == seq.shape[1]:  # logits at every position: drop the class token's
    logits = torch.cat([logits[:, :rule.class_position], logits[:, rule.class_position + 1:]], dim=1)
  logits = logits[..., :rule.sample_width or None]
  if rule.temperature == "divide":
    logits = logits / tables["temperature"][step]
  elif rule.temperature == "multiply":
    logits = logits * tables["temperature"][step]
  return logits


def _draws(plan, noise, index, step, logits_shape, device):
  rule, (batch, length, width) = plan.rule, logits_shape
  positions, image = rule.draw_positions(length)
  draws = {"gumbel_sample": noise.gumbel_sample(index, (batch, positions, width), device)[:, image]}
  if rule.confidence in ("weighted", "linear64"):
    dtype = torch.float64 if rule.confidence == "linear64" else torch.float32
    draws["gumbel_choice"] = noise.gumbel_choice(index, (batch, positions), device, dtype)[:, image]
  if plan.uniform_index[step] >= 0:
    draws["uniform_choice"] = noise.uniform_choice(int(plan.uniform_index[step]), (batch, length), device)
  return draws


def _tables(plan, device):
  names = ("cond_weight", "uncond_weight", "temperature", "conf_log", "conf_noise", "noise_scale", "noise_keep")
  tables = {n: torch.from_numpy(np.ascontiguousarray(getattr(plan, n))).to(device) for n in names}
  for name in ("mask_len", "counts", "rank"):
    if getattr(plan, name) is not None:
      tables[name] = torch.from_numpy(np.ascontiguousarray(getattr(plan, name))).to(device)
  return tables


def _step_params(plan, tables, step, unknown_at_start, rank):
  params = {n: tables[n][step] for n in ("conf_log", "conf_noise", "noise_scale", "noise_keep")}
  params["mask_id"] = plan.rule.mask_id
  if "mask_len" in tables:
    params["mask_len"] = tables["mask_len"][step, unknown_at_start].unsqueeze(-1)
  if "counts" in tables:
    params["count"] = tables["counts"][step]
    params["step_cells"] = tables["counts"][step] - (tables["counts"][step - 1] if step else 0)
  if rank is not None:
    params["rank"] = rank
  return params


def _order_rank(plan, noise, batch, device):
  """(B, L) each sample's Halton rank, rolled by a random offset per sample when the plan says so (l.86-91)."""
  rank = torch.from_numpy(plan.rank).to(device).long().expand(batch, -1)
  if not plan.rule.roll_order:
    return rank
  shift = noise.integers("order_roll", (batch,), plan.rank.shape[0], device).long()[:, None]
  return (rank + shift) % plan.rank.shape[0]


def run_plan(plan, init_ids, tokens_to_logits: Callable, noise, step_fn: Callable = decode_step) -> DecodeOutput:
  """Decodes (B, S) ids in the layout's order (the mask id = unknown) by following `plan` (a DecodePlan)."""
  rule = plan.rule
  ids = torch.as_tensor(init_ids).long()
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {tuple(ids.shape)}")
  device, (batch, seq_len), position = ids.device, ids.shape, rule.class_position
  class_tokens = ids[:, position]
  codes = torch.cat([ids[:, :position], ids[:, position + 1:]], dim=1)
  unknown = codes == rule.mask_id
  unknown_at_start = unknown.sum(-1)
  # The seed's per-step t and its early stop follow from the initial unknown counts: one transfer, before the loop.
  reveal = plan.reveal_counts(unknown_at_start.cpu().numpy()) if rule.stop_when_done else None
  steps_run = plan.steps if reveal is None else len(reveal)
  if isinstance(noise, RecordedNoise):
    noise.check_draws(plan.draw_counts(steps_run))
    noise = noise.to(device)
  if rule.random_init:  # the seed with mask_value < 0: random codes, every token still unknown
    codes = torch.where(unknown, noise.integers("init_tokens", tuple(codes.shape), rule.codebook_size, device),
                        codes)
  tables = _tables(plan, device)
  rank = _order_rank(plan, noise, batch, device) if plan.rank is not None else None
  records = {k: [] for k in ("input", "unknown", "pred", "sampled", "mask_len", "masking", "after", "count")}
  for index in range(plan.steps):
    step = plan.start_iter + index
    if index < steps_run:
      logits = _logits(plan, step, tokens_to_logits, _with_class(codes, class_tokens, position), tables)
      draws = _draws(plan, noise, index, step, tuple(logits.shape), device)
      params = _step_params(plan, tables, step, unknown_at_start, rank)
      if reveal is not None:
        params["t"] = reveal[index]
      pred, after, unknown_after, mask_len, count = step_fn(rule, logits, codes, unknown, draws, params)
    else:  # the seed stopped: nothing is drawn or written
      pred, after, unknown_after, mask_len, count = codes, codes, unknown, None, torch.zeros_like(unknown_at_start)
    if mask_len is None:
      mask_len = unknown_after.sum(-1, keepdim=True)
    values = (codes, unknown, pred, torch.where(unknown, pred, codes), mask_len, unknown_after, after, count)
    for key, value in zip(records, values):
      records[key].append(value)
    codes, unknown = after, unknown_after
  return _stack_output(plan, ids, class_tokens, records, steps_run)


def _stack_output(plan, ids, class_tokens, records: dict, steps_run: int) -> DecodeOutput:
  """Per-step lists -> DecodeOutput; rows of final_seqs before start_iter repeat the initial ids (official)."""
  rule = plan.rule
  stacked = {k: torch.stack(v) for k, v in records.items()}
  n = stacked["input"].shape[0]
  cls = class_tokens[None].expand(n, -1)
  seq = {k: torch.stack([_with_class(x, c, rule.class_position) for x, c in zip(stacked[k], cls)])
         for k in ("input", "pred", "sampled", "after")}
  flags = {k: torch.stack([_with_class(x, torch.zeros_like(cls[0], dtype=torch.bool), rule.class_position)
                           for x in stacked[k]]) for k in ("unknown", "masking")}
  rows = seq["sampled"] if rule.selection == "remask" else seq["after"]
  before = ids.unsqueeze(1).expand(-1, plan.start_iter, -1)
  final_seqs = torch.cat([before, rows.transpose(0, 1)], dim=1)
  final = (stacked["sampled"] if rule.selection == "remask" else stacked["after"])[-1]
  if rule.codebook_size:
    final = final.clamp(0, rule.codebook_size - 1)
  return DecodeOutput(final_seqs, seq["input"], seq["sampled"], stacked["mask_len"], flags["masking"],
                      seq["after"], flags["unknown"], seq["pred"], stacked["count"],
                      torch.tensor(steps_run), final, rule.class_position)


# Entry points ---------------------------------------------------------------------------------------------------
def decode(init_ids, tokens_to_logits: Callable, noise, *, num_iter: int = 12, start_iter: int = 0,
           choice_temperature: float = 1.0, mask_schedule: str = "cosine",
           step_fn: Callable = decode_step) -> DecodeOutput:
  """The official parallel decoding; same arguments as maskgit_jax.sampler.decode.

  Args:
    init_ids: (B, S) integer tensor: the class token, then codes or -1 (unknown).
    tokens_to_logits: ids (B, S) int64 -> logits (B, S, K) over the image codes.
    noise: `GeneratorNoise(generator)` or `RecordedNoise(gumbel_sample, gumbel_choice)`.
    step_fn: `decode_step` or a compiled version of it.
  """
  ids = torch.as_tensor(init_ids)
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {tuple(ids.shape)}")
  plan = decode_plan.official_plan(num_iter, start_iter, choice_temperature, mask_schedule, ids.shape[1])
  return run_plan(plan, ids, tokens_to_logits, noise, step_fn)


def decode_with_config(init_ids, tokens_to_logits: Callable, noise, sampler_config, *, num_iter=None,
                       start_iter=None, layout=None, step_fn: Callable = decode_step) -> DecodeOutput:
  """Decoding with a `configs.SamplerConfig` (or a whole MaskGITConfig, whose token layout is then used); see
  maskgit_jax.sampler.decode_with_config. `layout` (a TokenLayout) is needed for seed-layout models when only the
  sampler section is given. Defaults: exactly `decode`."""
  cfg = getattr(sampler_config, "sampler", sampler_config)
  if layout is None and hasattr(sampler_config, "sampler"):
    layout = token_layout(sampler_config)
  ids = torch.as_tensor(init_ids)
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {tuple(ids.shape)}")
  plan = decode_plan.plan_from_config(cfg, ids.shape[1], layout, num_iter, start_iter)
  return run_plan(plan, ids, tokens_to_logits, noise, step_fn)
