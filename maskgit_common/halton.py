"""Halton unmasking order (Besnier et al., "Halton Scheduler for Masked Generative Image Transformer", 2025).

The 2-D Halton sequence in bases 2 (rows) and 3 (columns), scaled to the h x h latent grid and de-duplicated in
order of first appearance, visits every cell once and spreads consecutive cells far apart. A sampler that reveals
tokens in this order (instead of by confidence) is deterministic and spatially uniform at every step.
"""

from __future__ import annotations

import numpy as np


def radical_inverse(index: int, base: int) -> float:
  """The index-th Halton number in `base` (index >= 1): the base-b digits of index mirrored after the point."""
  value, scale = 0.0, 1.0 / base
  while index > 0:
    index, digit = divmod(index, base)
    value += digit * scale
    scale /= base
  return value


def halton_order(latent_size: int) -> np.ndarray:
  """(h*h,) int32: flat cell indices (row * h + col) in Halton order, every cell exactly once."""
  if latent_size < 1:
    raise ValueError(f"halton_order: latent_size must be >= 1, got {latent_size}")
  seen, order, i = set(), [], 1
  while len(order) < latent_size ** 2:
    row = int(radical_inverse(i, 2) * latent_size)
    col = int(radical_inverse(i, 3) * latent_size)
    if (row, col) not in seen:
      seen.add((row, col))
      order.append(row * latent_size + col)
    i += 1
  return np.asarray(order, np.int32)


def halton_rank(latent_size: int) -> np.ndarray:
  """(h*h,) int32: the step of the Halton order at which each cell is revealed (0 = first)."""
  rank = np.empty(latent_size ** 2, np.int32)
  rank[halton_order(latent_size)] = np.arange(latent_size ** 2, dtype=np.int32)
  return rank
