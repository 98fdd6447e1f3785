"""What samples are compared with: reference images or stored statistics, read into one `Reference`.

`ref` may be a folder of images, an .npz image batch, our statistics file (`features.save_stats`), pytorch-fid's
`--save-stats` file (`mu`, `sigma`), or an ADM reference batch (`arr_0` images plus `mu`, `sigma`). Features of
images are cached in one .npz keyed by the extractor and the source's fingerprint (path, file count, size, mtime).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from evaluation import sources
from evaluation.features import EvalError, FeatureExtractor, load_npz, save_stats


def source_features(source: str, extractor: FeatureExtractor, batch_size: int, cache_path: str, log=print):
  """(pool, logits) of a folder / .npz image batch; reuses `cache_path` when made from the same files and network."""
  fingerprint = sources.fingerprint(source)
  cached = load_npz(cache_path)
  if cached is not None and str(cached.get("extractor")) == extractor.id and str(cached.get("source")) == fingerprint:
    return cached["features"], cached["logits"]
  log(f"extracting features of {fingerprint}")
  start = time.time()
  parts = [extractor(batch) for batch in sources.image_batches(source, batch_size)]
  pool, logits = np.concatenate([p for p, _ in parts]), np.concatenate([l for _, l in parts])
  log(f"  {len(pool)} images in {time.time() - start:.1f} s")
  save_stats(cache_path, pool, logits, extractor, source=fingerprint)
  return pool, logits


@dataclasses.dataclass
class Reference:
  """Stored FID statistics (mu, sigma) and/or reference features.

  FID uses mu/sigma when given, else the features (`metrics.fid_from_features`); precision/recall/density/coverage
  need the features.
  """
  mu: np.ndarray | None
  sigma: np.ndarray | None
  features: np.ndarray | None
  description: str


def check_reference_path(ref: str) -> None:
  """The cheap part of `load_reference`'s checks, for callers that validate before slow work."""
  if not os.path.exists(ref):
    raise EvalError(f"ref {ref}: no such file or folder")
  if not os.path.isdir(ref) and not ref.endswith(".npz"):
    raise EvalError(f"ref {ref}: expected a folder of images or an .npz (statistics or images)")


def load_reference(ref: str, extractor: FeatureExtractor, batch_size: int, cache_path: str,
                   fid_stats: str = "auto", log=print) -> Reference:
  """Reads `ref` (module docstring).

  fid_stats: "auto" takes mu/sigma stored in the file when it has them (an ADM reference batch stores them for the
  whole reference set while its `arr_0` holds a subset, used for precision/recall); "features" always computes them
  from the reference features made here.
  """
  if fid_stats not in ("auto", "features"):
    raise EvalError(f"fid_stats must be 'auto' or 'features', got {fid_stats!r}")
  check_reference_path(ref)
  if os.path.isdir(ref):
    features, _ = source_features(ref, extractor, batch_size, cache_path, log)
    return Reference(None, None, features, f"{len(features)} images in {ref}")
  keys = sources.npz_keys(ref)
  with np.load(ref, allow_pickle=False) as z:
    ours = "features" in keys
    if ours and ("extractor" not in keys or str(z["extractor"]) != extractor.id):
      made_by = str(z["extractor"]) if "extractor" in keys else "an unnamed extractor"
      raise EvalError(f"ref {ref} holds features made by {made_by}; this run uses {extractor.id}. Recompute the "
                      "reference with this extractor.")
    if ours:  # its mu/sigma are those of its features: use the features, as for a folder
      features = np.asarray(z["features"], np.float64)
      return Reference(None, None, features, f"FID against the {len(features)} reference features in {ref}")
    stored = (z["mu"], z["sigma"]) if "mu" in keys and "sigma" in keys else None
  features = None
  if any(k in keys for k in ("arr_0", "images")):
    features, _ = source_features(ref, extractor, batch_size, cache_path, log)
  what = f"{len(features)} reference images in {ref}" if features is not None else ""
  if stored is not None and (fid_stats == "auto" or features is None):
    if extractor.random_init:
      raise EvalError(f"ref {ref}: its mu/sigma were made by another tool's Inception, and this run's extractor is "
                      "random-init; they cannot be compared (give reference images, or fid_stats='features')")
    note = (f"FID against mu/sigma stored in {ref} (made by another tool: comparable only if it used the same "
            "Inception weights and preprocessing)")
    return Reference(np.asarray(stored[0]), np.asarray(stored[1]), features, f"{note}; {what}" if what else note)
  if features is None:
    raise EvalError(f"ref {ref}: found arrays {keys}; expected 'mu' and 'sigma' (statistics), 'features', or "
                    "images in 'arr_0' (the ADM batch format)")
  return Reference(None, None, features, f"FID against the {what}")
