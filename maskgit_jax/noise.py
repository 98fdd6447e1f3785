"""Noise providers of the JAX decode loop: every random draw of a decode comes from one (see maskgit_torch/noise.py).

`PRNGNoise(key)` splits a PRNG key exactly as the official loop (per step `key, k_sample = split(key)`, then
`key, k_choice = split(key)`), so the same key gives the official tokens on the same jax; `RecordedNoise` replays
recorded draws (how torch reproduces JAX, and how the parity runner checks both against the references). Both are
array pytrees, so a provider is an argument of the jitted decode. The kinds of draws are the torch module's:
gumbel_sample, gumbel_choice (float64 for the seed's numpy draws: held as uint32 word pairs, since jax without x64
would truncate them, and read back inside the loop's float64 scope), uniform_choice, init_tokens, order_roll.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def _x64():
  """A scoped jax.enable_x64 for the seed's float64 confidence noise (nothing to do where x64 is already on)."""
  return jax.enable_x64(True) if not jax.config.jax_enable_x64 else contextlib.nullcontext()


def _widen(draws, dtype):
  if np.dtype(dtype) != np.float64:
    return draws.astype(dtype)
  with _x64():
    return draws.astype(jnp.float64)


def _array_pytree(cls):
  """Registers a noise provider whose attributes are all arrays (or None) as a pytree, so it can be passed through
  jax.jit. Unflattening skips __init__: the arrays were validated when the provider was built."""
  def flatten(noise):
    names = tuple(sorted(vars(noise)))
    return tuple(getattr(noise, n) for n in names), names

  def unflatten(names, leaves):
    noise = object.__new__(cls)
    vars(noise).update(zip(names, leaves))
    return noise

  jax.tree_util.register_pytree_node(cls, flatten, unflatten)
  return cls


@_array_pytree
class PRNGNoise:
  """Draws from a PRNG key with the official splitting (module docstring); Gumbel noise is jax.random.gumbel (so
  `argmax(logits + g)` is jax.random.categorical). The seed's and Halton's extra draws split the same key."""

  def __init__(self, key):
    self.key = jnp.asarray(key)

  def init_state(self):
    return self.key

  def gumbel_sample(self, state, index, shape):
    del index
    state, k_sample = jax.random.split(state, 2)
    return state, jax.random.gumbel(k_sample, shape)

  def gumbel_choice(self, state, index, shape, dtype=jnp.float32):
    """(float64 for the seed's confidence: float32 draws widened; the PRNG itself runs without x64.)"""
    del index
    state, k_choice = jax.random.split(state)
    return state, _widen(jax.random.gumbel(k_choice, shape), dtype)

  def uniform_choice(self, state, index, shape):
    del index
    state, k = jax.random.split(state)
    return state, jax.random.uniform(k, shape)

  def integers(self, state, what, shape, high):
    del what
    state, k = jax.random.split(state)
    return state, jax.random.randint(k, shape, 0, high)


@_array_pytree
class RecordedNoise:
  """Replays recorded draws: `gumbel_sample` (n, B, P, W), `gumbel_choice` (n, B, P) for the n executed steps, and
  where a decoder takes them `uniform_choice` (m, B, L) (or (m, B, L, 1)), `init_tokens` (B, L), `order_roll`
  (B,)."""

  def __init__(self, gumbel_sample, gumbel_choice=None, uniform_choice=None, init_tokens=None, order_roll=None):
    self.gumbel_sample_draws = jnp.asarray(gumbel_sample, jnp.float32)
    self.gumbel_choice_draws = self.gumbel_choice_bits = None
    if gumbel_choice is not None and np.asarray(gumbel_choice).dtype == np.float64:
      words = np.ascontiguousarray(np.asarray(gumbel_choice)).view(np.uint32)
      self.gumbel_choice_bits = jnp.asarray(words.reshape(np.shape(gumbel_choice) + (2,)))
    elif gumbel_choice is not None:
      self.gumbel_choice_draws = jnp.asarray(gumbel_choice, jnp.float32)
    uniform = None if uniform_choice is None else np.asarray(uniform_choice, np.float32)
    self.uniform_choice_draws = None if uniform is None else jnp.asarray(uniform[..., 0] if uniform.ndim == 4
                                                                         else uniform)
    self.init_tokens = None if init_tokens is None else jnp.asarray(
        np.asarray(init_tokens).reshape(np.shape(init_tokens)[0], -1), jnp.int32)
    self.order_roll = None if order_roll is None else jnp.asarray(np.asarray(order_roll).reshape(-1), jnp.int32)
    for name, ndim in (("gumbel_sample", 4), ("gumbel_choice", 3), ("uniform_choice", 3)):
      shape = self._shape(name)
      if shape is not None and len(shape) != ndim:
        raise ValueError(f"RecordedNoise: {name} must have {ndim} dimensions (n, B, ...), got shape {shape}")

  def init_state(self):
    return jnp.zeros((), jnp.int32)

  def _shape(self, name):
    if name == "gumbel_choice" and self.gumbel_choice_bits is not None:
      return tuple(self.gumbel_choice_bits.shape[:-1])
    draws = getattr(self, f"{name}_draws")
    return None if draws is None else tuple(draws.shape)

  def _take(self, name, index, shape):
    have = self._shape(name)
    if have is None:
      raise ValueError(f"RecordedNoise.{name}: this decode draws {name}, none were recorded")
    if have[0] <= 0 or have[1:] != tuple(shape):
      raise ValueError(f"RecordedNoise.{name}: recorded draws have shape {have}, the step needs "
                       f"(n, {', '.join(map(str, shape))})")
    if name == "gumbel_choice" and self.gumbel_choice_bits is not None:
      words = jax.lax.dynamic_index_in_dim(self.gumbel_choice_bits, index, keepdims=False)
      with _x64():
        return jax.lax.bitcast_convert_type(words, jnp.float64)
    return jax.lax.dynamic_index_in_dim(getattr(self, f"{name}_draws"), index, keepdims=False)

  def gumbel_sample(self, state, index, shape):
    return state, self._take("gumbel_sample", index, shape)

  def gumbel_choice(self, state, index, shape, dtype=jnp.float32):
    return state, _widen(self._take("gumbel_choice", index, shape), dtype)

  def uniform_choice(self, state, index, shape):
    return state, self._take("uniform_choice", index, shape)

  def integers(self, state, what, shape, high):
    del high
    draws = getattr(self, what)
    if draws is None or tuple(draws.shape) != tuple(shape):
      got = "none" if draws is None else tuple(draws.shape)
      raise ValueError(f"RecordedNoise.{what}: the decode needs recorded {what} of shape {tuple(shape)}, got {got}")
    return state, draws

  def check_draws(self, needed: dict) -> None:
    """ValueError unless every kind of draw has as many recorded steps as the decode takes (`needed`)."""
    for name, count in needed.items():
      if count == 0 or name in ("init_tokens", "order_roll"):
        continue
      shape = self._shape(name)
      have = 0 if shape is None else shape[0]
      if have < count:
        raise ValueError(f"RecordedNoise.{name}: {have} recorded steps, the decode runs {count}")

  def check_steps(self, n):
    self.check_draws({"gumbel_sample": n, "gumbel_choice": n})
