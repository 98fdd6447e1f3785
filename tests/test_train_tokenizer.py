"""Tokenizer training in both backends: loss falls, codebook usage, one-step cross-backend parity, resume, export.

A small tokenizer (16px images, 2 levels, 16 codes) keeps the JAX compiles and the steps cheap on 2 CPU cores.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import MaskGITConfig, TokenizerConfig, TrainConfig
import conversion
from conversion import convert
from maskgit_common import data as data_lib
from maskgit_common import tokenizer_losses as common
from maskgit_common import training
from maskgit_jax import checkpoint as jax_checkpoint
from maskgit_jax import train_tokenizer as jax_train
from maskgit_torch import checkpoint as torch_checkpoint
from maskgit_torch import train_tokenizer as torch_train

BACKENDS = {"jax": jax_train, "torch": torch_train}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(**train) -> MaskGITConfig:
  train = dict(dict(batch_size=8, num_train_steps=30, lr=3e-3, warmup_steps=0, seed=0, log_every_steps=5,
                    checkpoint_every_steps=10, keep_checkpoints=2), **train)
  return MaskGITConfig(
      name="test_tokenizer", image_size=16, num_class=10,
      tokenizer=TokenizerConfig(filters=16, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=8,
                                codebook_size=16, num_groups=8),
      train=TrainConfig(**train))


def small_dataset(config):
  return data_lib.SyntheticDataset(80, config.image_size, config.num_class, seed=1)


def run(backend, config, workdir, **kwargs):
  kwargs.setdefault("device", "cpu") if backend == "torch" else None
  return BACKENDS[backend].train_tokenizer(config, str(workdir), dataset=small_dataset(config), progress=False,
                                           eval_images=20, **kwargs)


def metrics(workdir):
  return training.read_jsonl(os.path.join(workdir, common.TRAIN_DIR, "metrics.jsonl"))


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def trained(request, tmp_path_factory):
  workdir = tmp_path_factory.mktemp(f"tok_{request.param}")
  summary = run(request.param, small_config(), workdir)
  return request.param, str(workdir), summary


def test_reconstruction_loss_falls_and_usage_is_reported(trained):
  backend, workdir, summary = trained
  logged = [r for r in metrics(workdir) if "reconstruction_loss" in r]
  assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
  first, last = logged[0]["reconstruction_loss"], logged[-1]["reconstruction_loss"]
  assert last < 0.5 * first, (backend, first, last)
  for record in logged:
    assert 0 < record["codebook_usage"] <= 1 and 1 <= record["codebook_perplexity"] <= 16
  assert summary["step"] == 30 and 0 < summary["eval_codebook_usage"] <= 1
  assert summary["eval_reconstruction_mse"] < first
  assert os.path.isfile(os.path.join(workdir, common.TRAIN_DIR, common.RECONSTRUCTIONS_PNG))
  # Official Adam betas for the tokenizer, lr from the config.
  assert (summary["settings"]["beta1"], summary["settings"]["beta2"], summary["settings"]["lr"]) == (0.0, 0.99, 3e-3)


def test_export_is_read_by_both_backends(trained, tmp_path):
  """The exported directory, converted to the other layout, encodes a batch to the same codes in both backends."""
  backend, workdir, _ = trained
  export = os.path.join(workdir, training.TOKENIZER_DIR)
  config = MaskGITConfig.load(export)
  images = np.stack([small_dataset(config)[i][0] for i in range(20)])  # the eval batch shape: compiled
  if backend == "jax":
    jax_dir, torch_dir = export, str(tmp_path / "torch")
    convert(export, torch_dir, to="torch")
  else:
    jax_dir, torch_dir = str(tmp_path / "jax"), export
    convert(export, jax_dir, to="jax")
  tokenizer = torch_checkpoint.load_checkpoint(torch_dir, parts=("tokenizer",))[1]["tokenizer"]
  with torch.no_grad():
    torch_codes = tokenizer.encode_to_indices(torch.from_numpy(images)).numpy()
  params = jax_checkpoint.load_checkpoint(jax_dir, parts=("tokenizer",))[1]["tokenizer"]["params"]
  jax_codes, _ = jax_train.reconstruct(params, jax_train._model_config(config), jnp.asarray(images))
  jax_codes = np.asarray(jax_codes)
  np.testing.assert_array_equal(jax_codes, torch_codes)
  assert len(np.unique(jax_codes)) > 1  # a trained tokenizer, not a constant map


def test_one_step_matches_across_backends():
  """Same converted initial weights, same batch: losses, gradients and the Adam update agree.

  Measured on CPU (float32): losses within 2e-7 (1-2 ulp), decoder gradients within
  2e-6 of each tensor's largest gradient, encoder and codebook gradients within 6e-4. The encoder's larger gap is
  the entropy loss: it divides code distances by entropy_temperature = 0.01, so last-bit differences of the two
  frameworks' convolutions are amplified 100x in its softmax. With beta1 = 0 the first Adam update is
  lr * g / (|g| + eps) = lr * sign(g) wherever |g| >> eps; it can only differ where the gradient's sign is within
  the cross-backend noise, so the updated weights are compared where |g| exceeds 10x that noise; there they agree
  to float32 rounding of the weights (measured 1.5e-7 = 1 ulp at |w| ~ 0.05; tolerance 1e-6, 0.03% of lr).
  """
  config = small_config()
  settings = common.resolve_settings(config)
  tx, step = jax_train._step_function(jax_train._model_config(config), (0.0, 0.99), jnp.float32)
  state = jax_train.init_state(config, tx, seed=0)
  model = torch_train.init_model(config, 0, jax_to_torch({"params": jax.device_get(state.params)}, config,
                                                          "tokenizer"))
  optimizer = torch_train.make_optimizer(model, settings)
  dataset = small_dataset(config)
  images = common.load_batch(dataset, training.DataOrder(len(dataset), 0), 0, 0, 8, random_flip=True)
  # Compiled once per module (the training runs share it).
  new_state, aux, grads = step(state, jnp.asarray(images), jnp.float32(settings.lr))
  torch_aux = torch_train.train_step(model, optimizer, torch.from_numpy(images), config, settings.lr)

  np.testing.assert_array_equal(np.asarray(aux["codes"]), torch_aux["codes"].numpy())
  for name in common.LOSS_NAMES:
    np.testing.assert_allclose(float(torch_aux[name]), float(aux[name]), rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(aux["entropy_loss"]) != 0  # the amplified term is really exercised
  jax_grads = jax_to_torch({"params": jax.device_get(grads)}, config, "tokenizer")
  jax_new = jax_to_torch({"params": jax.device_get(new_state.params)}, config, "tokenizer")
  torch_new = model.state_dict()
  for name, param in model.named_parameters():
    g_jax, g_torch = jax_grads[name], param.grad
    scale = float(g_jax.abs().max())
    diff = float((g_torch - g_jax).abs().max())
    assert diff <= (2e-5 if name.startswith("decoder.") else 2e-3) * scale, (name, diff, scale)
    determined = g_jax.abs() > 10 * max(diff, 1e-7)
    assert determined.float().mean() > 0.5, name
    np.testing.assert_allclose(torch_new[name][determined].numpy(), jax_new[name][determined].numpy(),
                               rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_resume_repeats_the_same_losses(backend, tmp_path):
  config = small_config(num_train_steps=4, log_every_steps=1, checkpoint_every_steps=2)
  run(backend, config, tmp_path / "straight")
  run(backend, config, tmp_path / "resumed", num_steps=2)
  summary = run(backend, config, tmp_path / "resumed")  # continues from ckpt 2 to 4
  assert summary["step"] == 4
  losses = lambda d: [(r["step"], r["loss"], r["reconstruction_loss"]) for r in metrics(d) if "loss" in r]
  straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
  assert [s for s, _, _ in resumed] == [1, 2, 3, 4]
  assert resumed == straight  # bit-identical, since data order and flips are pure functions of (seed, step)


def test_settings_and_restart_are_pure():
  config = small_config()
  with pytest.raises(TypeError, match="unknown tokenizer training settings"):
    common.resolve_settings(config, beta3=0.5)
  with pytest.raises(ValueError, match="lr > 0"):
    common.resolve_settings(config.with_overrides(["train.lr=1e-3"]), beta1=1.0)
  codebook = np.zeros((4, 2), np.float32)
  latents = np.arange(12, dtype=np.float32).reshape(6, 2)
  new, count = common.restart_dead_codes(codebook, np.array([0, 0, 2, 2, 2, 0]), latents, seed=3, step=7)
  assert count == 2
  np.testing.assert_array_equal(new[[0, 2]], 0)
  assert all(any((row == latent).all() for latent in latents) for row in new[[1, 3]])
  again, _ = common.restart_dead_codes(codebook, np.array([0, 0, 2, 2, 2, 0]), latents, seed=3, step=7)
  np.testing.assert_array_equal(new, again)


def jax_to_torch(tree, config, which):
  """A flax tree -> torch state dict, the way the torch backend loads canonical weights."""
  return torch_checkpoint.from_flat(config, which, conversion.flatten(tree))
