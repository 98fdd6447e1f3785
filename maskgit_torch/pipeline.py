"""A trained MaskGIT ready to use: class-conditional generation, editing, encode/decode (PyTorch).

Mirrors `maskgit_jax/pipeline.py` name for name (docs/API.md, "Pipelines"). Images at the boundary are numpy NHWC
float32 in [0, 1]; codes are numpy int32 (B, h, h). Decoding is `sampler.decode_with_config`: the official parallel
decoder, plus the options the config's sampler section turns on.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import numpy as np
import torch

from configs import MaskGITConfig
from maskgit_common import decode_inputs
from maskgit_common.token_layout import token_layout
from maskgit_torch import checkpoint, sampler
from maskgit_torch import device as device_lib

PRECISIONS = ("parity", "fast")


class MaskGIT(decode_inputs.Generation):
  """A tokenizer + transformer pair of the config's family (maskgit_torch/families.py: the official VQVAE +
  Transformer, or the seed's taming VQModel + MaskTransformer) with the config that built them."""

  def __init__(self, config: MaskGITConfig, tokenizer: torch.nn.Module, transformer: torch.nn.Module | None,
               device: str | torch.device = "auto", precision: str = "parity", torch_compile: bool | str = False):
    if precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    self.config = config
    self.device = device_lib.resolve(device)
    self.precision = precision
    if precision == "fast" and self.device.type == "cpu" and not device_lib.native_cpu_bfloat16():
      warnings.warn("precision 'fast' (bfloat16) on this CPU is emulated (no AVX512-BF16 / AMX): measured 7-25x "
                    "slower than 'parity' here (benchmarks/RESULTS.md); use parity, optionally with torch_compile")
    # Master weights stay float32; "fast" runs the matmuls under bfloat16 autocast (norm statistics in float32).
    self.tokenizer = tokenizer.to(self.device).eval()
    self.transformer = transformer.to(self.device).eval() if transformer is not None else None
    # torch_compile (True or a torch.compile mode for the transformer, e.g. "max-autotune"): the transformer, the
    # sampler's step and the tokenizer decoder each become a compiled graph per batch shape (compiled on first use:
    # seconds on a GPU, 5-15 s per shape on a CPU). The step always compiles in the default mode: the decoder keeps
    # every step's outputs, which CUDA-graph replays ("reduce-overhead") would overwrite. Numerics: fused kernels
    # round differently from eager (~1e-7 on the logits), so parity checks use the eager default.
    self.torch_compile = torch_compile
    self._compiled = {}  # empty: the eager modules, looked up at each call
    if torch_compile:
      mode = None if torch_compile is True else str(torch_compile)
      if self.transformer is not None:
        self._compiled["transformer"] = torch.compile(self.transformer, mode=mode, dynamic=False)
      self._compiled["step"] = torch.compile(sampler.decode_step, dynamic=False)
      self._compiled["decode"] = torch.compile(self.tokenizer.decode_from_indices, dynamic=False)

  @classmethod
  def from_checkpoint(cls, path: str, overrides: Sequence[str] = (), device: str = "auto",
                      precision: str = "parity", torch_compile: bool | str = False) -> "MaskGIT":
    """Any checkpoint `conversion.read` accepts (our torch or JAX directory, the official files as released, ...).

    `overrides` ("sampler.num_iter=12", ...) apply to the loaded config; overriding a model field that changes a
    parameter shape fails with the list of mismatched parameters. A checkpoint without both models is a
    CheckpointError naming the missing one.
    """
    config, modules = checkpoint.load_checkpoint(path, overrides=overrides)
    return cls(config, modules["tokenizer"], modules["transformer"], device=device, precision=precision,
               torch_compile=torch_compile)

  # Small helpers --------------------------------------------------------------------------------------------------
  def _autocast(self):
    if self.precision == "fast":
      return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def _require_transformer(self) -> torch.nn.Module:
    if self.transformer is None:
      raise ValueError("this checkpoint holds only a tokenizer: generation and editing need a transformer")
    return self.transformer

  @torch.inference_mode()
  def tokens_to_logits(self, ids: torch.Tensor) -> torch.Tensor:
    """(N, S) ids -> float32 logits over the columns the decoder samples (the layout's sample width: official K)."""
    self._require_transformer()
    with self._autocast():
      logits = self._compiled.get("transformer", self.transformer)(ids)
    return logits[..., :token_layout(self.config).sample_width].float()

  def make_noise(self, seed: int):
    return sampler.GeneratorNoise(torch.Generator(device=self.device).manual_seed(int(seed)))

  # Public API ----------------------------------------------------------------------------------------------------
  @torch.inference_mode()
  def encode(self, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1] -> codes int32 (B, h, h)."""
    x = torch.as_tensor(decode_inputs.check_images(images, self.config.image_size), device=self.device)
    with self._autocast():
      codes = self.tokenizer.encode_to_indices(x)
    return codes.cpu().numpy().astype(np.int32)

  @torch.inference_mode()
  def decode_tokens(self, codes: np.ndarray) -> np.ndarray:
    """codes (B, h, h) -> images float32 (B, H, W, 3), unclipped (as the official decoder)."""
    codes = torch.as_tensor(np.asarray(codes, np.int64), device=self.device)
    with self._autocast():
      images = self._compiled.get("decode", self.tokenizer.decode_from_indices)(codes)
    return images.float().cpu().numpy()

  @torch.inference_mode()
  def decode_sequences(self, init_ids, noise, num_iter: int | None = None, start_iter: int | None = None):
    """Runs the configured decoder from (B, S) ids in the model's token layout (mask id = unknown) -> DecodeOutput."""
    init_ids = torch.as_tensor(init_ids, device=self.device).long()
    return sampler.decode_with_config(init_ids, self.tokens_to_logits, noise, self.config, num_iter=num_iter,
                                      start_iter=start_iter,
                                      step_fn=self._compiled.get("step", sampler.decode_step))

  @torch.inference_mode()
  def _images_from_output(self, out) -> tuple[np.ndarray, np.ndarray]:
    side = self.config.latent_size
    tokens = out.tokens.reshape(-1, side, side)
    with self._autocast():  # decoded where the tokens are; one copy to the host at the end
      images = self._compiled.get("decode", self.tokenizer.decode_from_indices)(tokens.long())
    return images.float().cpu().numpy(), tokens.cpu().numpy().astype(np.int32)


