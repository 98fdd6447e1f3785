"""taming-transformers' VQGAN (`taming.models.vqgan.VQModel`, as valeoai MaskGIT-pytorch v1 ships it) in flax,
mirroring `maskgit_torch/taming.py` class for class; NHWC throughout.

`tokenizer.arch=taming`. Parameter tree (flax names; `conversion/tables/seed.py` maps each leaf to taming's key):

  encoder/{conv_in, down_<lvl>/{block_<j>, attn_<j>, downsample/conv}, mid/{block_1, attn_1, block_2},
           norm_out, conv_out}
  decoder/{conv_in, mid/..., up_<lvl>/{block_<j>, attn_<j>, upsample/conv}, norm_out, conv_out}
  ResnetBlock: norm1, conv1, norm2, conv2[, nin_shortcut]     AttnBlock: norm, q, k, v, proj_out
  quantize/embedding/embedding (K, embed_dim), quant_conv, post_quant_conv

Numerics as taming: GroupNorm(32, eps 1e-6, two-pass variance), x * sigmoid(x), 3x3 convs with padding 1, zero
padding right/bottom + stride-2 3x3 conv to downsample, nearest x2 + conv to upsample, single-head attention
scaled by C^-0.5 after the product, the 1x1 shortcut on the block input, codebook distances
|z|^2 + |e|^2 - 2 z.e at HIGHEST precision, argmin taking the first index.

Interfaces, as in torch: the seed's own `encode(x) -> (quant, emb_loss, indices)`, `decode`, `decode_code`,
`__call__` with images in [-1, 1] (NHWC here), and the family-common `encode_to_indices(images in [0, 1]) ->
(B, h, w)` / `decode_from_indices(codes) -> images on the [0, 1] scale` (unclipped).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import MaskGITConfig
from maskgit_jax.seed_transformer import TORCH_KERNEL_INIT, torch_uniform_bias


def swish(x):
  return x * jax.nn.sigmoid(x)  # taming's `nonlinearity`


def group_norm(config, dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=config.num_groups, epsilon=config.norm_eps, use_fast_variance=False, dtype=dtype,
                      name=name)


def conv(features: int, fan_in: int, kernel: int, dtype, name: str, strides: int = 1, padding=None) -> nn.Conv:
  """A biased conv with torch's default init; padding kernel // 2 on every side unless given (taming's 3x3 and
  1x1 convs)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)) if padding is None else padding,
                 kernel_init=TORCH_KERNEL_INIT, bias_init=torch_uniform_bias(fan_in * kernel * kernel),
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """norm1, swish, conv1, norm2, swish, dropout, conv2, plus the input (1x1 `nin_shortcut` when channels change)."""
  config: Any  # TokenizerConfig
  in_channels: int
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cin, cout = self.in_channels, self.out_channels
    h = conv(cout, cin, 3, self.dtype, "conv1")(swish(group_norm(self.config, self.dtype, "norm1")(x)))
    h = swish(group_norm(self.config, self.dtype, "norm2")(h))
    h = nn.Dropout(rate=self.config.dropout_rate)(h, deterministic=deterministic)
    h = conv(cout, cout, 3, self.dtype, "conv2")(h)
    if cin != cout:
      x = conv(cout, cin, 1, self.dtype, "nin_shortcut")(x)  # on the block input, unlike the official tokenizer
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the h*w positions: x + proj_out(softmax(q k^T * C^-0.5) v)."""
  config: Any
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.channels
    h = group_norm(self.config, self.dtype, "norm")(x)
    q, k, v = (conv(c, c, 1, self.dtype, name)(h) for name in ("q", "k", "v"))
    b, height, width, _ = q.shape
    q, k, v = (t.reshape(b, height * width, c) for t in (q, k, v))
    weights = jnp.einsum("bic,bjc->bij", q, k) * (int(c) ** (-0.5))  # scaled after the product, as taming
    weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(self.dtype)  # over the keys j
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, height, width, c)
    return x + conv(c, c, 1, self.dtype, "proj_out")(h)


class Downsample(nn.Module):
  """Zero padding on the right and bottom only, then a 3x3 conv with stride 2, no further padding."""
  config: Any
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.channels, self.channels, 3, self.dtype, "conv", strides=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 (pixel repetition, exact), then a 3x3 conv."""
  config: Any
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.channels, self.channels, 3, self.dtype, "conv")(x)


class Level(nn.Module):
  """One resolution: ResnetBlocks, each followed by an AttnBlock if `attention`, then an optional resample."""
  config: Any
  in_channels: int
  out_channels: int
  num_blocks: int
  attention: bool
  resample: str | None = None  # "downsample" (encoder) or "upsample" (decoder)
  dtype: Any = jnp.float32

  def setup(self):
    c = self.out_channels
    self.block = [ResnetBlock(self.config, self.in_channels if j == 0 else c, c, dtype=self.dtype)
                  for j in range(self.num_blocks)]
    self.attn = [AttnBlock(self.config, c, dtype=self.dtype) for _ in range(self.num_blocks if self.attention else 0)]
    if self.resample == "downsample":
      self.downsample = Downsample(self.config, c, dtype=self.dtype)
    elif self.resample == "upsample":
      self.upsample = Upsample(self.config, c, dtype=self.dtype)

  def __call__(self, x, deterministic: bool = True):
    for j, block in enumerate(self.block):
      x = block(x, deterministic)
      if self.attn:
        x = self.attn[j](x)
    return getattr(self, self.resample)(x) if self.resample else x


class Mid(nn.Module):
  """block_1, attn_1, block_2 at the lowest resolution (always with attention)."""
  config: Any
  channels: int
  dtype: Any = jnp.float32

  def setup(self):
    self.block_1 = ResnetBlock(self.config, self.channels, self.channels, dtype=self.dtype)
    self.attn_1 = AttnBlock(self.config, self.channels, dtype=self.dtype)
    self.block_2 = ResnetBlock(self.config, self.channels, self.channels, dtype=self.dtype)

  def __call__(self, x, deterministic: bool = True):
    return self.block_2(self.attn_1(self.block_1(x, deterministic)), deterministic)


class Encoder(nn.Module):
  """conv_in -> levels 0..n-1 (downsampling between them) -> mid -> norm_out, swish, conv_out (to z_channels)."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    ch, mults = cfg.filters, cfg.channel_multipliers
    resolutions, _ = cfg.level_resolutions
    self.conv_in = conv(ch, cfg.in_channels, 3, self.dtype, "conv_in")
    in_mults = (1,) + tuple(mults)
    self.down = [Level(cfg, ch * in_mults[lvl], ch * mults[lvl], cfg.num_res_blocks,
                       resolutions[lvl] in cfg.attn_resolutions, "downsample" if lvl < len(mults) - 1 else None,
                       dtype=self.dtype) for lvl in range(len(mults))]
    self.mid = Mid(cfg, ch * mults[-1], dtype=self.dtype)
    self.norm_out = group_norm(cfg, self.dtype, "norm_out")
    self.conv_out = conv(cfg.z_channels, ch * mults[-1], 3, self.dtype, "conv_out")

  def __call__(self, x, deterministic: bool = True):
    x = self.conv_in(x)
    for level in self.down:
      x = level(x, deterministic)
    return self.conv_out(swish(self.norm_out(self.mid(x, deterministic))))


class Decoder(nn.Module):
  """conv_in -> mid -> levels n-1..0 (num_res_blocks + 1 blocks, upsampling between them) -> norm_out, swish,
  conv_out (to out_channels)."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    ch, mults = cfg.filters, cfg.channel_multipliers
    _, resolutions = cfg.level_resolutions
    self.conv_in = conv(ch * mults[-1], cfg.z_channels, 3, self.dtype, "conv_in")
    self.mid = Mid(cfg, ch * mults[-1], dtype=self.dtype)
    in_channels = [ch * m for m in mults[1:]] + [ch * mults[-1]]  # each level's input: the level above's output
    self.up = [Level(cfg, in_channels[lvl], ch * mults[lvl], cfg.num_res_blocks + 1,
                     resolutions[lvl] in cfg.attn_resolutions, "upsample" if lvl > 0 else None, dtype=self.dtype)
               for lvl in range(len(mults))]
    self.norm_out = group_norm(cfg, self.dtype, "norm_out")
    self.conv_out = conv(cfg.out_channels, ch * mults[0], 3, self.dtype, "conv_out")

  def __call__(self, z, deterministic: bool = True):
    x = self.mid(self.conv_in(z), deterministic)
    for level in reversed(self.up):
      x = level(x, deterministic)
    return self.conv_out(swish(self.norm_out(x)))


class VectorQuantizer(nn.Module):
  """taming's VectorQuantizer2 (legacy, beta = commitment_cost): nearest code by d = |z|^2 + |e|^2 - 2 z.e."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    k = self.config.codebook_size
    self.embedding = nn.Embed(k, self.config.embedding_dim, dtype=jnp.float32,
                              embedding_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype,
                                                                                          -1.0 / k, 1.0 / k))

  def squared_distances(self, flat):
    """(N, E) -> (N, K) in float32, summed in taming's order; HIGHEST precision whatever the global flag
    (neighbouring codes can be ~1e-4 apart, so a TF32/bf16 product would change the argmin)."""
    flat = flat.astype(jnp.float32)
    e = self.embedding.embedding
    return (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(e ** 2, axis=1)
            - 2 * jnp.matmul(flat, e.T, precision=jax.lax.Precision.HIGHEST))

  def __call__(self, z):
    """z (B, h, w, E) -> (straight-through z_q (B, h, w, E), emb_loss, indices (B*h*w,))."""
    z = z.astype(jnp.float32)
    indices = jnp.argmin(self.squared_distances(z.reshape(-1, z.shape[-1])), axis=1)  # first index on ties
    z_q = self.embedding(indices).reshape(z.shape)
    emb_loss = jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2) + self.config.commitment_cost * jnp.mean(
        (z_q - jax.lax.stop_gradient(z)) ** 2)  # legacy taming: 1.25 * mse in value
    z_q = z + jax.lax.stop_gradient(z_q - z)  # straight-through; the value differs from the row by rounding
    return z_q.astype(self.dtype), emb_loss, indices

  def get_codebook_entry(self, indices, shape):
    """Flat indices -> codebook rows reshaped to `shape` (B, h, w, E)."""
    return self.embedding(indices).reshape(shape).astype(self.dtype)


class VQModel(nn.Module):
  """The taming VQGAN without its training loss. Submodule names are taming's (setup attributes)."""
  config: MaskGITConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config.tokenizer
    self.encoder = Encoder(cfg, dtype=self.dtype)
    self.decoder = Decoder(cfg, dtype=self.dtype)
    self.quantize = VectorQuantizer(cfg, dtype=self.dtype)
    self.quant_conv = conv(cfg.embedding_dim, cfg.z_channels, 1, self.dtype, "quant_conv")
    self.post_quant_conv = conv(cfg.z_channels, cfg.embedding_dim, 1, self.dtype, "post_quant_conv")

  # The seed's interface: NHWC, images in [-1, 1] -------------------------------------------------------------
  def encode(self, x):
    return self.quantize(self.quant_conv(self.encoder(x)))

  def decode(self, quant):
    return self.decoder(self.post_quant_conv(quant)).astype(jnp.float32)

  def decode_code(self, codes):
    """codes (B, h, w) -> images (B, H, W, C) in [-1, 1], unclipped."""
    b, h, w = codes.shape
    return self.decode(self.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, -1)))

  def __call__(self, x):
    quant, emb_loss, _ = self.encode(x)
    return self.decode(quant), emb_loss

  # The family-common interface: images on the [0, 1] scale ---------------------------------------------------
  def encode_to_indices(self, images):
    """images (B, H, W, C) in [0, 1] -> codes (B, h, w). [-1, 1] = 2 * x - 1, as the seed's trainer."""
    quant, _, indices = self.encode(2 * jnp.asarray(images, jnp.float32) - 1)
    return indices.reshape(quant.shape[:3])

  def decode_from_indices(self, codes):
    """codes (B, h, w) -> images (B, H, W, C) on the [0, 1] scale, unclipped."""
    return (self.decode_code(jnp.asarray(codes)) + 1) / 2
