"""Noise providers of the torch decode loop: every random draw of a decode comes from one (see maskgit_jax/noise.py).

`GeneratorNoise(generator)` draws from a torch.Generator; `RecordedNoise` replays recorded draws (the official
Gumbel draws recorded from JAX or the official code, or the seed's and Halton's recorded draws), which is how torch
reproduces a reference trajectory step for step. The kinds of draws (the plan says which a step takes,
maskgit_common.decode_plan.DecodePlan.draw_counts):
  gumbel_sample   (B, P, W) float32 per step: the categorical draw, argmax(logits + g) or argmax(log p + g);
  gumbel_choice   (B, P) per step: the confidence noise (float32 official; float64 for the seed's numpy draws);
  uniform_choice  (B, L) float32 per step that uses it: the seed's torch.rand_like confidence (warm_up, random);
  init_tokens     (B, L) int once: the seed's random initial codes; order_roll (B,) int once: Halton's roll.
"""

from __future__ import annotations

import torch


def gumbel(shape, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
  """-log(-log(U)), U uniform in [tiny, 1) (jax.random.gumbel's formula)."""
  u = torch.rand(shape, generator=generator, device=device or generator.device, dtype=dtype)
  # In place: the same values as -log(-log(max(u, tiny))) without four temporaries (per-op cost matters at batch 1).
  return u.clamp_min_(torch.finfo(dtype).tiny).log_().neg_().log_().neg_()


class GeneratorNoise:
  """Draws from a torch.Generator in the loop's order (official: per step the categorical, then the choice noise)."""

  def __init__(self, generator: torch.Generator):
    self.generator = generator

  def gumbel_sample(self, index, shape, device):
    del index
    return gumbel(shape, self.generator, device)

  def gumbel_choice(self, index, shape, device, dtype=torch.float32):
    del index
    return gumbel(shape, self.generator, device, dtype)

  def uniform_choice(self, index, shape, device):
    del index
    return torch.rand(shape, generator=self.generator, device=device or self.generator.device)

  def integers(self, what, shape, high, device):
    del what
    return torch.randint(0, high, shape, generator=self.generator, device=device or self.generator.device)


class RecordedNoise:
  """Replays recorded draws: `gumbel_sample` (n, B, P, W), `gumbel_choice` (n, B, P) for the n executed steps, and
  where a decoder takes them `uniform_choice` (m, B, L) (or (m, B, L, 1) as torch.rand_like made them),
  `init_tokens` (B, L) or (B, h, h), `order_roll` (B,)."""

  def __init__(self, gumbel_sample, gumbel_choice=None, uniform_choice=None, init_tokens=None, order_roll=None):
    self.gumbel_sample_draws = torch.as_tensor(gumbel_sample, dtype=torch.float32)
    self.gumbel_choice_draws = None if gumbel_choice is None else _float(gumbel_choice)
    uniform = None if uniform_choice is None else torch.as_tensor(uniform_choice, dtype=torch.float32)
    self.uniform_choice_draws = uniform[..., 0] if uniform is not None and uniform.ndim == 4 else uniform
    self.init_tokens = None if init_tokens is None else torch.as_tensor(init_tokens).long()
    if self.init_tokens is not None:
      self.init_tokens = self.init_tokens.reshape(self.init_tokens.shape[0], -1)
    self.order_roll = None if order_roll is None else torch.as_tensor(order_roll).long().reshape(-1)
    for name, draws, ndim in (("gumbel_sample", self.gumbel_sample_draws, 4),
                              ("gumbel_choice", self.gumbel_choice_draws, 3),
                              ("uniform_choice", self.uniform_choice_draws, 3)):
      if draws is not None and draws.ndim != ndim:
        raise ValueError(f"RecordedNoise: {name} must have {ndim} dimensions (n, B, ...), got shape "
                         f"{tuple(draws.shape)}")

  def to(self, device) -> "RecordedNoise":
    """The same draws on `device`, moved once before the loop (not one host-to-device copy per step)."""
    moved = object.__new__(RecordedNoise)
    for name, value in vars(self).items():
      setattr(moved, name, None if value is None else value.to(device))
    return moved

  @staticmethod
  def _take(draws, index, shape, what):
    if draws is None:
      raise ValueError(f"RecordedNoise.{what}: this decode draws {what}, none were recorded")
    if tuple(draws.shape[1:]) != tuple(shape):
      raise ValueError(f"RecordedNoise.{what}: recorded draws have shape {tuple(draws.shape)}, the step needs "
                       f"(n, {', '.join(map(str, shape))})")
    return draws[index]

  def gumbel_sample(self, index, shape, device):
    return self._take(self.gumbel_sample_draws, index, shape, "gumbel_sample").to(device)

  def gumbel_choice(self, index, shape, device, dtype=torch.float32):
    return self._take(self.gumbel_choice_draws, index, shape, "gumbel_choice").to(device, dtype)

  def uniform_choice(self, index, shape, device):
    return self._take(self.uniform_choice_draws, index, shape, "uniform_choice").to(device)

  def integers(self, what, shape, high, device):
    del high
    draws = getattr(self, what)
    if draws is None or tuple(draws.shape) != tuple(shape):
      got = "none" if draws is None else tuple(draws.shape)
      raise ValueError(f"RecordedNoise.{what}: the decode needs recorded {what} of shape {tuple(shape)}, got {got}")
    return draws.to(device)

  def check_draws(self, needed: dict) -> None:
    """ValueError unless every kind of draw has as many recorded steps as the decode takes (`needed`)."""
    for name, count in needed.items():
      if count == 0 or name in ("init_tokens", "order_roll"):
        continue
      draws = getattr(self, f"{name}_draws")
      have = 0 if draws is None else draws.shape[0]
      if have < count:
        raise ValueError(f"RecordedNoise.{name}: {have} recorded steps, the decode runs {count}")

  def check_steps(self, n):
    self.check_draws({"gumbel_sample": n, "gumbel_choice": n})


def _float(draws) -> torch.Tensor:
  """float64 recordings (the seed's numpy Gumbel draws) stay float64, anything else becomes float32."""
  draws = torch.as_tensor(draws)
  return draws if draws.dtype == torch.float64 else draws.to(torch.float32)
