"""VQGAN tokenizer (no attention), a flax re-implementation of the official MaskGIT tokenizer.

The parameter tree is identical to `maskgit.nets.vqgan_tokenizer.VQVAE` (module names, shapes, dtypes), so the
released msgpack checkpoints load unchanged:

  params/encoder/{Conv_k, ResBlock_k/{GroupNorm_0, Conv_0, GroupNorm_1, Conv_1[, Conv_2]}, GroupNorm_0}
  params/decoder/...                 (the same kinds of modules, numbered per parent in call order)
  params/quantizer/codebook          (K, embedding_dim)

Mirrors maskgit_torch/tokenizer.py class for class, argument for argument: submodules take the `TokenizerConfig`
section first (ResBlock also its in_channels, which torch must know), then `dtype` (JAX only; torch uses
autocast); `VQVAE(config, train=False)` takes the whole `MaskGITConfig`. train=True is the official train mode
(quantizer losses and the straight-through estimator), in both backends.

Images are NHWC float32 in [0, 1] (the official input range); codes are (B, h, h) int32.

Usage:
  model = VQVAE(config)
  codes = model.apply(variables, images, method=VQVAE.encode_to_indices)
  images = model.apply(variables, codes, method=VQVAE.decode_from_indices)
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import MaskGITConfig, TokenizerConfig


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  return {"swish": nn.swish, "relu": nn.relu}[name]


def downsample(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, TF-style SAME padding (padded cells are not counted), as the official dsample."""
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "SAME")
  # The count of real (unpadded) cells per window depends on H and W only: one (1, H, W, 1) plane broadcasts over
  # the batch and channels (a full-size ones array makes XLA constant-fold for minutes at compile time).
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, "SAME")
  return total / count


def upsample(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling with jax.image.resize, the official op."""
  n, h, w, c = x.shape
  return jax.image.resize(x, (n, h * factor, w * factor, c), method="nearest")


class ResBlock(nn.Module):
  """GN -> act -> conv3x3 -> GN -> act -> conv3x3, plus a shortcut; convs have no bias.

  in_channels is what flax would infer from the input; it is an argument (checked against the input) so that the
  constructor is the torch one, which must know it.
  """
  config: TokenizerConfig
  in_channels: int
  filters: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    tc = self.config
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"ResBlock built for {self.in_channels} input channels got {x.shape[-1]}")
    act = _activation(tc.activation_fn)
    conv = lambda k: nn.Conv(self.filters, (k, k), use_bias=False, dtype=self.dtype)
    norm = lambda: nn.GroupNorm(num_groups=tc.num_groups, epsilon=tc.norm_eps, dtype=self.dtype)
    y = conv(3)(act(norm()(x)))
    y = conv(3)(act(norm()(y)))
    if self.in_channels != self.filters:
      # Official quirk, reproduced on purpose: the 1x1 shortcut is applied to the block's OUTPUT y, not to x, and
      # the input x is discarded (vqgan_tokenizer.py ResBlock). Released shortcut kernels are (1, 1, out, out).
      return y + conv(1)(y)
    return y + x


class Encoder(nn.Module):
  """conv3x3 -> per level: ResBlocks (+ 2x2 avg pool, except at the last level) -> ResBlocks -> GN -> act -> 1x1."""
  config: TokenizerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    tc = self.config
    x = nn.Conv(tc.filters, (3, 3), use_bias=False, dtype=self.dtype)(x)
    num_levels = len(tc.channel_multipliers)
    ch = tc.filters
    for i, multiplier in enumerate(tc.channel_multipliers):
      filters = tc.filters * multiplier
      for _ in range(tc.num_res_blocks):
        x, ch = ResBlock(tc, ch, filters, dtype=self.dtype)(x), filters
      if i < num_levels - 1:
        x = downsample(x)
    for _ in range(tc.num_res_blocks):
      x, ch = ResBlock(tc, ch, filters, dtype=self.dtype)(x), filters
    x = nn.GroupNorm(num_groups=tc.num_groups, epsilon=tc.norm_eps, dtype=self.dtype)(x)
    x = _activation(tc.activation_fn)(x)
    return nn.Conv(tc.embedding_dim, (1, 1), dtype=self.dtype)(x)  # the only encoder conv with a bias


class Decoder(nn.Module):
  """conv3x3 -> ResBlocks -> per level, last to first: ResBlocks (+ nearest x2 and conv3x3) -> GN -> act -> conv3x3
  to output_dim (RGB)."""
  config: TokenizerConfig
  output_dim: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    tc = self.config
    filters = ch = tc.filters * tc.channel_multipliers[-1]
    x = nn.Conv(filters, (3, 3), dtype=self.dtype)(x)  # decoder convs outside ResBlocks have a bias
    for _ in range(tc.num_res_blocks):
      x, ch = ResBlock(tc, ch, filters, dtype=self.dtype)(x), filters
    for i in reversed(range(len(tc.channel_multipliers))):
      filters = tc.filters * tc.channel_multipliers[i]
      for _ in range(tc.num_res_blocks):
        x, ch = ResBlock(tc, ch, filters, dtype=self.dtype)(x), filters
      if i > 0:
        x = upsample(x, 2)
        x = nn.Conv(filters, (3, 3), dtype=self.dtype)(x)
    x = nn.GroupNorm(num_groups=tc.num_groups, epsilon=tc.norm_eps, dtype=self.dtype)(x)
    x = _activation(tc.activation_fn)(x)
    return nn.Conv(self.output_dim, (3, 3), dtype=self.dtype)(x)


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """|z|^2 - 2 z.c + |c|^2 for flat z (N, E) and codebook (K, E), in the official order of operations.

  Always float32 at HIGHEST matmul precision: neighbouring codes differ by ~1e-4 in distance, so a TF32/bf16
  matmul would change the argmin. The official code gets this precision from the global flag; we ask for it here.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  c2 = jnp.sum(codebook.T ** 2, axis=0, keepdims=True)
  z2 = jnp.sum(z ** 2, axis=1, keepdims=True)
  zc = jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
  return z2 - 2 * zc + c2


def entropy_loss(affinity: jax.Array, loss_type: str = "softmax", temperature: float = 1.0) -> jax.Array:
  """Codebook-usage entropy regulariser of the official trainer: per-sample entropy minus batch entropy."""
  flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = jax.nn.softmax(flat, axis=-1)
  log_probs = jax.nn.log_softmax(flat + 1e-5, axis=-1)
  if loss_type == "softmax":
    target = probs
  elif loss_type == "argmax":
    onehot = jax.nn.one_hot(jnp.argmax(flat, axis=-1), flat.shape[-1], dtype=flat.dtype)
    target = probs - jax.lax.stop_gradient(probs - onehot)  # straight-through
  else:
    raise ValueError(f"entropy loss type {loss_type!r} is not 'softmax' or 'argmax'")
  avg_probs = jnp.mean(target, axis=0)
  avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(target * log_probs, axis=-1))
  return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
  """Nearest codebook entry by squared Euclidean distance (official `VectorQuantizer`); argmin takes the first
  index on ties (jnp.argmin, as the official). With train=True (the official train mode) it also returns the
  quantizer losses and the straight-through value x + stop_gradient(q - x)."""
  config: TokenizerConfig
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x (..., E) -> (quantized (..., E), {"encoding_indices": (...) int32, "raw": x, [losses]})."""
    tc = self.config
    codebook = self.param("codebook", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                          (tc.codebook_size, x.shape[-1]))
    distances = squared_distances(x.reshape(-1, x.shape[-1]), codebook).reshape(x.shape[:-1] + (tc.codebook_size,))
    indices = jnp.argmin(distances, axis=-1)
    # The official computes one_hot(indices) @ codebook; at full float32 precision that is exactly this gather.
    quantized = jnp.take(codebook, indices, axis=0).astype(self.dtype)
    result = {}
    if self.train:
      x32 = x.astype(jnp.float32)
      q32 = quantized.astype(jnp.float32)
      e_latent_loss = jnp.mean((jax.lax.stop_gradient(q32) - x32) ** 2) * tc.commitment_cost
      q_latent_loss = jnp.mean((q32 - jax.lax.stop_gradient(x32)) ** 2)
      entropy = jnp.asarray(0.0, jnp.float32)
      if tc.entropy_loss_ratio != 0:
        entropy = entropy_loss(-distances, tc.entropy_loss_type, tc.entropy_temperature) * tc.entropy_loss_ratio
      result = dict(quantizer_loss=e_latent_loss + q_latent_loss + entropy, e_latent_loss=e_latent_loss,
                    q_latent_loss=q_latent_loss, entropy_loss=entropy)
      quantized = x + jax.lax.stop_gradient(quantized - x)  # straight-through estimator
    result.update(encoding_indices=indices, raw=x)
    return quantized, result

  def decode_ids(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.variables["params"]["codebook"], ids, axis=0).astype(self.dtype)


class VQVAE(nn.Module):
  """Encoder -> vector quantizer -> decoder. Submodule names follow the official VQVAE (setup attributes)."""
  config: MaskGITConfig
  train: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    tc = self.config.tokenizer
    self.quantizer = VectorQuantizer(tc, train=self.train, dtype=self.dtype)
    self.encoder = Encoder(tc, dtype=self.dtype)
    self.decoder = Decoder(tc, output_dim=3, dtype=self.dtype)

  def encode(self, images):
    """images (B, H, H, 3) in [0, 1] -> (quantized (B, h, h, E), {"encoding_indices", "raw", [losses]})."""
    return self.quantizer(self.encoder(images))

  def encode_to_indices(self, images):
    return self.encode(images)[1]["encoding_indices"]

  def decode(self, quantized):
    """(B, h, h, E) -> images (B, H, H, 3), unclipped."""
    return self.decoder(quantized)

  def decode_from_indices(self, codes):
    return self.decode(self.quantizer.decode_ids(codes))

  def __call__(self, images):
    """Reconstruction. (The official __call__ passes the (quantized, dict) tuple to the decoder and fails.)"""
    quantized, _ = self.encode(images)
    return self.decode(quantized)
