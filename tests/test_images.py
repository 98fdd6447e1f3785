"""Reading user pictures right (16-bit PNGs were read as solid white) and writing the format a suffix names
(issue 14, finding 3), for images, masks and evaluation folders alike."""

import os

import numpy as np
import pytest
from PIL import Image

import configs
from evaluation import sources
from maskgit_common import editing, images


def _grey16(path, size=48):
  """A 16-bit greyscale PNG (Pillow opens it in mode I;16): a horizontal ramp 0..65535."""
  ramp = np.round(np.linspace(0, 65535, size)).astype(np.uint16)
  Image.fromarray(np.tile(ramp, (size, 1))).save(path)
  assert Image.open(path).mode in ("I;16", "I")
  return ramp


def test_a_16_bit_greyscale_png_is_read_as_its_values_not_white(tmp_path):
  path = str(tmp_path / "ramp16.png")
  ramp = _grey16(path)
  rgb = images.read_rgb_uint8(path)
  assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[0, :, 0], np.round(ramp / 257.0).astype(np.uint8))  # 65535 / 255 = 257
  assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.min() == 0 and rgb.max() == 255
  loaded = images.load_image(path)
  np.testing.assert_allclose(loaded[0, :, 1], np.round(ramp / 257.0) / 255.0, atol=1e-7)
  assert abs(float(images.load_image(path, 32).mean()) - 0.5) < 0.01  # resized, still the ramp's mean
  # The same picture stored in 8 bits reads the same.
  eight = str(tmp_path / "ramp8.png")
  Image.fromarray(rgb).save(eight)
  np.testing.assert_array_equal(images.read_rgb_uint8(eight), rgb)


def test_a_16_bit_mask_marks_its_white_area_only(tmp_path):
  config = configs.tiny()  # 32 px, factor 4: 8x8 tokens
  pixels = np.zeros((64, 64), np.uint16)
  pixels[:32, 32:] = 65535  # the top-right quarter
  path = str(tmp_path / "mask16.png")
  Image.fromarray(pixels).save(path)
  expected = np.zeros((8, 8), np.float32)
  expected[:4, 4:] = 1
  np.testing.assert_array_equal(editing.latent_mask_from_png(path, config), expected)
  np.testing.assert_allclose(images.read_grey(path), pixels / 65535.0)


def test_evaluation_folders_read_16_bit_pngs_right(tmp_path):
  folder = tmp_path / "refs"
  folder.mkdir()
  ramp = _grey16(str(folder / "a.png"), size=16)
  (batch,) = list(sources.image_batches(str(folder), 4))
  np.testing.assert_array_equal(batch[0, 0, :, 0], np.round(ramp / 257.0).astype(np.uint8))
  assert sources.count_images(str(folder)) == 1


@pytest.mark.parametrize("suffix, pillow_format", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"),
                                                   (".bmp", "BMP"), (".tiff", "TIFF")])
def test_pictures_are_written_in_the_format_their_suffix_names(tmp_path, suffix, pillow_format):
  grid = np.random.default_rng(0).random((3, 8, 8, 3)).astype(np.float32)
  for write in (lambda p: images.save_grid(grid, p), lambda p: images.save_image(grid[0], p)):
    path = str(tmp_path / f"picture{suffix}")
    write(path)
    with Image.open(path) as picture:
      assert picture.format == pillow_format


def test_unknown_suffixes_and_clashing_outputs_are_refused_before_writing(tmp_path):
  for name in ("picture.foo", "picture"):
    with pytest.raises(images.ImageError, match="give a file name ending in one of .png"):
      images.save_grid(np.zeros((1, 4, 4, 3)), str(tmp_path / name))
    assert not os.path.exists(tmp_path / name)
  a = str(tmp_path / "a.png")
  with pytest.raises(images.ImageError, match="--save_steps .* is also --out"):
    images.check_output_paths({"out": a, "save_steps": a})
  with pytest.raises(images.ImageError, match="--out .* is also --image"):
    images.check_output_paths({"out": a}, {"image": os.path.join(str(tmp_path), "..", tmp_path.name, "a.png")})
  images.check_output_paths({"out": a, "grid": None, "save_steps": str(tmp_path / "b.png")}, {"image": None})
