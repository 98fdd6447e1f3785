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
from maskgit_common import editing
from maskgit_torch import checkpoint, sampler
from maskgit_torch import device as device_lib
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer

PRECISIONS = ("parity", "fast")


class MaskGIT:
  """A tokenizer + transformer pair with the config that built them."""

  def __init__(self, config: MaskGITConfig, tokenizer: VQVAE, transformer: Transformer | None,
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
  def class_names(self, labels: Sequence[int]) -> list[str]:
    names = self.config.data.class_names
    return [names[int(l)] if int(l) < len(names) else str(int(l)) for l in labels]

  def _autocast(self):
    if self.precision == "fast":
      return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def _require_transformer(self) -> Transformer:
    if self.transformer is None:
      raise ValueError("this checkpoint holds only a tokenizer: generation and editing need a transformer")
    return self.transformer

  @torch.inference_mode()
  def tokens_to_logits(self, ids: torch.Tensor) -> torch.Tensor:
    """(N, S) ids -> (N, S, K) float32 logits over the image codes (the official slice of the vocabulary)."""
    self._require_transformer()
    with self._autocast():
      logits = self._compiled.get("transformer", self.transformer)(ids)
    return logits[..., :self.config.codebook_size].float()

  def make_noise(self, seed: int):
    return sampler.GeneratorNoise(torch.Generator(device=self.device).manual_seed(int(seed)))

  def class_tokens(self, labels: Sequence[int]) -> torch.Tensor:
    labels = np.asarray(labels, np.int64).reshape(-1)
    bad = labels[(labels < 0) | (labels >= self.config.num_class)]
    if bad.size:
      raise ValueError(f"class labels must lie in [0, {self.config.num_class}), got {bad.tolist()}")
    return torch.as_tensor(labels + self.config.codebook_size, device=self.device)

  # Public API ----------------------------------------------------------------------------------------------------
  @torch.inference_mode()
  def encode(self, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1] -> codes int32 (B, h, h)."""
    images = _check_images(images, self.config.image_size)
    x = torch.as_tensor(images, device=self.device)
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
  def decode_sequences(self, init_ids: torch.Tensor, noise, num_iter: int | None = None,
                       start_iter: int | None = None):
    """Runs the configured decoder from (B, S) ids (-1 = unknown) -> DecodeOutput."""
    return sampler.decode_with_config(init_ids, self.tokens_to_logits, noise, self.config.sampler,
                                      num_iter=num_iter, start_iter=start_iter,
                                      step_fn=self._compiled.get("step", sampler.decode_step))

  @torch.inference_mode()
  def _images_from_output(self, out) -> tuple[np.ndarray, np.ndarray]:
    side = self.config.latent_size
    tokens = out.final_seqs[:, -1, 1:].reshape(-1, side, side)
    with self._autocast():  # decoded where the tokens are; one copy to the host at the end
      images = self._compiled.get("decode", self.tokenizer.decode_from_indices)(tokens.long())
    return images.float().cpu().numpy(), tokens.cpu().numpy().astype(np.int32)

  def generate(self, labels: Sequence[int], seed: int = 0, num_iter: int | None = None, noise=None,
               return_output: bool = False):
    """Class-conditional samples -> (images (B, H, W, 3), tokens (B, h, h)) [, DecodeOutput]."""
    class_tokens = self.class_tokens(labels)
    init_ids = torch.full((len(class_tokens), self.config.seq_len), self.config.mask_token_id, dtype=torch.int64,
                          device=self.device)
    init_ids[:, 0] = class_tokens
    out = self.decode_sequences(init_ids, noise if noise is not None else self.make_noise(seed), num_iter)
    images, tokens = self._images_from_output(out)
    return (images, tokens, out) if return_output else (images, tokens)

  def edit(self, images: np.ndarray, latent_mask: np.ndarray, labels: Sequence[int], seed: int = 0,
           num_iter: int | None = None, start_iter: int | None = None, noise=None, return_output: bool = False):
    """Regenerates the tokens where `latent_mask` (h, h) or (B, h, h) is 1, conditioned on `labels`.

    Tokens outside the mask are kept exactly (the decoder never re-masks known tokens). The decoder starts at
    `start_iter` (default `config.sampler.edit_start_iter`, as the official editing demo). Returns the decoded
    images (to be blended into the originals with `maskgit_common.editing`) and the tokens.
    """
    codes = self.encode(images)
    init_ids = editing.edit_input_tokens(codes, latent_mask, labels, self.config)
    self.class_tokens(labels)  # validates the labels
    init_ids = torch.as_tensor(np.asarray(init_ids, np.int64), device=self.device)
    start_iter = self.config.sampler.edit_start_iter if start_iter is None else start_iter
    out = self.decode_sequences(init_ids, noise if noise is not None else self.make_noise(seed), num_iter,
                                start_iter)
    edited, tokens = self._images_from_output(out)
    return (edited, tokens, out) if return_output else (edited, tokens)


def _check_images(images: np.ndarray, size: int) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise ValueError(f"expected images of shape (B, {size}, {size}, 3) in [0, 1] for this model, got "
                     f"{images.shape}; resize them first (maskgit_common.images.load_image(path, size))")
  return images
