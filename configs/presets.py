"""Presets: the official ImageNet 256/512 models, a tiny demo model, and valeoai MaskGIT-pytorch's (the seed's)
ImageNet 256/512 models.

Values come from the official configs (google-research/maskgit `configs/maskgit_class_cond_config.py` and
`configs/vqgan_config.py`); the ImageNet parameter trees they produce are listed in
`tests/data/imagenet_official_param_trees.txt` and checked by `tests/test_configs.py`. The seed presets follow
valeoai/Maskgit-pytorch v1 (`Trainer/vit.py`, its README) and taming-transformers' `configs/imagenet_vqgan.yaml`;
their parameter counts are checked by `tests/test_seed_models.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from configs import recipes, samplers
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


def _taming_imagenet_f16_1024() -> TokenizerConfig:
  """taming-transformers' ImageNet VQGAN, f=16, 1024 codes (its configs/imagenet_vqgan.yaml; the seed's
  pretrained_maskgit/VQGAN/model.yaml): ch 128, ch_mult (1, 1, 2, 2, 4), 2 ResnetBlocks per level, attention at
  resolution 16, z_channels = embed_dim = 256. 72,141,699 parameters without the loss module."""
  return TokenizerConfig(arch="taming", filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
                         embedding_dim=256, codebook_size=1024, z_channels=256, resolution=256,
                         attn_resolutions=(16,), dropout_rate=0.0)


def seed_imagenet_256() -> MaskGITConfig:
  """valeoai MaskGIT-pytorch v1, ImageNet 256x256 (Hugging Face llvictorll/Maskgit-pytorch: MaskGIT_ImageNet_256.pth
  + VQGAN/last.ckpt): the seed's `--vit-size base` transformer (174,160,874 parameters) on 16x16 tokens."""
  return MaskGITConfig(
      name="seed_imagenet_256", image_size=256, num_class=1000,
      tokenizer=_taming_imagenet_f16_1024(),
      # Trainer/vit.py get_network("vit"), "base": 768 wide, 24 deep, 16 heads, MLP 3072, dropout 0.1.
      transformer=TransformerConfig(arch="seed", num_layers=24, num_embeds=768, num_heads=16,
                                    intermediate_size=3072, dropout_rate=0.1),
      # The seed's own decoder with its README's setting for FID 6.80: softmax temperature 1, Gumbel temperature
      # (r_temp) 4.5, CFG w = 3 ramped as w * i / (T - 1), "linear" randomization, arccos schedule, 8 steps.
      sampler=samplers.seed_256(),
      # The seed's recipe (configs/recipes.py: Bernoulli arccos masking, loss over all tokens, 10% label dropout,
      # AdamW wd 1e-5, 2500-step warmup from 0 then constant, torch clipping, fp16 on CUDA, random crops, no EMA);
      # README: batch 512 for 755,200 iterations.
      train=TrainConfig(**recipes.fields("seed", "train"), batch_size=512, num_train_steps=755_200, lr=1e-4,
                        beta1=0.9, beta2=0.96, lr_schedule="constant", grad_clip_norm=1.0, label_smoothing=0.1),
      data=DataConfig(dataset="folder", data_dir="imagenet/train", **recipes.fields("seed", "data")))


def seed_imagenet_512() -> MaskGITConfig:
  """valeoai MaskGIT-pytorch v1, ImageNet 512x512 (MaskGIT_ImageNet_512.pth): the same networks on 32x32 tokens.
  The VQGAN is the 256px one, so its `resolution` stays 256 (attention where that count reaches 16)."""
  config = seed_imagenet_256()
  return config.replace(
      name="seed_imagenet_512", image_size=512,
      # The seed's decoder, README 512px: softmax temperature 1, Gumbel temperature 7, CFG 2.8, linear, arccos, 15.
      sampler=samplers.seed_512(),
      # README: fine-tuned from the 256px model for ~750,000 iterations at batch 128.
      train=dataclasses.replace(config.train, batch_size=128, num_train_steps=750_000))


PRESETS: dict[str, Callable[[], MaskGITConfig]] = {
    "imagenet_256": imagenet_256,
    "imagenet_512": imagenet_512,
    "tiny": tiny,
    "seed_imagenet_256": seed_imagenet_256,
    "seed_imagenet_512": seed_imagenet_512,
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
