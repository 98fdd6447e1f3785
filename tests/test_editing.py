"""Editing helpers: masks from boxes and pictures, outpainting canvases, the official compositing, and the decoders
never touching tokens outside the mask (both backends)."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import configs
from maskgit_common import editing
from maskgit_jax import sampler as jax_sampler
from maskgit_torch import sampler as torch_sampler


@pytest.fixture(scope="module")
def config():
  return configs.tiny()  # 32x32 images, factor 4, 8x8 tokens, 64 codes


def test_box_mask_is_the_official_formula_with_the_factor(config):
  mask = editing.latent_mask_from_bbox(config, top=8, left=12, height=8, width=4)
  expected = np.zeros((8, 8), np.float32)
  expected[1:5, 2:5] = 1  # rows [8//4 - 1, 8//4 + 8//4 + 1), cols [12//4 - 1, 12//4 + 4//4 + 1)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(editing.latent_mask_from_bbox(config, 0, 0, 32, 32), np.ones((8, 8)))
  with pytest.raises(ValueError, match="top must be a non-negative integer"):
    editing.latent_mask_from_bbox(config, -1, 0, 4, 4)


def test_png_mask_any_size_is_resized_and_thresholded(config, tmp_path):
  pixels = np.zeros((100, 100), np.uint8)
  pixels[:50, 50:] = 255  # the top-right quarter
  pixels[50:56, :6] = 255  # a speck covering less than half of one cell
  path = str(tmp_path / "mask.png")
  Image.fromarray(pixels).save(path)
  mask = editing.latent_mask_from_png(path, config)
  expected = np.zeros((8, 8), np.float32)
  expected[:4, 4:] = 1
  np.testing.assert_array_equal(mask, expected)
  with pytest.raises(ValueError, match="cannot read mask picture"):
    editing.latent_mask_from_png(str(tmp_path / "missing.png"), config)


def test_outpaint_canvas_and_mask(config):
  image = np.random.default_rng(0).random((24, 20, 3)).astype(np.float32)
  canvas, mask = editing.outpaint_canvas(image, top=4, bottom=4, left=8, right=4)
  assert canvas.shape == (32, 32, 3) and mask.shape == (32, 32)
  np.testing.assert_array_equal(canvas[4:28, 8:28], image)
  assert mask.sum() == 32 * 32 - 24 * 20 and (mask[4:28, 8:28] == 0).all()
  assert (canvas[mask == 1] == 0.5).all()
  latent = editing.latent_mask_from_pixels(mask, config)
  assert latent[0].all() and latent[:, :2].all() and not latent[3:6, 3:6].any()


def test_composite_keeps_the_original_far_from_the_mask(config):
  rng = np.random.default_rng(1)
  original, generated = rng.random((2, 32, 32, 3)).astype(np.float32)
  mask = np.zeros((8, 8), np.float32)
  mask[:4] = 1
  out = editing.composite(original, generated, mask, config)
  np.testing.assert_allclose(out[:8], generated[:8], atol=1e-6)  # deep inside the mask
  np.testing.assert_allclose(out[-8:], original[-8:], atol=1e-6)  # far outside
  between = out[14:18]
  assert not np.allclose(between, original[14:18]) and not np.allclose(between, generated[14:18])
  np.testing.assert_allclose(editing.composite(original, generated, np.ones((8, 8)), config), generated, atol=1e-6)


def test_edit_modes_for_empty_and_full_masks():
  assert editing.edit_mode(np.zeros((8, 8))) == "none"
  assert editing.edit_mode(np.ones((8, 8))) == "generate"
  assert editing.edit_mode(np.eye(8)) == "edit"


@pytest.mark.parametrize("options", [{}, {"guidance_scale": 2.0, "order": "halton"}])
def test_tokens_outside_the_mask_never_change_in_either_backend(config, options, toy_logits):
  jax_fn, torch_fn, k, _ = toy_logits(seq_len=config.seq_len, k=config.codebook_size, num_class=config.num_class)
  rng = np.random.default_rng(2)
  codes = rng.integers(0, k, (2, 8, 8))
  mask = editing.latent_mask_from_bbox(config, 8, 8, 12, 12)
  ids = editing.edit_input_tokens(codes, mask, [3, 5], config)
  sampler = dataclasses.replace(config.sampler, **options)
  start = sampler.edit_start
  n = sampler.num_iter - start
  draws = (rng.gumbel(size=(n, 2, config.seq_len, k)).astype(np.float32),
           rng.gumbel(size=(n, 2, config.seq_len)).astype(np.float32))
  a = jax_sampler.decode_with_config(ids, jax_fn, jax_sampler.RecordedNoise(*draws), sampler, start_iter=start)
  b = torch_sampler.decode_with_config(torch.from_numpy(ids), torch_fn, torch_sampler.RecordedNoise(*draws),
                                       sampler, start_iter=start)
  for out in (np.asarray(a.final_seqs), b.final_seqs.numpy()):
    final = out[:, -1, 1:].reshape(2, 8, 8)
    np.testing.assert_array_equal(final[:, mask == 0], codes[:, mask == 0])
    assert (final[:, mask == 1] >= 0).all()
    assert (out[:, :, 0] == ids[:, :1]).all()  # the class token is kept
  np.testing.assert_array_equal(b.final_seqs.numpy(), np.asarray(a.final_seqs))


# What `run.py edit` is given -> image and latent mask (editing.edit_inputs) -----------------------------------
def test_an_aligned_box_grows_by_exactly_one_token_on_each_side_and_an_unaligned_one_may_not(config):
  # The README's statement, checked: the official formula rounds the box's top and its height down to tokens
  # separately, then adds one token above/left and one below/right (clipped to the grid).
  aligned = editing.latent_mask_from_bbox(config, top=8, left=12, height=8, width=8)  # f = 4: tokens 2-3, 3-4
  expected = np.zeros((8, 8), np.float32)
  expected[1:5, 2:6] = 1  # one more token on each side
  np.testing.assert_array_equal(aligned, expected)
  # top=7, height=2 covers pixel rows 7-8, i.e. tokens 1 and 2; the formula gives [7//4 - 1, 7//4 + 2//4 + 1)
  # = rows 0-1: one token above, and token row 2 (pixel 8 of the box) is NOT regenerated.
  unaligned = editing.latent_mask_from_bbox(config, top=7, left=8, height=2, width=4)
  assert unaligned[:, 3].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_edit_inputs_box_mask_and_extend(config, tmp_path):
  picture = str(tmp_path / "in.png")
  Image.fromarray(np.uint8(np.random.default_rng(0).random((48, 40, 3)) * 255)).save(picture)
  boxed = editing.edit_inputs(config, picture, box="8,8,8,8")
  assert boxed.image.shape == (32, 32, 3) and boxed.image.dtype == np.float32
  assert "resized 40x48 -> 32x32" in boxed.note
  np.testing.assert_array_equal(boxed.latent_mask, editing.latent_mask_from_bbox(config, 8, 8, 8, 8))
  mask = str(tmp_path / "mask.png")
  pixels = np.zeros((10, 10), np.uint8)
  pixels[5:, :] = 255
  Image.fromarray(pixels).save(mask)
  masked = editing.edit_inputs(config, picture, mask=mask)
  assert masked.latent_mask[4:].all() and not masked.latent_mask[:4].any()
  extended = editing.edit_inputs(config, picture, extend="0,0,0,8")  # 48x40 -> 48x48 canvas
  assert extended.latent_mask[:, -1].all() and not extended.latent_mask[:, :-1].any()  # 8 of 48 px: 1 of 8 cells
  assert "canvas 48x48" in extended.note


@pytest.mark.parametrize("kwargs, match", [
    (dict(box="8,8,8"), "--box needs 4 comma-separated non-negative integers"),
    (dict(box="30,0,8,8"), "--box 30,0,8,8 must lie inside the 32x32 image"),
    (dict(extend="1,2,-3,4"), "--extend needs 4"),
    (dict(), "exactly one of --mask"),
    (dict(box="0,0,8,8", extend="0,0,0,8"), "exactly one of --mask"),
    (dict(mask="no_such_mask.png"), "--mask no_such_mask.png: no such file"),
])
def test_edit_input_errors_name_the_flag(config, tmp_path, kwargs, match):
  picture = str(tmp_path / "in.png")
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(picture)
  with pytest.raises(editing.EditError, match=match):
    editing.edit_inputs(config, picture, **kwargs)
  with pytest.raises(editing.EditError, match="--image"):
    editing.edit_inputs(config, str(tmp_path / "missing.png"), box="0,0,8,8")
