"""The decoders' inputs, built once for both pipelines (maskgit_common/decode_inputs.py): initial tokens in each
family's token layout, label and image checks with errors that say what is wrong."""

import types

import numpy as np
import pytest

import configs
from maskgit_common import decode_inputs, editing
from maskgit_common.errors import UserError


def test_generation_ids_follow_the_layout():
  config = configs.tiny()  # K = 64, 10 classes, 8x8 tokens
  ids = decode_inputs.generation_ids([3, 0], config)
  np.testing.assert_array_equal(ids[:, 0], [64 + 3, 64])
  assert ids.shape == (2, 65) and (ids[:, 1:] == -1).all()
  seed = types.SimpleNamespace(transformer=types.SimpleNamespace(arch="seed"), codebook_size=64, num_class=10,
                               seq_len=65, latent_size=8, data=config.data)
  ids = decode_inputs.generation_ids([3, 0], seed)
  np.testing.assert_array_equal(ids[:, -1], [64 + 1 + 3, 64 + 1])  # the class token last, id K + 1 + label
  assert (ids[:, :-1] == 64).all()  # the mask id is K
  codes = np.arange(128).reshape(2, 8, 8) % 64
  mask = np.zeros((8, 8))
  mask[2:4, 2:4] = 1
  edit = decode_inputs.edit_ids(codes, mask, 5, seed)
  assert (edit[:, :-1].reshape(2, 8, 8)[:, 2:4, 2:4] == 64).all() and (edit[:, -1] == 70).all()
  np.testing.assert_array_equal(editing.edit_input_tokens(codes, mask, 5, config)[:, 1:].reshape(2, 8, 8)[:, 0],
                                codes[:, 0])


@pytest.mark.parametrize("labels,message", [([10], r"must lie in \[0, 10\), got \[10\]"), ([-1, 2], r"got \[-1\]"),
                                            ([1.5], "must be integers"), ([], "need at least one")])
def test_bad_labels_are_clear_errors(labels, message):
  with pytest.raises(UserError, match=message):
    decode_inputs.generation_ids(labels, configs.tiny())


def test_bad_images_and_edit_inputs_are_clear_errors():
  config = configs.tiny()
  with pytest.raises(UserError, match=r"expected images of shape \(B, 32, 32, 3\)"):
    decode_inputs.check_images(np.zeros((2, 16, 16, 3)), 32)
  assert decode_inputs.check_images(np.zeros((32, 32, 3)), 32).shape == (1, 32, 32, 3)
  with pytest.raises(UserError, match="3 labels for 2 images"):
    decode_inputs.edit_ids(np.zeros((2, 8, 8), int), np.ones((8, 8)), [1, 2, 3], config)
  with pytest.raises(UserError, match=r"latent_mask must be \(8, 8\) or \(B, 8, 8\)"):
    decode_inputs.edit_ids(np.zeros((2, 8, 8), int), np.ones((4, 4)), 1, config)
