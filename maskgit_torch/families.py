"""The model classes of each family (docs/ARCHITECTURE.md, "Model families"): the one place that maps
`tokenizer.arch` / `transformer.arch` to a module, so pipelines, trainers and checkpoints never branch on it.

  tokenizer.arch    maskgit -> tokenizer.VQVAE          taming -> taming.VQModel
  transformer.arch  maskgit -> transformer.Transformer  seed   -> seed_transformer.MaskTransformer
Every tokenizer offers encode_to_indices(images NHWC in [0, 1]) and decode_from_indices(codes); every transformer
maps (B, S) ids built with the token layout to logits. `maskgit_jax/families.py` is the same table.
"""

from torch import nn

from maskgit_torch.seed_transformer import MaskTransformer
from maskgit_torch.taming import VQModel
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer

TOKENIZERS = {"maskgit": VQVAE, "taming": VQModel}
TRANSFORMERS = {"maskgit": Transformer, "seed": MaskTransformer}


def model_class(config, which: str) -> type[nn.Module]:
  """The module class of `which` ("tokenizer" or "transformer") for the config's family."""
  if which == "tokenizer":
    return TOKENIZERS[config.tokenizer.arch]
  if which == "transformer":
    return TRANSFORMERS[config.transformer.arch]
  raise ValueError(f"which must be 'tokenizer' or 'transformer', got {which!r}")
