"""Image editing inputs, framework-free: which latent tokens to regenerate and the decoder's starting tokens.

Official: google-research/maskgit `maskgit/inference.py`
(`create_latent_mask_and_input_tokens_for_image_editing`, `composite_outputs`). A latent mask is (h, h) float32
with 1 = regenerate; the editing input is `[K + label, codes where the mask is 0, -1 where it is 1]`, decoded from
`sampler.edit_start_iter` (the official demo starts at step 2 of 12). `edit_inputs` turns what `run.py edit` is
given (a picture and a --mask picture, a --box or --extend margins) into the image and the latent mask.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from maskgit_common import decode_inputs
from maskgit_common import images as image_io
from maskgit_common.errors import UserError


class EditError(UserError, ValueError):
  """Editing input that cannot be used (a box outside the image, an unreadable mask, ...); names the flag."""


def latent_mask_from_bbox(config, top: int, left: int, height: int, width: int) -> np.ndarray:
  """(h, h) float32, 1 inside the pixel box grown by one latent cell on each side (the official formula).

  The official code hard-codes the tokenizer factor 16; here f = config.downsample_factor:
  rows [max(0, top//f - 1), min(h, height//f + top//f + 1)), columns likewise with left/width.
  """
  for name, value in (("top", top), ("left", left), ("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"latent_mask_from_bbox: {name} must be a non-negative integer (pixels), got {value!r}")
  f, h = config.downsample_factor, config.latent_size
  mask = np.zeros((h, h), np.float32)
  t, b = max(0, top // f - 1), min(h, height // f + top // f + 1)
  l, r = max(0, left // f - 1), min(h, left // f + width // f + 1)
  mask[t:b, l:r] = 1
  return mask


def edit_input_tokens(codes, latent_mask, label, config) -> np.ndarray:
  """(B, S) int32 decoder input: the codes with the mask id where latent_mask is 1 and the class token, in the
  model's token layout (official: `[K + label, codes or -1]`); see `maskgit_common.decode_inputs.edit_ids`."""
  return decode_inputs.edit_ids(codes, latent_mask, label, config).astype(np.int32)


# Masks from pictures, outpainting, compositing ------------------------------------------------------------------
MASK_THRESHOLD = 0.5


def latent_mask_from_pixels(pixel_mask, config, threshold: float = MASK_THRESHOLD) -> np.ndarray:
  """(h, h) float32 from a pixel mask of any size (H, W) (or (H, W, C): channels averaged), values in [0, 1]:
  each latent cell takes the mean of the pixels it covers (area resampling) and is 1 where that mean is >= threshold
  (default 0.5: a cell is regenerated when at least half of its area is marked)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  mask = np.asarray(pixel_mask, np.float32)
  if mask.ndim == 3:
    mask = mask.mean(-1)
  if mask.ndim != 2 or mask.size == 0:
    raise ValueError(f"latent_mask_from_pixels: the mask must be (H, W) or (H, W, C), got shape {mask.shape}")
  h = config.latent_size
  small = np.asarray(Image.fromarray(mask).resize((h, h), Image.BOX), np.float32)
  return (small >= threshold).astype(np.float32)


def latent_mask_from_png(path: str, config, threshold: float = MASK_THRESHOLD) -> np.ndarray:
  """(h, h) float32 from a mask picture (white = regenerate), any size and mode (16-bit included), see
  `latent_mask_from_pixels`."""
  try:
    pixels = image_io.read_grey(path)
  except image_io.ImageError as e:
    raise EditError(f"latent_mask_from_png: cannot read mask picture {path}: {e}") from None
  return latent_mask_from_pixels(pixels, config, threshold)


def outpaint_canvas(image, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0, fill: float = 0.5):
  """Extends an image (H, W, 3) in [0, 1] by pixels on any side.

  Returns (canvas (H + top + bottom, W + left + right, 3) float32 with the new area set to `fill`, pixel mask of
  the same height and width, float32, 1 on the new area). Resize both to config.image_size (or pick the margins so
  the canvas has that size), then `latent_mask_from_pixels` gives the tokens to generate.
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise ValueError(f"outpaint_canvas: image must be (H, W, C), got shape {image.shape}")
  for name, value in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"outpaint_canvas: {name} must be a non-negative integer (pixels), got {value!r}")
  height, width = image.shape[0] + top + bottom, image.shape[1] + left + right
  canvas = np.full((height, width, image.shape[2]), fill, np.float32)
  canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
  mask = np.ones((height, width), np.float32)
  mask[top:top + image.shape[0], left:left + image.shape[1]] = 0
  return canvas, mask


def composite(original, generated, latent_mask, config) -> np.ndarray:
  """The official blending of an edit (`composite_outputs`): the latent mask is upsampled to the image (PIL's
  default resampling of 8-bit masks), blurred with a Gaussian of radius image_size // 16 - 1 (the official value),
  and used as alpha: generated * m + original * (1 - m). Images (B, H, W, 3) or (H, W, 3) in [0, 1]."""
  from PIL import Image, ImageFilter  # pylint: disable=import-outside-toplevel
  size = config.image_size
  mask = np.asarray(latent_mask, np.float32)
  mask = mask[0] if mask.ndim == 3 else mask  # the official code blends every row with row 0's mask
  alpha = Image.fromarray(np.uint8(mask * 255.0)).resize((size, size))
  alpha = alpha.filter(ImageFilter.GaussianBlur(radius=max(0, size // 16 - 1)))
  alpha = np.float32(alpha)[:, :, None] / 255.0
  return np.asarray(generated, np.float32) * alpha + (1 - alpha) * np.asarray(original, np.float32)


def edit_mode(latent_mask) -> str:
  """What an edit with this mask does: `none` (nothing marked: there is nothing to regenerate, the input is
  returned unchanged), `generate` (everything marked: plain class-conditional generation from step 0, since no
  token is known) or `edit` (the official inpainting from sampler.edit_start_iter)."""
  marked = np.asarray(latent_mask) > 0.5
  if not marked.any():
    return "none"
  return "generate" if marked.all() else "edit"


# What `run.py edit` is given -> the image and the latent mask -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EditInputs:
  image: np.ndarray        # (H, H, 3) float32 in [0, 1], the model's image size
  latent_mask: np.ndarray  # (h, h) float32, 1 = regenerate
  note: str                # what was done to the picture to fit the model ("" when nothing)


def parse_ints(text: str, count: int, flag: str) -> list[int]:
  """`count` comma-separated non-negative integers, or EditError naming --flag."""
  try:
    values = [int(v) for v in str(text).split(",")]
  except ValueError:
    values = []
  if len(values) != count or any(v < 0 for v in values):
    raise EditError(f"--{flag} needs {count} comma-separated non-negative integers, got {text!r}")
  return values


def edit_inputs(config, image_path: str, *, mask: str | None = None, box: str | None = None,
                extend: str | None = None) -> EditInputs:
  """The image (resized to config.image_size) and the latent mask from exactly one of: a mask picture (white =
  regenerate, any size), a box "top,left,height,width" in pixels of the resized image (`latent_mask_from_bbox`),
  or outpainting margins "top,bottom,left,right" in pixels of the input (`outpaint_canvas`)."""
  if not image_path:
    raise EditError("edit needs --image (a picture to edit)")
  if not os.path.isfile(image_path):
    raise EditError(f"--image {image_path}: no such file")
  chosen = [name for name, value in (("mask", mask), ("box", box), ("extend", extend)) if value]
  if len(chosen) != 1:
    raise EditError("edit needs exactly one of --mask m.png (white = regenerate), --box top,left,height,width "
                    f"(pixels of the resized image) or --extend top,bottom,left,right (outpainting); got {chosen}")
  if mask and not os.path.isfile(mask):
    raise EditError(f"--mask {mask}: no such file")
  size = config.image_size
  original = image_io.load_image(image_path)
  if extend:
    top, bottom, left, right = parse_ints(extend, 4, "extend")
    canvas, pixel_mask = outpaint_canvas(original, top=top, bottom=bottom, left=left, right=right)
    image = image_io.resize(canvas, size)
    note = f"outpainting: canvas {canvas.shape[1]}x{canvas.shape[0]} resized to {size}x{size}"
    return EditInputs(image, latent_mask_from_pixels(pixel_mask, config), note)
  image = image_io.load_image(image_path, size)
  note = ("" if original.shape[:2] == (size, size) else
          f"resized {original.shape[1]}x{original.shape[0]} -> {size}x{size} (the model's image size)")
  if mask:
    try:
      latent_mask = latent_mask_from_png(mask, config)
    except ValueError as e:
      raise EditError(f"--mask {mask}: {e}") from None
  else:
    top, left, height, width = parse_ints(box, 4, "box")
    if top + height > size or left + width > size or not height or not width:
      raise EditError(f"--box {box} must lie inside the {size}x{size} image and be non-empty")
    latent_mask = latent_mask_from_bbox(config, top, left, height, width)
  return EditInputs(np.asarray(image, np.float32), latent_mask, note)


# Shading of the mask panel: the kept area dimmed, the regenerated area tinted red. Neither can be white, the
# background of `images.make_grid`, so the panel stays visible whatever the mask (a plain white-on-black mask
# panel vanished into the background where it was white).
KEEP_SHADE = 0.35
REGENERATE_TINT = (1.0, 0.15, 0.15)


def mask_panel(image, latent_mask, config) -> np.ndarray:
  """(H, W, 3) picture of which tokens an edit regenerates: `image` dimmed where kept, tinted red where
  regenerated, in whole latent cells (each cell is f x f pixels)."""
  f = config.downsample_factor
  marked = np.kron(np.asarray(latent_mask, np.float32) > 0.5, np.ones((f, f), bool))[..., None]
  image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
  return np.where(marked, 0.5 * image + 0.5 * np.asarray(REGENERATE_TINT, np.float32), KEEP_SHADE * image)
