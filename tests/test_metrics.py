"""Metric math against closed forms, hand-computed cases and independent brute-force code (issue 9)."""

import itertools
import math

import numpy as np
import pytest

from evaluation import metrics


# FID -------------------------------------------------------------------------------------------------------------
def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _fid_by_eigh(mu1, s1, mu2, s2):
  """Independent of sqrtm: Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD matrix."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_fid_diagonal_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert abs(got - expected) < 1e-6
  # Rotating both Gaussians by the same orthogonal matrix leaves the distance unchanged.
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
  assert abs(rotated - expected) < 1e-6


def test_fid_general_covariances_match_eigen_formula():
  rng = np.random.default_rng(1)
  d = 12
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert abs(got - _fid_by_eigh(mu1, s1, mu2, s2)) < 1e-6
  assert abs(got - metrics.frechet_distance(mu2, s2, mu1, s1)) < 1e-6  # symmetric
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_feature_statistics_and_fid_from_features():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(50, 6)) * [1, 2, 3, 1, 1, 0.5] + 3
  y = rng.normal(size=(40, 6))
  mu, sigma = metrics.feature_statistics(x)
  centred = x - x.mean(0)
  np.testing.assert_allclose(mu, x.sum(0) / 50, atol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, atol=1e-12)  # unbiased, ddof=1
  expected = _fid_by_eigh(mu, sigma, *metrics.feature_statistics(y))
  assert abs(metrics.fid_from_features(x, y) - expected) < 1e-6
  assert abs(metrics.fid_from_features(x, x)) < 1e-6


def test_fid_singular_covariance():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(5, 10)), rng.normal(size=(5, 10)) + 1  # rank 4 < 10 dimensions
  (mu1, s1), (mu2, s2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
  # The eigen formula holds for singular PSD matrices too.
  assert abs(metrics.fid_from_features(x, y) - _fid_by_eigh(mu1, s1, mu2, s2)) < 1e-6


@pytest.mark.parametrize("n1, n2", [(2, 2), (3, 12), (12, 12), (12, 13), (40, 5)])
def test_fid_from_features_either_path_matches_eigen_formula(n1, n2):
  # Low-rank (n <= D = 12: nuclear norm) and full-rank (sqrtm) paths against the same independent formula.
  rng = np.random.default_rng(n1 * 100 + n2)
  x, y = rng.normal(size=(n1, 12)) * 2, rng.normal(size=(n2, 12)) + 0.5
  expected = _fid_by_eigh(*metrics.feature_statistics(x), *metrics.feature_statistics(y))
  assert abs(metrics.fid_from_features(x, y) - expected) < 1e-6
  assert abs(metrics.fid_from_features(y, x) - expected) < 1e-6


def test_fid_retries_with_eps_when_sqrtm_fails(monkeypatch):
  # The common evaluators' fallback: a non-finite square root is recomputed with eps added to both diagonals.
  rng = np.random.default_rng(4)
  d, eps = 6, 1e-2
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  real_sqrtm, calls = metrics.linalg.sqrtm, []

  def failing_once(a):
    calls.append(a)
    return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(metrics.linalg, "sqrtm", failing_once)
  got = metrics.frechet_distance(mu1, s1, mu2, s2, eps=eps)
  root = _fid_by_eigh(mu1, s1 + eps * np.eye(d), mu2, s2 + eps * np.eye(d))
  # Only the cross term uses the offset matrices: correct the traces back.
  assert len(calls) == 2 and abs(got - (root - 2 * d * eps)) < 1e-6


def test_fid_refuses_a_complex_square_root_and_bad_shapes():
  # S1 S2 = diag(1, -1): its square root has an imaginary unit on the diagonal, not round-off.
  with pytest.raises(metrics.MetricError, match="imaginary"):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(metrics.MetricError, match="shape"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(metrics.MetricError, match="at least 2"):
    metrics.feature_statistics(np.zeros((1, 4)))


# Inception Score -------------------------------------------------------------------------------------------------
def _is_brute_force(probs, splits):
  """Plain Python loops over a probability table (no numpy vectorisation, math.log)."""
  n = len(probs)
  scores = []
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    classes = len(part[0])
    marginal = [sum(row[c] for row in part) / len(part) for c in range(classes)]
    kls = [sum(row[c] * (math.log(row[c]) - math.log(marginal[c])) for c in range(classes) if row[c] > 0)
           for row in part]
    scores.append(math.exp(sum(kls) / len(kls)))
  mean = sum(scores) / splits
  return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


def _score_table(probs, splits):
  with np.errstate(divide="ignore"):
    return metrics.inception_score(np.log(np.asarray(probs, np.float64)), splits=splits)


def test_inception_score_known_values():
  c = 7
  one_hot = np.eye(c)
  mean, std = _score_table(one_hot, splits=1)  # confident and diverse: IS = number of classes
  assert abs(mean - c) < 1e-9 and std == 0
  mean, std = _score_table(np.concatenate([one_hot, one_hot[::-1]]), splits=2)
  assert abs(mean - c) < 1e-9 and abs(std) < 1e-9
  mean, _ = _score_table(np.tile([[0.2, 0.3, 0.5]], (6, 1)), splits=1)  # every sample alike: IS = 1
  assert abs(mean - 1.0) < 1e-9
  # p1 = (1, 0), p2 = (1/2, 1/2): marginal (3/4, 1/4), KLs log(4/3) and log(4/3)/2, IS = (4/3) ** (3/4).
  mean, _ = _score_table([[1.0, 0.0], [0.5, 0.5]], splits=1)
  assert abs(mean - (4 / 3) ** 0.75) < 1e-9


@pytest.mark.parametrize("n, splits", [(12, 1), (12, 3), (13, 4), (5, 2)])
def test_inception_score_matches_brute_force(n, splits):
  rng = np.random.default_rng(n * 10 + splits)
  logits = rng.normal(size=(n, 9)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  mean, std = metrics.inception_score(logits, splits=splits)
  ref_mean, ref_std = _is_brute_force(probs.tolist(), splits)
  assert abs(mean - ref_mean) < 1e-9 and abs(std - ref_std) < 1e-9
  # Softmax ignores a per-row shift of the logits.
  shifted, _ = metrics.inception_score(logits + rng.normal(size=(n, 1)) * 100, splits=splits)
  assert abs(shifted - mean) < 1e-9


def test_inception_score_errors():
  with pytest.raises(metrics.MetricError, match="per split"):
    metrics.inception_score(np.zeros((3, 4)), splits=10)
  with pytest.raises(metrics.MetricError, match="positive"):
    metrics.inception_score(np.zeros((3, 4)), splits=0)


# Precision, recall, density, coverage ----------------------------------------------------------------------------
def _prdc_brute_force(real, fake, k):
  """Loops and sorted lists; Euclidean distances from explicit differences."""
  def dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

  def radius(points, i):
    return sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

  real, fake = real.tolist(), fake.tolist()
  real_r = [radius(real, i) for i in range(len(real))]
  fake_r = [radius(fake, j) for j in range(len(fake))]
  inside = [[dist(r, f) <= real_r[i] for f in fake] for i, r in enumerate(real)]
  precision = sum(any(inside[i][j] for i in range(len(real))) for j in range(len(fake))) / len(fake)
  recall = sum(any(dist(r, f) <= fake_r[j] for j, f in enumerate(fake)) for r in real) / len(real)
  density = sum(sum(row) for row in inside) / (k * len(fake))
  coverage = sum(any(row) for row in inside) / len(real)
  return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_prdc_hand_computed():
  # Points on a line (embedded in 2-D), k = 1. Real radii: 1, 1, 1, 8; fake radii: 2, 2, 2.5, 15.
  real = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0]])
  fake = np.array([[0.5, 0], [2.5, 0], [5, 0], [20, 0]])
  got = metrics.prdc(real, fake, k=1)
  # precision: 20 lies in no real ball -> 3/4; recall: 10 lies in the ball of 20 (10 <= 15) -> 1;
  # density: 0.5 in the balls of 0 and 1, 2.5 in those of 2 and 10, 5 in that of 10 -> 5 / 4; coverage: 1.
  expected = {"precision": 0.75, "recall": 1.0, "density": 1.25, "coverage": 1.0}
  assert got == pytest.approx(expected, abs=1e-12)
  np.testing.assert_allclose(metrics.nearest_neighbour_sq_radii(real, 1), [1, 1, 1, 64])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force(k, monkeypatch):
  rng = np.random.default_rng(k)
  real = rng.normal(size=(23, 5))
  fake = rng.normal(size=(17, 5)) * 1.3 + 0.4
  expected = _prdc_brute_force(real, fake, k)
  assert metrics.prdc(real, fake, k=k) == pytest.approx(expected, abs=1e-6)
  monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 40)  # a couple of rows per block: the chunking is exact
  assert metrics.prdc(real, fake, k=k) == pytest.approx(expected, abs=1e-6)
  assert expected["precision"] < 1 and expected["coverage"] < 1  # the case exercises both outcomes


def test_prdc_of_a_set_with_itself():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(30, 4))
  k = 4
  got = metrics.prdc(x, x, k=k)
  # Each ball holds its centre and its k neighbours: density (k + 1) / k; everything else is 1.
  assert got == pytest.approx({"precision": 1, "recall": 1, "density": (k + 1) / k, "coverage": 1}, abs=1e-12)


def test_prdc_errors():
  with pytest.raises(metrics.MetricError, match="more than k"):
    metrics.prdc(np.zeros((5, 2)), np.ones((9, 2)), k=5)
  with pytest.raises(metrics.MetricError, match="dimension"):
    metrics.prdc(np.zeros((9, 2)), np.ones((9, 3)), k=2)
  with pytest.raises(metrics.MetricError, match="NaN"):
    metrics.prdc(np.full((9, 2), np.nan), np.ones((9, 2)), k=2)


def test_radii_of_duplicate_points():
  # Two copies of a point are each other's nearest neighbour at distance 0; the self entry is not counted twice.
  x = np.array([[0.0], [0.0], [3.0], [7.0]])
  np.testing.assert_allclose(metrics.nearest_neighbour_sq_radii(x, 1), [0, 0, 9, 16])
  np.testing.assert_allclose(metrics.nearest_neighbour_sq_radii(x, 2), [9, 9, 9, 49])
  assert len(list(itertools.islice(metrics._row_blocks(10, 10), 100))) == 1
