"""Training images for both backends: a built-in synthetic dataset and an image-folder reader.

Images are float32 HWC in [0, 1], the official input range (the official demo divides uint8 by 255).

Synthetic: ten classes of simple, clearly distinct patterns (`SYNTHETIC_CLASSES`), each image a pure function of
(seed, index, image_size): random colours, positions, sizes, periods and phases. Nothing is downloaded, so the whole
pipeline (tokenize, train, sample) runs offline, and a model trained on it must draw recognisable classes.

Folder: the ImageNet layout, one subfolder per class (`root/<class>/*.JPEG`); class ids follow the sorted folder
names, as torchvision's ImageFolder and tfds' imagenet2012 do. Preprocessing (`preprocess`): resize the shorter side
to image_size (bicubic with antialiasing), then a centre crop. The official MaskGIT release has no training input
pipeline; its demo resizes with PIL bicubic and divides by 255 (maskgit/utils.py `read_image_from_url`). We keep that
resampler and range and add the aspect-preserving resize + centre crop that ImageNet-256 generative models use, so
no image is distorted. Random horizontal flips are applied at training time from the token cache's flipped codes;
random crops (`data.random_crops` > 1, the seed's RandomCrop) from the cache's codes of several crops per image.
(The seed resizes with torchvision's bilinear Resize; we keep PIL bicubic for both recipes.)
"""

from __future__ import annotations

import colorsys
import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "hstripes", "vstripes", "checkerboard", "cross", "ring",
                     "diagonal", "dots")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
# Example count of the synthetic dataset when a caller does not choose one (10 classes x 1000 images).
SYNTHETIC_NUM_EXAMPLES = 10_000


# Synthetic patterns ----------------------------------------------------------------------------------------------
def _coverage(inside, image_size: int) -> np.ndarray:
  """Anti-aliased (H, W) coverage of the region `inside(x, y)`, x and y in [0, 1] (y points down)."""
  ss = 4 if image_size <= 128 else 2  # supersampling: soft, resolution-independent edges
  n = image_size * ss
  t = (np.arange(n, dtype=np.float64) + 0.5) / n
  x, y = np.meshgrid(t, t)
  mask = inside(x, y).astype(np.float32)
  return mask.reshape(image_size, ss, image_size, ss).mean(axis=(1, 3))


def _stripes(coord, period, phase):
  return np.mod(coord / period + phase, 1.0) < 0.5


def _pattern(name: str, rng: np.random.Generator):
  """The region of one pattern, with its random geometry drawn from `rng` (a fixed number of draws per class)."""
  size = rng.uniform(0.2, 0.34)  # shapes: radius / half-extent as a fraction of the image side
  cx, cy = rng.uniform(size + 0.04, 1.0 - size - 0.04, size=2)
  period = rng.uniform(0.16, 0.3)  # textures: one light + one dark band, as a fraction of the image side
  phase_x, phase_y = rng.uniform(0.0, 1.0, size=2)
  direction = 1.0 if rng.uniform() < 0.5 else -1.0

  def r2(x, y):
    return (x - cx) ** 2 + (y - cy) ** 2

  if name == "circle":
    return lambda x, y: r2(x, y) <= size ** 2
  if name == "square":
    half = 0.85 * size
    return lambda x, y: (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
  if name == "triangle":  # upward, apex at the top, base width 2 * size
    return lambda x, y: (y >= cy - size) & (y <= cy + size) & (np.abs(x - cx) <= (y - cy + size) / 2.0)
  if name == "hstripes":
    return lambda x, y: _stripes(y, period, phase_y)
  if name == "vstripes":
    return lambda x, y: _stripes(x, period, phase_x)
  if name == "checkerboard":
    return lambda x, y: (np.floor(x / period + phase_x) + np.floor(y / period + phase_y)) % 2 == 0
  if name == "cross":
    arm = 0.3 * size
    return lambda x, y: (((np.abs(x - cx) <= arm) & (np.abs(y - cy) <= size))
                         | ((np.abs(y - cy) <= arm) & (np.abs(x - cx) <= size)))
  if name == "ring":
    return lambda x, y: (r2(x, y) <= size ** 2) & (r2(x, y) >= (0.55 * size) ** 2)
  if name == "diagonal":  # 45-degree stripes, '/' or '\'
    return lambda x, y: _stripes((x + direction * y) / np.sqrt(2.0), period, phase_x)
  if name == "dots":  # a grid of round dots
    def dots(x, y):
      dx = np.mod(x / period + phase_x, 1.0) - 0.5
      dy = np.mod(y / period + phase_y, 1.0) - 0.5
      return dx ** 2 + dy ** 2 <= 0.28 ** 2
    return dots
  raise ValueError(f"unknown synthetic pattern {name!r}; patterns: {list(SYNTHETIC_CLASSES)}")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A bright saturated foreground on a dark, muted background: the shape, not the colour, carries the class."""
  fg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.8, 1.0))
  bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.05, 0.3))
  return np.asarray(fg, np.float32), np.asarray(bg, np.float32)


def synthetic_image(index: int, image_size: int, num_class: int = len(SYNTHETIC_CLASSES),
                    seed: int = 0) -> tuple[np.ndarray, int]:
  """Image `index` of the synthetic dataset: ((H, H, 3) float32 in [0, 1], label = index % num_class)."""
  if not 1 <= num_class <= len(SYNTHETIC_CLASSES):
    raise ValueError(f"the synthetic dataset has {len(SYNTHETIC_CLASSES)} classes {list(SYNTHETIC_CLASSES)}; "
                     f"num_class={num_class} is not in [1, {len(SYNTHETIC_CLASSES)}]")
  if index < 0:
    raise IndexError(f"synthetic image index must be >= 0, got {index}")
  label = index % num_class
  # One independent stream per (seed, index): any image is made alone, in any order, on any host.
  rng = np.random.default_rng([seed, index])
  fg, bg = _colours(rng)
  alpha = _coverage(_pattern(SYNTHETIC_CLASSES[label], rng), image_size)[..., None]
  return (bg * (1.0 - alpha) + fg * alpha).astype(np.float32), label


class SyntheticDataset:
  """`num_examples` synthetic images (labels cycle through the classes, so every class is equally frequent)."""

  def __init__(self, num_examples: int, image_size: int, num_class: int = len(SYNTHETIC_CLASSES), seed: int = 0):
    if num_examples < 1:
      raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    synthetic_image(0, 1, num_class)  # validates num_class
    self.num_examples, self.image_size, self.num_class, self.seed = num_examples, image_size, num_class, seed
    self.class_names = list(SYNTHETIC_CLASSES[:num_class])

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} synthetic images")
    return synthetic_image(index, self.image_size, self.num_class, self.seed)

  def describe(self) -> dict:
    return {"dataset": "synthetic", "num_examples": self.num_examples, "image_size": self.image_size,
            "num_class": self.num_class, "seed": self.seed}


# Image folders ---------------------------------------------------------------------------------------------------
def crop_offsets(room: int, crops: int) -> list[int]:
  """`crops` offsets in [0, room], evenly spaced (floor), the middle one (odd counts) the centre crop's room // 2."""
  if crops == 1:
    return [room // 2]
  return [i * room // (crops - 1) for i in range(crops)]


def preprocess(image: Image.Image, image_size: int, crops: int = 0) -> np.ndarray:
  """RGB, shorter side resized to image_size (bicubic, antialiased), then a crop: (H, H, 3) float32 in [0, 1], the
  centre crop; with `crops` >= 1, (crops, H, H, 3): crops at `crop_offsets` along the longer side (random-crop
  augmentation: the seed's RandomCrop after Resize draws one such offset per epoch and image)."""
  image = image.convert("RGB")
  w, h = image.size
  scale = image_size / min(w, h)
  new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
  if (new_w, new_h) != (w, h):
    # PIL's resize filters over the whole footprint when downscaling (antialiasing), unlike a plain bicubic tap.
    image = image.resize((new_w, new_h), Image.BICUBIC)
  boxes = [(left, top, left + image_size, top + image_size)
           for left, top in zip(crop_offsets(new_w - image_size, max(crops, 1)),
                                crop_offsets(new_h - image_size, max(crops, 1)))]
  out = np.stack([np.asarray(image.crop(box), dtype=np.float32) / 255.0 for box in boxes])
  return out if crops else out[0]


def image_crops(dataset, index: int, crops: int) -> tuple[np.ndarray, int]:
  """((crops, H, H, 3) crops, label) of example `index`: the dataset's own `crops` method when it has one (image
  folders), else copies of its image (images already of the model's size, e.g. synthetic: every crop is the
  image)."""
  if hasattr(dataset, "crops"):
    return dataset.crops(index, crops)
  image, label = dataset[index]
  return np.repeat(image[None], crops, axis=0), label


class ImageFolder:
  """Images in `root/<class name>/...` (ImageNet layout); labels are indices into the sorted class names."""

  def __init__(self, root: str, image_size: int, num_class: int | None = None):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist (expected root/<class>/<image files>)")
    self.root, self.image_size = root, image_size
    self.class_names = sorted(d for d in os.listdir(root)
                              if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not self.class_names:
      raise ValueError(f"image folder {root!r} has no class subfolders (expected root/<class>/<image files>)")
    if num_class is not None and len(self.class_names) > num_class:
      raise ValueError(f"image folder {root!r} has {len(self.class_names)} class folders but the config has "
                       f"num_class={num_class}")
    self.samples: list[tuple[str, int]] = []
    for label, name in enumerate(self.class_names):
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
        dirnames.sort()
        for f in sorted(filenames):
          if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
            self.samples.append((os.path.join(dirpath, f), label))
    if not self.samples:
      raise ValueError(f"image folder {root!r} has class folders but no images with extensions {IMAGE_EXTENSIONS}")

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.crops(index, 0)

  def crops(self, index: int, crops: int) -> tuple[np.ndarray, int]:
    """(preprocess(image, image_size, crops), label): the centre crop (crops=0) or `crops` crops."""
    path, label = self.samples[index]
    try:
      with Image.open(path) as image:
        return preprocess(image, self.image_size, crops), label
    except OSError as e:
      raise OSError(f"cannot read image {path}: {e}") from None

  def describe(self) -> dict:
    return {"dataset": "folder", "root": os.path.abspath(self.root), "num_examples": len(self),
            "image_size": self.image_size, "num_class": len(self.class_names)}


def make_dataset(config, num_synthetic: int = SYNTHETIC_NUM_EXAMPLES):
  """The image dataset named by `config.data` (synthetic or folder)."""
  data = config.data
  if data.dataset == "synthetic":
    return SyntheticDataset(num_synthetic, config.image_size, config.num_class, seed=config.train.seed)
  if data.dataset == "folder":
    return ImageFolder(data.data_dir, config.image_size, config.num_class)
  raise ValueError(f"data.dataset={data.dataset!r} has no images to read (a token cache is read with token_cache)")


def iterate_images(dataset, batch_size: int, indices: Sequence[int] | None = None, num_workers: int = 0,
                   crops: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (indices, images (b, H, H, 3) float32, labels (b,) int32) in order; threads decode files if asked.
  With `crops` >= 1 the images are (b, crops, H, H, 3) (`image_crops`)."""
  indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
  load = dataset.__getitem__ if not crops else (lambda i: image_crops(dataset, int(i), crops))
  pool = None
  if num_workers > 0:
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
    pool = ThreadPoolExecutor(num_workers)
  try:
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      items = list(pool.map(load, chunk)) if pool else [load(int(i)) for i in chunk]
      yield chunk, np.stack([im for im, _ in items]), np.asarray([lb for _, lb in items], np.int32)
  finally:
    if pool:
      pool.shutdown()


def with_class_names(config):
  """`config` with `data.class_names` filled from the dataset when empty (synthetic pattern names, or an image
  folder's class folders), so exported checkpoints label their sample grids with names."""
  if config.data.class_names:
    return config
  names = ()
  if config.data.dataset == "synthetic":
    names = SYNTHETIC_CLASSES[:config.num_class]
  elif config.data.dataset == "folder" and os.path.isdir(config.data.data_dir):
    names = tuple(sorted(d for d in os.listdir(config.data.data_dir)
                         if os.path.isdir(os.path.join(config.data.data_dir, d))))[:config.num_class]
  return config.replace(data=dataclasses.replace(config.data, class_names=tuple(names))) if names else config


def write_synthetic_folder(path: str, first: int, count: int, image_size: int = 32) -> str:
  """Writes synthetic images first..first+count-1 as PNGs in one folder (e.g. held-out references for eval)."""
  from maskgit_common import fileio  # pylint: disable=import-outside-toplevel
  from maskgit_common.images import to_uint8  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  for index in range(first, first + count):
    image, label = synthetic_image(index, image_size)
    png = Image.fromarray(to_uint8(image))
    fileio.atomic_write(os.path.join(path, f"{index:06d}_{SYNTHETIC_CLASSES[label]}.png"),
                        lambda f, png=png: png.save(f, format="PNG"))
  return path


if __name__ == "__main__":
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description="Write synthetic images as PNGs (reference sets for eval).")
  parser.add_argument("--write", required=True, help="output folder")
  parser.add_argument("--first", type=int, default=20000, help="first image index (training uses 0..9999)")
  parser.add_argument("--count", type=int, default=200)
  parser.add_argument("--image_size", type=int, default=32)
  args = parser.parse_args()
  print(f"wrote {write_synthetic_folder(args.write, args.first, args.count, args.image_size)}: {args.count} images")
