"""MaskGIT iterative parallel decoding in JAX: one decode loop for every decoder, jittable, never syncing with the
host.

Every decoder is a plan for the loop (maskgit_common/decode_plan.py): the official decoder (google-research/maskgit
`maskgit/libml/parallel_decode.py`, step for step and key for key, with the options of configs.SamplerConfig), the
seed's `MaskGIT.sample` (valeoai MaskGIT-pytorch v1) and Halton-MaskGIT's `HaltonSampler`. The official step:
  1. logits = tokens_to_logits(ids)                            (B, S, K)
  2. key, k_sample = split(key); sampled = argmax(logits + gumbel(k_sample))   (the categorical draw)
  3. ratio = (t + 1) / T; mask_len = clip(floor(N0 * schedule(ratio, N0)), 1, #unknown - 1), N0 = initial #unknown
  4. key, k_choice = split(key); confidence = log p(sampled) + choice_temperature * (1 - ratio) * gumbel(k_choice),
     +inf at known positions; the mask_len least confident positions are masked again for the next step.
The loop is a `lax.scan` with the step index traced, as the official `lax.while_loop`; for the official decoder
the schedule and the choice temperature are the official expressions traced in the loop (`_official_hook`: XLA
simplifies them as inside the official loop, (t + 1) / T becoming (t + 1) * (1/T)), so the mask lengths agree bit
for bit on any device; every other number comes from the plan's host tables, shared with torch. The seed's
"linear" confidence is float64 (its numpy noise), computed in a scoped `jax.enable_x64`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_common import decode_plan, schedules
from maskgit_common.token_layout import token_layout
from maskgit_jax.noise import PRNGNoise, RecordedNoise  # noqa: F401  (the public providers)

# Known tokens get infinite confidence, so they are never masked again (the official _CONFIDENCE_OF_KNOWN_TOKENS).
CONFIDENCE_OF_KNOWN_TOKENS = jnp.inf
MASK_TOKEN_ID = -1
NULL_CLASS_TOKEN = -1  # the official unconditional pass's class token: the mask id (maskgit_common.masking)


# Schedules ------------------------------------------------------------------------------------------------------
def schedule(ratio, total_unknown, method: str = "cosine"):
  """Mask ratio gamma(ratio) in [1e-6, 1]: the official `mask_schedule.schedule` plus the seed-named curves.

  Official methods use the official jnp expressions (so the values are the official ones on any device); `arccos`,
  `square`, `root` follow `maskgit_common.schedules.mask_ratio`.
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
  else:  # arccos
    mask_ratio = jnp.arccos(ratio) / (math.pi / 2.)
  return jnp.clip(mask_ratio, 1e-6, 1.)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _loop_mask_ratio(step, num_iter, total_unknown, method):
  return schedule(1. * (step + 1) / num_iter, total_unknown, method)


def decode_mask_ratio(step: int, num_iter: int, total_unknown, method: str = "cosine"):
  """The mask ratio the decoding loop uses at `step`: the official expression with the step traced, as inside the
  official `lax.while_loop`; the seed-named curves use `maskgit_common.schedules`."""
  if not _official_method(method):
    return jnp.asarray(schedules.decode_mask_ratio(step, num_iter, np.asarray(total_unknown), method))
  return _loop_mask_ratio(jnp.int32(step), num_iter, jnp.asarray(total_unknown, jnp.int32), method)


def _official_method(method: str) -> bool:
  return method in ("uniform", "cosine", "log", "exp") or method.startswith("pow")


# The decode output ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeOutput(decode_plan.DecodeOutputViews):
  """Official return value `final_seqs` (B, T, S) plus every step's state; the fields of maskgit_torch.sampler's."""
  final_seqs: jax.Array  # (B, T, S) int32
  step_input_ids: jax.Array  # (n, B, S) int32
  step_sampled_ids: jax.Array  # (n, B, S) int32
  step_mask_len: jax.Array  # (n, B, 1) int32
  step_masking: jax.Array  # (n, B, S) bool
  step_state_after: jax.Array  # (n, B, S) int32
  step_unknown: jax.Array  # (n, B, S) bool
  step_predictions: jax.Array  # (n, B, S) int32
  step_count: jax.Array  # (n, B) int32
  steps_run: jax.Array  # () int32
  final_tokens: jax.Array  # (B, L) int32
  class_position: int = 0


_DATA = [f.name for f in dataclasses.fields(DecodeOutput) if f.name != "class_position"]
jax.tree_util.register_dataclass(DecodeOutput, data_fields=_DATA, meta_fields=["class_position"])


def _x64(enabled: bool):
  """The seed's float64 confidence: a scoped jax.enable_x64 (nothing changes where it is off or already on)."""
  return jax.enable_x64(True) if enabled and not jax.config.jax_enable_x64 else contextlib.nullcontext()


# One step -------------------------------------------------------------------------------------------------------
def mask_by_random_topk(mask_len, probs, gumbel, temperature):
  """(B, S) bool, True = mask: the official `mask_by_random_topk` with its Gumbel draw passed in.

  confidence = log(probs) + temperature * gumbel; the mask_len lowest per row are masked.
  """
  confidence = jnp.log(probs) + temperature * gumbel
  sorted_confidence = jnp.sort(confidence, axis=-1)
  cut_off = jnp.take_along_axis(sorted_confidence, mask_len.astype(jnp.int32), axis=-1)
  return confidence < cut_off


def _top_k_draw(scores, g, k):
  values, ids = jax.lax.top_k(scores, k)
  pick = jnp.argmax(values + jnp.take_along_axis(g, ids, -1), axis=-1)[..., None]
  return jnp.take_along_axis(ids, pick, -1)[..., 0]


def categorical(rule, logits, g):
  """(draws (B, L), p(draw)): argmax(logits + g) (official) or argmax(log softmax + g) (the seed, Halton); top_k
  draws among the k most likely (Halton: renormalised); see maskgit_torch.sampler.categorical."""
  if rule.categorical == "logits":
    pred = jnp.argmax(g + logits, axis=-1) if not rule.top_k else _top_k_draw(logits, g, rule.top_k)
    probs = jax.nn.softmax(logits, axis=-1)
  else:
    probs = jax.nn.softmax(logits, axis=-1)
    if rule.top_k:  # Halton-MaskGIT l.130-134
      values, ids = jax.lax.top_k(probs, rule.top_k)
      values = values / values.sum(-1, keepdims=True)
      pick = jnp.argmax(jnp.log(values) + jnp.take_along_axis(g, ids, -1), axis=-1)[..., None]
      pred = jnp.take_along_axis(ids, pick, -1)[..., 0]
    else:
      pred = jnp.argmax(jnp.log(probs) + g, axis=-1)
  pred = pred.astype(jnp.int32)
  return pred, jnp.take_along_axis(probs, pred[..., None], -1)[..., 0]


def confidence(rule, probs, draws, params):
  """The confidence of each draw (see maskgit_torch.sampler.confidence); `linear64` inside the float64 scope."""
  if rule.confidence == "weighted":
    a, b = params["conf_log"], params["conf_noise"]
    return jnp.where(a > 0, a * jnp.log(probs), 0.) + b * draws["gumbel_choice"]
  if rule.confidence == "halton_rank":
    return jnp.broadcast_to(-params["rank"].astype(probs.dtype), probs.shape)
  if rule.confidence == "linear64":
    noise = (params["noise_scale"] * draws["gumbel_choice"]) * params["noise_keep"]
    return jnp.log(probs).astype(jnp.float64) + noise
  if rule.confidence in ("warm_up", "random"):
    return jnp.where(params["uses_uniform"], draws["uniform_choice"], probs)
  return probs


def _official_hook(plan, params, probs, unknown, g_choice, step):
  """The official decoder's re-masking with its arithmetic traced (module docstring): mask_len from the official
  schedule expression (or the host table for the seed-named curves), temperature choice_temperature * (1 - ratio)."""
  method, num_iter = plan.rule.trace_official, plan.num_iter
  ratio = 1. * (step + 1) / num_iter
  if _official_method(method):
    n0 = params["unknown_at_start"]
    mask_len = jnp.expand_dims(jnp.floor(n0 * schedule(ratio, n0, method)), 1)
  else:
    mask_len = params["mask_len"]
  mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, axis=-1, keepdims=True) - 1, mask_len))
  temperature = plan.choice_temperature * (1. - ratio)  # a Python float, as in the official loop
  probs = jnp.where(unknown, probs, CONFIDENCE_OF_KNOWN_TOKENS)
  padded = jnp.concatenate([probs, jnp.full_like(probs[:, :1], jnp.inf)], axis=-1)  # the class token's +inf
  padded_g = jnp.concatenate([g_choice, jnp.zeros_like(g_choice[:, :1])], axis=-1)
  return mask_by_random_topk(mask_len, padded, padded_g, temperature)[:, :-1], mask_len.astype(jnp.int32)


def decode_step(plan, params, logits, codes, unknown, draws, step):
  """One step from its logits -> (draws, codes after, unknown after, mask_len (B, 1) or None, count (B,))."""
  rule, batch = plan.rule, codes.shape[0]
  pred, probs = categorical(rule, logits, draws["gumbel_sample"])
  if rule.selection == "rank":  # Halton: the cells of rank < the cumulative count (order[prev:r], l.106-110)
    reveal = unknown & (params["rank"] < params["count"])
    count = jnp.broadcast_to(params["step_cells"], (batch,)).astype(jnp.int32)
    return pred, jnp.where(reveal, pred, codes), unknown & ~reveal, None, count
  if rule.selection == "remask":
    if rule.trace_official:
      masking, mask_len = _official_hook(plan, params, probs, unknown, draws["gumbel_choice"], step)
    else:
      conf = jnp.where(unknown, confidence(rule, probs, draws, params), CONFIDENCE_OF_KNOWN_TOKENS)
      mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, axis=-1, keepdims=True) - 1, params["mask_len"]))
      mask_len = jnp.nan_to_num(mask_len).astype(jnp.int32)
      padded = jnp.concatenate([jnp.sort(conf, axis=-1), jnp.full_like(conf[:, :1], jnp.inf)], axis=-1)
      masking = conf < jnp.take_along_axis(padded, mask_len, axis=-1)
    after = jnp.where(masking, rule.mask_id, jnp.where(unknown, pred, codes))
    return pred, after, masking, mask_len, (jnp.sum(unknown, axis=-1) - mask_len[:, 0]).astype(jnp.int32)
  # The seed (maskgit_torch.sampler.decode_step): the t most confident after the batch clip revealed, the code
  # written where conf >= the t-th (ties included). t is traced here, so a stable sort ranks them: tied values go
  # lower index first, where torch takes torch.topk's order (the seed's); they tie only for degenerate logits.
  with _x64(rule.confidence == "linear64"):
    conf = jnp.where(unknown, confidence(rule, probs, draws, params), -jnp.inf)
    t = jnp.maximum(jnp.minimum(params["count"], jnp.sum(unknown)), 0).astype(jnp.int32)
    order = jnp.argsort(-conf, axis=-1, stable=True)
    ranked = jnp.take_along_axis(conf, order, -1)
    position = jnp.zeros_like(order).at[jnp.arange(batch)[:, None], order].set(
        jnp.arange(conf.shape[-1], dtype=order.dtype)[None, :])
    threshold = ranked[:, jnp.maximum(t - 1, 0)][:, None]
    written = unknown & (conf >= threshold) & (t > 0)
    revealed = position < t
  return pred, jnp.where(written, pred, codes), unknown & ~revealed, None, jnp.broadcast_to(t, (batch,))


# The loop -------------------------------------------------------------------------------------------------------
def _with_class(codes, class_tokens, position):
  return jnp.concatenate([codes[..., :position], class_tokens[..., None], codes[..., position:]], axis=-1)


def _logits(plan, step, tokens_to_logits, seq, tables):
  """The step's logits over the image positions and sample width: guidance, then the softmax temperature."""
  rule = plan.rule
  if rule.guidance:  # one call on 2B rows: the conditional rows, then the same with the null class
    null = seq.at[:, rule.class_position].set(rule.null_class_id)
    cond, uncond = jnp.split(tokens_to_logits(jnp.concatenate([seq, null], axis=0)), 2, axis=0)
    logits = tables["cond_weight"][step] * cond - tables["uncond_weight"][step] * uncond
  else:
    logits = tokens_to_logits(seq)
  logits = logits.astype(jnp.float32)
  if logits.shape[1] == seq.shape[1]:  # logits at every position: drop the class token's
    logits = jnp.concatenate([logits[:, :rule.class_position], logits[:, rule.class_position + 1:]], axis=1)
  logits = logits[..., :rule.sample_width or None]
  if rule.temperature == "divide":
    logits = logits / tables["temperature"][step]
  elif rule.temperature == "multiply":
    logits = logits * tables["temperature"][step]
  return logits


def _draws(plan, noise, state, index, step, shape, tables):
  rule, (batch, length, width) = plan.rule, shape
  positions, image = rule.draw_positions(length)
  state, g = noise.gumbel_sample(state, index, (batch, positions, width))
  draws = {"gumbel_sample": g[:, image]}
  if rule.confidence in ("weighted", "linear64"):  # (the provider widens the seed's draws to float64 itself)
    dtype = jnp.float64 if rule.confidence == "linear64" else jnp.float32
    state, g = noise.gumbel_choice(state, index, (batch, positions), dtype)
    with _x64(rule.confidence == "linear64"):
      draws["gumbel_choice"] = g[:, image]
  if rule.confidence in ("warm_up", "random"):
    state, draws["uniform_choice"] = noise.uniform_choice(state, jnp.maximum(tables["uniform_index"][step], 0),
                                                          (batch, length))
  return state, draws


def _step_params(plan, tables, step, unknown_at_start, rank):
  params = {n: tables[n][step] for n in ("conf_log", "conf_noise")}
  params["unknown_at_start"] = unknown_at_start
  params["uses_uniform"] = tables["uniform_index"][step] >= 0
  if plan.rule.confidence == "linear64":
    with _x64(True):
      params["noise_scale"] = jnp.asarray(plan.noise_scale)[step]
      params["noise_keep"] = jnp.asarray(plan.noise_keep)[step]
  if "mask_len" in tables:
    params["mask_len"] = tables["mask_len"][step, unknown_at_start][:, None]
  if "counts" in tables:
    params["count"] = tables["counts"][step]
    params["step_cells"] = tables["counts"][step] - jnp.where(step > 0, tables["counts"][jnp.maximum(step - 1, 0)],
                                                               0)
  if rank is not None:
    params["rank"] = rank
  return params


def _tables(plan):
  names = ("cond_weight", "uncond_weight", "temperature", "conf_log", "conf_noise", "uniform_index")
  tables = {n: jnp.asarray(getattr(plan, n)) for n in names}
  for name in ("mask_len", "counts"):
    if getattr(plan, name) is not None:
      tables[name] = jnp.asarray(getattr(plan, name).astype(np.float32 if name == "mask_len" else np.int32))
  return tables


def run_plan(plan, init_ids, tokens_to_logits: Callable, noise) -> DecodeOutput:
  """Decodes (B, S) ids in the layout's order (the mask id = unknown) by following `plan`; jittable."""
  rule, position = plan.rule, plan.rule.class_position
  ids = jnp.asarray(init_ids).astype(jnp.int32)
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {ids.shape}")
  batch = ids.shape[0]
  class_tokens = ids[:, position]
  codes = jnp.concatenate([ids[:, :position], ids[:, position + 1:]], axis=1)
  unknown = codes == rule.mask_id
  unknown_at_start = jnp.sum(unknown, axis=-1)
  traced = isinstance(unknown_at_start, jax.core.Tracer)
  if isinstance(noise, RecordedNoise) and not (rule.stop_when_done and traced):
    # (under jit the seed's executed steps depend on the inputs: only the draws' shapes are checked there)
    noise.check_draws(plan.draw_counts(plan.steps_run(np.asarray(unknown_at_start)) if rule.stop_when_done
                                       else None))
  state = noise.init_state()
  if rule.random_init:
    state, random_codes = noise.integers(state, "init_tokens", codes.shape, rule.codebook_size)
    codes = jnp.where(unknown, random_codes.astype(jnp.int32), codes)
  rank = None
  if plan.rank is not None:
    rank = jnp.broadcast_to(jnp.asarray(plan.rank), codes.shape)
    if rule.roll_order:  # Halton l.86-91: each sample's order rolled by randint(0, N)
      state, shift = noise.integers(state, "order_roll", (batch,), plan.rank.shape[0])
      rank = (rank + shift[:, None].astype(jnp.int32)) % plan.rank.shape[0]
  tables = _tables(plan)

  def run(carry, index):
    codes, unknown, state = carry
    step = plan.start_iter + index
    logits = _logits(plan, step, tokens_to_logits, _with_class(codes, class_tokens, position), tables)
    state, draws = _draws(plan, noise, state, index, step, logits.shape, tables)
    pred, after, unknown_after, mask_len, count = decode_step(
        plan, _step_params(plan, tables, step, unknown_at_start, rank), logits, codes, unknown, draws, step)
    if mask_len is None:
      mask_len = jnp.sum(unknown_after, axis=-1, keepdims=True).astype(jnp.int32)
    record = (codes, unknown, pred, jnp.where(unknown, pred, codes), mask_len, unknown_after, after, count,
              jnp.bool_(True))
    return (after, unknown_after, state), record

  def skip(carry, index):  # the seed stopped: nothing is drawn or written
    codes, unknown, _ = carry
    zeros = jnp.zeros((batch,), jnp.int32)
    mask_len = jnp.sum(unknown, axis=-1, keepdims=True).astype(jnp.int32)
    return carry, (codes, unknown, codes, codes, mask_len, unknown, codes, zeros, jnp.bool_(False))

  def step_fn(carry, index):
    if not rule.stop_when_done:
      return run(carry, index)
    return jax.lax.cond(jnp.any(carry[1]), run, skip, carry, index)

  _, records = jax.lax.scan(step_fn, (codes, unknown, state), jnp.arange(plan.steps, dtype=jnp.int32))
  return _stack_output(plan, ids, class_tokens, records)


def _stack_output(plan, ids, class_tokens, records) -> DecodeOutput:
  rule = plan.rule
  codes, unknown, pred, sampled, mask_len, masking, after, count, ran = records
  n = codes.shape[0]
  cls = jnp.broadcast_to(class_tokens, (n,) + class_tokens.shape)
  seq = [_with_class(x, cls, rule.class_position).astype(jnp.int32) for x in (codes, pred, sampled, after)]
  flags = [_with_class(x, jnp.zeros_like(cls, dtype=bool), rule.class_position) for x in (unknown, masking)]
  rows = seq[2] if rule.selection == "remask" else seq[3]
  before = jnp.tile(ids[:, None, :], (1, plan.start_iter, 1))
  final_seqs = jnp.concatenate([before, jnp.swapaxes(rows, 0, 1)], axis=1)
  final = (sampled if rule.selection == "remask" else after)[-1].astype(jnp.int32)
  if rule.codebook_size:
    final = jnp.clip(final, 0, rule.codebook_size - 1)
  return DecodeOutput(final_seqs, seq[0], seq[2], mask_len.astype(jnp.int32), flags[1], seq[3], flags[0], seq[1],
                      count.astype(jnp.int32), jnp.sum(ran).astype(jnp.int32), final, rule.class_position)


# Entry points ---------------------------------------------------------------------------------------------------
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
  ids = jnp.asarray(init_ids)
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {ids.shape}")
  plan = decode_plan.official_plan(num_iter, start_iter, choice_temperature, mask_schedule, ids.shape[1])
  return run_plan(plan, ids, tokens_to_logits, noise)


def decode_with_config(init_ids, tokens_to_logits: Callable, noise, sampler_config, *, num_iter=None,
                       start_iter=None, layout=None) -> DecodeOutput:
  """Decoding with a `configs.SamplerConfig` (or a whole MaskGITConfig, whose token layout is then used);
  identical in both backends. With the default options this is exactly `decode`. Every per-step number comes from
  the plan (maskgit_common.decode_plan.plan_from_config) and every draw from `noise`. num_iter / start_iter
  override the config's (e.g. start_iter=sampler.edit_start for editing); `layout` (a TokenLayout) is needed for
  seed-layout models when only the sampler section is given."""
  cfg = getattr(sampler_config, "sampler", sampler_config)
  if layout is None and hasattr(sampler_config, "sampler"):
    layout = token_layout(sampler_config)
  ids = jnp.asarray(init_ids)
  if ids.ndim != 2:
    raise ValueError(f"decode: init_ids must be (B, S), got shape {ids.shape}")
  plan = decode_plan.plan_from_config(cfg, ids.shape[1], layout, num_iter, start_iter)
  return run_plan(plan, ids, tokens_to_logits, noise)
