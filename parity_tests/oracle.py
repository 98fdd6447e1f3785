"""The live oracle: the official MaskGIT code (PyPI package `maskgit`, google-research/maskgit) run in-process.

Nothing here edits or copies official code. Two runtime shims make it import on current jax, both applied in the
test harness only:
  * `jax.numpy.DeviceArray = jax.Array` if absent (removed from jax; older parallel_decode versions annotate with it),
    set before importing `maskgit.libml.parallel_decode`;
  * empty stub modules `tensorflow`, `tensorflow.compat`, `tensorflow.compat.v1`, only when `inference` / `utils`
    are requested and tensorflow is not installed (they import it only to read checkpoint files).

Usage:
  official = import_official()                  # raises OfficialUnavailable with the reason
  reason = official_skip_reason()               # None, or a pytest skip reason
  model = official_transformer(config)          # maskgit_transformer.Transformer as inference.py builds it
"""

import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp

from configs import MaskGITConfig

PACKAGE = "maskgit"


class OfficialUnavailable(ImportError):
  """The official package cannot be imported (not installed, or a dependency is missing)."""


def official_skip_reason() -> str | None:
  """None when the official package imports, else a one-line reason (for pytest.skip)."""
  try:
    import_official()
  except OfficialUnavailable as e:
    return str(e)
  return None


def _stub_tensorflow() -> None:
  if importlib.util.find_spec("tensorflow") is not None or "tensorflow" in sys.modules:
    return
  tf = types.ModuleType("tensorflow")
  tf.compat = types.ModuleType("tensorflow.compat")
  tf.compat.v1 = types.ModuleType("tensorflow.compat.v1")
  sys.modules.update({"tensorflow": tf, "tensorflow.compat": tf.compat, "tensorflow.compat.v1": tf.compat.v1})


def import_official(inference: bool = False) -> types.SimpleNamespace:
  """The official modules: vqgan_tokenizer, maskgit_transformer, parallel_decode, mask_schedule, and the config
  modules maskgit_class_cond_config / vqgan_config; with inference=True also `inference` and `utils`."""
  if importlib.util.find_spec(PACKAGE) is None:
    raise OfficialUnavailable(f"the official MaskGIT package is not installed (pip install {PACKAGE}); "
                              "the live-oracle checks need it")
  if not hasattr(jnp, "DeviceArray"):
    jnp.DeviceArray = jax.Array  # shim: removed from jax after the official release
  names = {
      "vqgan_tokenizer": "maskgit.nets.vqgan_tokenizer",
      "maskgit_transformer": "maskgit.nets.maskgit_transformer",
      "parallel_decode": "maskgit.libml.parallel_decode",
      "mask_schedule": "maskgit.libml.mask_schedule",
      "maskgit_class_cond_config": "maskgit.configs.maskgit_class_cond_config",
      "vqgan_config": "maskgit.configs.vqgan_config",
  }
  if inference:
    _stub_tensorflow()
    names.update(utils="maskgit.utils", inference="maskgit.inference")
  modules = {}
  for key, name in names.items():
    try:
      modules[key] = importlib.import_module(name)
    except ImportError as e:
      raise OfficialUnavailable(f"cannot import the official module {name}: {e}") from e
  return types.SimpleNamespace(**modules)


def official_config(cfg: MaskGITConfig):
  """The official ml_collections ConfigDict (maskgit_class_cond_config.get_config() with our values)."""
  official = import_official()
  config = official.maskgit_class_cond_config.get_config()
  config.image_size = cfg.image_size
  config.num_class = cfg.num_class
  config.seed = cfg.train.seed
  config.mask_scheduling_method = cfg.sampler.mask_schedule
  config.sample_choice_temperature = float(cfg.sampler.choice_temperature)
  config.label_smoothing = float(cfg.train.label_smoothing)
  config.compute_loss_for_all = cfg.train.compute_loss_for_all
  config.polyak_decay = float(cfg.train.polyak_decay)
  tk = cfg.tokenizer
  for name in ("filters", "num_res_blocks", "embedding_dim", "codebook_size", "norm_type", "activation_fn",
               "quantizer", "conv_downsample", "entropy_loss_type"):
    config.vqvae[name] = getattr(tk, name)
  config.vqvae.channel_multipliers = list(tk.channel_multipliers)
  for name in ("commitment_cost", "entropy_loss_ratio", "entropy_temperature"):
    config.vqvae[name] = float(getattr(tk, name))
  tr = cfg.transformer
  for name in ("num_layers", "num_embeds", "num_heads", "intermediate_size", "mask_token_id"):
    config.transformer[name] = getattr(tr, name)
  config.transformer.dropout_rate = float(tr.dropout_rate)
  config.transformer.patch_size = cfg.downsample_factor
  config.transformer.latent_size = cfg.latent_size
  return config


def official_tokenizer(cfg: MaskGITConfig, train: bool = False):
  """vqgan_tokenizer.VQVAE as inference.py builds it (GroupNorm there is flax's default: 32 groups, eps 1e-6)."""
  official = import_official()
  return official.vqgan_tokenizer.VQVAE(config=official_config(cfg), dtype=jnp.float32, train=train)


def official_transformer(cfg: MaskGITConfig):
  """maskgit_transformer.Transformer with the arguments inference.py passes (initializer_range left at default)."""
  official = import_official()
  config = official_config(cfg)
  latent_size = config.image_size // config.transformer.patch_size
  return official.maskgit_transformer.Transformer(
      vocab_size=config.vqvae.codebook_size + config.num_class + 1,
      hidden_size=config.transformer.num_embeds,
      num_hidden_layers=config.transformer.num_layers,
      num_attention_heads=config.transformer.num_heads,
      intermediate_size=config.transformer.intermediate_size,
      hidden_dropout_prob=config.transformer.dropout_rate,
      attention_probs_dropout_prob=config.transformer.dropout_rate,
      max_position_embeddings=latent_size ** 2 + 1)
