"""MaskGIT in JAX/Flax: the official parameter tree and numerics. Never imports torch.

The same public names as `maskgit_torch` (docs/ARCHITECTURE.md, "Mirrored backends").
"""

from maskgit_jax.checkpoint import load_checkpoint, save_checkpoint
from maskgit_jax.tokenizer import VQVAE
from maskgit_jax.transformer import Transformer

__all__ = ["Transformer", "VQVAE", "load_checkpoint", "save_checkpoint"]
