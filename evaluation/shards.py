"""Resumable sample shards: `OUT/samples/shard_NNNNN.npz` (uint8 images, labels, tokens), keyed on what made them.

Sample plan, fixed by (seed, batch_size, num_classes) alone so `num_samples` can grow later and reuse finished
shards: sample i has class i % num_classes; shard b holds samples [b*B, (b+1)*B), generated in one call with seed
`batch_seed(seed, b)`; the last shard is generated whole and only the first num_samples samples are scored. Images
are stored as uint8 (clip to [0, 1], round(x * 255)), exactly what a PNG holds, so scoring the shards or a folder of
their PNGs gives the same features.

The plan, with the caller's `settings` (the weights' sha256, the sampler config, steps, backend, precision, ...:
everything that changes the samples), is written to `OUT/manifest.json`, and its sha256 into every shard. A
restart with the same plan skips every finished shard; a restart with another plan (new weights at the same
checkpoint path included) is refused, naming each difference, and nothing is changed. Resuming is keyed on
content, never on a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
from PIL import Image

from evaluation.features import EvalError, FeatureExtractor, load_npz, save_npz
from maskgit_common import fileio
from maskgit_common.images import to_uint8

MANIFEST_FORMAT = "maskgit-eval-samples/2"  # /2: shards carry the plan's sha256 (content-keyed resume)


def balanced_labels(start: int, count: int, num_classes: int) -> np.ndarray:
  """Labels of samples [start, start + count): sample i has class i % num_classes."""
  return (np.arange(start, start + count) % num_classes).astype(np.int32)


def batch_seed(seed: int, index: int) -> int:
  """The seed of shard `index`: independent streams per shard, fixed by (seed, index) alone."""
  return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] % (2 ** 31))


def shard_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, "samples", f"shard_{index:05d}.npz")


def num_shards(num_samples: int, batch_size: int) -> int:
  return -(-num_samples // batch_size)


# The plan ----------------------------------------------------------------------------------------------------------
def plan_sha256(plan: dict) -> str:
  return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> str:
  def show(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
  keys = sorted(set(old) | set(new))
  return ", ".join(f"{k}: {show(old.get(k))} there, {show(new.get(k))} now" for k in keys if old.get(k) != new.get(k))


def check_plan(out_dir: str, plan: dict) -> str:
  """Writes the plan to OUT/manifest.json, or checks it against the one there; returns the plan's sha256.

  Raises EvalError (and changes nothing) when OUT holds samples of another plan, or shards without a manifest.
  """
  plan = json.loads(json.dumps(plan))  # compare as stored (tuples become lists)
  path = os.path.join(out_dir, "manifest.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f).get("plan", {})
    except (OSError, ValueError, AttributeError) as e:
      raise EvalError(f"{path} is unreadable ({e}); it says which model made the samples beside it. Use another "
                      "output folder") from None
    if old != plan:
      raise EvalError(f"{out_dir} holds samples made with other settings ({_differences(old, plan)}); refusing to "
                      "mix them, nothing was changed. Use another output folder, or the same settings to resume")
  else:
    samples = os.path.join(out_dir, "samples")
    if os.path.isdir(samples) and any(n.startswith("shard_") for n in os.listdir(samples)):
      raise EvalError(f"{samples} holds sample shards but {path} is missing, so what made them is unknown; "
                      "refusing to reuse or replace them. Use another output folder")
    fileio.atomic_write_json(path, {"plan": plan})
  return plan_sha256(plan)


# Shards ------------------------------------------------------------------------------------------------------------
def _read_shard(path: str, labels: np.ndarray, key: str) -> dict | None:
  """The shard at `path`, None when missing or damaged (made again); EvalError when another plan made it."""
  shard = load_npz(path)
  if shard is None or "images" not in shard or not np.array_equal(shard.get("labels"), labels):
    return None
  images = shard["images"]
  if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
    return None
  if str(shard.get("plan_sha256")) != key:
    raise EvalError(f"{path} was made with other settings than {os.path.dirname(os.path.dirname(path))}/"
                    "manifest.json says (plan sha256 differs); refusing to mix samples. Use another output folder")
  return shard


def _make_shard(generate_fn, labels: np.ndarray, seed: int, key: str) -> dict:
  out = generate_fn(labels, seed)
  images, tokens = out[:2] if isinstance(out, (tuple, list)) else (out, None)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] != len(labels) or images.shape[-1] != 3:
    raise EvalError(f"generate_fn returned images of shape {images.shape} for {len(labels)} labels; expected "
                    "(B, H, W, 3) floats in [0, 1]")
  shard = {"images": to_uint8(images), "labels": labels, "plan_sha256": np.array(key)}
  if tokens is not None:
    shard["tokens"] = np.asarray(tokens, np.int32)
  return shard


def _write_pngs(out_dir: str, shard: dict, first: int, num_samples: int) -> None:
  """OUT/samples/png/NNNNNN_classC.png for the shard's samples below num_samples (a folder `evaluate_folder` reads)."""
  for i, (image, label) in enumerate(zip(shard["images"], shard["labels"]), start=first):
    path = os.path.join(out_dir, "samples", "png", f"{i:06d}_class{int(label)}.png")
    if i < num_samples and not os.path.exists(path):
      fileio.atomic_write(path, lambda f, image=image: Image.fromarray(image).save(f, format="PNG"))


def check_sizes(num_samples: int, batch_size: int, num_classes: int = 1, prefix: str = "") -> None:
  """Each a positive integer; the message names it with `prefix` ("--" for flags)."""
  for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("num_classes", num_classes)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise EvalError(f"{prefix}{name} must be a positive integer, got {value!r}")


def generate_samples(generate_fn, out_dir: str, num_samples: int, num_classes: int, batch_size: int, *,
                     seed: int = 0, settings: dict | None = None, extractor: FeatureExtractor | None = None,
                     write_png: bool = False, log=print) -> int:
  """Makes every shard `num_samples` needs that is not already on disk; returns how many shards it generated.

  generate_fn(labels int32 (B,), seed int) -> images (B, H, W, 3) float in [0, 1], or (images, tokens).
  `settings` (JSON values) join the plan (module docstring). With `extractor`, each shard's features are cached as
  soon as it exists.
  """
  check_sizes(num_samples, batch_size, num_classes)
  key = check_plan(out_dir, {"format": MANIFEST_FORMAT, "seed": int(seed), "batch_size": int(batch_size),
                             "num_classes": int(num_classes), **(settings or {})})
  total, generated = num_shards(num_samples, batch_size), 0
  for index in range(total):
    labels = balanced_labels(index * batch_size, batch_size, num_classes)
    shard = _read_shard(shard_path(out_dir, index), labels, key)
    if shard is None:
      start = time.time()
      shard = _make_shard(generate_fn, labels, batch_seed(seed, index), key)
      save_npz(shard_path(out_dir, index), **shard)
      generated += 1
      log(f"shard {index + 1}/{total}: {batch_size} samples in {time.time() - start:.1f} s")
    if write_png:
      _write_pngs(out_dir, shard, index * batch_size, num_samples)
    if extractor is not None:
      shard_features(out_dir, index, shard["images"], extractor)
  return generated


def _features_dir(out_dir: str, extractor: FeatureExtractor) -> str:
  return os.path.join(out_dir, "features", hashlib.sha256(extractor.id.encode()).hexdigest()[:16])


def shard_features(out_dir: str, index: int, images: np.ndarray, extractor: FeatureExtractor):
  """(pool, logits) of one shard, cached under OUT/features/<extractor>/ with the digest of the images they are of
  (a shard made again, e.g. after damage, never reuses stale features)."""
  path = os.path.join(_features_dir(out_dir, extractor), f"shard_{index:05d}.npz")
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
  cached = load_npz(path)
  if (cached is not None and str(cached.get("extractor")) == extractor.id
      and str(cached.get("images_sha256")) == digest):
    return cached["pool"], cached["logits"]
  pool, logits = extractor(images)
  save_npz(path, pool=pool, logits=logits, extractor=np.array(extractor.id), images_sha256=np.array(digest))
  return pool, logits


def sample_features(out_dir: str, num_samples: int, batch_size: int, extractor: FeatureExtractor):
  """(pool, logits) of the first `num_samples` generated samples."""
  parts = []
  for index in range(num_shards(num_samples, batch_size)):
    shard = load_npz(shard_path(out_dir, index))
    if shard is None:
      raise EvalError(f"{shard_path(out_dir, index)} is missing or unreadable; run the evaluation to generate it")
    parts.append(shard_features(out_dir, index, shard["images"], extractor))
  return np.concatenate([p for p, _ in parts])[:num_samples], np.concatenate([l for _, l in parts])[:num_samples]


def export_adm_npz(out_dir: str, num_samples: int, batch_size: int, path: str) -> str:
  """The samples as an ADM sample batch (arr_0 uint8 (N, H, W, 3), arr_1 labels) for guided-diffusion's evaluator."""
  shards = [load_npz(shard_path(out_dir, i)) for i in range(num_shards(num_samples, batch_size))]
  if any(s is None for s in shards):
    raise EvalError(f"{out_dir}: some sample shards are missing; run the evaluation to generate them")
  save_npz(path, arr_0=np.concatenate([s["images"] for s in shards])[:num_samples],
           arr_1=np.concatenate([s["labels"] for s in shards])[:num_samples])
  return path
