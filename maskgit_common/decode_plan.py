"""Decode plans: what every step of a decode does, computed once on the host (numpy) from the sampler config.

Both backends have one decode loop (maskgit_torch/sampler.py and maskgit_jax/sampler.py `run_plan`); a decoder is
a plan for it (docs/ARCHITECTURE.md, "Decode plan"). Each step of the loop, on the L image positions:
  1. logits: one `tokens_to_logits` call, or with guidance one call on 2B rows (the last B with the null class at
     the class position) combined as cond_weight_t * cond - uncond_weight_t * uncond; then divided (official
     `softmax_temperature`) or multiplied (the seed's `sm_temp`, Halton's ramp) by temperature_t;
  2. the categorical draw over the first `sample_width` columns: argmax(logits + g) (official) or
     argmax(log softmax + g) (the seed and Halton, Gumbel-max of their `Categorical(probs)`), optionally among the
     `top_k` most likely tokens only;
  3. the confidence of each draw: official log p + b_t g with the known tokens at +inf (the mask_len least confident
     are masked again: `remask`), or the seed's modes with the known tokens at -inf (the t most confident are
     revealed: `top`), or none (Halton reveals the cells of rank < its cumulative count: `rank`).
`Rule` holds the static choices (hashable: a jit / torch.compile constant), `DecodePlan` the per-step numbers,
indexed by the step t in 0..T-1. Which draws a step takes is part of the plan (`draw_counts`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maskgit_common import halton, schedules, seed_schedules
from maskgit_common.errors import UserError

_F32 = np.float32


class PlanError(UserError, ValueError):
  """The sampler settings cannot decode these inputs (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """The static part of a plan: how each stage of the loop works (see the module docstring)."""
  decoder: str = "official"
  # Token layout (maskgit_common/token_layout.py).
  class_position: int = 0
  mask_id: int = -1
  null_class_id: int = -1
  sample_width: int = 0  # 0: every column tokens_to_logits returns
  codebook_size: int = 0  # the final tokens are clamped to [0, K - 1] (0: not clamped)
  # Stages.
  guidance: bool = False
  temperature: str = "none"  # none | divide | multiply
  categorical: str = "logits"  # logits | log_probs
  top_k: int = 0
  confidence: str = "weighted"  # weighted | halton_rank | linear64 | warm_up | random | prob | none
  selection: str = "remask"  # remask | top | rank
  trace_official: str = ""  # JAX traces this official schedule's arithmetic in the loop ("": host tables)
  draws_on_sequence: bool = True  # official: draws cover all S positions (the class position's are unused)
  stop_when_done: bool = False  # the seed: steps after every token is known are skipped
  random_init: bool = False  # the seed with a negative mask value: unknown tokens start as random codes
  roll_order: bool = False  # Halton randomize: each sample's order rolled by a random offset

  def draw_positions(self, length: int) -> tuple[int, slice]:
    """(positions the draws cover, the slice of them at the L image positions)."""
    if not self.draws_on_sequence:
      return length, slice(0, length)
    return length + 1, slice(1, None) if self.class_position == 0 else slice(0, length)


@dataclasses.dataclass(frozen=True, eq=False)
class DecodePlan:
  """Per-step numbers (index t = 0..T-1) of one decode; the executed steps are start_iter..T-1."""
  rule: Rule
  num_iter: int
  start_iter: int
  cond_weight: np.ndarray  # (T,) float32, guidance only
  uncond_weight: np.ndarray  # (T,) float32
  temperature: np.ndarray  # (T,) float32
  conf_log: np.ndarray  # (T,) float32 a_t of confidence a_t log p + b_t g (weighted)
  conf_noise: np.ndarray  # (T,) float32 b_t
  noise_scale: np.ndarray  # (T,) float64: linear64 confidence log p + (noise_scale_t * g) * noise_keep_t
  noise_keep: np.ndarray  # (T,) float64
  uniform_index: np.ndarray  # (T,) int32: index of the uniform draw step t uses, -1 = none (warm_up, random)
  mask_len: np.ndarray | None = None  # remask: (T, S + 1) float32 floor(N0 gamma_t) for N0 in 0..S
  counts: np.ndarray | None = None  # top: (T,) tokens revealed; rank: (T,) cumulative cells
  rank: np.ndarray | None = None  # (L,) int32 Halton rank of each cell (the roll is modulo L)
  choice_temperature: float = 0.0  # official: the Python float the traced hook multiplies by (1 - ratio)

  @property
  def steps(self) -> int:
    return self.num_iter - self.start_iter

  def reveal_counts(self, unknown_per_row) -> list[int]:
    """The seed's t of each executed step for rows with these unknown counts: the step's count clipped by the
    unknown tokens of the whole batch; the steps end once every token is known (each step reveals min(t, left) in
    each row). Known before the loop: the counts do not depend on the model."""
    remaining, out = np.asarray(unknown_per_row, np.int64).copy(), []
    for step in range(self.start_iter, self.num_iter):
      if remaining.sum() == 0:
        break
      t = max(min(int(self.counts[step]), int(remaining.sum())), 0)
      remaining -= np.minimum(t, remaining)
      out.append(t)
    return out

  def steps_run(self, unknown_per_row) -> int:
    """Executed steps: all, or for the seed the steps until every token is known (`reveal_counts`)."""
    return len(self.reveal_counts(unknown_per_row)) if self.rule.stop_when_done else self.steps

  def draw_counts(self, steps_run: int | None = None) -> dict:
    """{kind: recorded draws needed} for a decode of `steps_run` executed steps (default: all)."""
    n = self.steps if steps_run is None else steps_run
    rule, executed = self.rule, slice(self.start_iter, self.start_iter + n)
    counts = {"gumbel_sample": n,
              "gumbel_choice": n if rule.confidence in ("weighted", "linear64") else 0,
              "uniform_choice": int((self.uniform_index[executed] >= 0).sum())}
    counts["init_tokens"], counts["order_roll"] = int(rule.random_init), int(rule.roll_order)
    return counts


class DecodeOutputViews:
  """The framework-free views of both backends' DecodeOutput (fields final_tokens and class_position)."""

  @property
  def tokens(self):
    """(B, L): the final image tokens (class token dropped)."""
    return self.final_tokens

  def image(self, x):
    """The image positions of an (..., S) array (drops the class token)."""
    return x[..., 1:] if self.class_position == 0 else x[..., :self.class_position]


def _per_step(num_iter: int, value=0.0, dtype=_F32) -> np.ndarray:
  return np.full(num_iter, value, dtype)


def _base(rule: Rule, num_iter: int, start_iter: int, **arrays) -> DecodePlan:
  fields = dict(cond_weight=_per_step(num_iter, 1.0), uncond_weight=_per_step(num_iter),
                temperature=_per_step(num_iter, 1.0), conf_log=_per_step(num_iter, 1.0),
                conf_noise=_per_step(num_iter), noise_scale=_per_step(num_iter, 0.0, np.float64),
                noise_keep=_per_step(num_iter, 0.0, np.float64), uniform_index=_per_step(num_iter, -1, np.int32))
  fields.update(arrays)
  return DecodePlan(rule, num_iter, start_iter, **fields)


def _check_steps(num_iter: int, start_iter: int) -> None:
  if not 0 <= start_iter < num_iter:
    raise PlanError(f"decode: need 0 <= start_iter < num_iter, got start_iter={start_iter}, num_iter={num_iter}")


def _layout_fields(layout) -> dict:
  if layout is None:  # the official layout, sampling from every column the caller's logits have
    return {}
  return dict(class_position=layout.class_position, mask_id=layout.mask_id, null_class_id=layout.null_class_id,
              sample_width=layout.sample_width, codebook_size=layout.codebook_size)


def official_plan(num_iter: int, start_iter: int, choice_temperature: float, mask_schedule: str, seq_len: int,
                  layout=None) -> DecodePlan:
  """The official decoder (google-research/maskgit `parallel_decode.decode`), with JAX's traced-arithmetic hook."""
  schedules.check_method(mask_schedule)
  _check_steps(num_iter, start_iter)
  rule = Rule(trace_official=mask_schedule, **_layout_fields(layout))
  noise = [schedules.loop_choice_temperature(t, num_iter, choice_temperature) for t in range(num_iter)]
  return _base(rule, num_iter, start_iter, mask_len=schedules.mask_len_table(num_iter, seq_len, mask_schedule),
               conf_noise=np.asarray(noise, _F32), choice_temperature=choice_temperature)


def _official_options(cfg, num_iter: int, start_iter: int, seq_len: int, layout) -> DecodePlan:
  """The official loop with the options of configs.SamplerConfig (guidance, temperatures, orders, counts)."""
  num_tokens = seq_len - 1
  if cfg.tokens_per_step:
    _check_counts(cfg.tokens_per_step, num_iter, num_tokens)
  a, b = schedules.confidence_weights(num_iter, 0, cfg.choice_temperature, cfg.randomize,
                                      cfg.choice_temperature_schedule)
  w = schedules.guidance_weights(num_iter, 0, cfg.guidance_scale, cfg.guidance_schedule)
  rule = Rule(guidance=cfg.guidance_scale > 0, temperature="divide" if cfg.softmax_temperature != 1 else "none",
              top_k=cfg.top_k, confidence="halton_rank" if cfg.order == "halton" else "weighted",
              **_layout_fields(layout))
  arrays = dict(mask_len=schedules.mask_len_table(num_iter, seq_len, cfg.mask_schedule, cfg.tokens_per_step),
                cond_weight=(_F32(1) + w).astype(_F32), uncond_weight=w,
                temperature=_per_step(num_iter, cfg.softmax_temperature), conf_log=a, conf_noise=b)
  if cfg.order == "halton":
    arrays["rank"] = halton.halton_rank(_grid_side(num_tokens, "order='halton'"), cfg.halton_points)
  return _base(rule, num_iter, start_iter, **arrays)


def _seed(cfg, num_iter: int, start_iter: int, seq_len: int, layout) -> DecodePlan:
  """valeoai MaskGIT-pytorch v1 `Trainer/vit.py` `MaskGIT.sample` (golden_seed FORMAT.md, quirks 9-19)."""
  if num_iter < 2:
    raise PlanError(f"sampler.num_iter: decoder='seed' needs at least 2 steps (the seed divides by T - 1), "
                    f"got {num_iter}")
  num_tokens = seq_len - 1
  if cfg.tokens_per_step:  # the seed's custom scheduler: the counts as given
    counts = np.asarray(_check_counts(cfg.tokens_per_step, num_iter, num_tokens), np.int64)
  else:
    counts = seed_schedules.seed_counts(num_iter, cfg.mask_schedule, num_tokens).astype(np.int64)
  ratio = np.arange(num_iter, dtype=np.float64) / (num_iter - 1)  # i / (T - 1), Python floats in the seed
  w = cfg.guidance_scale * ratio  # _w = w * (i / (T - 1))
  confidence = {"linear": "linear64", "warm_up": "warm_up", "random": "random", "none": "prob"}[cfg.randomize]
  uses_uniform = {"warm_up": np.arange(num_iter) < 2, "random": np.ones(num_iter, bool)}.get(
      cfg.randomize, np.zeros(num_iter, bool))
  uses_uniform[:start_iter] = False
  uniform_index = np.where(uses_uniform, np.cumsum(uses_uniform) - 1, -1).astype(np.int32)
  rule = Rule(decoder="seed", guidance=cfg.guidance_scale != 0, temperature="multiply", categorical="log_probs",
              top_k=cfg.top_k, confidence=confidence, selection="top", draws_on_sequence=False,
              stop_when_done=True, random_init=cfg.random_init, **_layout_fields(layout))
  return _base(rule, num_iter, start_iter, counts=counts, cond_weight=(1 + w).astype(_F32),
               uncond_weight=w.astype(_F32), temperature=_per_step(num_iter, cfg.sm_temp),
               noise_scale=_per_step(num_iter, cfg.choice_temperature, np.float64), noise_keep=1 - ratio,
               uniform_index=uniform_index)


def _halton(cfg, num_iter: int, start_iter: int, seq_len: int, layout) -> DecodePlan:
  """valeoai/Halton-MaskGIT (f61b0a1) `Sampler/halton_sampler.py` `HaltonSampler.__call__`, by line:
  order `build_halton_mask` l.154-190 (maskgit_common/halton.py), optionally rolled per sample by
  randint(0, N) l.86-91; cumulative count r l.100-103, cells order[prev:r] written l.106-110 and l.140 (prev = r,
  l.144); scale linspace(sm_temp_min, sm_temp_max, T) l.42 ** temp_pow l.113, halved in warm-up l.114-115,
  multiplying the logits l.129; constant CFG on (cond, null) rows l.117-123; top_k l.130-134, else
  Categorical(probs) l.137; the clamp before decoding l.146."""
  num_tokens = seq_len - 1
  side = _grid_side(num_tokens, "decoder='halton'")
  order = halton.halton_order(side, cfg.halton_points)
  if len(order) < num_tokens:  # its sampler fails there (expand / assignment of M < N cells, l.87-93)
    raise PlanError(f"sampler.halton_points: the first {cfg.halton_points} Halton points reach {len(order)} of the "
                    f"{num_tokens} cells of a {side}x{side} grid, where Halton-MaskGIT's sampler fails; set "
                    "sampler.halton_points=0 to run the sequence until every cell is covered")
  w = np.float64(cfg.guidance_scale)  # constant: (1 + w) * logit_c - w * logit_u (l.123)
  rule = Rule(decoder="halton", guidance=cfg.guidance_scale != 0, temperature="multiply", categorical="log_probs",
              top_k=cfg.top_k, confidence="none", selection="rank", draws_on_sequence=False,
              roll_order=cfg.halton_randomize, **_layout_fields(layout))
  temperature = seed_schedules.halton_temperatures(num_iter, cfg.sm_temp_min, cfg.sm_temp, cfg.temp_pow,
                                                   cfg.temp_warmup)
  return _base(rule, num_iter, start_iter, counts=seed_schedules.halton_counts(num_iter, num_tokens),
               cond_weight=_per_step(num_iter, _F32(1 + w)), uncond_weight=_per_step(num_iter, _F32(w)),
               temperature=temperature, rank=halton.halton_rank(side, cfg.halton_points))


def _check_counts(counts, num_iter: int, num_tokens: int) -> tuple:
  if len(counts) != num_iter:
    raise PlanError(f"sampler.tokens_per_step has {len(counts)} counts, num_iter is {num_iter}")
  if sum(counts) != num_tokens:
    raise PlanError(f"sampler.tokens_per_step sums to {sum(counts)}, the image has {num_tokens} tokens")
  return tuple(counts)


def _grid_side(num_tokens: int, what: str) -> int:
  side = int(round(num_tokens ** 0.5))
  if side * side != num_tokens:
    raise PlanError(f"{what} needs a square latent grid, got {num_tokens} image tokens")
  return side


def plan_from_config(sampler_config, seq_len: int, layout=None, num_iter: int | None = None,
                     start_iter: int | None = None) -> DecodePlan:
  """The plan of a configs.SamplerConfig (`decoder`: official | seed | halton) for S = seq_len input positions.

  num_iter / start_iter override the config's (start_iter=edit start for editing); `layout` is the model's
  TokenLayout (None: the official layout, drawing from every column the logits have).
  """
  cfg = sampler_config
  num_iter = cfg.num_iter if num_iter is None else num_iter
  start_iter = cfg.start_iter if start_iter is None else start_iter
  _check_steps(num_iter, start_iter)
  if layout is not None and layout.total_len != seq_len:
    raise PlanError(f"decode: the inputs have {seq_len} positions, the model's token layout {layout.total_len}")
  if cfg.decoder == "official" and cfg.is_official:
    return official_plan(num_iter, start_iter, cfg.choice_temperature, cfg.mask_schedule, seq_len, layout)
  build = {"official": _official_options, "seed": _seed, "halton": _halton}[cfg.decoder]
  return build(cfg, num_iter, start_iter, seq_len, layout)
