"""Image I/O shared by both backends: reading user images and masks, writing images and (labelled) grids.

Images are NHWC float arrays in [0, 1] (the official input range); values outside are clipped when written.
Reading goes through Pillow, with one fix: Pillow opens a 16-bit greyscale PNG in mode "I;16" / "I" (values up to
65535) and its `convert("RGB")` / `convert("L")` clip those to 255, which reads any such picture as solid white;
here they are scaled to 8 bits (or to [0, 1] for masks) instead. Writing names the format by the file's suffix
(`IMAGE_FORMATS`); a suffix Pillow cannot write is refused before any work, never written as PNG bytes.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from maskgit_common import fileio
from maskgit_common.errors import UserError

# Suffix -> Pillow format name, for the formats an output picture may have.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit greyscale PNGs (and 32-bit integer images)


class ImageError(UserError, ValueError):
  """An image that cannot be read, or an output path that cannot take a picture; the message names it."""


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


# Reading --------------------------------------------------------------------------------------------------------
def _open(path: str) -> Image.Image:
  try:
    with Image.open(path) as image:
      image.load()
      return image
  except (OSError, ValueError) as e:
    raise ImageError(f"cannot read image {path}: {e}") from None


def _wide_to_unit(image: Image.Image) -> np.ndarray:
  # Mode "I;16*" holds uint16, "I" int32 (how older Pillows open 16-bit PNGs): both on the 16-bit scale.
  return np.clip(np.asarray(image, np.float64) / 65535.0, 0.0, 1.0).astype(np.float32)


def read_rgb_uint8(path: str) -> np.ndarray:
  """(H, W, 3) uint8 of any picture Pillow opens; 16-bit greyscale rounded to 8 bits, not clipped to white."""
  image = _open(path)
  if image.mode in _WIDE_MODES:
    grey = np.round(_wide_to_unit(image) * 255.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  return np.asarray(image.convert("RGB"), np.uint8)


def read_grey(path: str) -> np.ndarray:
  """(H, W) float32 in [0, 1] (a mask picture): luma of colour pictures, full precision for 16-bit ones."""
  image = _open(path)
  if image.mode in _WIDE_MODES:
    return _wide_to_unit(image)
  return np.asarray(image.convert("L"), np.float32) / 255.0


def resize(image, size: int) -> np.ndarray:
  """(H, W, 3) float32 in [0, 1] (or uint8) -> (size, size, 3) float32: 8-bit pixels resized bicubically, as the
  official demo prepares its inputs."""
  image = np.asarray(image)
  pixels = Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image))
  if pixels.size != (size, size):
    pixels = pixels.resize((size, size), Image.BICUBIC)
  return np.asarray(pixels, np.float32) / 255.0


def load_image(path: str, size: int | None = None) -> np.ndarray:
  """Reads an RGB image as (H, W, 3) float32 in [0, 1]; resizes (bicubic, as the official demo) when `size`."""
  pixels = read_rgb_uint8(path)
  return resize(pixels, size) if size is not None else pixels.astype(np.float32) / 255.0


# Writing --------------------------------------------------------------------------------------------------------
def image_format(path: str, flag: str = "out") -> str:
  """The Pillow format `path`'s suffix names; ImageError for a suffix this Pillow cannot write."""
  Image.init()  # Pillow registers its writers lazily
  suffix = os.path.splitext(path)[1].lower()
  name = IMAGE_FORMATS.get(suffix)
  if name is None or name not in Image.SAVE:
    usable = ", ".join(s for s, n in IMAGE_FORMATS.items() if n in Image.SAVE)
    what = f"the suffix {suffix!r} names no picture format this Pillow writes" if suffix else "no suffix"
    raise ImageError(f"--{flag} {path}: {what}; give a file name ending in one of {usable}")
  return name


def check_output_paths(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None] = ()) -> None:
  """Before any work: every output picture (flag -> path) has a known suffix, can be written, and is neither
  another output nor one of the `inputs` (flag -> path): one file must never silently replace another."""
  seen = {os.path.realpath(p): f for f, p in dict(inputs).items() if p}
  for flag, path in outputs.items():
    if not path:
      continue
    image_format(path, flag)
    if os.path.exists(path) and not os.path.isfile(path):
      # The atomic rename would swap a device like /dev/null for a regular file: only regular files are replaced.
      raise ImageError(f"--{flag} {path}: exists and is not a regular file")
    fileio.check_writable(path, f"--{flag}")
    real = os.path.realpath(path)
    if real in seen:
      raise ImageError(f"--{flag} {path} is also --{seen[real]}: writing it would overwrite that file; give "
                       "another path")
    seen[real] = flag


def _save(picture: Image.Image, path: str) -> str:
  name = image_format(path)
  options = {"quality": 95} if name in ("JPEG", "WEBP") else {}
  return fileio.atomic_write(path, lambda f: picture.save(f, format=name, **options))


def save_image(image: np.ndarray, path: str) -> str:
  """Writes one (H, W, 3) image atomically, in the format of the path's suffix; returns the path."""
  image = to_uint8(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"save_image expects an (H, W, 3) image, got shape {image.shape}")
  return _save(Image.fromarray(image), path)


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
  """Writes a grid atomically (temp file + rename), in the format of the path's suffix, and returns the path."""
  if os.path.exists(path) and not os.path.isfile(path):
    raise ImageError(f"cannot write the picture to {path}: it exists and is not a regular file")
  return _save(make_grid(images, labels=labels, ncol=ncol, scale=scale), path)
