"""Image I/O shared by both backends: PNG grids (optionally labelled) and reading user images.

Images are NHWC float arrays in [0, 1] (the official input range); values outside are clipped when written.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from maskgit_common import fileio


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def make_grid(images: np.ndarray, labels: Sequence[str] | None = None, ncol: int | None = None,
              pad: int = 2, scale: int = 1) -> Image.Image:
  """Tiles (N, H, W, 3) images into one picture; `labels` (one per image) are written above each tile."""
  images = to_uint8(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"make_grid expects (N, H, W, 3) images, got shape {images.shape}")
  n, h, w, _ = images.shape
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  ncol = ncol or min(n, 8)
  nrow = math.ceil(n / ncol)
  label_h = 12 if labels else 0
  grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad + label_h) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i in range(n):
    r, c = divmod(i, ncol)
    x, y = pad + c * (w + pad), pad + r * (h + pad + label_h)
    if labels:
      draw.text((x, y), str(labels[i])[: max(1, w // 6)], fill=(0, 0, 0))
    grid.paste(Image.fromarray(images[i]), (x, y + label_h))
  return grid


def save_grid(images: np.ndarray, path: str, labels: Sequence[str] | None = None, ncol: int | None = None,
              scale: int = 1) -> str:
  """Writes a PNG grid atomically (temp file + rename) and returns the path."""
  if os.path.exists(path) and not os.path.isfile(path):
    # The atomic rename would replace whatever is there (a directory fails, but a device like /dev/null would be
    # swapped for a regular file): only regular files are overwritten.
    raise ValueError(f"cannot write the picture to {path}: it exists and is not a regular file")
  grid = make_grid(images, labels=labels, ncol=ncol, scale=scale)
  return fileio.atomic_write(path, lambda f: grid.save(f, format="PNG"))


def load_image(path: str, size: int | None = None) -> np.ndarray:
  """Reads an RGB image as (H, W, 3) float32 in [0, 1]; resizes (bicubic, as the official demo) when `size`."""
  try:
    image = Image.open(path).convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  if size is not None and image.size != (size, size):
    image = image.resize((size, size), Image.BICUBIC)
  return np.asarray(image, np.float32) / 255.0
