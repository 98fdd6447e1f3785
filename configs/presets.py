"""Presets: the official ImageNet 256/512 models and a tiny demo model.

Values come from the official configs (google-research/maskgit `configs/maskgit_class_cond_config.py` and
`configs/vqgan_config.py`); the ImageNet parameter trees they produce are listed in
`shared/golden/imagenet_official_param_trees.txt` and checked by `tests/test_configs.py`.
"""

from __future__ import annotations

from typing import Callable

from configs.schema import (ConfigError, DataConfig, MaskGITConfig, SamplerConfig, TokenizerConfig,
                            TrainConfig, TransformerConfig)


def imagenet_256() -> MaskGITConfig:
  """Released ImageNet 256x256 model: 16x16 tokens, 24-layer 768-wide transformer (172.46M parameters)."""
  return MaskGITConfig(
      name="imagenet_256", image_size=256, num_class=1000,
      tokenizer=TokenizerConfig(),  # filters 128, multipliers (1, 1, 2, 2, 4), 1024 codes of dim 256
      transformer=TransformerConfig(),  # 24 layers, 768 hidden, 16 heads, 3072 MLP
      # The paper's 256px setting: 8 steps, cosine schedule, choice temperature 4.5.
      sampler=SamplerConfig(num_iter=8, choice_temperature=4.5, mask_schedule="cosine"),
      train=TrainConfig(), data=DataConfig(dataset="folder", data_dir="imagenet/train"))


def imagenet_512() -> MaskGITConfig:
  """Released ImageNet 512x512 model: the same networks on 32x32 tokens."""
  return imagenet_256().replace(
      name="imagenet_512", image_size=512,
      # The paper's 512px setting: 12 steps.
      sampler=SamplerConfig(num_iter=12, choice_temperature=4.5, mask_schedule="cosine"))


def tiny() -> MaskGITConfig:
  """A demo model that trains on a CPU in minutes: 32x32 images, 8x8 tokens, 10 classes."""
  return MaskGITConfig(
      name="tiny", image_size=32, num_class=10,
      tokenizer=TokenizerConfig(filters=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, embedding_dim=16,
                                codebook_size=64),
      transformer=TransformerConfig(num_layers=2, num_embeds=64, num_heads=4, intermediate_size=128),
      sampler=SamplerConfig(num_iter=8, choice_temperature=4.5, mask_schedule="cosine"),
      train=TrainConfig(batch_size=64, num_train_steps=2000, lr=1e-3, warmup_steps=100, polyak_decay=0.99,
                        log_every_steps=20, checkpoint_every_steps=500),
      data=DataConfig(dataset="synthetic"))


PRESETS: dict[str, Callable[[], MaskGITConfig]] = {
    "imagenet_256": imagenet_256,
    "imagenet_512": imagenet_512,
    "tiny": tiny,
}


def get_preset(name: str) -> MaskGITConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
  return PRESETS[name]()


def resolve(spec: str) -> MaskGITConfig:
  """A preset name, a config.json path, or a checkpoint directory holding config.json."""
  if spec in PRESETS:
    return get_preset(spec)
  import os
  if os.path.exists(spec):
    return MaskGITConfig.load(spec)
  raise ConfigError(f"--config {spec!r} is neither a preset ({sorted(PRESETS)}) nor an existing config.json "
                    f"or checkpoint directory")
