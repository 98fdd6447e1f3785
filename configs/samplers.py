"""The decoders (`sampler.decoder`), what each reproduces, and their presets.

official  google-research/maskgit `parallel_decode.decode` (MaskGIT, Chang et al. 2022): after each step the
          floor(N0 * gamma((t+1)/T)) least confident tokens are masked again, confidence log p + choice_temperature *
          (1 - (t+1)/T) * Gumbel. Options on it (off by default): guidance_scale / guidance_schedule (CFG
          (1 + w) cond - w uncond, w constant or w t/(T-1), the null class at the class position),
          softmax_temperature (logits / it), choice_temperature_schedule (linear | constant), randomize (official,
          or seed-style linear | warm_up | random | none on this loop), tokens_per_step (tokens revealed per step),
          order (confidence | halton: re-mask by Halton rank), top_k, mask_schedule (official curves, and `arccos`,
          `square`, `root` used this way: not the seed's counts).
seed      valeoai MaskGIT-pytorch v1 `Trainer/vit.py` `MaskGIT.sample`, exactly (its README's FID 6.80 at 256px,
          7.26 at 512px): mask_schedule is its adap_sche shape (root | linear | square | cosine | arccos; its cosine
          increases over the steps) or tokens_per_step its custom scheduler; logits * sm_temp; softmax over K + 1 (the
          mask id can be drawn and committed, clamped to K - 1 at the end); CFG w = guidance_scale * t/(T-1) (T >= 2);
          randomize linear (log p + choice_temperature (its r_temp) * Gumbel * (1 - t/(T-1)), float64) | warm_up |
          random | none; the t most confident tokens revealed, t clipped by the unknown tokens of the whole batch,
          ties at the threshold written; the loop stops once every token is known; random_init = its negative mask
          value (random initial codes); top_k. warm_up and random run for any batch, each row with its own
          threshold (the seed itself runs them for one sample only: FORMAT.md quirk 15).
halton    valeoai/Halton-MaskGIT `Sampler/halton_sampler.py` `HaltonSampler` (Besnier et al. 2025; FID 6.40 for
          H-MaskGIT-S at 256px, 2.59 for H-MaskGIT-L at 384px): cells revealed in the Halton order (halton_points of
          its sequence, 10,000 by default), cumulative count max(t+1, int(N (1 - arccos((t+1)/T) / (pi/2)))), CFG
          constant w = guidance_scale, logits * linspace(sm_temp_min, sm_temp, T) ** temp_pow halved during the first
          temp_warmup steps, halton_randomize rolls each sample's order, top_k. It ignores mask_schedule, randomize
          and choice_temperature (its sched_pow is unused in its sampler too).

Presets (the published settings):
  official    the paper's ImageNet 256 setting (8 steps, cosine, choice temperature 4.5).
  seed_256    the seed README, ImageNet 256: softmax temperature 1, Gumbel temperature 4.5, CFG 3, "linear",
              arccos, 8 steps.   seed_512: Gumbel temperature 7, CFG 2.8, 15 steps.
  halton      Halton-MaskGIT's evaluation (launch/eval_test_to_img.sh, its README table): 32 steps, softmax scale 1
              to 1 with 1 warm-up step, no top-k, fixed order; CFG 1.0 (H-MaskGIT-S, 256px; its other models use
              1.5, 0.7, 0.5: set sampler.guidance_scale).
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
