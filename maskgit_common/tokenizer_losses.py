"""Framework-free pieces of tokenizer training, shared by maskgit_jax/ and maskgit_torch/ `train_tokenizer.py`.

The losses (computed in each backend with the same formulas and reported under the same names):

  reconstruction_loss = mean((images - decode(st(z)))**2)                       L2 on images in [0, 1]
  e_latent_loss       = mean((stop_grad(q) - z)**2) * tokenizer.commitment_cost  (commitment: trains the encoder)
  q_latent_loss       = mean((q - stop_grad(z))**2)                              (codebook: trains the codes)
  entropy_loss        = entropy(-distances / tokenizer.entropy_temperature) * tokenizer.entropy_loss_ratio
  quantizer_loss      = e_latent_loss + q_latent_loss + entropy_loss
  loss                = reconstruction_loss + quantizer_loss

with z the encoder output, q its nearest code and st(z) = z + stop_grad(q - z) the straight-through estimator.
The quantizer terms are computed in one place per backend, `vq_losses` in its train_tokenizer.py, from the encoder
output and the codebook, with the formulas of the official `VectorQuantizer` in train mode
(maskgit/nets/vqgan_tokenizer.py; entropy: maskgit/libml/losses.py `entropy_loss`). The official VQGAN trainer is
not released; the reconstruction term is its `losses.l2_loss` (the sibling google-research/magvit VQGAN trainer, by the same authors, uses l2_loss(real,
generated) and adds the quantizer loss). The perceptual (LPIPS-like, on a pretrained ImageNet classifier) and
adversarial (StyleGAN discriminator) terms need pretrained weights that cannot be downloaded here, so they are left
out: this is the "basic" recipe.

Optimizer: Adam with the betas of the official vqgan_config (train.tokenizer_beta1 0, train.tokenizer_beta2 0.99),
eps 1e-8 (optax and torch defaults agree). The learning rate is `train.lr` after `train.warmup_steps` of linear
warmup, then constant (maskgit_common.training.learning_rate, the one schedule of every trainer): the official
generator lr is 1e-4, the same as the official transformer lr (and our ImageNet presets' `train.lr`); the official
schedule is constant, and a warmup only steadies the first steps of a small run (the tiny preset: lr 1e-3, 100
warmup steps). The data order is every trainer's (maskgit_common.training.DataOrder).

Codebook restarts (our addition, off unless asked): every `train.tokenizer_codebook_restart_every` steps, codes that
no latent of the current batch chose are moved onto latents of that batch drawn at random. On small data a VQ
codebook tends to collapse onto a few codes; restarting dead codes (as in Jukebox / SoundStream) keeps usage high. It is a pure
function of (batch, seed, step), so it is identical in both backends and a resumed run repeats it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from maskgit_common import images as image_io
from maskgit_common import train_loop, training

ADAM_EPS = 1e-8
# Fingerprint keys that can never change when a tokenizer run resumes (its state would not load).
FIXED = ("image_size", "tokenizer.")
LOSS_WEIGHT_FIELDS = ("commitment_cost", "entropy_loss_ratio", "entropy_temperature", "entropy_loss_type")
LOSS_NAMES = ("loss", "reconstruction_loss", "quantizer_loss", "e_latent_loss", "q_latent_loss", "entropy_loss")
# Workdir layout (both backends): <workdir>/tokenizer is the portable export that the transformer trainer reads by
# default (maskgit_common/training.py TOKENIZER_DIR); resumable state and logs live apart from the transformer's.
TRAIN_DIR = "tokenizer_train"
RECONSTRUCTIONS_PNG = "reconstructions.png"
# Independent numpy streams: np.random.default_rng([seed, STREAM, step]) (the data order uses stream 0).
STREAM_FLIP, STREAM_RESTART = 1, 2


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


# Where each setting comes from in the config's `train` section (shared with the transformer, except the Adam betas
# and codebook restarts, which are the tokenizer's own `train.tokenizer_*` fields).
_FROM_TRAIN = {"lr": "lr", "beta1": "tokenizer_beta1", "beta2": "tokenizer_beta2", "warmup_steps": "warmup_steps",
               "batch_size": "batch_size", "num_steps": "num_train_steps", "log_every_steps": "log_every_steps",
               "checkpoint_every_steps": "checkpoint_every_steps", "keep_checkpoints": "keep_checkpoints",
               "seed": "seed", "precision": "precision",
               "codebook_restart_every": "tokenizer_codebook_restart_every"}


def resolve_settings(config, **overrides: Any) -> TokenizerTrainSettings:
  """Explicit arguments (not None) > the config's `train` field named in `_FROM_TRAIN`."""
  unknown = sorted(set(overrides) - set(_FROM_TRAIN))
  if unknown:
    raise TypeError(f"unknown tokenizer training settings {unknown}")
  values = {name: getattr(config.train, field) for name, field in _FROM_TRAIN.items()}
  values.update({k: v for k, v in overrides.items() if v is not None})
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


def loop_settings(settings: TokenizerTrainSettings) -> train_loop.LoopSettings:
  """The loop's settings of a tokenizer run: the one schedule (training.learning_rate), constant after the warmup."""
  return train_loop.LoopSettings(num_steps=settings.num_steps, batch_size=settings.batch_size, lr=settings.lr,
                                 warmup_steps=settings.warmup_steps, lr_schedule="constant",
                                 log_every_steps=settings.log_every_steps,
                                 checkpoint_every_steps=settings.checkpoint_every_steps)


# Data ------------------------------------------------------------------------------------------------------------
def load_batch(dataset, order: training.DataOrder, position: int, step: int, batch_size: int, random_flip: bool,
               pool=None) -> np.ndarray:
  """Images (B, H, H, 3) float32 of the batch at data `position` (update `step`); each flipped left-right with
  probability 1/2 if asked (draws from (seed, step))."""
  indices = order.indices(position, batch_size)
  fetch = lambda i: dataset[int(i)]
  items = list(pool.map(fetch, indices)) if pool else [fetch(i) for i in indices]
  batch = np.stack([image for image, _ in items]).astype(np.float32)
  if random_flip:
    flip = np.random.default_rng([order.seed, STREAM_FLIP, step]).random(batch_size) < 0.5
    batch[flip] = batch[flip, :, ::-1]
  return batch


def run_fingerprint(config, settings: TokenizerTrainSettings) -> dict:
  """What defines a tokenizer run, as flat `key: value` (the resume check compares it with the checkpoint's)."""
  out = {f"settings.{k}": v for k, v in dataclasses.asdict(settings).items()}
  tokenizer = dataclasses.asdict(config.tokenizer)
  # The loss weights may change on resume (with --allow_config_change); the architecture (tokenizer.*) never.
  out.update({f"losses.{k}": tokenizer.pop(k) for k in LOSS_WEIGHT_FIELDS})
  out.update(training.flatten({"image_size": config.image_size, "tokenizer": tokenizer,
                               "data": dataclasses.asdict(config.data)}))
  return out


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
def window_record(window: list[dict], codebook_size: int) -> dict:
  """Means of the losses over the logged window, codebook statistics over all of its codes, codes restarted."""
  record = {name: float(np.mean([w[name] for w in window])) for name in LOSS_NAMES}
  record.update(codebook_stats(np.concatenate([np.asarray(w["codes"]).reshape(-1) for w in window]), codebook_size))
  record["codes_restarted"] = float(sum(w.get("codes_restarted", 0) for w in window))
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


def eval_metrics(images: np.ndarray, outputs: np.ndarray, codes: np.ndarray, codebook_size: int) -> dict:
  """The held-out evaluation of either tokenizer trainer: reconstruction MSE and the codebook statistics, each
  named `eval_<name>`."""
  stats = codebook_stats(codes, codebook_size)
  return {"eval_reconstruction_mse": float(np.mean(np.square(outputs - images))),
          **{f"eval_{k}": v for k, v in stats.items()}}
