"""A trained MaskGIT ready to use: class-conditional generation, editing, encode/decode (JAX).

Mirrors `maskgit_torch/pipeline.py` name for name (docs/API.md, "Pipelines"). Images at the boundary are numpy NHWC
float32 in [0, 1]; codes are numpy int32 (B, h, h). Decoding is `sampler.decode_with_config`: the official parallel
decoder, plus the options the config's sampler section turns on. The transformer and the tokenizer are jitted once
per pipeline; the decode loop runs inside the sampler.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs import MaskGITConfig
from maskgit_common import decode_inputs
from maskgit_common.token_layout import token_layout
from maskgit_jax import checkpoint, families, sampler
from maskgit_jax import device as device_lib

PRECISIONS = ("parity", "fast")


class MaskGIT(decode_inputs.Generation):
  """A tokenizer + transformer pair (flax variables) of the config's family (maskgit_jax/families.py: the official
  VQVAE + Transformer, or the seed's taming VQModel + MaskTransformer) with the config that built them."""

  def __init__(self, config: MaskGITConfig, tokenizer_variables, transformer_variables, device: str = "auto",
               precision: str = "parity"):
    if precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # The weights are committed to the resolved device, so every computation on them runs there (or DeviceError).
    self.device = device_lib.resolve(device)
    self.config = config
    self.precision = precision
    # Master weights stay float32; "fast" computes in bfloat16 (flax modules' dtype), norms' statistics in float32.
    dtype = jnp.bfloat16 if precision == "fast" else jnp.float32
    self.tokenizer_variables = jax.device_put(tokenizer_variables, self.device)
    self.transformer_variables = (jax.device_put(transformer_variables, self.device)
                                  if transformer_variables is not None else None)
    # The config's family (families.model_class): the official VQVAE + Transformer, or the seed's taming VQModel +
    # MaskTransformer; both tokenizers take and give images on the [0, 1] scale, the layout says the rest.
    tokenizer_cls, transformer_cls = families.model_class(config, "tokenizer"), families.model_class(config,
                                                                                                     "transformer")
    tokenizer, transformer = tokenizer_cls(config, dtype=dtype), transformer_cls(config, dtype=dtype)
    k = token_layout(config).sample_width  # the columns the decoder samples (official: the K codes; seed: K + 1)
    self._logits = jax.jit(lambda v, ids: transformer.apply(v, ids)[..., :k].astype(jnp.float32))
    self._encode = jax.jit(lambda v, x: tokenizer.apply(v, x, method=tokenizer_cls.encode_to_indices))
    self._decode = jax.jit(lambda v, c: tokenizer.apply(v, c, method=tokenizer_cls.decode_from_indices).astype(
        jnp.float32))

    def decode_program(variables, init_ids, noise, num_iter, start_iter, model_config):
      logits_fn = lambda ids: transformer.apply(variables, ids)[..., :k].astype(jnp.float32)
      return sampler.decode_with_config(init_ids, logits_fn, noise, model_config, num_iter=num_iter,
                                        start_iter=start_iter)

    # The whole decode (every step, the noise draws, the bookkeeping) is one XLA program, as the official
    # p_generate_samples: one dispatch per call, no host round trip per step, compiled once per shape/config.
    self._decode_program = jax.jit(decode_program, static_argnums=(3, 4, 5))

  @classmethod
  def from_checkpoint(cls, path: str, overrides: Sequence[str] = (), device: str = "auto",
                      precision: str = "parity") -> "MaskGIT":
    """Any checkpoint `conversion.read` accepts (our JAX or torch directory, the official files as released, ...).

    `overrides` ("sampler.num_iter=12", ...) apply to the loaded config; overriding a model field that changes a
    parameter shape fails with the list of mismatched parameters. A checkpoint without both models is a
    CheckpointError naming the missing one.
    """
    config, variables = checkpoint.load_checkpoint(path, overrides=overrides)
    return cls(config, variables["tokenizer"], variables["transformer"], device=device, precision=precision)

  # Small helpers --------------------------------------------------------------------------------------------------
  def _require_transformer(self):
    if self.transformer_variables is None:
      raise ValueError("this checkpoint holds only a tokenizer: generation and editing need a transformer")
    return self.transformer_variables

  def tokens_to_logits(self, ids: jax.Array) -> jax.Array:
    """(N, S) ids -> float32 logits over the columns the decoder samples (the layout's sample width: official K)."""
    return self._logits(self._require_transformer(), ids)

  def make_noise(self, seed: int):
    return sampler.PRNGNoise(jax.random.PRNGKey(int(seed)))

  # Public API ----------------------------------------------------------------------------------------------------
  def encode(self, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1] -> codes int32 (B, h, h)."""
    images = decode_inputs.check_images(images, self.config.image_size)
    return np.asarray(self._encode(self.tokenizer_variables, jnp.asarray(images)), np.int32)

  def decode_tokens(self, codes: np.ndarray) -> np.ndarray:
    """codes (B, h, h) -> images float32 (B, H, W, 3), unclipped (as the official decoder)."""
    return np.asarray(self._decode(self.tokenizer_variables, jnp.asarray(codes, jnp.int32)))

  def decode_sequences(self, init_ids, noise, num_iter: int | None = None, start_iter: int | None = None):
    """Runs the configured decoder from (B, S) ids in the model's token layout (mask id = unknown) -> DecodeOutput."""
    variables = self._require_transformer()
    init_ids = jnp.asarray(init_ids, jnp.int32)  # built on the host: one transfer
    if isinstance(noise, (sampler.PRNGNoise, sampler.RecordedNoise)):  # array pytrees: the whole decode is jitted
      return self._decode_program(variables, init_ids, noise, num_iter, start_iter, self.config)
    # Any other provider (e.g. one drawing from host state) runs the same decoder outside jit.
    return sampler.decode_with_config(init_ids, self.tokens_to_logits, noise, self.config, num_iter=num_iter,
                                      start_iter=start_iter)

  def _images_from_output(self, out) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(out.tokens).reshape(-1, self.config.latent_size, self.config.latent_size).astype(np.int32)
    return self.decode_tokens(tokens), tokens
