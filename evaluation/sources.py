"""Image sources an evaluation reads: a folder of images (recursive) or an .npz image batch (the ADM format).

Both come out as uint8 (n, H, W, 3) batches. An .npz is streamed a batch at a time, so an ADM batch of 50k images
need not fit in RAM. Images are read with `maskgit_common.images.read_rgb_uint8`, the reader `run.py edit` uses
(16-bit PNGs included).
"""

from __future__ import annotations

import os
import zipfile
from typing import Iterator

import numpy as np

from evaluation.features import EvalError
from maskgit_common import images as image_io

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(folder: str) -> list[str]:
  """Image files under `folder` (recursively), in sorted path order."""
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    paths.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
  return paths


def _read_rgb(path: str) -> np.ndarray:
  try:
    return image_io.read_rgb_uint8(path)
  except ValueError as e:
    raise EvalError(str(e)) from None


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


def npz_keys(path: str) -> list[str]:
  try:
    with zipfile.ZipFile(path) as archive:
      return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
  except (OSError, zipfile.BadZipFile) as e:
    raise EvalError(f"cannot read {path} as an .npz: {e}") from None


def _npz_batches(path: str, key: str, batch_size: int) -> Iterator[np.ndarray]:
  """Streams uint8 (N, H, W, 3) `key` of an .npz a batch at a time."""
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
    keys = npz_keys(source)
    key = next((k for k in ("arr_0", "images") if k in keys), None)
    if key is None:
      raise EvalError(f"{source}: no images in it (expected an 'arr_0' or 'images' array; found {keys})")
    return _npz_batches(source, key, batch_size)
  raise EvalError(f"{source}: not a folder of images or an .npz file")


def count_images(source: str) -> int:
  """How many images `image_batches(source)` yields, read from the listing or the .npz header (no pixels)."""
  if os.path.isdir(source):
    return len(list_images(source))
  if not (os.path.isfile(source) and source.endswith(".npz")):
    raise EvalError(f"{source}: not a folder of images or an .npz file")
  keys = npz_keys(source)
  key = next((k for k in ("arr_0", "images") if k in keys), None)
  if key is None:
    raise EvalError(f"{source}: no images in it (expected an 'arr_0' or 'images' array; found {keys})")
  with zipfile.ZipFile(source) as archive, archive.open(f"{key}.npy") as f:
    version = np.lib.format.read_magic(f)
    shape = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
             else np.lib.format.read_array_header_2_0(f))[0]
  return int(shape[0]) if shape else 0


def fingerprint(source: str) -> str:
  """The source's path plus what changes when its files change: count, total size and newest mtime."""
  paths = list_images(source) if os.path.isdir(source) else [source]
  stats = [os.stat(p) for p in paths]
  return (f"{os.path.abspath(source)} ({len(paths)} files, {sum(s.st_size for s in stats)} bytes, "
          f"mtime {max((s.st_mtime_ns for s in stats), default=0)})")
