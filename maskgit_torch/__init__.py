"""MaskGIT in PyTorch, numerically mirroring the official JAX/Flax code. Never imports jax or flax."""

from maskgit_torch.checkpoint import load_checkpoint, save_checkpoint
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer

__all__ = ["VQVAE", "Transformer", "load_checkpoint", "save_checkpoint"]
