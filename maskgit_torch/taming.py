"""taming-transformers' VQGAN (`taming.models.vqgan.VQModel`, as valeoai MaskGIT-pytorch v1 ships it) in PyTorch.

`tokenizer.arch=taming`. Module attributes carry taming's names, so the seed's `VQGAN/last.ckpt` `state_dict`
(minus the training-loss entries `loss.*`) loads with `load_state_dict(strict=True)` unchanged:

  encoder: conv_in, down.<lvl>.{block.<j>, attn.<j>, downsample.conv}, mid.{block_1, attn_1, block_2},
           norm_out, conv_out                  <lvl> 0 is full resolution; no downsample at the last level
  decoder: conv_in, mid.*, up.<lvl>.{block.<j> (num_res_blocks + 1), attn.<j>, upsample.conv}, norm_out, conv_out
           runs lvl = levels-1 .. 0; no upsample at level 0
  ResnetBlock: norm1, conv1, norm2, conv2 [, nin_shortcut]   AttnBlock: norm, q, k, v, proj_out (1x1 convs)
  quantize.embedding (K, embed_dim), quant_conv (z_channels -> embed_dim), post_quant_conv (embed_dim -> z_channels)

Every conv has a bias; norms are GroupNorm(32, eps 1e-6); the activation is x * sigmoid(x). An AttnBlock follows
every ResnetBlock of a level whose resolution (counted from `tokenizer.resolution`) is in `attn_resolutions`.

Two interfaces. The seed's own, NCHW images in [-1, 1] (what the parity tests compare): `encode(x) -> (quant,
emb_loss, (None, None, indices))`, `decode(quant)`, `decode_code(codes)`, `forward(x) -> (images, emb_loss)`.
The family-common one the pipelines use (as the official VQVAE): `encode_to_indices(images NHWC in [0, 1]) ->
(B, h, w)` and `decode_from_indices(codes) -> NHWC images on the [0, 1] scale`, unclipped; the range conversion
to and from [-1, 1] happens inside. `maskgit_jax/taming.py` mirrors it class for class (NHWC throughout).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def swish(x: torch.Tensor) -> torch.Tensor:
  # taming's `nonlinearity`, written as it is: F.silu is another kernel, which rounds differently.
  return x * torch.sigmoid(x)


def group_norm(config, channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(config.num_groups, channels, eps=config.norm_eps, affine=True)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
  return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
  return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)


class ResnetBlock(nn.Module):
  """norm1, swish, conv1, norm2, swish, dropout, conv2, plus the input (through a 1x1 `nin_shortcut` when the
  channel count changes: taming applies it to the block's input, unlike the official tokenizer)."""

  def __init__(self, config, in_channels: int, out_channels: int):
    super().__init__()
    self.norm1 = group_norm(config, in_channels)
    self.conv1 = conv3x3(in_channels, out_channels)
    self.norm2 = group_norm(config, out_channels)
    self.dropout = nn.Dropout(config.dropout_rate)
    self.conv2 = conv3x3(out_channels, out_channels)
    self.nin_shortcut = conv1x1(in_channels, out_channels) if in_channels != out_channels else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(self.dropout(swish(self.norm2(h))))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the h*w positions: x + proj_out(softmax(q^T k / sqrt(C)) applied to v)."""

  def __init__(self, config, channels: int):
    super().__init__()
    self.norm = group_norm(config, channels)
    self.q = conv1x1(channels, channels)
    self.k = conv1x1(channels, channels)
    self.v = conv1x1(channels, channels)
    self.proj_out = conv1x1(channels, channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.norm(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    b, c, height, width = q.shape
    # The same batched products in the same layouts as taming (bmm of (b, hw, c) x (b, c, hw), scaled after the
    # product), so the float32 rounding is taming's.
    weights = torch.bmm(q.reshape(b, c, height * width).permute(0, 2, 1), k.reshape(b, c, height * width))
    weights = F.softmax(weights * (int(c) ** (-0.5)), dim=2)  # over the keys
    h = torch.bmm(v.reshape(b, c, height * width), weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + self.proj_out(h)


class Downsample(nn.Module):
  """Zero padding on the right and bottom only, then a 3x3 conv with stride 2 (taming's `resamp_with_conv`)."""

  def __init__(self, config, channels: int):
    super().__init__()
    del config  # the same signature as the other blocks
    self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, config, channels: int):
    super().__init__()
    del config
    self.conv = conv3x3(channels, channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
  """One resolution: `num_blocks` ResnetBlocks, each followed by an AttnBlock if `attention`, then an optional
  Downsample (encoder, `down.<lvl>`) or Upsample (decoder, `up.<lvl>`)."""

  def __init__(self, config, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
               resample: str | None = None):
    super().__init__()
    blocks, attns = [], []
    for j in range(num_blocks):  # built interleaved, in taming's order (the order parameters are drawn in)
      blocks.append(ResnetBlock(config, in_channels if j == 0 else out_channels, out_channels))
      if attention:
        attns.append(AttnBlock(config, out_channels))
    self.block = nn.ModuleList(blocks)
    self.attn = nn.ModuleList(attns)
    self.resample = resample
    if resample == "downsample":
      self.downsample = Downsample(config, out_channels)
    elif resample == "upsample":
      self.upsample = Upsample(config, out_channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for j, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[j](x)
    return getattr(self, self.resample)(x) if self.resample else x


class Mid(nn.Module):
  """block_1, attn_1, block_2 at the lowest resolution (always with attention)."""

  def __init__(self, config, channels: int):
    super().__init__()
    self.block_1 = ResnetBlock(config, channels, channels)
    self.attn_1 = AttnBlock(config, channels)
    self.block_2 = ResnetBlock(config, channels, channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
  """conv_in -> levels 0..n-1 (downsampling between them) -> mid -> norm_out, swish, conv_out (3x3 to z_channels)."""

  def __init__(self, config):
    super().__init__()
    ch, mults = config.filters, config.channel_multipliers
    resolutions, _ = config.level_resolutions
    self.conv_in = conv3x3(config.in_channels, ch)
    in_mults = (1,) + tuple(mults)
    self.down = nn.ModuleList(
        Level(config, ch * in_mults[lvl], ch * mults[lvl], config.num_res_blocks,
              resolutions[lvl] in config.attn_resolutions, "downsample" if lvl < len(mults) - 1 else None)
        for lvl in range(len(mults)))
    self.mid = Mid(config, ch * mults[-1])
    self.norm_out = group_norm(config, ch * mults[-1])
    self.conv_out = conv3x3(ch * mults[-1], config.z_channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_in(x)
    for level in self.down:
      x = level(x)
    return self.conv_out(swish(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
  """conv_in (z_channels) -> mid -> levels n-1..0 (num_res_blocks + 1 blocks each, upsampling between them) ->
  norm_out, swish, conv_out (3x3 to out_channels)."""

  def __init__(self, config):
    super().__init__()
    ch, mults = config.filters, config.channel_multipliers
    _, resolutions = config.level_resolutions
    self.conv_in = conv3x3(config.z_channels, ch * mults[-1])
    self.mid = Mid(config, ch * mults[-1])
    in_channels = [ch * m for m in mults[1:]] + [ch * mults[-1]]  # each level's input: the level above's output
    # Built from the lowest resolution up, as taming does, then indexed by level (up.0 is full resolution).
    up = [Level(config, in_channels[lvl], ch * mults[lvl], config.num_res_blocks + 1,
                resolutions[lvl] in config.attn_resolutions, "upsample" if lvl > 0 else None)
          for lvl in reversed(range(len(mults)))]
    self.up = nn.ModuleList(up[::-1])
    self.norm_out = group_norm(config, ch * mults[0])
    self.conv_out = conv3x3(ch * mults[0], config.out_channels)

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    x = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      x = level(x)
    return self.conv_out(swish(self.norm_out(x)))


class VectorQuantizer(nn.Module):
  """taming's VectorQuantizer2 (legacy, beta = commitment_cost = 0.25): nearest code by d = |z|^2 + |e|^2 - 2 z.e."""

  def __init__(self, config):
    super().__init__()
    self.beta = config.commitment_cost
    self.embedding = nn.Embedding(config.codebook_size, config.embedding_dim)
    self.embedding.weight.data.uniform_(-1.0 / config.codebook_size, 1.0 / config.codebook_size)

  def squared_distances(self, flat: torch.Tensor) -> torch.Tensor:
    """(N, E) latents -> (N, K), summed in taming's order (an algebraically equal form could pick other codes)."""
    e = self.embedding.weight
    return (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, e.t()))

  def forward(self, z: torch.Tensor):
    """z (B, E, h, w) -> (straight-through z_q (B, E, h, w), emb_loss, (None, None, indices (B*h*w,)))."""
    z = z.permute(0, 2, 3, 1).contiguous()
    indices = torch.argmin(self.squared_distances(z.view(-1, z.shape[-1])), dim=1)  # the first index on ties
    z_q = self.embedding(indices).view(z.shape)
    # Legacy taming: beta weighs the codebook term; both terms have the same value, 1.25 * mse in the forward.
    emb_loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
    z_q = z + (z_q - z).detach()  # straight-through: the value differs from the code row by rounding (~1e-8)
    return z_q.permute(0, 3, 1, 2).contiguous(), emb_loss, (None, None, indices)

  def get_codebook_entry(self, indices: torch.Tensor, shape) -> torch.Tensor:
    """Flat indices -> codebook rows viewed as `shape` (B, h, w, E), returned as (B, E, h, w)."""
    return self.embedding(indices).view(shape).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
  """The taming VQGAN without its training loss (the seed never builds it)."""

  def __init__(self, config):
    super().__init__()
    cfg = config.tokenizer
    self.config = config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quantize = VectorQuantizer(cfg)
    self.quant_conv = conv1x1(cfg.z_channels, cfg.embedding_dim)
    self.post_quant_conv = conv1x1(cfg.embedding_dim, cfg.z_channels)

  # The seed's interface: NCHW, images in [-1, 1] -------------------------------------------------------------
  def encode(self, x: torch.Tensor):
    return self.quantize(self.quant_conv(self.encoder(x)))

  def decode(self, quant: torch.Tensor) -> torch.Tensor:
    return self.decoder(self.post_quant_conv(quant))

  def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, h, w) -> images (B, C, H, W) in [-1, 1], unclipped."""
    b, h, w = codes.shape
    return self.decode(self.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, -1)))

  def forward(self, x: torch.Tensor):
    quant, emb_loss, _ = self.encode(x)
    return self.decode(quant), emb_loss

  # The family-common interface: NHWC, images on the [0, 1] scale ---------------------------------------------
  def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
    """images (B, H, W, C) in [0, 1] -> codes (B, h, w) int64. [-1, 1] = 2 * x - 1, as the seed's trainer."""
    x = (2 * images.float() - 1).permute(0, 3, 1, 2).contiguous()
    quant, _, (_, _, indices) = self.encode(x)
    return indices.reshape(quant.shape[0], quant.shape[2], quant.shape[3])

  def decode_from_indices(self, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, h, w) -> images (B, H, W, C) on the [0, 1] scale, unclipped."""
    return ((self.decode_code(codes.long()) + 1) / 2).permute(0, 2, 3, 1)
