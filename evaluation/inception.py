"""The FID Inception-v3 feature extractor, written out in torch (no torchvision).

The only module of `evaluation` that imports torch; `import evaluation` and the metrics stay framework-free.

This is the network of the TensorFlow `inception-2015-12-05` graph that TTUR's FID, improved-gan's Inception Score
and the ADM evaluator use, in the layout of pytorch-fid's port (`pt_inception-2015-12-05-6726825d.pth`): module
names follow torchvision's `Inception3(num_classes=1008, aux_logits=False)` so that state dict loads as is. It
differs from torchvision's ImageNet Inception-v3 in the ways the TF graph does (pytorch-fid `inception.py` patches
the same places):
- 1008 output classes;
- the 3x3 average pools inside the A, C and first E blocks ignore the zero padding (TF `avg_pool` semantics);
- the last E block (Mixed_7c) pools its fourth branch with a 3x3 max pool instead of an average pool.
Input handling follows pytorch-fid: images in [0, 1], resized to 299x299 bilinearly (align_corners=False, no
antialiasing), then mapped to [-1, 1].

Outputs: the 2048-d pool features (FID, precision/recall) and the 1008 logits of the final layer *without* its bias:
improved-gan and ADM compute the Inception Score from `pool3 @ W` of `softmax/logits/MatMul`, the bias left out.

Weights come only from a file the user names (no network); its sha256 must be one of `KNOWN_WEIGHTS`, so a wrong
file fails loudly instead of giving a silently wrong number. It is read with `torch.load(weights_only=True)`.
Without a file, `build_extractor(None)` gives the network with seeded random weights, flagged `random_init` in every
report (tests and pipeline demos only). Written out by hand because pytorch-fid, torch-fidelity and torchmetrics all
need torchvision, which cannot be installed beside this project's CPU torch (docs/EVAL.md).
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.features import FeatureExtractor
from maskgit_common.errors import UserError
from maskgit_common.fileio import sha256_file
from maskgit_torch import device as device_lib

# sha256 of accepted weight files. pytorch-fid's release file; torch-fidelity ships the same bytes under the name
# weights-inception-2015-12-05-6726825d.pth (the "6726825d" in both names is this hash's prefix).
KNOWN_WEIGHTS = {
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2":
        "pytorch-fid pt_inception-2015-12-05-6726825d.pth (95,628,359 bytes), TF inception-2015-12-05 ported",
}
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class InceptionWeightsError(UserError, ValueError):
  """The Inception weights file is missing, unknown (hash mismatch) or does not fit the architecture."""


# Network ---------------------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, the TF graph's) -> ReLU."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
  # TF's 3x3/1 SAME average pool divides by the number of real (unpadded) pixels.
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
  """35x35 block: 1x1, 1x1->5x5, 1x1->3x3->3x3 and pool->1x1 branches."""

  def __init__(self, in_channels, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 64, 1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

  def forward(self, x):
    a = self.branch1x1(x)
    b = self.branch5x5_2(self.branch5x5_1(x))
    c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    d = self.branch_pool(_tf_avg_pool(x))
    return torch.cat([a, b, c, d], dim=1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def forward(self, x):
    a = self.branch3x3(x)
    b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    c = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([a, b, c], dim=1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

  def __init__(self, in_channels, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, 1)

  def forward(self, x):
    a = self.branch1x1(x)
    b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    c = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      c = layer(c)
    d = self.branch_pool(_tf_avg_pool(x))
    return torch.cat([a, b, c, d], dim=1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def forward(self, x):
    a = self.branch3x3_2(self.branch3x3_1(x))
    b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    c = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([a, b, c], dim=1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 outputs. `max_pool`: the FID graph's last block pools with max, not average."""

  def __init__(self, in_channels, max_pool=False):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_channels, 320, 1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, 1)

  def forward(self, x):
    a = self.branch1x1(x)
    b = self.branch3x3_1(x)
    b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
    c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
    # Official graph quirk (mixed_10 pools with max), reproduced as pytorch-fid does.
    pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
    d = self.branch_pool(pooled)
    return torch.cat([a, b, c, d], dim=1)


class FIDInceptionV3(nn.Module):
  """Images (N, 3, H, W) in [0, 1] -> (pool features (N, 2048), bias-free logits (N, 1008))."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b = InceptionA(192, pool_features=32)
    self.Mixed_5c = InceptionA(256, pool_features=64)
    self.Mixed_5d = InceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, channels_7x7=128)
    self.Mixed_6c = InceptionC(768, channels_7x7=160)
    self.Mixed_6d = InceptionC(768, channels_7x7=160)
    self.Mixed_6e = InceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280)
    self.Mixed_7c = InceptionE(2048, max_pool=True)
    self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

  def forward(self, images):
    x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    x = 2.0 * x - 1.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 64 x 147 x 147
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 192 x 71 x 71
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)  # ends at 2048 x 8 x 8
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
    logits = pool @ self.fc.weight.t()  # no bias: the Inception Score convention (improved-gan, ADM)
    return pool, logits


# Weights ---------------------------------------------------------------------------------------------------------
def _check_state_dict(model: nn.Module, state, path: str) -> dict:
  """The state dict without BatchNorm counters; raises listing every missing, unexpected and mis-shaped key."""
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise InceptionWeightsError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
  # num_batches_tracked is a training counter, present or not depending on the torch that saved the file.
  state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
                     for k in set(state) & set(expected) if state[k].shape != expected[k])
  if missing or unexpected or misshaped:
    def show(items):
      return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "") if items else "none"
    raise InceptionWeightsError(
        f"{path} does not fit the FID Inception-v3 (pytorch-fid layout): missing {show(missing)}; "
        f"unexpected {show(unexpected)}; mis-shaped {show(misshaped)}")
  return state


def check_weights_file(path: str) -> str:
  """The sha256 of `path`; raises InceptionWeightsError when the file is missing or not a known FID weights file."""
  if not path or not os.path.isfile(path):
    raise InceptionWeightsError(
        f"Inception weights file {path!r} not found. Download {WEIGHTS_FILE} from {WEIGHTS_URL} and pass its "
        "path (see docs/EVAL.md).")
  digest = sha256_file(path)
  if digest not in KNOWN_WEIGHTS:
    known = "; ".join(f"{h} ({name})" for h, name in KNOWN_WEIGHTS.items())
    raise InceptionWeightsError(
        f"{path}: sha256 {digest} matches no known FID Inception weights (hash mismatch; expected {known}). "
        "Other weights give numbers that cannot be compared with published ones, so they are refused.")
  return digest


def load_inception(path: str, device="cpu") -> tuple[FIDInceptionV3, str]:
  """(the FID Inception from `path`, its sha256); refused unless the sha256 is in KNOWN_WEIGHTS."""
  digest = check_weights_file(path)
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # not a torch file, or a pickle with code in it
    raise InceptionWeightsError(f"{path}: cannot read it as a torch state dict (weights_only=True): {e}") from None
  model = FIDInceptionV3()
  model.load_state_dict(_check_state_dict(model, state, path), strict=False)
  return model.eval().requires_grad_(False).to(device), digest


def random_inception(seed: int = 0, device="cpu") -> FIDInceptionV3:
  """The same network with seeded random weights: for tests and pipeline demos only, never for reported numbers.

  He-normal convolutions behind identity BatchNorms keep activations O(1) through the ~50 layers (torch's default
  init shrinks them by orders of magnitude), so the features still separate different images.
  """
  model = FIDInceptionV3()
  generator = torch.Generator().manual_seed(int(seed))
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
      elif isinstance(module, nn.Linear):
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(FEATURE_DIM))
        module.bias.zero_()
  return model.eval().requires_grad_(False).to(device)


# Extractor -------------------------------------------------------------------------------------------------------
def resolve_device(device="auto") -> torch.device:
  return device_lib.resolve("auto" if device is None else device)


@contextlib.contextmanager
def _exact_float32():
  """TF32 off for the features (as the parity precision mode), restored afterwards: callers' flags are theirs."""
  matmul = torch.backends.cuda.matmul.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = False
  try:
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
      yield
  finally:
    torch.backends.cuda.matmul.allow_tf32 = matmul


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images, batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images (N, H, W, 3) -> (pool (N, 2048), logits (N, 1008)) float32 numpy, `batch_size` at a time.

  Images are read as pytorch-fid reads a PNG: uint8 / 255. On one device and with one batch size, the same images
  always give bitwise the same features.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"the Inception extractor takes uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
  device = next(model.parameters()).device
  pools = [np.zeros((0, FEATURE_DIM), np.float32)]
  logits = [np.zeros((0, NUM_LOGITS), np.float32)]
  with _exact_float32():
    for start in range(0, images.shape[0], batch_size):
      batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
      pool, logit = model(batch.permute(0, 3, 1, 2).float() / 255.0)
      pools.append(pool.float().cpu().numpy())
      logits.append(logit.float().cpu().numpy())
  return np.concatenate(pools), np.concatenate(logits)


def build_extractor(weights_path: str | None = None, device="auto", batch_size: int = 50,
                    seed: int = 0) -> FeatureExtractor:
  """The extractor `evaluation.evaluate` calls: the real FID Inception from `weights_path` (hash-checked), or,
  when no path is given, a seeded RANDOM-INIT network flagged as such in every report."""
  device = resolve_device(device)
  if weights_path:
    model, digest = load_inception(weights_path, device)
    return FeatureExtractor(
        fn=lambda images: inception_features(model, images, batch_size), id=f"fid-inception-sha256-{digest}",
        description=f"FID Inception-v3 ({KNOWN_WEIGHTS[digest]}), sha256 {digest}", random_init=False)
  model = random_inception(seed, device)
  return FeatureExtractor(
      fn=lambda images: inception_features(model, images, batch_size),
      id=f"random-init-inception-seed{int(seed)}-torch{torch.__version__}",
      description=(f"RANDOM-INIT Inception-v3 (seed {int(seed)}, torch {torch.__version__}): NOT the FID weights; "
                   "numbers only compare runs made with this same extractor"),
      random_init=True)
