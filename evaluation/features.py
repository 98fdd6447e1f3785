"""What every evaluation step shares: the feature-extractor interface, the error type, and the .npz cache files.

Framework-free: `FeatureExtractor` wraps any `uint8 (N, H, W, 3) -> (pool (N, D), logits (N, C))` function; the FID
Inception one is built by `evaluation.inception.build_extractor` (torch), tests use numpy stand-ins.
"""

from __future__ import annotations

import dataclasses
import zipfile
from typing import Callable

import numpy as np

from evaluation import metrics
from maskgit_common import fileio
from maskgit_common.errors import UserError

STATS_FORMAT = "maskgit-inception-stats/1"


class EvalError(UserError, ValueError):
  """A wrong path, an unreadable reference, or an output folder made with other settings; the message says which."""


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """uint8 images (N, H, W, 3) -> (pool features (N, D), classifier logits (N, C)).

  `id` names the network and its weights: cached features and statistics files are only reused with the same id.
  `random_init` marks a network without the real FID weights; every report says so.
  """
  fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  id: str
  description: str
  random_init: bool = False

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pool, logits = self.fn(images)
    pool, logits = np.asarray(pool, np.float32), np.asarray(logits, np.float32)
    if pool.ndim != 2 or logits.ndim != 2 or len(pool) != len(images) or len(logits) != len(images):
      raise EvalError(f"extractor {self.id} returned shapes {pool.shape} and {logits.shape} for {len(images)} images")
    return pool, logits


def save_npz(path: str, **arrays) -> None:
  fileio.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str) -> dict | None:
  """All arrays of an .npz, or None when it is missing or unreadable (a cache entry to recompute)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return None


def save_stats(path: str, pool, logits, extractor: FeatureExtractor, source: str = "") -> None:
  """Our statistics file (usable as `ref`): mu, sigma, the features (for precision/recall), and what made them."""
  mu, sigma = metrics.feature_statistics(pool)
  save_npz(path, format=np.array(STATS_FORMAT), mu=mu, sigma=sigma, features=np.asarray(pool, np.float32),
           logits=np.asarray(logits, np.float32), extractor=np.array(extractor.id), source=np.array(source))
