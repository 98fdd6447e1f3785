"""What a decode starts from, framework-free: checked labels and images, and the decoder's initial token sequences
in the model's token layout (class token + codes, the mask id where a token is unknown). Both pipelines call these;
the layout (maskgit_common/token_layout.py) says where the class token sits and which ids are special."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maskgit_common.errors import UserError
from maskgit_common.token_layout import token_layout


class InputError(UserError, ValueError):
  """Labels, images, codes or masks that do not fit the model (the message names which and why)."""


def check_labels(labels, num_class: int) -> np.ndarray:
  """(B,) int64 class labels, each in [0, num_class)."""
  values = np.asarray(labels)
  if values.dtype.kind not in "iu" and not (values.dtype.kind == "f" and np.all(values == np.round(values))):
    raise InputError(f"class labels must be integers, got {values.tolist()}")
  values = values.astype(np.int64).reshape(-1)
  if values.size == 0:
    raise InputError("class labels: need at least one")
  bad = values[(values < 0) | (values >= num_class)]
  if bad.size:
    raise InputError(f"class labels must lie in [0, {num_class}), got {bad.tolist()}")
  return values


def class_names(config, labels: Sequence[int]) -> list[str]:
  """Display names of labels: `config.data.class_names` where given, else the numbers."""
  names = config.data.class_names
  return [names[int(l)] if int(l) < len(names) else str(int(l)) for l in labels]


def check_images(images, size: int) -> np.ndarray:
  """(B, size, size, 3) float32 from (B, H, W, 3) or one (H, W, 3) image in [0, 1]."""
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise InputError(f"expected images of shape (B, {size}, {size}, 3) in [0, 1] for this model, got "
                     f"{images.shape}; resize them first (maskgit_common.images.load_image(path, size))")
  return images


def generation_ids(labels, config) -> np.ndarray:
  """(B, S) int64: every image token unknown (the mask id), the class token of each label in its place."""
  layout = token_layout(config)
  labels = check_labels(labels, config.num_class)
  codes = np.full((len(labels), layout.seq_len), layout.mask_id, np.int64)
  return layout.sequence(codes, layout.class_tokens(labels))


def edit_ids(codes, latent_mask, labels, config) -> np.ndarray:
  """(B, S) int64 decoder input of an edit: the codes, the mask id where latent_mask is 1, the class token.

  Args:
    codes: (B, h, h) integer tokens of the source images.
    latent_mask: (h, h) or (B, h, h), 1 = regenerate, 0 = keep (values are rounded: > 0.5 counts as 1).
    labels: the target class, an int or (B,) ints in [0, num_class).
    config: the MaskGITConfig.
  """
  codes = np.asarray(codes)
  h = config.latent_size
  if codes.ndim != 3 or codes.shape[1:] != (h, h):
    raise InputError(f"edit: codes must be (B, {h}, {h}), got {codes.shape}")
  mask = np.asarray(latent_mask, np.float32)
  if mask.shape not in ((h, h), (codes.shape[0], h, h)):
    raise InputError(f"edit: latent_mask must be ({h}, {h}) or (B, {h}, {h}), got {mask.shape}")
  labels = check_labels(label_list(labels), config.num_class)
  if len(labels) not in (1, codes.shape[0]):
    raise InputError(f"edit: {len(labels)} labels for {codes.shape[0]} images (give one, or one per image)")
  labels = np.broadcast_to(labels, (codes.shape[0],))
  layout = token_layout(config)
  masked = np.where(np.broadcast_to(mask > 0.5, codes.shape), layout.mask_id, codes).reshape(codes.shape[0], -1)
  return layout.sequence(masked.astype(np.int64), layout.class_tokens(labels))


def label_list(labels) -> np.ndarray:
  """An int or a sequence of ints as a 1-D array (one label broadcasts over a batch)."""
  return np.atleast_1d(np.asarray(labels))


class Generation:
  """generate / edit / class_names of both pipelines, written once on top of the backend's `encode`,
  `decode_sequences(init_ids, noise, num_iter, start_iter)`, `make_noise(seed)` and `_images_from_output(out)`."""

  def class_names(self, labels: Sequence[int]) -> list[str]:
    return class_names(self.config, labels)

  def generate(self, labels: Sequence[int], seed: int = 0, num_iter: int | None = None, noise=None,
               return_output: bool = False):
    """Class-conditional samples -> (images (B, H, W, 3), tokens (B, h, h)) [, DecodeOutput]."""
    out = self.decode_sequences(generation_ids(labels, self.config),
                                noise if noise is not None else self.make_noise(seed), num_iter)
    images, tokens = self._images_from_output(out)
    return (images, tokens, out) if return_output else (images, tokens)

  def edit(self, images, latent_mask, labels: Sequence[int], seed: int = 0, num_iter: int | None = None,
           start_iter: int | None = None, noise=None, return_output: bool = False):
    """Regenerates the tokens where `latent_mask` (h, h) or (B, h, h) is 1, conditioned on `labels`.

    Tokens outside the mask are kept exactly (no decoder writes a known token). The decoder starts at
    `start_iter` (default `config.sampler.edit_start`: the official editing demo's step 2, 0 for the seed's and
    Halton's decoders). Returns the decoded images (to be blended into the originals with
    `maskgit_common.editing`) and the tokens.
    """
    init_ids = edit_ids(self.encode(images), latent_mask, labels, self.config)
    start_iter = self.config.sampler.edit_start if start_iter is None else start_iter
    out = self.decode_sequences(init_ids, noise if noise is not None else self.make_noise(seed), num_iter,
                                start_iter)
    edited, tokens = self._images_from_output(out)
    return (edited, tokens, out) if return_output else (edited, tokens)
