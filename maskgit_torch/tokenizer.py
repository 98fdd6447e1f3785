"""MaskGIT VQGAN tokenizer in PyTorch, numerically mirroring the official flax model.

Official: google-research/maskgit `maskgit/nets/vqgan_tokenizer.py` (VQGAN without non-local layers) and
`maskgit/nets/layers.py`. Images at the API are NHWC float32 in [0, 1] (the official input range); inside, NCHW.
Module attributes mirror the official tree (conversion/table.py maps every parameter):
  encoder: conv_in (Conv_0), blocks[k] (ResBlock_k), norm_out (GroupNorm_0), conv_out (Conv_1)
  decoder: conv_in (Conv_0), blocks[k] (ResBlock_k), upsample_convs[j] (Conv_{j+1}), norm_out, conv_out (Conv_last)
  ResBlock: norm0, conv0, norm1, conv1 (GroupNorm_0, Conv_0, GroupNorm_1, Conv_1), shortcut (Conv_2)
  quantizer.codebook (K, embedding_dim)

Precision: float32 is the parity mode. Under `torch.autocast(..., dtype=torch.bfloat16)` the convolutions run in
bf16, GroupNorm statistics stay in float32 and the codebook distances are computed in float32 with autocast off.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
  return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GroupNorm(nn.GroupNorm):
  """GroupNorm with float32 statistics (and output) whatever the input dtype.

  flax's GroupNorm (32 groups, eps 1e-6) computes var = E[x^2] - E[x]^2; torch's variance differs by rounding only.
  """

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(_at_least_float32(x), self.num_groups, self.weight, self.bias, self.eps)


def conv(in_ch: int, out_ch: int, kernel: int, bias: bool) -> nn.Conv2d:
  # TF/flax SAME padding; every tokenizer conv has stride 1 and an odd kernel, where SAME is symmetric (k // 2).
  return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias)


class ResBlock(nn.Module):
  """Official ResBlock: y = conv(act(GN(conv(act(GN(x)))))), both convs without bias."""

  def __init__(self, in_ch: int, filters: int, act, num_groups: int, eps: float):
    super().__init__()
    self.act = act
    self.norm0 = GroupNorm(num_groups, in_ch, eps=eps)
    self.conv0 = conv(in_ch, filters, 3, bias=False)
    self.norm1 = GroupNorm(num_groups, filters, eps=eps)
    self.conv1 = conv(filters, filters, 3, bias=False)
    self.shortcut = conv(filters, filters, 1, bias=False) if in_ch != filters else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv0(self.act(self.norm0(x)))
    y = self.conv1(self.act(self.norm1(y)))
    if self.shortcut is not None:
      # Official quirk kept on purpose: when channels change the 1x1 shortcut is applied to the block's output y,
      # not to its input, so x is discarded (released shortcut kernels are (1, 1, out, out)).
      return y + self.shortcut(y)
    return y + x


def _activation(name: str):
  return {"swish": F.silu, "relu": F.relu}[name]


def downsample(x: torch.Tensor) -> torch.Tensor:
  # Official `dsample`: TF-style 2x2 average pool, stride 2, SAME. The config guarantees even sizes (image_size is
  # a multiple of the downsampling factor), where SAME adds no padding, so this is a plain average of 4 pixels.
  return F.avg_pool2d(x, kernel_size=2, stride=2)


def upsample(x: torch.Tensor) -> torch.Tensor:
  # Official `upsample`: jax.image.resize(method="nearest") by an integer factor 2 = pixel replication, written as a
  # broadcast: the same values as F.interpolate(scale_factor=2, mode="nearest"), 2.7-3.5x faster on CPU (measured,
  # 1 thread, (64, 64, 16, 16): 7.5 vs 20.4 ms) where interpolate copies its output once more.
  b, c, h, w = x.shape
  return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class Encoder(nn.Module):
  """conv3x3 -> per level num_res_blocks ResBlocks (+ avg pool except at the last level) -> num_res_blocks more
  ResBlocks -> GN -> act -> conv1x1 to embedding_dim (with bias)."""

  def __init__(self, cfg):
    super().__init__()
    self.act = _activation(cfg.activation_fn)
    mults = cfg.channel_multipliers
    self.num_levels = len(mults)
    self.num_res_blocks = cfg.num_res_blocks
    self.conv_in = conv(3, cfg.filters, 3, bias=False)
    blocks, ch = [], cfg.filters
    for level in list(range(len(mults))) + [len(mults) - 1]:  # the extra group reuses the last level's width
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResBlock(ch, cfg.filters * mults[level], self.act, cfg.num_groups, cfg.norm_eps))
        ch = cfg.filters * mults[level]
    self.blocks = nn.ModuleList(blocks)
    self.norm_out = GroupNorm(cfg.num_groups, ch, eps=cfg.norm_eps)
    self.conv_out = conv(ch, cfg.embedding_dim, 1, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_in(x)
    blocks = iter(self.blocks)
    for level in range(self.num_levels):
      for _ in range(self.num_res_blocks):
        x = next(blocks)(x)
      if level < self.num_levels - 1:
        x = downsample(x)
    for block in blocks:
      x = block(x)
    return self.conv_out(self.act(self.norm_out(x)))


class Decoder(nn.Module):
  """conv3x3 (bias) -> num_res_blocks ResBlocks -> for each level from last to first: num_res_blocks ResBlocks
  (then nearest x2 + conv3x3 unless it is the first level) -> GN -> act -> conv3x3 to RGB."""

  def __init__(self, cfg):
    super().__init__()
    self.act = _activation(cfg.activation_fn)
    mults = cfg.channel_multipliers
    self.num_levels = len(mults)
    self.num_res_blocks = cfg.num_res_blocks
    ch = cfg.filters * mults[-1]
    self.conv_in = conv(cfg.embedding_dim, ch, 3, bias=True)
    blocks, upsample_convs = [], []
    for level in [len(mults) - 1] + list(reversed(range(len(mults)))):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResBlock(ch, cfg.filters * mults[level], self.act, cfg.num_groups, cfg.norm_eps))
        ch = cfg.filters * mults[level]
    for level in reversed(range(1, len(mults))):
      upsample_convs.append(conv(cfg.filters * mults[level], cfg.filters * mults[level], 3, bias=True))
    self.blocks = nn.ModuleList(blocks)
    self.upsample_convs = nn.ModuleList(upsample_convs)
    self.norm_out = GroupNorm(cfg.num_groups, ch, eps=cfg.norm_eps)
    self.conv_out = conv(ch, 3, 3, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_in(x)
    blocks, upsample_convs = iter(self.blocks), iter(self.upsample_convs)
    for _ in range(self.num_res_blocks):
      x = next(blocks)(x)
    for level in reversed(range(self.num_levels)):
      for _ in range(self.num_res_blocks):
        x = next(blocks)(x)
      if level > 0:
        x = next(upsample_convs)(upsample(x))
    return self.conv_out(self.act(self.norm_out(x)))


class VectorQuantizer(nn.Module):
  """Nearest codebook entry by squared Euclidean distance (official `VectorQuantizer`, eval mode)."""

  def __init__(self, codebook_size: int, embedding_dim: int):
    super().__init__()
    self.codebook = nn.Parameter(torch.empty(codebook_size, embedding_dim))

  def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (..., E) -> (quantized (..., E) float32, indices (...) int64)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
      flat = z.float().reshape(-1, z.shape[-1])
      codebook = self.codebook.float()
      # The official formula, |z|^2 - 2 z.c + |c|^2 in float32 (losses.squared_euclidean_distance); the closest
      # distances differ by ~1e-4 at random init, so an algebraically equal form could pick other codes.
      distances = ((flat ** 2).sum(dim=1, keepdim=True) - 2 * (flat @ codebook.t())
                   + (codebook ** 2).sum(dim=1)[None, :])
      indices = distances.argmin(dim=1).reshape(z.shape[:-1])  # torch.argmin returns the first index on ties
    # one_hot(indices) @ codebook (official) is exactly the selected rows.
    return self.lookup(indices), indices

  def lookup(self, indices: torch.Tensor) -> torch.Tensor:
    return F.embedding(indices.long(), self.codebook.float())


def _nchw(x: torch.Tensor) -> torch.Tensor:
  # A plain permute would leave a channels_last-strided tensor, which convs propagate; torch's CPU channels_last
  # GroupNorm accumulates less accurately (measured 3.7e-5 vs 7e-6 max error on a 64px golden case), so copy.
  return x.permute(0, 3, 1, 2).contiguous()


class VQVAE(nn.Module):
  """The official VQGAN tokenizer. Methods take and return NHWC tensors; images are float32 in [0, 1]."""

  def __init__(self, config):
    super().__init__()
    cfg = config.tokenizer
    self.config = config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.embedding_dim)
    self.reset_parameters()

  @torch.no_grad()
  def reset_parameters(self) -> None:
    """Official init: flax Conv default lecun_normal (truncated normal, variance 1/fan_in), zero biases, GN scale 1;
    codebook variance_scaling(1, fan_in, uniform) over its (K, E) shape, i.e. U(+-sqrt(3 / K))."""
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        # 0.8796... is the std of a standard normal truncated to [-2, 2] (jax's variance_scaling correction).
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
          nn.init.zeros_(module.bias)
      elif isinstance(module, nn.GroupNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    limit = math.sqrt(3.0 / self.quantizer.codebook.shape[0])
    nn.init.uniform_(self.quantizer.codebook, -limit, limit)

  def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """images (B, H, W, 3) -> (quantized (B, h, w, E), {"encoding_indices": (B, h, w) int64, "raw": (B, h, w, E)})."""
    raw = self.encoder(_nchw(images)).permute(0, 2, 3, 1).float()
    quantized, indices = self.quantizer(raw)
    return quantized, {"encoding_indices": indices, "raw": raw}

  def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
    return self.encode(images)[1]["encoding_indices"]

  def decode(self, quantized: torch.Tensor) -> torch.Tensor:
    """quantized (B, h, w, E) -> images (B, H, W, 3), unclipped."""
    return self.decoder(_nchw(quantized)).permute(0, 2, 3, 1).float()

  def decode_from_indices(self, codes: torch.Tensor) -> torch.Tensor:
    return self.decode(self.quantizer.lookup(codes))

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """Reconstruction: decode(encode(images))."""
    return self.decode(self.encode(images)[0])
