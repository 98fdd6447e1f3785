"""The two pipelines (maskgit_{jax,torch}/pipeline.py): loading either checkpoint layout, and identical results.

One tiny random model (tests/conftest.py's tiny_checkpoint) is a torch checkpoint directory converted to a JAX one;
every pipeline (torch/JAX backend x torch/JAX layout, loaded once) must encode to the same codes and, from the same
recorded draws, decode the same tokens.
"""

import os
import warnings

import numpy as np
import pytest
import torch

from maskgit_common import editing
from maskgit_jax import pipeline as jax_pipeline
from maskgit_jax import sampler as jax_sampler
from maskgit_torch import pipeline as torch_pipeline
from maskgit_torch import sampler as torch_sampler

@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
  """(config, torch checkpoint dir, the same weights as a JAX checkpoint dir): tests/conftest.py's tiny model."""
  return tiny_checkpoint


@pytest.fixture(scope="module")
def models(tiny_pipelines):
  """Every pipeline (torch/JAX backend x torch/JAX layout) of the checkpoints, loaded once."""
  return tiny_pipelines


def images(config, n=2, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, config.image_size, config.image_size, 3)).astype(np.float32)


def recorded_draws(config, batch, num_iter, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.gumbel(size=(num_iter, batch, config.seq_len, config.codebook_size)).astype(np.float32)
  choice = rng.gumbel(size=(num_iter, batch, config.seq_len)).astype(np.float32)
  return sample, choice


def recorded(backend, draws):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if backend == "jax":
    return jax_sampler.RecordedNoise(jnp.asarray(draws[0]), jnp.asarray(draws[1]))
  return torch_sampler.RecordedNoise(torch.as_tensor(draws[0]), torch.as_tensor(draws[1]))


def test_every_backend_and_layout_encodes_and_decodes_alike(checkpoints, models):
  config = checkpoints[0]
  x = images(config)
  codes = {key: m.encode(x) for key, m in models.items()}
  ref = codes[("jax", "jax")]
  assert ref.shape == (2, config.latent_size, config.latent_size) and ref.dtype == np.int32
  for key, c in codes.items():
    np.testing.assert_array_equal(c, ref, err_msg=str(key))
  decoded = {key: m.decode_tokens(ref) for key, m in models.items()}
  for key, d in decoded.items():
    assert d.shape == x.shape
    np.testing.assert_allclose(d, decoded[("jax", "jax")], atol=1e-4, rtol=0, err_msg=str(key))


def test_generate_gives_identical_tokens_across_backends_from_recorded_draws(checkpoints, models):
  config = checkpoints[0]
  labels = [0, 2, 1]
  draws = recorded_draws(config, len(labels), config.sampler.num_iter)
  results = {key: m.generate(labels, noise=recorded(key[0], draws)) for key, m in models.items()}
  ref_images, ref_tokens = results[("jax", "jax")]
  assert ref_tokens.shape == (3, config.latent_size, config.latent_size)
  assert ((ref_tokens >= 0) & (ref_tokens < config.codebook_size)).all()
  for key, (imgs, tokens) in results.items():
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=str(key))
    np.testing.assert_allclose(imgs, ref_images, atol=1e-4, rtol=0, err_msg=str(key))


def test_seed_reproduces_within_a_backend_and_changes_the_samples(checkpoints, models):
  config = checkpoints[0]
  for backend in ("torch", "jax"):
    model = models[(backend, "torch")]
    _, a = model.generate([0, 1], seed=3)
    _, b = model.generate([0, 1], seed=3)
    _, c = model.generate([0, 1], seed=4)
    np.testing.assert_array_equal(a, b, err_msg=backend)
    assert (a != c).any(), backend
    assert model.class_names([2, 0]) == ["triangle", "circle"]
    assert a.shape == (2, config.latent_size, config.latent_size)


def test_edit_keeps_every_token_outside_the_mask_in_both_backends(checkpoints, models):
  config = checkpoints[0]
  x = images(config, n=1, seed=5)
  h = config.latent_size
  latent_mask = np.zeros((h, h), np.float32)
  latent_mask[2:6, 1:5] = 1
  num_steps = config.sampler.num_iter - config.sampler.edit_start_iter
  draws = recorded_draws(config, 1, num_steps, seed=9)
  results = {key: m.edit(x, latent_mask, [1], noise=recorded(key[0], draws)) for key, m in models.items()}
  original = models[("jax", "jax")].encode(x)[0]
  ref_tokens = results[("jax", "jax")][1]
  for key, (_, tokens) in results.items():
    np.testing.assert_array_equal(tokens[0][latent_mask == 0], original[latent_mask == 0], err_msg=str(key))
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=str(key))
  assert (ref_tokens[0][latent_mask == 1] != original[latent_mask == 1]).any()
  assert editing.latent_mask_from_bbox(config, 0, 0, config.image_size, config.image_size).all()


def test_overrides_apply_and_shape_changing_overrides_fail_clearly(checkpoints):
  _, torch_dir, jax_dir = checkpoints
  for module, path in ((torch_pipeline, torch_dir), (jax_pipeline, jax_dir), (jax_pipeline, torch_dir)):
    model = module.MaskGIT.from_checkpoint(path, overrides=["sampler.num_iter=6"], device="cpu")
    assert model.config.sampler.num_iter == 6
    with pytest.raises(ValueError, match=r"(?s)TransformerLayer_1|layers\.1"):
      module.MaskGIT.from_checkpoint(path, overrides=["transformer.num_layers=2"], device="cpu")


def test_bad_labels_and_images_are_refused_with_the_reason(models):
  for backend in ("torch", "jax"):
    model = models[(backend, "jax")]
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[7\]"):
      model.generate([0, 7])
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\).*\(1, 16, 16, 3\)"):
      model.encode(np.zeros((1, 16, 16, 3), np.float32))


def test_fast_precision_stays_close_to_parity(checkpoints, models):
  config = checkpoints[0]
  ids = np.full((2, config.seq_len), -1, np.int64)
  ids[:, 0] = config.codebook_size
  ids[:, 5:20] = 7
  for backend, module, to_array in (("torch", torch_pipeline, lambda a: torch.as_tensor(a)),
                                    ("jax", jax_pipeline, np.asarray)):
    parity = models[(backend, "torch")]
    fast = module.MaskGIT.from_checkpoint(checkpoints[1], device="cpu", precision="fast")
    a = np.asarray(parity.tokens_to_logits(to_array(ids)), np.float32)
    b = np.asarray(fast.tokens_to_logits(to_array(ids)), np.float32)
    assert a.dtype == b.dtype == np.float32 and np.isfinite(b).all()
    # bfloat16 keeps 8 mantissa bits: ~0.4% relative per op; random-init logits are O(1).
    assert np.abs(a - b).max() < 0.1, module.__name__
    assert np.abs(a - b).max() > 0, module.__name__  # fast mode really computes in bfloat16


def test_jitted_jax_decode_equals_the_sampler_called_directly(checkpoints):
  """The JAX pipeline runs the whole decode as one jitted program; it must equal decode_with_config step by step,
  for both noise providers and with guidance on."""
  import jax  # pylint: disable=import-outside-toplevel
  config = checkpoints[0]
  model = jax_pipeline.MaskGIT.from_checkpoint(checkpoints[2], overrides=["sampler.guidance_scale=3"], device="cpu")
  ids = np.full((2, config.seq_len), -1, np.int32)
  ids[:, 0] = config.codebook_size + np.array([0, 2])
  draws = recorded_draws(config, 2, config.sampler.num_iter, seed=4)
  for make in (lambda: jax_sampler.PRNGNoise(jax.random.PRNGKey(7)), lambda: recorded("jax", draws)):
    jitted = model.decode_sequences(ids, make())
    direct = jax_sampler.decode_with_config(ids, model.tokens_to_logits, make(), model.config.sampler)
    for field in ("final_seqs", "step_input_ids", "step_sampled_ids", "step_mask_len", "step_masking",
                  "step_state_after"):
      np.testing.assert_array_equal(np.asarray(getattr(jitted, field)), np.asarray(getattr(direct, field)), field)


@pytest.mark.slow
def test_torch_compile_gives_the_eager_tokens(checkpoints):
  """torch_compile=True (transformer, sampler step, tokenizer decoder compiled): the same tokens as eager from the
  same recorded draws, with and without guidance; images equal to float32 rounding. Slow: 3 graphs per shape."""
  config = checkpoints[0]
  labels = [0, 2, 1]
  draws = recorded_draws(config, len(labels), config.sampler.num_iter, seed=5)
  for overrides in ([], ["sampler.guidance_scale=2"]):
    eager = torch_pipeline.MaskGIT.from_checkpoint(checkpoints[1], overrides=overrides, device="cpu")
    compiled = torch_pipeline.MaskGIT.from_checkpoint(checkpoints[1], overrides=overrides, device="cpu",
                                                      torch_compile=True)
    ref_images, ref_tokens = eager.generate(labels, noise=recorded("torch", draws))
    images, tokens = compiled.generate(labels, noise=recorded("torch", draws))
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=str(overrides))
    np.testing.assert_allclose(images, ref_images, atol=1e-4, rtol=0, err_msg=str(overrides))
    assert set(compiled._compiled) == {"transformer", "step", "decode"}  # pylint: disable=protected-access


def test_fast_precision_on_a_cpu_without_bfloat16_warns(checkpoints, monkeypatch):
  for native, expect_warning in ((False, True), (True, False)):
    monkeypatch.setattr(torch_pipeline.device_lib, "native_cpu_bfloat16", lambda native=native: native)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      torch_pipeline.MaskGIT.from_checkpoint(checkpoints[1], device="cpu", precision="fast")
    assert any("emulated" in str(w.message) for w in caught) == expect_warning, native


def test_torch_compile_flag_is_refused_for_the_jax_backend(checkpoints, tmp_path, run_py):
  rc, _, err = run_py("sample", "--backend", "jax", "--torch_compile", "--checkpoint", checkpoints[1], "--out",
                      str(tmp_path / "x.png"))
  assert rc == 2 and err.startswith("error:") and err.count("\n") == 1 and "--torch_compile" in err, err
  assert not os.listdir(tmp_path)
