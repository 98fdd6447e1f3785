"""Token cache: images tokenized once, read by both backends.

A cache is a directory:
  index.json              format, version, sizes, the tokenizer signature and its hash, optional weights hash,
                          the source dataset, class names, and the shard list
  codes_00000.npy ...     (n, h, h) int16 (int32 when K > 32767) codes, numpy .npy, opened as memmaps; with
                          `num_crops` C > 1 in the index, (n, C, h, h): the codes of C crops per image
                          (random-crop augmentation, data.random_crops; `data.crop_offsets` says where)
  labels_00000.npy ...    (n,) int32 labels
  flipped_00000.npy ...   optional: the codes of the horizontally flipped images (random-flip augmentation)
It is written into a temporary directory and renamed into place, so a crash never leaves a half-written cache.

A cache belongs to one tokenizer: the signature holds the image size and every tokenizer field that changes the
codes (architecture, codebook, GroupNorm settings), and optionally a hash of the tokenizer weights. Opening it with a
config whose signature differs raises `TokenCacheError` naming the differing fields.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np

from maskgit_common import data as data_lib
from maskgit_common import fileio
from maskgit_common.errors import UserError

FORMAT = "maskgit-token-cache"
VERSION = 1
# Tokenizer fields that only matter for tokenizer training (losses); they do not change the codes.
_TRAINING_ONLY_FIELDS = ("commitment_cost", "entropy_loss_ratio", "entropy_temperature", "entropy_loss_type")


class TokenCacheError(UserError, ValueError):
  """A token cache is missing, malformed, or was built for another tokenizer."""


def tokenizer_signature(config) -> dict:
  """What determines the codes of an image: image size and the tokenizer's encoding fields."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  tok = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config.tokenizer).items()
         if k not in _TRAINING_ONLY_FIELDS}
  return {"image_size": config.image_size, "tokenizer": tok}


def signature_hash(signature: dict) -> str:
  return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(flat_params: dict) -> str:
  """A fingerprint of tokenizer weights given as {name: array} (names sorted); callers prefix "<backend>:"."""
  h = hashlib.sha256()
  for name in sorted(flat_params):
    arr = np.ascontiguousarray(np.asarray(flat_params[name], np.float32))
    h.update(name.encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()[:16]


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k}: cache {va!r} vs config {vb!r}")
  return out


class TokenCache:
  """A token cache opened for reading; shards are memory-mapped, nothing is loaded until indexed."""

  def __init__(self, path: str, config=None, expected_weights_hash: str | None = None):
    self.path = path
    index_path = os.path.join(path, "index.json")
    if not os.path.isfile(index_path):
      raise TokenCacheError(f"{path} is not a token cache (no index.json); build one with "
                            f"`python run.py train ...` from images, or maskgit_common.token_cache.build")
    try:
      with open(index_path) as f:
        self.index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise TokenCacheError(f"cannot read {index_path}: {e}") from None
    if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
      raise TokenCacheError(f"{index_path}: expected format {FORMAT!r} version {VERSION}, got "
                            f"{self.index.get('format')!r} version {self.index.get('version')!r}")
    if config is not None:
      self.check_config(config, expected_weights_hash)
    self._codes, self._flipped, self._labels, sizes = [], [], [], []
    for shard in self.index["shards"]:
      codes = self._load(shard["codes"])
      labels = self._load(shard["labels"])
      if codes.shape[0] != shard["num_examples"] or labels.shape != (shard["num_examples"],):
        raise TokenCacheError(f"{path}: shard {shard['codes']} holds {codes.shape[0]} examples, index says "
                              f"{shard['num_examples']} (truncated or replaced shard?)")
      self._codes.append(codes)
      self._labels.append(labels)
      self._flipped.append(self._load(shard["flipped"]) if self.has_flipped else None)
      sizes.append(codes.shape[0])
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if self._offsets[-1] != self.index["num_examples"]:
      raise TokenCacheError(f"{path}: shards hold {self._offsets[-1]} examples, index says "
                            f"{self.index['num_examples']}")
    self.labels = np.concatenate(self._labels) if self._labels else np.zeros((0,), np.int32)

  def _load(self, name: str) -> np.ndarray:
    try:
      return np.load(os.path.join(self.path, name), mmap_mode="r")
    except (OSError, ValueError) as e:
      raise TokenCacheError(f"{self.path}: cannot read shard {name}: {e}") from None

  def check_config(self, config, expected_weights_hash: str | None = None) -> None:
    """Raises TokenCacheError unless the cache was built for this config's tokenizer (and weights, if given)."""
    want = tokenizer_signature(config)
    have = self.index["tokenizer_signature"]
    if signature_hash(want) != self.index["tokenizer_signature_hash"]:
      raise TokenCacheError(
          f"token cache {self.path} was built for another tokenizer config (hash "
          f"{self.index['tokenizer_signature_hash']}, this config {signature_hash(want)}): "
          + "; ".join(_diff(have, want)) + ". Rebuild the cache (delete it) or use the matching config.")
    cached = self.index.get("tokenizer_weights_hash")
    # Hashes are "<backend>:<hex>" over that backend's own parameter layout, so only same-backend hashes compare.
    same_layout = bool(cached and expected_weights_hash
                       and cached.split(":")[0] == expected_weights_hash.split(":")[0])
    if same_layout and cached != expected_weights_hash:
      raise TokenCacheError(f"token cache {self.path} was built with other tokenizer weights (hash {cached}, the "
                            f"tokenizer given now has {expected_weights_hash}). Rebuild the cache (delete it).")
    if config.num_class < self.index["num_class"]:
      raise TokenCacheError(f"token cache {self.path} has {self.index['num_class']} classes, config.num_class is "
                            f"{config.num_class}")

  @property
  def has_flipped(self) -> bool:
    return bool(self.index.get("has_flipped"))

  @property
  def num_crops(self) -> int:
    """Crops per image (1: the centre crop only)."""
    return int(self.index.get("num_crops", 1))

  @property
  def crops_requested(self) -> int:
    """data.random_crops of the build (a dataset of model-sized images stores one crop, whatever was asked)."""
    return int(self.index.get("crops_requested", self.num_crops))

  @property
  def class_names(self) -> list[str]:
    return list(self.index.get("class_names") or [])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def codes(self, indices, flipped: bool = False, crops=None) -> np.ndarray:
    """(n, h, h) int32 codes of the examples `indices` (flipped: of their mirrored images); `crops` (n,) picks each
    example's crop in [0, num_crops) (default the middle one, the centre crop for an odd count)."""
    if flipped and not self.has_flipped:
      raise TokenCacheError(f"token cache {self.path} holds no flipped codes (built with flip=False)")
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"token cache index out of range [0, {len(self)})")
    sources = self._flipped if flipped else self._codes
    h = self.index["latent_size"]
    if self.num_crops > 1:
      crops = np.full(indices.shape, (self.num_crops - 1) // 2) if crops is None else np.asarray(crops, np.int64)
    out = np.empty((indices.shape[0], h, h), np.int32)
    shard = np.searchsorted(self._offsets, indices, side="right") - 1
    for s in np.unique(shard):
      sel = shard == s
      rows = indices[sel] - self._offsets[s]
      out[sel] = sources[s][rows] if self.num_crops == 1 else sources[s][rows, crops[sel]]
    return out


def build(path: str, dataset, encode_fn: Callable[[np.ndarray], np.ndarray], config, *, flip: bool = True,
          batch_size: int = 64, shard_size: int = 65536, tokenizer_weights_hash: str | None = None,
          num_workers: int = 0, progress: bool = True, crops: int = 1) -> TokenCache:
  """Tokenizes every image of `dataset` with `encode_fn` (NHWC [0, 1] images -> (b, h, h) codes) into `path`.

  `encode_fn` is either backend's tokenizer (`VQVAE.encode_to_indices`), so this module stays framework-free.
  With `flip`, the mirrored images are tokenized too (random-flip augmentation reads them at training time); with
  `crops` > 1, that many crops of each image (`data.image_crops`; random-crop augmentation).
  """
  if os.path.exists(path):
    raise TokenCacheError(f"{path} already exists; open it with TokenCache or delete it to rebuild")
  h, k = config.latent_size, config.codebook_size
  code_dtype = np.int16 if k <= np.iinfo(np.int16).max else np.int32
  shards, buf = [], {"codes": [], "flipped": [], "labels": []}

  def flush():
    if not buf["labels"]:
      return
    i = len(shards)
    entry = {"codes": f"codes_{i:05d}.npy", "labels": f"labels_{i:05d}.npy",
             "num_examples": int(sum(len(x) for x in buf["labels"]))}
    np.save(os.path.join(tmp, entry["codes"]), np.concatenate(buf["codes"]).astype(code_dtype))
    np.save(os.path.join(tmp, entry["labels"]), np.concatenate(buf["labels"]).astype(np.int32))
    if flip:
      entry["flipped"] = f"flipped_{i:05d}.npy"
      np.save(os.path.join(tmp, entry["flipped"]), np.concatenate(buf["flipped"]).astype(code_dtype))
    shards.append(entry)
    for v in buf.values():
      v.clear()

  # Atomic (fileio): the cache appears whole or not at all; a killed build's leftover is removed by the next one.
  with fileio.atomic_directory(path) as tmp:
    requested = crops
    # Images that already have the model's size (no `crops` method: synthetic) have one crop, the image itself.
    crops = crops if hasattr(dataset, "crops") else 1
    per = max(1, batch_size // crops) if crops > 1 else batch_size  # images per encode call stay ~batch_size
    batches = data_lib.iterate_images(dataset, per, num_workers=num_workers, crops=crops if crops > 1 else 0)
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      batches = tqdm(batches, total=-(-len(dataset) // per), desc="tokenizing", unit="batch")
    pending = 0
    for _, images, labels in batches:
      shape = images.shape[:-3]  # (b,) or (b, crops)
      images = images.reshape(-1, *images.shape[-3:])
      buf["codes"].append(_encode(encode_fn, images, h, k).reshape(*shape, h, h))
      buf["labels"].append(labels)
      if flip:
        mirrored = _encode(encode_fn, np.ascontiguousarray(images[:, :, ::-1]), h, k)
        buf["flipped"].append(mirrored.reshape(*shape, h, h))
      pending += len(labels)
      if pending >= shard_size:
        flush()
        pending = 0
    flush()
    index = _index(config, dataset, shards, code_dtype, flip, crops, requested, tokenizer_weights_hash)
    with open(os.path.join(tmp, "index.json"), "w") as f:
      json.dump(index, f, indent=1)
  return TokenCache(path, config, tokenizer_weights_hash)


def _encode(encode_fn, images: np.ndarray, h: int, k: int) -> np.ndarray:
  """encode_fn(images) as numpy, checked to be (b, h, h) codes in [0, k)."""
  codes = np.asarray(encode_fn(images))
  if codes.shape != (images.shape[0], h, h) or codes.min() < 0 or codes.max() >= k:
    raise TokenCacheError(f"encode_fn returned codes of shape {codes.shape} in [{codes.min()}, {codes.max()}]; "
                          f"expected ({images.shape[0]}, {h}, {h}) in [0, {k})")
  return codes


def _index(config, dataset, shards, code_dtype, flip, crops, requested, tokenizer_weights_hash) -> dict:
  """The cache's index.json: its shards, sizes, and what made it (the tokenizer's signature, the source)."""
  signature = tokenizer_signature(config)
  return {
      "format": FORMAT, "version": VERSION, "num_examples": int(sum(s["num_examples"] for s in shards)),
      "latent_size": config.latent_size, "codebook_size": config.codebook_size,
      "code_dtype": np.dtype(code_dtype).name, "num_class": int(config.num_class), "has_flipped": bool(flip),
      "num_crops": int(crops), "crops_requested": int(requested),
      "tokenizer_signature": signature, "tokenizer_signature_hash": signature_hash(signature),
      "tokenizer_weights_hash": tokenizer_weights_hash,
      "source": dataset.describe() if hasattr(dataset, "describe") else {"dataset": type(dataset).__name__},
      "class_names": list(getattr(dataset, "class_names", [])), "shards": shards,
  }
