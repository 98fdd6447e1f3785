"""Sampler presets: each decoder with the settings of the result it reproduces, and switching a config to one.

  official    google-research/maskgit, the paper's ImageNet 256 setting (8 steps, cosine, choice temperature 4.5).
  seed_256    valeoai MaskGIT-pytorch v1 README, ImageNet 256 (its FID 6.80): softmax temperature 1, Gumbel
              temperature 4.5, CFG w = 3 (ramped), "linear" randomization, arccos schedule, 8 steps.
  seed_512    the same README, ImageNet 512 (FID 7.26): Gumbel temperature 7, CFG 2.8, 15 steps.
  halton      valeoai/Halton-MaskGIT's evaluation (launch/eval_test_to_img.sh, README table): 32 steps, softmax
              scale 1 to 1 with 1 warm-up step, no top-k, fixed order; CFG 1.0 (H-MaskGIT-S, ImageNet 256, FID 6.40;
              its other models use 1.5, 0.7, 0.5: set sampler.guidance_scale).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from configs.schema import ConfigError, MaskGITConfig, SamplerConfig


def official() -> SamplerConfig:
  return SamplerConfig(num_iter=8, choice_temperature=4.5, mask_schedule="cosine")


def seed_256() -> SamplerConfig:
  return SamplerConfig(decoder="seed", num_iter=8, choice_temperature=4.5, guidance_scale=3.0, randomize="linear",
                       mask_schedule="arccos", sm_temp=1.0)


def seed_512() -> SamplerConfig:
  return dataclasses.replace(seed_256(), num_iter=15, choice_temperature=7.0, guidance_scale=2.8)


def halton() -> SamplerConfig:
  return SamplerConfig(decoder="halton", num_iter=32, guidance_scale=1.0, sm_temp_min=1.0, sm_temp=1.0,
                       temp_warmup=1)


SAMPLERS = {"official": official, "seed_256": seed_256, "seed_512": seed_512, "halton": halton}
DEFAULT_FOR_DECODER = {"official": official, "seed": seed_256, "halton": halton}


def with_decoder(config: MaskGITConfig, decoder: str | None = None, top_k: int | None = None,
                 overrides: Sequence[str] = ()) -> MaskGITConfig:
  """`config` decoding with `decoder` (official | seed | halton) and `top_k`, for run.py's --decoder / --top_k.

  A config that already uses that decoder keeps its settings; otherwise its sampler section becomes the decoder's
  preset (module docstring). The `sampler.*` entries of `overrides` (run.py's --set) are applied again on top, so
  they win over the preset.
  """
  sampler = config.sampler
  if decoder is not None and decoder != sampler.decoder:
    if decoder not in DEFAULT_FOR_DECODER:
      raise ConfigError(f"--decoder {decoder!r}: must be one of {sorted(DEFAULT_FOR_DECODER)}")
    sampler = DEFAULT_FOR_DECODER[decoder]()
  if top_k is not None:
    sampler = dataclasses.replace(sampler, top_k=top_k)
  if sampler is config.sampler:
    return config
  sampler.validate()
  return config.replace(sampler=sampler).with_overrides([o for o in overrides if o.strip().startswith("sampler.")])
