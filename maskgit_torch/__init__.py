"""MaskGIT in PyTorch, numerically mirroring the official JAX/Flax code. Never imports jax or flax.

The same public names as `maskgit_jax` (docs/ARCHITECTURE.md, "Mirrored backends").
"""

from maskgit_torch.checkpoint import load_checkpoint, save_checkpoint
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer

__all__ = ["Transformer", "VQVAE", "load_checkpoint", "save_checkpoint"]
