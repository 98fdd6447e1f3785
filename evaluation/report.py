"""Scores samples against a reference and writes the report: `evaluate` (a model's samples, resumable) and
`evaluate_folder` (a folder / .npz of images). One report format for both: `OUT/metrics.json` (atomic) and a
printed table. docs/EVAL.md describes every field.
"""

from __future__ import annotations

import os

import numpy as np

from evaluation import metrics, references, shards, sources
from evaluation.features import EvalError, FeatureExtractor
from maskgit_common import fileio

PRDC_NAMES = ("precision", "recall", "density", "coverage")
RANDOM_INIT_WARNING = ("RANDOM-INIT feature extractor: these numbers are a pipeline check only, NOT comparable "
                       "with any published FID/IS")


def min_samples(k: int = 5, splits: int = 10) -> tuple[int, str]:
  """The fewest samples every metric can be computed from, and why."""
  need = {"FID (a covariance)": 2, f"precision/recall (k={k} neighbours)": k + 1,
          f"the Inception Score ({splits} splits)": splits}
  return max(need.values()), ", ".join(f"{what}: {n}" for what, n in need.items())


def check_request(num_samples: int | None, batch_size: int, k: int = 5, splits: int = 10,
                  prefix: str = "") -> None:
  """Raises EvalError for sizes no metric can be computed from (num_samples None: the batch size alone); cheap, so
  callers run it before any slow work. Messages name `{prefix}num_samples` ("--" for flags)."""
  shards.check_sizes(1 if num_samples is None else num_samples, batch_size, prefix=prefix)
  least, why = min_samples(k, splits)
  if num_samples is not None and num_samples < least:
    raise EvalError(f"{prefix}num_samples {num_samples}: the metrics need at least {least} samples ({why})")


def check_out_dir(out_dir: str, what: str = "output folder") -> str:
  """Raises unless OUT/metrics.json can be written (OUT a directory, or creatable)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise EvalError(f"{what} {out_dir} exists and is not a folder")
  return fileio.check_writable(os.path.join(out_dir, "metrics.json"), what)


def compute_metrics(pool, logits, reference: references.Reference, k: int = 5, splits: int = 10) -> dict:
  """FID, IS (mean, std over splits), and precision/recall/density/coverage when the reference has features."""
  ref_dim = np.shape(reference.mu if reference.mu is not None else reference.features)[-1]
  if ref_dim != np.shape(pool)[1]:
    raise EvalError(f"the reference has {ref_dim}-d features, the samples {np.shape(pool)[1]}-d: the reference "
                    "was made by another network or layer")
  if reference.mu is not None:
    fid = metrics.frechet_distance(*metrics.feature_statistics(pool), reference.mu, reference.sigma)
  else:
    fid = metrics.fid_from_features(pool, reference.features)
  results = {"fid": fid}
  results["inception_score"], results["inception_score_std"] = metrics.inception_score(logits, splits)
  if reference.features is not None:
    results.update(metrics.prdc(reference.features, pool, k=k))
  else:
    results.update(dict.fromkeys(PRDC_NAMES))
  return results


def format_table(report: dict) -> str:
  lines = [f"{report['num_samples']} samples vs {report['reference']['description']}",
           f"extractor: {report['extractor']['description']}"]
  if report["extractor"]["random_init"]:
    lines.append(f"!! {RANDOM_INIT_WARNING} !!")
  lines.append(f"  {'metric':<16} value")
  for name in ("fid", "inception_score") + PRDC_NAMES:
    value = report[name]
    if value is None:
      text = "n/a (the reference has no images or features)"
    elif name == "inception_score":
      text = f"{value:.4f} +- {report['inception_score_std']:.4f} ({report['is_splits']} splits)"
    else:
      text = f"{value:.4f}" + (f" (k={report['k']})" if name in PRDC_NAMES else "")
    lines.append(f"  {name:<16} {text}")
  return "\n".join(lines)


def _report(out_dir, pool, logits, reference, ref, extractor, k, splits, samples_info, log) -> dict:
  report = compute_metrics(pool, logits, reference, k=k, splits=splits)
  report.update({
      "num_samples": int(len(pool)), "k": int(k), "is_splits": int(splits),
      "reference": {"path": os.path.abspath(ref), "description": reference.description,
                    "num_features": None if reference.features is None else int(len(reference.features))},
      "extractor": {"id": extractor.id, "description": extractor.description,
                    "random_init": bool(extractor.random_init)},
      "samples": samples_info})
  if extractor.random_init:
    report["warning"] = RANDOM_INIT_WARNING
  fileio.atomic_write_json(os.path.join(out_dir, "metrics.json"), report)
  log(format_table(report))
  log(f"wrote {os.path.join(out_dir, 'metrics.json')}")
  return report


def evaluate(generate_fn, extractor: FeatureExtractor, num_samples: int, num_classes: int, out_dir: str,
             ref: str, batch_size: int = 50, *, seed: int = 0, k: int = 5, splits: int = 10,
             fid_stats: str = "auto", settings: dict | None = None, write_png: bool = False, log=print) -> dict:
  """Generates (resumably) and scores `num_samples` class-balanced samples against `ref`; returns the report.

  generate_fn(labels int32 (B,), seed) -> images (B, H, W, 3) float in [0, 1] [, tokens]: called once per missing
  shard of `batch_size` samples (evaluation/shards.py). Every cheap check (sizes, paths, writability) runs before
  the reference features are extracted.
  """
  check_request(num_samples, batch_size, k, splits)
  shards.check_sizes(num_samples, batch_size, num_classes)
  references.check_reference_path(ref)
  check_out_dir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  reference = references.load_reference(ref, extractor, batch_size, os.path.join(out_dir, "reference_stats.npz"),
                                        fid_stats, log)
  shards.generate_samples(generate_fn, out_dir, num_samples, num_classes, batch_size, seed=seed, settings=settings,
                          extractor=extractor, write_png=write_png, log=log)
  pool, logits = shards.sample_features(out_dir, num_samples, batch_size, extractor)
  samples_info = {"dir": os.path.join(os.path.abspath(out_dir), "samples"), "seed": int(seed),
                  "batch_size": int(batch_size), "num_classes": int(num_classes), **(settings or {})}
  return _report(out_dir, pool, logits, reference, ref, extractor, k, splits, samples_info, log)


def evaluate_folder(samples: str, extractor: FeatureExtractor, out_dir: str, ref: str, batch_size: int = 50, *,
                    k: int = 5, splits: int = 10, fid_stats: str = "auto", log=print) -> dict:
  """Scores a folder of images (or an .npz image batch) against `ref`. Its features are kept in
  OUT/sample_stats.npz, itself usable as a `ref` later."""
  if not os.path.exists(samples):
    raise EvalError(f"samples {samples}: no such file or folder")
  count, (least, why) = sources.count_images(samples), min_samples(k, splits)
  if count < least:
    raise EvalError(f"samples {samples}: {count} images; the metrics need at least {least} ({why})")
  shards.check_sizes(1, batch_size)
  references.check_reference_path(ref)
  check_out_dir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  reference = references.load_reference(ref, extractor, batch_size, os.path.join(out_dir, "reference_stats.npz"),
                                        fid_stats, log)
  pool, logits = references.source_features(samples, extractor, batch_size,
                                            os.path.join(out_dir, "sample_stats.npz"), log)
  return _report(out_dir, pool, logits, reference, ref, extractor, k, splits, {"path": os.path.abspath(samples)},
                 log)
