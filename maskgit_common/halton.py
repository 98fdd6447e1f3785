"""Halton unmasking order (Besnier et al., "Halton Scheduler for Masked Generative Image Transformer", 2025).

The 2-D Halton sequence in bases 2 (rows) and 3 (columns), scaled to the h x h latent grid and de-duplicated in
order of first appearance, spreads consecutive cells far apart; a decoder that reveals tokens in this order is
spatially uniform at every step. valeoai/Halton-MaskGIT (f61b0a1) `Sampler/halton_sampler.py`:
  - `build_halton_mask` (l.154-190) takes the first `nb_point=10_000` points of `halton(2, .)` for the rows and
    `halton(3, .)` for the columns (l.182-183; `halton` l.164-179 yields the radical inverses of 1, 2, 3, ...),
    scales them by the grid side and floors them (l.184-185), then keeps each cell's first occurrence in sequence
    order (`np.unique(..., return_index=True)` then `sorted(indexes)`, l.188-189);
  - rows come from base 2 and columns from base 3: the sampler writes `mask[i, _mask[:, 0], _mask[:, 1]]` (l.109).
Here the radical inverse is an exact fraction n / b^k and a cell is floor(n * h / b^k) in integers, so no grid side
is off by the rounding of a float (a float radical inverse puts 1/3 * 9 at 2.999..., every side a multiple of 9 went
wrong). The exact order equals Halton-MaskGIT's for every side 1..64 (tested against its own code's output). Its
10,000 points do not reach every cell of grids of side 50, 52, 53 and >= 55 (a 64 x 64 grid gets 4090 of 4096
cells), where its sampler then fails; `num_points` keeps that cap by default, 0 = run the sequence until every cell
is covered.
"""

from __future__ import annotations

import numpy as np

HALTON_POINTS = 10_000  # Halton-MaskGIT's nb_point (Sampler/halton_sampler.py l.154)


def radical_inverse(index: int, base: int) -> tuple[int, int]:
  """The index-th Halton number in `base` (index >= 1) as an exact fraction (numerator, denominator = base^k): the
  base-b digits of index mirrored after the point."""
  numerator, denominator = 0, 1
  while index > 0:
    index, digit = divmod(index, base)
    numerator, denominator = numerator * base + digit, denominator * base
  return numerator, denominator


def halton_order(latent_size: int, num_points: int = HALTON_POINTS) -> np.ndarray:
  """(M,) int32 flat cell indices (row * h + col) in Halton order, each cell once; M = h*h unless the first
  `num_points` points miss cells (see the module docstring; num_points=0: no cap, M = h*h)."""
  if latent_size < 1:
    raise ValueError(f"halton_order: latent_size must be >= 1, got {latent_size}")
  if num_points < 0:
    raise ValueError(f"halton_order: num_points must be >= 0 (0 = no cap), got {num_points}")
  seen, order, i = set(), [], 1
  while len(order) < latent_size ** 2 and (num_points == 0 or i <= num_points):
    (n2, d2), (n3, d3) = radical_inverse(i, 2), radical_inverse(i, 3)
    cell = (n2 * latent_size // d2) * latent_size + n3 * latent_size // d3
    if cell not in seen:
      seen.add(cell)
      order.append(cell)
    i += 1
  return np.asarray(order, np.int32)


def halton_rank(latent_size: int, num_points: int = HALTON_POINTS) -> np.ndarray:
  """(h*h,) int32: the position of each cell in the Halton order (0 = first); cells the order misses come after
  it, in index order, so every cell has a distinct rank."""
  order = halton_order(latent_size, num_points)
  missing = np.setdiff1d(np.arange(latent_size ** 2), order)
  rank = np.empty(latent_size ** 2, np.int32)
  rank[np.concatenate([order, missing]).astype(np.int64)] = np.arange(latent_size ** 2, dtype=np.int32)
  return rank
