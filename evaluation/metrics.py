"""Sample-quality metrics on feature arrays: FID, Inception Score, precision/recall, density/coverage.

Framework-free (numpy + scipy): the inputs are Inception pool features (N, 2048) and logits (N, 1008) from
`evaluation/inception.py`, but nothing here depends on where they came from. Everything is computed in float64.

Definitions, as in the common evaluators:
- FID (Heusel et al. 2017): |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the covariances unbiased (ddof=1, as
  np.cov), the square root by `scipy.linalg.sqrtm`; a tiny imaginary part from round-off is discarded only after a
  check (the TTUR / pytorch-fid / ADM rule: |imag| of the diagonal <= 1e-3).
- Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) per split of the samples, p(y) the split's
  marginal; mean and standard deviation over `splits` contiguous splits (10 in improved-gan and ADM at 50k samples).
- Precision / recall (Kynkaenniemi et al. 2019) and density / coverage (Naeem et al. 2020): each point's ball has
  the radius of its k-th nearest neighbour in its own set (itself excluded). Precision = fraction of fake points
  inside some real ball; recall = fraction of real points inside some fake ball; density = mean over fake points of
  (number of real balls containing it) / k; coverage = fraction of real balls holding at least one fake point.
  Balls are closed (`<=`, as Kynkaenniemi's reference code and ADM; the prdc package uses `<`: they differ only on
  exact ties). Distances are Euclidean, computed as squared distances in float64, a block of rows at a time.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg
from maskgit_common.errors import UserError

# Elements of one block of the pairwise-distance matrix (float64): 2**25 = 256 MiB.
_BLOCK_ELEMENTS = 2 ** 25


class MetricError(UserError, ValueError):
  """Inputs a metric cannot be computed from (wrong shapes, too few points, a complex matrix square root)."""


def _as_2d(features, name: str) -> np.ndarray:
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise MetricError(f"{name} must be a (N, D) array, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise MetricError(f"{name} holds NaN or infinite values")
  return x


# FID -------------------------------------------------------------------------------------------------------------
def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu (D,), sigma (D, D)) of (N, D) features: the mean and the unbiased covariance (np.cov, ddof=1)."""
  x = _as_2d(features, "features")
  if x.shape[0] < 2:
    raise MetricError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, imag_atol: float = 1e-3) -> float:
  """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise MetricError(f"FID statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                      f"sigma {sigma1.shape} vs {sigma2.shape} (were they made by the same feature extractor?)")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A singular product (e.g. fewer samples than dimensions): the common evaluators retry with eps on the diagonal.
    offset = np.eye(d) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=imag_atol):
      raise MetricError(f"FID: the matrix square root has an imaginary part of {np.abs(covmean.imag).max():.3g} "
                        "(covariances far from positive semi-definite?)")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
  """FID of two feature sets (N1, D) and (N2, D).

  With more vectors than dimensions on a side (real evaluations: 10k-50k x 2048) this is `frechet_distance` of the
  two `feature_statistics`. With at most D on both sides (smoke runs, tests) both covariances are singular, where
  sqrtm is slow and only approximate; there the exact identity is used instead: with Xi the centred features,
  Si = Xi^T Xi / (Ni - 1), the eigenvalues of S1 S2 are the squared singular values of X2 X1^T / sqrt((N1-1)(N2-1)),
  so Tr (S1 S2)^(1/2) is that matrix's nuclear norm.
  """
  x1, x2 = _as_2d(features1, "features1"), _as_2d(features2, "features2")
  (n1, d), n2 = x1.shape, x2.shape[0]
  if x2.shape[1] != d:
    raise MetricError(f"FID: the feature sets differ in dimension: {d} vs {x2.shape[1]}")
  if max(n1, n2) > d or min(n1, n2) < 2:
    return frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
  c1, c2 = x1 - x1.mean(axis=0), x2 - x2.mean(axis=0)
  cross = np.linalg.svd(c2 @ c1.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
  diff = x1.mean(axis=0) - x2.mean(axis=0)
  return float(diff @ diff + np.sum(c1 * c1) / (n1 - 1) + np.sum(c2 * c2) / (n2 - 1) - 2.0 * cross)


# Inception Score -------------------------------------------------------------------------------------------------
def log_softmax(logits) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` contiguous splits of exp(mean KL(p(y|x) || p(y))), p = softmax(logits).

  Pass log-probabilities to score a probability table (softmax(log p) = p; log 0 = -inf is allowed).
  """
  logp = log_softmax(_as_logits(logits))
  n = logp.shape[0]
  if not isinstance(splits, (int, np.integer)) or splits < 1:
    raise MetricError(f"splits must be a positive integer, got {splits!r}")
  if n < splits:
    raise MetricError(f"the Inception Score needs at least one sample per split: {n} samples, {splits} splits")
  scores = []
  with np.errstate(divide="ignore", invalid="ignore"):
    for i in range(splits):
      part = logp[i * n // splits:(i + 1) * n // splits]  # the split rule of improved-gan
      p = np.exp(part)
      log_marginal = np.log(p.mean(axis=0, keepdims=True))
      # 0 * log 0 = 0: classes a sample gives no mass contribute nothing.
      kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(axis=1)
      scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _as_logits(logits) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  if x.ndim != 2:
    raise MetricError(f"logits must be a (N, classes) array, got shape {x.shape}")
  if np.isnan(x).any() or np.isposinf(x).any() or np.isneginf(x).all(axis=1).any():
    raise MetricError("logits hold NaN, +inf or a row without any finite entry")
  return x


# Precision, recall, density, coverage ----------------------------------------------------------------------------
def _row_blocks(num_rows: int, num_cols: int):
  step = max(1, _BLOCK_ELEMENTS // max(num_cols, 1))
  for start in range(0, num_rows, step):
    yield start, min(start + step, num_rows)


def _squared_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  # |a|^2 - 2 a.b + |b|^2 in float64; clipped at 0 against round-off.
  return np.maximum(a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :], 0.0)


def nearest_neighbour_sq_radii(features, k: int) -> np.ndarray:
  """Squared distance from each point to its k-th nearest neighbour in the same set, the point itself excluded."""
  x = _as_2d(features, "features")
  n = x.shape[0]
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise MetricError(f"k must be a positive integer, got {k!r}")
  if n <= k:
    raise MetricError(f"the k-th nearest neighbour needs more than k={k} points, got {n}")
  sq = np.einsum("ij,ij->i", x, x)
  radii = np.empty(n)
  for start, stop in _row_blocks(n, n):
    d = _squared_distances(x[start:stop], sq[start:stop], x, sq)
    d[np.arange(stop - start), np.arange(start, stop)] = 0.0  # the point itself, exactly
    # Sorted position k counts the point itself at position 0, so it is the k-th neighbour (as prdc's k + 1).
    radii[start:stop] = np.partition(d, k, axis=1)[:, k]
  return radii


def prdc(real_features, fake_features, k: int = 5) -> dict[str, float]:
  """Precision, recall (Kynkaenniemi et al. 2019), density and coverage (Naeem et al. 2020) with k neighbours."""
  real = _as_2d(real_features, "real features")
  fake = _as_2d(fake_features, "fake features")
  if real.shape[1] != fake.shape[1]:
    raise MetricError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
  real_radii = nearest_neighbour_sq_radii(real, k)
  fake_radii = nearest_neighbour_sq_radii(fake, k)
  real_sq, fake_sq = np.einsum("ij,ij->i", real, real), np.einsum("ij,ij->i", fake, fake)
  n_real, n_fake = real.shape[0], fake.shape[0]
  fake_in_real = np.zeros(n_fake, bool)   # precision
  balls_holding = np.zeros(n_fake, np.int64)  # density
  real_in_fake = np.zeros(n_real, bool)   # recall
  covered = np.zeros(n_real, bool)        # coverage
  for start, stop in _row_blocks(n_real, n_fake):
    d = _squared_distances(real[start:stop], real_sq[start:stop], fake, fake_sq)  # (real block, fake)
    inside_real_ball = d <= real_radii[start:stop, None]
    fake_in_real |= inside_real_ball.any(axis=0)
    balls_holding += inside_real_ball.sum(axis=0)
    covered[start:stop] = inside_real_ball.any(axis=1)
    real_in_fake[start:stop] = (d <= fake_radii[None, :]).any(axis=1)
  return {
      "precision": float(fake_in_real.mean()),
      "recall": float(real_in_fake.mean()),
      "density": float(balls_holding.sum() / (k * n_fake)),
      "coverage": float(covered.mean()),
  }
