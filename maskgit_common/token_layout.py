"""Token layout: where the class token sits and what the special ids are, per transformer family.

The sampler, editing and training ask the layout; none of them branches on the architecture (docs/ARCHITECTURE.md,
"Model families"). A sequence holds L image tokens and one class token, S = L + 1 in all.

| field | official MaskGIT (`transformer.arch=maskgit`) | seed, valeoai MaskGIT-pytorch v1 (`seed`) |
|---|---|---|
| class_position | 0 (class token first) | L (class token last) |
| mask_id | -1 (the embedding lookup wraps it to row V-1) | K |
| class id of label c | K + c | K + 1 + c |
| null_class_id (CFG, label dropout) | -1, the mask id at the class position | K + 1 + C, a row of its own |
| logits_width (transformer output) | V = K + C + 1 | K + 1 (codes and the mask id) |
| sample_width (columns drawn from) | K (the official decoder slices [:K]) | K + 1 (the seed samples the mask id too) |
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  codebook_size: int  # K: image codes are 0 .. K-1
  num_classes: int  # C
  seq_len: int  # L image tokens
  class_position: int  # index of the class token among the S = L + 1 inputs
  mask_id: int  # id of an unknown image token in the transformer input
  class_offset: int  # class token id = class_offset + label
  null_class_id: int  # class token of the unconditional pass
  logits_width: int  # last axis of the transformer output
  sample_width: int  # how many leading logits columns the sampler draws from

  @property
  def total_len(self) -> int:
    return self.seq_len + 1

  def class_tokens(self, labels) -> np.ndarray:
    """(B,) class token ids for integer labels in [0, C) (checked by the caller's label check)."""
    return np.asarray(labels, np.int64) + self.class_offset

  def sequence(self, codes, class_tokens) -> np.ndarray:
    """(B, L) image tokens + (B,) class tokens -> (B, S) transformer input with the class token in its place."""
    codes = np.asarray(codes).reshape(len(class_tokens), -1)
    cls = np.asarray(class_tokens, codes.dtype)[:, None]
    if self.class_position == 0:
      return np.concatenate([cls, codes], axis=1)
    return np.concatenate([codes, cls], axis=1)

  def image_slice(self) -> slice:
    """The image positions of an S-long sequence."""
    return slice(1, None) if self.class_position == 0 else slice(0, self.seq_len)


def official_layout(codebook_size: int, num_classes: int, seq_len: int) -> TokenLayout:
  k = codebook_size
  return TokenLayout(k, num_classes, seq_len, class_position=0, mask_id=-1, class_offset=k, null_class_id=-1,
                     logits_width=k + num_classes + 1, sample_width=k)


def seed_layout(codebook_size: int, num_classes: int, seq_len: int) -> TokenLayout:
  k = codebook_size
  return TokenLayout(k, num_classes, seq_len, class_position=seq_len, mask_id=k, class_offset=k + 1,
                     null_class_id=k + 1 + num_classes, logits_width=k + 1, sample_width=k + 1)


LAYOUTS = {"maskgit": official_layout, "seed": seed_layout}


def token_layout(config) -> TokenLayout:
  """The layout of `config.transformer.arch` (a MaskGITConfig)."""
  arch = getattr(config.transformer, "arch", "maskgit")
  return LAYOUTS[arch](config.codebook_size, config.num_class, config.seq_len - 1)
