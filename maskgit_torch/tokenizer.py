"""MaskGIT VQGAN tokenizer in PyTorch, numerically mirroring the official flax model.

Official: google-research/maskgit `maskgit/nets/vqgan_tokenizer.py` (VQGAN without non-local layers) and
`maskgit/nets/layers.py`. Images at the API are NHWC float32 in [0, 1] (the official input range); inside, NCHW.
Mirrors maskgit_jax/tokenizer.py class for class, argument for argument: submodules take the `TokenizerConfig`
section first (then the channel counts flax infers from its input but torch must know: ResBlock's in_channels);
`VQVAE(config, train=False)` takes the whole `MaskGITConfig`. train=True is the official train mode: the quantizer
returns its losses (commitment, codebook, entropy) and the straight-through value, as in JAX.
Module attributes mirror the official tree (conversion/tables/official.py maps every parameter):
  encoder: conv_in (Conv_0), blocks[k] (ResBlock_k), norm_out (GroupNorm_0), conv_out (Conv_1)
  decoder: conv_in (Conv_0), blocks[k] (ResBlock_k), upsample_convs[j] (Conv_{j+1}), norm_out, conv_out (Conv_last)
  ResBlock: norm0, conv0, norm1, conv1 (GroupNorm_0, Conv_0, GroupNorm_1, Conv_1), shortcut (Conv_2)
  quantizer.codebook (K, embedding_dim)

Precision: float32 is the parity mode. Under `torch.autocast(..., dtype=torch.bfloat16)` the convolutions run in
bf16, GroupNorm statistics stay in float32 and the codebook distances are computed in float32 with autocast off.

Speed: float32 inference on a CPU decodes channels_last end to end (`Decoder._forward_channels_last`): oneDNN's
convolutions then read and write NHWC directly instead of reordering every activation to and from a blocked layout,
GroupNorm + activation and the upsampling write into buffers kept across calls of the same shape, and the residual
adds are in place. Training, CUDA, autocast and forward hooks (parity_tests.intermediates) take the module-by-module
NCHW forward.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn
import torch.nn.functional as F

from configs import MaskGITConfig, TokenizerConfig
from maskgit_torch import device as device_lib


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


def _activation(name: str):
  return {"swish": F.silu, "relu": F.relu}[name]


def downsample(x: torch.Tensor) -> torch.Tensor:
  # Official `dsample`: TF-style 2x2 average pool, stride 2, SAME. The config guarantees even sizes (image_size is
  # a multiple of the downsampling factor), where SAME adds no padding, so this is a plain average of 4 pixels.
  return F.avg_pool2d(x, kernel_size=2, stride=2)


def upsample(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
  # Official `upsample`: jax.image.resize(method="nearest") by an integer factor = pixel replication, written as a
  # broadcast: the same values as F.interpolate(scale_factor=2, mode="nearest"), 2.7-3.5x faster on CPU (measured,
  # 1 thread, (64, 64, 16, 16): 7.5 vs 20.4 ms) where interpolate copies its output once more.
  b, c, h, w = x.shape
  return x[:, :, :, None, :, None].expand(b, c, h, factor, w, factor).reshape(b, c, factor * h, factor * w)


# The channels_last CPU inference path ----------------------------------------------------------------------------
WORKSPACE_LIMIT_BYTES = 1 << 30  # buffers kept between calls up to this size (64 MiB per 256 px image); above, per call


def _cpu_inference(x: torch.Tensor) -> bool:
  """Eager float32 CPU inference (torch.compile traces the module path and picks layouts itself)."""
  return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
          and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _Workspace:
  """Activation buffers of one decoder, one per NCHW shape, channels_last. Kept while calls have the same input
  shape: every new tensor above glibc's mmap threshold (32 MiB, one 128-channel 256x256 activation) is mapped afresh
  and page-faulted in, measured ~35% of the batch-4 decoder's time (1.3 M minor faults per call) before this."""

  def __init__(self):
    self.lock = threading.Lock()
    self.key, self.buffers = None, {}

  def start(self, key) -> None:
    if key != self.key:
      self.key, self.buffers = key, {}

  def get(self, shape) -> torch.Tensor:
    buffer = self.buffers.get(tuple(shape))
    if buffer is None:
      n, c, h, w = shape
      buffer = self.buffers[tuple(shape)] = torch.empty(n, h, w, c).permute(0, 3, 1, 2)
    return buffer

  def finish(self) -> None:
    if sum(b.numel() * b.element_size() for b in self.buffers.values()) > WORKSPACE_LIMIT_BYTES:
      self.key, self.buffers = None, {}


_WORKSPACES: "weakref.WeakKeyDictionary[nn.Module, _Workspace]" = weakref.WeakKeyDictionary()


def _nhwc_rows(x: torch.Tensor) -> torch.Tensor:
  n, c, h, w = x.shape
  return x.permute(0, 2, 3, 1).view(n, h * w, c)  # channels_last memory as (N, HW, C), a view


def _group_norm_act_into(norm: nn.GroupNorm, act, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
  """act(norm(x)) for a channels_last x, written into `out` (same shape and layout) and returned.

  torch's own channels_last GroupNorm sums each group in one float32 pass: 1.8e-5 max error at 256x256 (NCHW
  7e-7). Here each channel's sum and sum of squares is a cascade-summed reduction over the rows (1.5e-7 relative),
  the groups add up their channels, and var = E[x^2] - E[x]^2 clipped at 0, as flax computes it. `out` holds the
  squares before it holds the result.
  """
  n, c, h, w = x.shape
  g = norm.num_groups
  rows = _nhwc_rows(x)
  count = h * w * (c // g)
  mean = rows.sum(dim=1).view(n, g, -1).sum(-1) / count
  mean_sq = torch.mul(rows, rows, out=_nhwc_rows(out)).sum(dim=1).view(n, g, -1).sum(-1) / count
  var = (mean_sq - mean * mean).clamp_min_(0)
  scale = torch.rsqrt(var + norm.eps)[:, :, None] * norm.weight.view(g, -1)  # (N, G, C/G)
  shift = norm.bias.view(g, -1) - mean[:, :, None] * scale
  torch.addcmul(shift.reshape(n, c, 1, 1), x, scale.reshape(n, c, 1, 1), out=out)
  return act(out, inplace=True)


def _upsample_into(x: torch.Tensor, out: torch.Tensor, factor: int = 2) -> torch.Tensor:
  """`upsample` for a channels_last x, written into `out` (channels_last, factor x the size): the same values."""
  b, c, h, w = x.shape
  src = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, factor, w, factor, c)
  out.permute(0, 2, 3, 1).view(b, h, factor, w, factor, c).copy_(src)
  return out


class ResBlock(nn.Module):
  """Official ResBlock: y = conv(act(GN(conv(act(GN(x)))))), both convs without bias, plus a shortcut."""

  def __init__(self, config: TokenizerConfig, in_channels: int, filters: int):
    super().__init__()
    self.act = _activation(config.activation_fn)
    self.norm0 = GroupNorm(config.num_groups, in_channels, eps=config.norm_eps)
    self.conv0 = conv(in_channels, filters, 3, bias=False)
    self.norm1 = GroupNorm(config.num_groups, filters, eps=config.norm_eps)
    self.conv1 = conv(filters, filters, 3, bias=False)
    self.shortcut = conv(filters, filters, 1, bias=False) if in_channels != filters else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv0(self.act(self.norm0(x)))
    y = self.conv1(self.act(self.norm1(y)))
    if self.shortcut is not None:
      # Official quirk kept on purpose: when channels change the 1x1 shortcut is applied to the block's output y,
      # not to its input, so x is discarded (released shortcut kernels are (1, 1, out, out)).
      return y + self.shortcut(y)
    return y + x

  def _forward_channels_last(self, x: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    """forward for a channels_last activation on the inference path (x itself is left as it is)."""
    y = self.conv0(_group_norm_act_into(self.norm0, self.act, x, workspace.get(x.shape)))
    y = self.conv1(_group_norm_act_into(self.norm1, self.act, y, workspace.get(y.shape)))
    return y.add_(self.shortcut(y) if self.shortcut is not None else x)  # y is this call's own conv output


class Encoder(nn.Module):
  """conv3x3 -> per level num_res_blocks ResBlocks (+ avg pool except at the last level) -> num_res_blocks more
  ResBlocks -> GN -> act -> conv1x1 to embedding_dim (with bias)."""

  def __init__(self, config: TokenizerConfig):
    super().__init__()
    self.act = _activation(config.activation_fn)
    mults = config.channel_multipliers
    self.num_levels = len(mults)
    self.num_res_blocks = config.num_res_blocks
    self.conv_in = conv(3, config.filters, 3, bias=False)
    blocks, ch = [], config.filters
    for level in list(range(len(mults))) + [len(mults) - 1]:  # the extra group reuses the last level's width
      for _ in range(config.num_res_blocks):
        blocks.append(ResBlock(config, ch, config.filters * mults[level]))
        ch = config.filters * mults[level]
    self.blocks = nn.ModuleList(blocks)
    self.norm_out = GroupNorm(config.num_groups, ch, eps=config.norm_eps)
    self.conv_out = conv(ch, config.embedding_dim, 1, bias=True)

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
  (then nearest x2 + conv3x3 unless it is the first level) -> GN -> act -> conv3x3 to output_dim (RGB)."""

  def __init__(self, config: TokenizerConfig, output_dim: int = 3):
    super().__init__()
    self.act = _activation(config.activation_fn)
    mults = config.channel_multipliers
    self.num_levels = len(mults)
    self.num_res_blocks = config.num_res_blocks
    ch = config.filters * mults[-1]
    self.conv_in = conv(config.embedding_dim, ch, 3, bias=True)
    blocks, upsample_convs = [], []
    for level in [len(mults) - 1] + list(reversed(range(len(mults)))):
      for _ in range(config.num_res_blocks):
        blocks.append(ResBlock(config, ch, config.filters * mults[level]))
        ch = config.filters * mults[level]
    for level in reversed(range(1, len(mults))):
      upsample_convs.append(conv(config.filters * mults[level], config.filters * mults[level], 3, bias=True))
    self.blocks = nn.ModuleList(blocks)
    self.upsample_convs = nn.ModuleList(upsample_convs)
    self.norm_out = GroupNorm(config.num_groups, ch, eps=config.norm_eps)
    self.conv_out = conv(ch, output_dim, 3, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if _cpu_inference(x) and not device_lib.hooked(self):
      workspace = _WORKSPACES.setdefault(self, _Workspace())
      if workspace.lock.acquire(blocking=False):  # another thread decoding with this module: buffers of its own
        try:
          return self._forward_channels_last(x, workspace)
        finally:
          workspace.lock.release()
      return self._forward_channels_last(x, _Workspace())
    x = self.conv_in(x)
    blocks, upsample_convs = iter(self.blocks), iter(self.upsample_convs)
    for _ in range(self.num_res_blocks):
      x = next(blocks)(x)
    for level in reversed(range(self.num_levels)):
      for _ in range(self.num_res_blocks):
        x = next(blocks)(x)
      if level > 0:
        x = next(upsample_convs)(upsample(x, 2))
    return self.conv_out(self.act(self.norm_out(x)))

  def _forward_channels_last(self, x: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
    """forward, channels_last from the first conv on (its output is channels_last too); the same ops in the same
    order, the same parameters. Measured (ImageNet-256 decoder, 2-core AVX-512 Xeon): benchmarks/RESULTS.md."""
    workspace.start(tuple(x.shape))
    x = self.conv_in(x.contiguous(memory_format=torch.channels_last))
    blocks, upsample_convs = iter(self.blocks), iter(self.upsample_convs)
    for _ in range(self.num_res_blocks):
      x = next(blocks)._forward_channels_last(x, workspace)
    for level in reversed(range(self.num_levels)):
      for _ in range(self.num_res_blocks):
        x = next(blocks)._forward_channels_last(x, workspace)
      if level > 0:
        b, c, h, w = x.shape
        x = next(upsample_convs)(_upsample_into(x, workspace.get((b, c, 2 * h, 2 * w))))
    x = self.conv_out(_group_norm_act_into(self.norm_out, self.act, x, workspace.get(x.shape)))
    workspace.finish()
    return x


def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
  """|z|^2 - 2 z.c + |c|^2 for flat z (N, E) and codebook (K, E), in the official order of operations.

  Call it in float32 with autocast off (the quantizer does): the closest distances differ by ~1e-4 at random init,
  so a bf16 matmul, or an algebraically equal form, could pick other codes.
  """
  return (z ** 2).sum(dim=1, keepdim=True) - 2 * (z @ codebook.t()) + (codebook ** 2).sum(dim=1)[None, :]


def entropy_loss(affinity: torch.Tensor, loss_type: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
  """Codebook-usage regulariser of the official trainer: per-sample entropy minus batch entropy."""
  flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = F.softmax(flat, dim=-1)
  log_probs = F.log_softmax(flat + 1e-5, dim=-1)
  if loss_type == "softmax":
    target = probs
  elif loss_type == "argmax":
    onehot = F.one_hot(flat.argmax(dim=-1), flat.shape[-1]).to(flat.dtype)
    target = probs - (probs - onehot).detach()  # straight-through
  else:
    raise ValueError(f"entropy loss type {loss_type!r} is not 'softmax' or 'argmax'")
  avg_probs = target.mean(dim=0)
  avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
  sample_entropy = -(target * log_probs).sum(dim=-1).mean()
  return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
  """Nearest codebook entry by squared Euclidean distance (official `VectorQuantizer`); argmin takes the first
  index on ties. With train=True (the official train mode) it also returns the quantizer losses and the
  straight-through value z + stop_grad(q - z)."""

  def __init__(self, config: TokenizerConfig, train: bool = False):
    super().__init__()
    self.config = config
    # The official `train` flag, fixed at construction as in flax: nn.Module.train() only toggles dropout-like
    # modes, and a trainer that wants the codebook rows themselves builds the quantizer with train=False.
    self.train_mode = train
    self.codebook = nn.Parameter(torch.empty(config.codebook_size, config.embedding_dim))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """x (..., E) -> (quantized (..., E) float32, {"encoding_indices": (...) int64, "raw": x, [losses]})."""
    tc = self.config
    flat = lambda: x.float().reshape(-1, x.shape[-1])
    # The argmin needs no gradient, so its (N, K) distances keep no autograd graph; the entropy term below, the
    # only differentiable use, computes its own after the latent losses.
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
      indices = squared_distances(flat(), self.codebook.float()).argmin(dim=1).reshape(x.shape[:-1])  # first on ties
    # one_hot(indices) @ codebook (official) is exactly the selected rows.
    quantized = self.decode_ids(indices)
    result = {}
    if self.train_mode:
      e_latent_loss = torch.mean((quantized.detach() - x) ** 2) * tc.commitment_cost
      q_latent_loss = torch.mean((quantized - x.detach()) ** 2)
      entropy = x.new_zeros(())
      if tc.entropy_loss_ratio != 0:
        with torch.autocast(device_type=x.device.type, enabled=False):
          distances = squared_distances(flat(), self.codebook.float())
          entropy = entropy_loss(-distances, tc.entropy_loss_type, tc.entropy_temperature) * tc.entropy_loss_ratio
      result = dict(quantizer_loss=e_latent_loss + q_latent_loss + entropy, e_latent_loss=e_latent_loss,
                    q_latent_loss=q_latent_loss, entropy_loss=entropy)
      quantized = x + (quantized - x).detach()  # straight-through estimator
    result.update(encoding_indices=indices, raw=x)
    return quantized, result

  def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids.long(), self.codebook.float())


def _nchw(x: torch.Tensor) -> torch.Tensor:
  # A plain permute would leave a channels_last-strided tensor, which convs propagate; torch's CPU channels_last
  # GroupNorm accumulates less accurately (measured 3.7e-5 vs 7e-6 max error on a 64px golden case), so copy.
  return x.permute(0, 3, 1, 2).contiguous()


class VQVAE(nn.Module):
  """The official VQGAN tokenizer. Methods take and return NHWC tensors; images are float32 in [0, 1]."""

  def __init__(self, config: MaskGITConfig, train: bool = False):
    super().__init__()
    self.config = config
    self.encoder = Encoder(config.tokenizer)
    self.decoder = Decoder(config.tokenizer, output_dim=3)
    self.quantizer = VectorQuantizer(config.tokenizer, train=train)
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
    """images (B, H, W, 3) -> (quantized (B, h, w, E), {"encoding_indices": (B, h, w) int64, "raw": (B, h, w, E),
    [quantizer losses when train=True]})."""
    return self.quantizer(self.encoder(_nchw(images)).permute(0, 2, 3, 1).float())

  def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
    return self.encode(images)[1]["encoding_indices"]

  def decode(self, quantized: torch.Tensor) -> torch.Tensor:
    """quantized (B, h, w, E) -> images (B, H, W, 3), unclipped."""
    # The channels_last path takes the NHWC latents as they are (a permuted view is channels_last) and returns
    # NHWC memory, so the final permute is a view there too.
    fast = _cpu_inference(quantized) and not device_lib.hooked(self.decoder)
    return self.decoder(quantized.permute(0, 3, 1, 2) if fast else _nchw(quantized)).permute(0, 2, 3, 1).float()

  def decode_from_indices(self, codes: torch.Tensor) -> torch.Tensor:
    return self.decode(self.quantizer.decode_ids(codes))

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """Reconstruction: decode(encode(images))."""
    return self.decode(self.encode(images)[0])
