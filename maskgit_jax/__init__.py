"""MaskGIT in JAX/Flax: the official parameter tree, numerics and decoder. Never imports torch."""

from maskgit_jax.checkpoint import load_checkpoint, save_checkpoint
from maskgit_jax.tokenizer import VQVAE
from maskgit_jax.transformer import Transformer

__all__ = ["VQVAE", "Transformer", "load_checkpoint", "save_checkpoint"]
