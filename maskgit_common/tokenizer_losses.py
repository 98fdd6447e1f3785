"""Framework-free pieces of tokenizer training, shared by maskgit_jax/ and maskgit_torch/ `train_tokenizer.py`.

The losses (computed in each backend with the same formulas and reported under the same names):

  reconstruction_loss = mean((images - decode(st(z)))**2)                       L2 on images in [0, 1]
  e_latent_loss       = mean((stop_grad(q) - z)**2) * tokenizer.commitment_cost  (commitment: trains the encoder)
  q_latent_loss       = mean((q - stop_grad(z))**2)                              (codebook: trains the codes)
  entropy_loss        = entropy(-distances / tokenizer.entropy_temperature) * tokenizer.entropy_loss_ratio
  quantizer_loss      = e_latent_loss + q_latent_loss + entropy_loss
  loss                = reconstruction_loss + quantizer_loss

with z the encoder output, q its nearest code and st(z) = z + stop_grad(q - z) the straight-through estimator.
The quantizer terms are the official `VectorQuantizer` in train mode (maskgit/nets/vqgan_tokenizer.py; entropy:
maskgit/libml/losses.py `entropy_loss`). The official VQGAN trainer is not released; the reconstruction term is its
`losses.l2_loss` (the sibling google-research/magvit VQGAN trainer, by the same authors, uses l2_loss(real,
generated) and adds the quantizer loss). The perceptual (LPIPS-like, on a pretrained ImageNet classifier) and
adversarial (StyleGAN discriminator) terms need pretrained weights that cannot be downloaded here, so they are left
out: this is the "basic" recipe.

Optimizer: Adam with the betas of the official vqgan_config (beta1 0, beta2 0.99), eps 1e-8 (optax and torch
defaults agree). The learning rate is `train.lr` after `train.warmup_steps` of linear warmup: the official generator
lr is 1e-4, the same as the official transformer lr (and our ImageNet presets' `train.lr`); the official schedule is
constant, and a warmup only steadies the first steps of a small run (the tiny preset: lr 1e-3, 100 warmup steps).

Codebook restarts (our addition, off unless asked): every `codebook_restart_every` steps, codes that no latent of the
current batch chose are moved onto latents of that batch drawn at random. On small data a VQ codebook tends to
collapse onto a few codes; restarting dead codes (as in Jukebox / SoundStream) keeps usage high. It is a pure
function of (batch, seed, step), so it is identical in both backends and a resumed run repeats it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from maskgit_common import images as image_io

# Official generator optimizer (maskgit/configs/vqgan_config.py).
OFFICIAL_BETA1 = 0.0
OFFICIAL_BETA2 = 0.99
ADAM_EPS = 1e-8
LOSS_NAMES = ("loss", "reconstruction_loss", "quantizer_loss", "e_latent_loss", "q_latent_loss", "entropy_loss")
# Workdir layout (both backends): <workdir>/tokenizer is the portable export that the transformer trainer reads by
# default (maskgit_common/training.py TOKENIZER_DIR); resumable state and logs live apart from the transformer's.
TRAIN_DIR = "tokenizer_train"
RECONSTRUCTIONS_PNG = "reconstructions.png"
# Independent numpy streams: np.random.default_rng([seed, STREAM, step]).
STREAM_ORDER, STREAM_FLIP, STREAM_RESTART = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TokenizerTrainSettings:
  """Hyperparameters of one tokenizer run, resolved once (`resolve_settings`) and stored with every checkpoint."""
  lr: float
  beta1: float
  beta2: float
  warmup_steps: int
  batch_size: int
  num_steps: int
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  seed: int
  precision: str
  codebook_restart_every: int


# The config's `train` section is written for the transformer. lr, warmup, batch size, steps, logging, checkpoints,
# seed and precision are shared; the betas differ (transformer AdamW 0.9/0.96, tokenizer Adam 0/0.99), so a
# tokenizer run reads `train.tokenizer_<field>` where the schema defines one, else these official tokenizer values.
_TOKENIZER_DEFAULTS = {"beta1": OFFICIAL_BETA1, "beta2": OFFICIAL_BETA2, "codebook_restart_every": 0}
_SHARED_WITH_TRAIN = {"num_steps": "num_train_steps"}


def resolve_settings(config, **overrides: Any) -> TokenizerTrainSettings:
  """Explicit arguments (not None) > `config.train.tokenizer_<field>` (if the schema has it) > defaults.

  Defaults: betas from the official vqgan_config, no codebook restarts; lr, warmup, batch size, steps, logging,
  checkpointing, seed and precision from `config.train`.
  """
  train = config.train
  values = {}
  for field in dataclasses.fields(TokenizerTrainSettings):
    name = field.name
    if name in _TOKENIZER_DEFAULTS:
      default = _TOKENIZER_DEFAULTS[name]
    else:
      default = getattr(train, _SHARED_WITH_TRAIN.get(name, name))
    value = overrides.pop(name, None)
    if value is None:
      value = getattr(train, f"tokenizer_{name}", None)
    values[name] = default if value is None else value
  if overrides:
    raise TypeError(f"unknown tokenizer training settings {sorted(overrides)}")
  s = TokenizerTrainSettings(**values)
  if not (s.lr > 0 and 0 <= s.beta1 < 1 and 0 <= s.beta2 < 1):
    raise ValueError(f"tokenizer training needs lr > 0 and betas in [0, 1), got lr={s.lr}, beta1={s.beta1}, "
                     f"beta2={s.beta2}")
  for name in ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if getattr(s, name) < 1:
      raise ValueError(f"tokenizer training needs {name} >= 1, got {getattr(s, name)}")
  if s.num_steps < 0 or s.warmup_steps < 0 or s.codebook_restart_every < 0:
    raise ValueError(f"num_steps, warmup_steps and codebook_restart_every must be >= 0, got {s}")
  if s.precision not in ("parity", "fast"):
    raise ValueError(f"precision must be 'parity' or 'fast', got {s.precision!r}")
  return s


def learning_rate(settings: TokenizerTrainSettings, step: int) -> float:
  """Constant after an optional linear warmup; `step` counts completed updates (0 for the first update)."""
  if settings.warmup_steps > 0:
    return settings.lr * min(1.0, (step + 1) / settings.warmup_steps)
  return settings.lr


# Data order ------------------------------------------------------------------------------------------------------
def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Example indices of batch `step`: a fresh permutation per epoch, the incomplete tail of each epoch dropped.

  A pure function of (step, seed), so a resumed run reads exactly the batches an uninterrupted run reads.
  """
  per_epoch = num_examples // batch_size
  if per_epoch < 1:
    raise ValueError(f"the dataset has {num_examples} images, fewer than one batch of {batch_size}")
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, STREAM_ORDER, epoch]).permutation(num_examples)
  return order[position * batch_size:(position + 1) * batch_size]


def load_batch(dataset, step: int, batch_size: int, seed: int, random_flip: bool, pool=None) -> np.ndarray:
  """Images (B, H, H, 3) float32 of batch `step`; each flipped left-right with probability 1/2 if asked."""
  indices = batch_indices(step, batch_size, len(dataset), seed)
  fetch = lambda i: dataset[int(i)]
  items = list(pool.map(fetch, indices)) if pool else [fetch(i) for i in indices]
  batch = np.stack([image for image, _ in items]).astype(np.float32)
  if random_flip:
    flip = np.random.default_rng([seed, STREAM_FLIP, step]).random(batch_size) < 0.5
    batch[flip] = batch[flip, :, ::-1]
  return batch


# Codebook --------------------------------------------------------------------------------------------------------
def codebook_stats(codes, codebook_size: int) -> dict:
  """Fraction of the codebook used at least once by `codes`, and the perplexity of the code histogram."""
  counts = np.bincount(np.asarray(codes).reshape(-1).astype(np.int64), minlength=codebook_size)
  probs = counts / max(1, counts.sum())
  nonzero = probs[probs > 0]
  return {"codebook_usage": float((counts > 0).mean()),
          "codebook_perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero))))}


def is_restart_step(settings: TokenizerTrainSettings, step: int) -> bool:
  """Whether dead codes are restarted after update `step` (0-based)."""
  return settings.codebook_restart_every > 0 and (step + 1) % settings.codebook_restart_every == 0


def restart_dead_codes(codebook: np.ndarray, codes: np.ndarray, latents: np.ndarray, seed: int,
                       step: int) -> tuple[np.ndarray, int]:
  """Moves every code no latent chose onto a latent of the batch drawn at random -> (new codebook, #restarted).

  Args:
    codebook: (K, E) after the update.
    codes: the batch's code indices (any shape); latents: the matching encoder outputs (..., E).
    seed, step: which latents are drawn (np.random.default_rng([seed, STREAM_RESTART, step])).
  """
  codebook = np.array(codebook, np.float32)
  latents = np.asarray(latents, np.float32).reshape(-1, codebook.shape[1])
  dead = np.flatnonzero(np.bincount(np.asarray(codes).reshape(-1), minlength=len(codebook)) == 0)
  if len(dead):
    rng = np.random.default_rng([seed, STREAM_RESTART, step])
    picks = rng.choice(len(latents), size=len(dead), replace=len(dead) > len(latents))
    codebook[dead] = latents[picks]
  return codebook, int(len(dead))


# Logging and pictures --------------------------------------------------------------------------------------------
def window_record(window: list[dict], step: int, settings: TokenizerTrainSettings, codebook_size: int,
                  seconds: float) -> dict:
  """Means of the losses over the logged window, codebook statistics over all of its codes, lr and speed."""
  record = {name: float(np.mean([w[name] for w in window])) for name in LOSS_NAMES}
  record.update(codebook_stats(np.concatenate([np.asarray(w["codes"]).reshape(-1) for w in window]), codebook_size))
  record["codes_restarted"] = float(sum(w.get("codes_restarted", 0) for w in window))
  record["lr"] = learning_rate(settings, step - 1)
  record["steps_per_sec"] = len(window) / max(seconds, 1e-9)
  return record


def eval_indices(num_examples: int, count: int) -> np.ndarray:
  """The first `count` images: with labels cycling through the classes, every class is represented."""
  return np.arange(min(count, num_examples))


def save_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: str, scale: int = 2) -> str:
  """A PNG with pairs of rows: originals above their reconstructions (clipped to [0, 1])."""
  originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
  ncol = min(len(originals), 10)
  rows = []
  for start in range(0, len(originals), ncol):
    pair = [originals[start:start + ncol], reconstructions[start:start + ncol]]
    pad = ncol - len(pair[0])
    if pad:  # fill the last pair of rows with white tiles
      pair = [np.concatenate([r, np.ones((pad,) + r.shape[1:], r.dtype)]) for r in pair]
    rows += pair
  return image_io.save_grid(np.concatenate(rows), path, ncol=ncol, scale=scale)
