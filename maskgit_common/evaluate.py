"""Resumable sample-quality evaluation (`run.py eval`): FID, Inception Score, precision/recall, density/coverage.

Framework-free: the model comes in as `generate_fn(labels, seed)` and the network as a `FeatureExtractor` (built by
`maskgit_torch.inception.build_extractor`, or any callable in tests). Two entry points, one report:
- `evaluate`: class-balanced samples are generated in shards `OUT/samples/shard_NNNNN.npz` (uint8 images, labels,
  tokens), each written atomically as soon as it is made; a restart skips every finished shard, and the features of
  each shard are cached beside it (`OUT/features/<extractor>/`), so an interrupted run loses at most one shard.
- `evaluate_folder`: a folder of images or an .npz image batch (`arr_0`, the ADM / guided-diffusion format).
The reference (`ref`) is a folder of images, an .npz image batch, or an .npz of statistics: ours (`save_stats`),
pytorch-fid's `--save-stats` (`mu`, `sigma`), or an ADM reference batch (`arr_0` images plus `mu`, `sigma`).
Metrics go to `OUT/metrics.json` (atomically) and a printed table.

Sample plan, fixed by (seed, batch_size, num_classes) alone so `num_samples` can grow later and reuse finished
shards: sample i has class i % num_classes; shard b holds samples [b*B, (b+1)*B), generated in one call with seed
`batch_seed(seed, b)`; the last shard is generated whole and only the first num_samples samples are scored. Images
are stored as uint8 (clip to [0, 1], round(x * 255)), exactly what a PNG holds, so scoring the shards or a folder of
their PNGs gives the same features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zipfile
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from maskgit_common import fileio, metrics
from maskgit_common.images import to_uint8
from maskgit_common.errors import UserError

MANIFEST_FORMAT = "maskgit-eval-samples/1"
STATS_FORMAT = "maskgit-inception-stats/1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PRDC_NAMES = ("precision", "recall", "density", "coverage")
RANDOM_INIT_WARNING = ("RANDOM-INIT feature extractor: these numbers are a pipeline check only, NOT comparable "
                       "with any published FID/IS")


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


# Files -----------------------------------------------------------------------------------------------------------
def _save_npz(path: str, **arrays) -> None:
  fileio.atomic_write(path, lambda f: np.savez(f, **arrays))


def _save_json(path: str, data) -> None:
  fileio.atomic_write_json(path, data)


def _load_npz(path: str) -> dict | None:
  """All arrays of an .npz, or None when it is missing or unreadable (a cache entry to recompute)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    return None


# Image sources ---------------------------------------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
  """Image files under `folder` (recursively), in sorted path order."""
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    paths.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
  return paths


def _read_rgb(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), np.uint8)
  except (OSError, ValueError) as e:
    raise EvalError(f"cannot read image {path}: {e}") from None


def _folder_batches(folder: str, batch_size: int) -> Iterator[np.ndarray]:
  paths = list_images(folder)
  if not paths:
    raise EvalError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
  batch: list[np.ndarray] = []
  for path in paths:
    image = _read_rgb(path)
    if batch and (len(batch) == batch_size or image.shape != batch[0].shape):  # a batch holds one image size
      yield np.stack(batch)
      batch = []
    batch.append(image)
  yield np.stack(batch)


def _npz_keys(path: str) -> list[str]:
  try:
    with zipfile.ZipFile(path) as archive:
      return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
  except (OSError, zipfile.BadZipFile) as e:
    raise EvalError(f"cannot read {path} as an .npz: {e}") from None


def _npz_batches(path: str, key: str, batch_size: int) -> Iterator[np.ndarray]:
  """Streams uint8 (N, H, W, 3) `key` of an .npz a batch at a time: an ADM batch of 50k images need not fit in RAM."""
  with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(f)
    if version not in readers:
      raise EvalError(f"{path}[{key}]: unsupported .npy format version {version}")
    shape, fortran, dtype = readers[version](f)
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
      raise EvalError(f"{path}[{key}]: expected uint8 (N, H, W, 3) images in C order (the ADM batch format), got "
                      f"{np.dtype(dtype)} {tuple(shape)}{' in Fortran order' if fortran else ''}")
    per_image = int(np.prod(shape[1:]))
    for start in range(0, shape[0], batch_size):
      count = min(batch_size, shape[0] - start)
      data = f.read(count * per_image)
      if len(data) != count * per_image:
        raise EvalError(f"{path}[{key}]: the file ends early (truncated download?)")
      yield np.frombuffer(bytearray(data), np.uint8).reshape((count,) + tuple(shape[1:]))  # writable, for torch


def image_batches(source: str, batch_size: int) -> Iterator[np.ndarray]:
  """uint8 (n, H, W, 3) batches from a folder of images or an .npz image batch (key `arr_0` or `images`)."""
  if os.path.isdir(source):
    return _folder_batches(source, batch_size)
  if os.path.isfile(source) and source.endswith(".npz"):
    keys = _npz_keys(source)
    key = next((k for k in ("arr_0", "images") if k in keys), None)
    if key is None:
      raise EvalError(f"{source}: no images in it (expected an 'arr_0' or 'images' array; found {keys})")
    return _npz_batches(source, key, batch_size)
  raise EvalError(f"{source}: not a folder of images or an .npz file")


def _fingerprint(source: str) -> str:
  """The source's path plus what changes when its files change: count, total size and newest mtime."""
  paths = list_images(source) if os.path.isdir(source) else [source]
  stats = [os.stat(p) for p in paths]
  return (f"{os.path.abspath(source)} ({len(paths)} files, {sum(s.st_size for s in stats)} bytes, "
          f"mtime {max((s.st_mtime_ns for s in stats), default=0)})")


# Features and statistics -----------------------------------------------------------------------------------------
def _cache_dir(out_dir: str, extractor: FeatureExtractor) -> str:
  return os.path.join(out_dir, "features", hashlib.sha256(extractor.id.encode()).hexdigest()[:16])


def save_stats(path: str, pool, logits, extractor: FeatureExtractor, source: str = "") -> None:
  """Our statistics file (usable as `ref`): mu, sigma, the features (for precision/recall), and what made them."""
  mu, sigma = metrics.feature_statistics(pool)
  _save_npz(path, format=np.array(STATS_FORMAT), mu=mu, sigma=sigma, features=np.asarray(pool, np.float32),
            logits=np.asarray(logits, np.float32), extractor=np.array(extractor.id), source=np.array(source))


def source_features(source: str, extractor: FeatureExtractor, batch_size: int, cache_path: str, log=print):
  """(pool, logits) of a folder / .npz image batch; reuses `cache_path` when made from the same files and network."""
  fingerprint = _fingerprint(source)
  cached = _load_npz(cache_path)
  if cached is not None and str(cached.get("extractor")) == extractor.id and str(cached.get("source")) == fingerprint:
    return cached["features"], cached["logits"]
  log(f"extracting features of {fingerprint}")
  start = time.time()
  parts = [extractor(batch) for batch in image_batches(source, batch_size)]
  pool, logits = np.concatenate([p for p, _ in parts]), np.concatenate([l for _, l in parts])
  log(f"  {len(pool)} images in {time.time() - start:.1f} s")
  save_stats(cache_path, pool, logits, extractor, source=fingerprint)
  return pool, logits


@dataclasses.dataclass
class Reference:
  """What samples are compared with: stored FID statistics (mu, sigma) and/or reference features.

  FID uses mu/sigma when given, else the features (`metrics.fid_from_features`); precision/recall/density/coverage
  need the features.
  """
  mu: np.ndarray | None
  sigma: np.ndarray | None
  features: np.ndarray | None
  description: str


def load_reference(ref: str, extractor: FeatureExtractor, batch_size: int, cache_path: str,
                   fid_stats: str = "auto", log=print) -> Reference:
  """Reads `ref`: a folder or .npz of images, our stats .npz, pytorch-fid stats, or an ADM reference batch.

  fid_stats: "auto" takes mu/sigma stored in the file when it has them (an ADM reference batch stores them for the
  whole reference set while its `arr_0` holds a subset, used for precision/recall); "features" always computes them
  from the reference features made here.
  """
  if fid_stats not in ("auto", "features"):
    raise EvalError(f"fid_stats must be 'auto' or 'features', got {fid_stats!r}")
  if not os.path.exists(ref):
    raise EvalError(f"ref {ref}: no such file or folder")
  if os.path.isdir(ref):
    features, _ = source_features(ref, extractor, batch_size, cache_path, log)
    return Reference(None, None, features, f"{len(features)} images in {ref}")
  if not ref.endswith(".npz"):
    raise EvalError(f"ref {ref}: expected a folder of images or an .npz (statistics or images)")
  keys = _npz_keys(ref)
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


# Sample generation -----------------------------------------------------------------------------------------------
def balanced_labels(start: int, count: int, num_classes: int) -> np.ndarray:
  """Labels of samples [start, start + count): sample i has class i % num_classes."""
  return (np.arange(start, start + count) % num_classes).astype(np.int32)


def batch_seed(seed: int, index: int) -> int:
  """The seed of shard `index`: independent streams per shard, fixed by (seed, index) alone."""
  return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] % (2 ** 31))


def shard_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, "samples", f"shard_{index:05d}.npz")


def _read_shard(path: str, labels: np.ndarray) -> dict | None:
  shard = _load_npz(path)
  if shard is None or "images" not in shard or not np.array_equal(shard.get("labels"), labels):
    return None
  images = shard["images"]
  return shard if images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(labels) else None


def _make_shard(generate_fn, labels: np.ndarray, seed: int) -> dict:
  out = generate_fn(labels, seed)
  images, tokens = out[:2] if isinstance(out, (tuple, list)) else (out, None)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] != len(labels) or images.shape[-1] != 3:
    raise EvalError(f"generate_fn returned images of shape {images.shape} for {len(labels)} labels; expected "
                    "(B, H, W, 3) floats in [0, 1]")
  shard = {"images": to_uint8(images), "labels": labels}
  if tokens is not None:
    shard["tokens"] = np.asarray(tokens, np.int32)
  return shard


def _write_pngs(out_dir: str, shard: dict, first: int, num_samples: int) -> None:
  """OUT/samples/png/NNNNNN_classC.png for the shard's samples below num_samples (a folder `evaluate_folder` reads)."""
  for i, (image, label) in enumerate(zip(shard["images"], shard["labels"]), start=first):
    path = os.path.join(out_dir, "samples", "png", f"{i:06d}_class{int(label)}.png")
    if i < num_samples and not os.path.exists(path):
      fileio.atomic_write(path, lambda f, image=image: Image.fromarray(image).save(f, format="PNG"))


def _check_manifest(out_dir: str, plan: dict) -> None:
  path = os.path.join(out_dir, "manifest.json")
  plan = json.loads(json.dumps(plan))  # compare as stored (tuples become lists)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("plan", {})
    differ = {k: (old.get(k), plan.get(k)) for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)}
    if differ:
      detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
      raise EvalError(f"{out_dir} holds samples made with other settings ({detail}); use another output folder "
                      "or the same settings to resume")
  else:
    _save_json(path, {"plan": plan})


def generate_samples(generate_fn, out_dir: str, num_samples: int, num_classes: int, batch_size: int, *,
                     seed: int = 0, settings: dict | None = None, extractor: FeatureExtractor | None = None,
                     write_png: bool = False, log=print) -> int:
  """Makes every shard `num_samples` needs that is not already on disk; returns how many shards it generated.

  generate_fn(labels int32 (B,), seed int) -> images (B, H, W, 3) float in [0, 1], or (images, tokens).
  `settings` (backend, checkpoint, steps, ...; JSON values) join the plan in OUT/manifest.json and must match on
  a restart, so one folder never mixes samples of two models. With `extractor`, each shard's features are cached
  as soon as it exists.
  """
  if num_samples < 1 or batch_size < 1 or num_classes < 1:
    raise EvalError(f"num_samples, batch_size and num_classes must be >= 1, got {num_samples}, {batch_size}, "
                    f"{num_classes}")
  _check_manifest(out_dir, {"format": MANIFEST_FORMAT, "seed": int(seed), "batch_size": int(batch_size),
                            "num_classes": int(num_classes), **(settings or {})})
  num_shards, generated = -(-num_samples // batch_size), 0
  for index in range(num_shards):
    labels = balanced_labels(index * batch_size, batch_size, num_classes)
    shard = _read_shard(shard_path(out_dir, index), labels)
    if shard is None:
      start = time.time()
      shard = _make_shard(generate_fn, labels, batch_seed(seed, index))
      _save_npz(shard_path(out_dir, index), **shard)
      generated += 1
      log(f"shard {index + 1}/{num_shards}: {batch_size} samples in {time.time() - start:.1f} s")
    if write_png:
      _write_pngs(out_dir, shard, index * batch_size, num_samples)
    if extractor is not None:
      shard_features(out_dir, index, shard["images"], extractor)
  return generated


def shard_features(out_dir: str, index: int, images: np.ndarray, extractor: FeatureExtractor):
  """(pool, logits) of one shard, cached under OUT/features/<extractor>/ with the digest of the images they are of
  (a shard made again, e.g. after damage, never reuses stale features)."""
  path = os.path.join(_cache_dir(out_dir, extractor), f"shard_{index:05d}.npz")
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
  cached = _load_npz(path)
  if (cached is not None and str(cached.get("extractor")) == extractor.id
      and str(cached.get("images_sha256")) == digest):
    return cached["pool"], cached["logits"]
  pool, logits = extractor(images)
  _save_npz(path, pool=pool, logits=logits, extractor=np.array(extractor.id), images_sha256=np.array(digest))
  return pool, logits


def sample_features(out_dir: str, num_samples: int, batch_size: int, extractor: FeatureExtractor):
  """(pool, logits) of the first `num_samples` generated samples."""
  parts = []
  for index in range(-(-num_samples // batch_size)):
    shard = _load_npz(shard_path(out_dir, index))
    if shard is None:
      raise EvalError(f"{shard_path(out_dir, index)} is missing or unreadable; run the evaluation to generate it")
    parts.append(shard_features(out_dir, index, shard["images"], extractor))
  return np.concatenate([p for p, _ in parts])[:num_samples], np.concatenate([l for _, l in parts])[:num_samples]


def export_adm_npz(out_dir: str, num_samples: int, batch_size: int, path: str) -> str:
  """The samples as an ADM sample batch (arr_0 uint8 (N, H, W, 3), arr_1 labels) for guided-diffusion's evaluator."""
  shards = [_load_npz(shard_path(out_dir, i)) for i in range(-(-num_samples // batch_size))]
  if any(s is None for s in shards):
    raise EvalError(f"{out_dir}: some sample shards are missing; run the evaluation to generate them")
  _save_npz(path, arr_0=np.concatenate([s["images"] for s in shards])[:num_samples],
            arr_1=np.concatenate([s["labels"] for s in shards])[:num_samples])
  return path


# Metrics and report ----------------------------------------------------------------------------------------------
def compute_metrics(pool, logits, reference: Reference, k: int = 5, splits: int = 10) -> dict:
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
  _save_json(os.path.join(out_dir, "metrics.json"), report)
  log(format_table(report))
  log(f"wrote {os.path.join(out_dir, 'metrics.json')}")
  return report


def evaluate(generate_fn, extractor: FeatureExtractor, num_samples: int, num_classes: int, out_dir: str,
             ref: str, batch_size: int = 50, *, seed: int = 0, k: int = 5, splits: int = 10,
             fid_stats: str = "auto", settings: dict | None = None, write_png: bool = False, log=print) -> dict:
  """Generates (resumably) and scores `num_samples` class-balanced samples against `ref`; returns the report.

  generate_fn(labels int32 (B,), seed) -> images (B, H, W, 3) float in [0, 1] [, tokens]: called once per missing
  shard of `batch_size` samples. The report is also written to OUT/metrics.json and printed as a table.
  """
  os.makedirs(out_dir, exist_ok=True)
  reference = load_reference(ref, extractor, batch_size, os.path.join(out_dir, "reference_stats.npz"), fid_stats,
                             log)
  generate_samples(generate_fn, out_dir, num_samples, num_classes, batch_size, seed=seed, settings=settings,
                   extractor=extractor, write_png=write_png, log=log)
  pool, logits = sample_features(out_dir, num_samples, batch_size, extractor)
  samples_info = {"dir": os.path.join(os.path.abspath(out_dir), "samples"), "seed": int(seed),
                  "batch_size": int(batch_size), "num_classes": int(num_classes), **(settings or {})}
  return _report(out_dir, pool, logits, reference, ref, extractor, k, splits, samples_info, log)


def evaluate_folder(samples: str, extractor: FeatureExtractor, out_dir: str, ref: str, batch_size: int = 50, *,
                    k: int = 5, splits: int = 10, fid_stats: str = "auto", log=print) -> dict:
  """Scores a folder of images (or an .npz image batch) against `ref`. Its features are kept in
  OUT/sample_stats.npz, itself usable as a `ref` later."""
  if not os.path.exists(samples):
    raise EvalError(f"samples {samples}: no such file or folder")
  os.makedirs(out_dir, exist_ok=True)
  reference = load_reference(ref, extractor, batch_size, os.path.join(out_dir, "reference_stats.npz"), fid_stats,
                             log)
  pool, logits = source_features(samples, extractor, batch_size, os.path.join(out_dir, "sample_stats.npz"), log)
  return _report(out_dir, pool, logits, reference, ref, extractor, k, splits, {"path": os.path.abspath(samples)},
                 log)
