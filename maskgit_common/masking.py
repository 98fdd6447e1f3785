"""Masked visual token modelling: the training inputs, as pure numpy functions of explicit random draws.

The official MaskGIT release has no training loop; the recipe follows the paper (Chang et al. 2022, Sec. 3.2 "Masked
Visual Token Modeling") and the released config (maskgit/configs/maskgit_class_cond_config.py):
  - per example a ratio r ~ U[0, 1); mask_ratio = schedule(r) with the configured schedule (cosine by default),
    the official `mask_schedule.schedule` (`maskgit_common.schedules.mask_ratio`, numpy float32), clipped to [1e-6, 1];
  - the number of masked tokens is ceil(mask_ratio * L) (the paper's "uniformly select ceil(gamma(r) * N) tokens");
    since mask_ratio >= 1e-6 that is always >= 1, and we clamp it to L. The count is computed in float32, like the
    schedule itself, so every backend gets the same integer from the same draw;
  - which tokens: the n positions with the smallest i.i.d. uniform position draws, i.e. a uniformly random subset;
  - masked positions hold the mask token id -1 (the official embedding lookup wraps it to row V-1);
  - the class token K + label comes first, as in the official `create_input_tokens_normal`.
Class dropout (classifier-free guidance; not in the official recipe): the class token is replaced, with probability
`train.class_dropout`, by the null class of the token layout (maskgit_common/token_layout.py). The official
vocabulary (K codes + num_class classes + 1 mask row) has no spare row, so its null class is the mask token id -1:
an unconditional input is "class unknown", which keeps the official parameter tree (and released checkpoints)
unchanged; the seed family has a row of its own. Samplers use the same id for the unconditional pass. The mask id,
the class ids and the class token's position also come from the layout, so this module never asks the family.

Masking strategies (`train.masking`): "count" is the official rule above; "bernoulli" masks each token
independently, where its draw is below the seed's rate (valeoai MaskGIT-pytorch v1 `MaskGIT.get_mask_code`:
`torch.rand(B, h, h) < val_to_mask[:, None, None]`), so a row may have no masked token at all (its masked-token loss
then counts nothing; see the trainers' loss). The rate is `seed_mask_rate`: the seed's own float32 formula for its
four modes (arccos, cosine, square, linear = r: the seed's per-draw value, not the official 1 - r), the official
schedule for the others.

All draws come in through `TrainingNoise`; `draw_noise(rng, ...)` makes them from a numpy Generator. Masks are built
on the host, so the JAX and torch trainers (and any number of devices) see exactly the same masked batches.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from maskgit_common.schedules import mask_ratio  # the official schedule, float32 (one definition)
from maskgit_common.token_layout import TokenLayout, token_layout

# The official layout's null class (the mask token id), kept for callers that name it.
NULL_CLASS_TOKEN = -1
MASKING = ("count", "bernoulli")


@dataclasses.dataclass(frozen=True)
class TrainingNoise:
  """Every random draw behind one training batch of B examples with L tokens each."""
  ratio: np.ndarray  # (B,) float32 in [0, 1): the schedule input r
  position: np.ndarray  # (B, L) float32 in [0, 1): ranks choose which tokens are masked
  class_drop: np.ndarray  # (B,) float32 in [0, 1): < class_dropout replaces the label by the null class
  flip: np.ndarray  # (B,) float32 in [0, 1): < 0.5 takes the horizontally flipped codes (when flips are on)
  crop: np.ndarray | None = None  # (B,) float32 in [0, 1): which of the cached crops (floor(u * crops))

  def __getitem__(self, index) -> "TrainingNoise":
    """The draws of a subset of the examples (e.g. one data-parallel shard)."""
    return TrainingNoise(self.ratio[index], self.position[index], self.class_drop[index], self.flip[index],
                         None if self.crop is None else self.crop[index])


def draw_noise(rng: np.random.Generator, batch_size: int, num_tokens: int) -> TrainingNoise:
  """Draws a batch's noise from `rng`, always in this order and these shapes (so it is reproducible; the crop draw
  came last, so the earlier draws are those of runs made before it)."""
  return TrainingNoise(
      ratio=rng.random(batch_size, dtype=np.float32),
      position=rng.random((batch_size, num_tokens), dtype=np.float32),
      class_drop=rng.random(batch_size, dtype=np.float32),
      flip=rng.random(batch_size, dtype=np.float32),
      crop=rng.random(batch_size, dtype=np.float32))


_F32 = np.float32
SEED_MASK_MODES = ("linear", "square", "cosine", "arccos")  # get_mask_code's modes


def seed_mask_rate(ratio: np.ndarray, method: str = "arccos", num_tokens: int = 1) -> np.ndarray:
  """(B,) float32 rate of the seed's Bernoulli masking for its modes, with its float32 torch operations:
  arccos `acos(r) / (pi * 0.5)`, cosine `cos(r * pi * 0.5)`, square `r ** 2`, linear `r`. Other names: the official
  schedule (`schedules.mask_ratio` with N0 = num_tokens).

  acos and cos are correctly rounded here (float64 rounded once); torch's vectorised CPU kernels (SLEEF, 1 ulp) round
  about 7% of them the other way, which moves a token's mask only when its draw falls inside that one ulp
  (probability ~1e-8 per token); the division by the float32 pi / 2 is torch's own.
  """
  r = np.asarray(ratio, _F32)
  if method == "arccos":
    return (np.arccos(r.astype(np.float64)).astype(_F32) / _F32(math.pi * 0.5)).astype(_F32)
  if method == "cosine":
    return np.cos(((r * _F32(math.pi)) * _F32(0.5)).astype(np.float64)).astype(_F32)
  if method == "square":
    return (r * r).astype(_F32)
  if method == "linear":
    return r
  return mask_ratio(r, num_tokens, method)


def num_masked(ratio: np.ndarray, num_tokens: int, method: str = "cosine") -> np.ndarray:
  """(B,) int32 number of masked tokens: ceil(schedule(r) * L) in float32, within [1, L]."""
  count = np.ceil(mask_ratio(ratio, num_tokens, method) * np.float32(num_tokens))
  return np.clip(count, 1, num_tokens).astype(np.int32)


def token_mask(ratio: np.ndarray, position: np.ndarray, method: str = "cosine", masking: str = "count") -> np.ndarray:
  """(B, L) bool, True = masked.

  "count": in each row the num_masked(r) positions with the smallest position draws (official). "bernoulli": every
  position whose draw is below seed_mask_rate(r), i.e. each token masked with that probability (the seed).
  """
  position = np.asarray(position)
  if masking == "bernoulli":
    return position < seed_mask_rate(ratio, method, position.shape[-1])[:, None]
  if masking != "count":
    raise ValueError(f"train.masking={masking!r} is not one of {list(MASKING)}")
  count = num_masked(ratio, position.shape[-1], method)
  # Rank of each draw within its row (stable sort: ties, which float draws make unlikely, go to the lower index).
  ranks = np.argsort(np.argsort(position, axis=-1, kind="stable"), axis=-1, kind="stable")
  return ranks < count[:, None]


def class_tokens(labels: np.ndarray, class_drop: np.ndarray, class_dropout: float, layout: TokenLayout) -> np.ndarray:
  """(B,) int32 class tokens of the labels, or the layout's null class where class_drop < class_dropout."""
  tokens = layout.class_tokens(labels).astype(np.int32)
  return np.where(np.asarray(class_drop) < class_dropout, np.int32(layout.null_class_id), tokens).astype(np.int32)


def make_batch(codes: np.ndarray, labels: np.ndarray, noise: TrainingNoise, config,
               codes_flipped: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One training batch from codes (B, h, h) and labels (B,).

  Returns `input_ids` (B, S) int32 (the layout's sequence: class token and codes, the mask id at masked
  positions), `targets` (B, L) int32 (the true codes), `weights` (B, L) float32 (1 where the loss counts: masked
  tokens, or all tokens with train.compute_loss_for_all) and `mask` (B, L) bool.
  """
  train = config.train
  layout = token_layout(config)
  codes = np.asarray(codes)
  if codes_flipped is not None and config.data.random_flip:
    codes = np.where((noise.flip < 0.5)[:, None, None], np.asarray(codes_flipped), codes)
  b = codes.shape[0]
  targets = codes.reshape(b, -1).astype(np.int32)
  if targets.shape[1] != config.num_tokens:
    raise ValueError(f"codes have {targets.shape[1]} tokens per image, the config expects {config.num_tokens} "
                     f"({config.latent_size}x{config.latent_size})")
  mask = token_mask(noise.ratio, noise.position, train.mask_schedule, train.masking)
  masked = np.where(mask, np.int32(layout.mask_id), targets)
  cls = class_tokens(labels, noise.class_drop, train.class_dropout, layout)
  input_ids = layout.sequence(masked, cls).astype(np.int32)
  weights = np.ones_like(targets, np.float32) if train.compute_loss_for_all else mask.astype(np.float32)
  return {"input_ids": input_ids, "targets": targets, "weights": weights, "mask": mask}
