"""The config a checkpoint's shapes imply (official family), and the presets a part fits exactly.

Tokenizer: K and embedding_dim from the codebook, filters from the first conv, levels from the decoder convs,
num_res_blocks and channel_multipliers from the encoder ResBlocks. Transformer: layers, hidden size, heads (from the
query kernel), MLP size; S -> latent side -> image_size = side * f; V -> num_class = V - K - 1. What shapes cannot
tell (sampler, training) comes from the preset the model matches exactly, else the defaults.

The released ImageNet 256 and 512 tokenizers have identical shapes: only the transformer's position embeddings tell
the latent grid. A tokenizer alone that fits several presets is refused with the candidates named.
"""

from __future__ import annotations

import math
from typing import Mapping

from configs import PRESETS, ConfigError, MaskGITConfig, TokenizerConfig, TransformerConfig
from conversion.checks import check, check_config
from conversion.errors import PASS_CONFIG, ConversionError
from conversion.tables import DEFAULT_ARCH, TABLES
from conversion.tree import as_flat


def match_presets(part: str, flat: Mapping) -> list[str]:
  """The names of the presets whose `part` has exactly these keys and shapes."""
  return [name for name, make in PRESETS.items() if not check(make(), part, flat)]


def _fields(part: str, flat: Mapping) -> dict:
  return TABLES[(part, DEFAULT_ARCH)].fields(flat)


def _make(cls, fields: dict, what: str):
  try:
    return cls(**fields)
  except ConfigError as e:
    raise ConversionError(f"the {what} checkpoint implies an invalid config: {e}") from None


def _preset_for(part: str, flat: Mapping, alone: str) -> MaskGITConfig:
  """The one preset a lone part fits, or a ConversionError saying why the config cannot be told and what to pass."""
  names = match_presets(part, flat)
  if len(names) == 1:
    return PRESETS[names[0]]()
  if names:
    choices = " or ".join(f"--config {n}" for n in names)
    raise ConversionError(f"the {part}'s shapes fit the presets {', '.join(names)} alike ({alone}): pass {choices} "
                          f"(config= in Python), or give the transformer too")
  raise ConversionError(f"cannot infer a config from the {part} alone ({alone}); {PASS_CONFIG}")


def infer_config(tokenizer_tree: Mapping | None, transformer_tree: Mapping | None, num_class: int | None = None,
                 image_size: int | None = None) -> MaskGITConfig:
  """The MaskGITConfig implied by flax checkpoint shapes; every tree given is then checked against it."""
  tok = None if tokenizer_tree is None else as_flat(tokenizer_tree)
  tr = None if transformer_tree is None else as_flat(transformer_tree)
  trees = {k: v for k, v in (("tokenizer", tok), ("transformer", tr)) if v is not None}
  if tok is None:
    if tr is None:
      raise ConversionError("infer_config needs the tokenizer, the transformer or both")
    config = _preset_for("transformer", tr, "the codebook size K splits the vocabulary V = K + num_class + 1")
    check_config(config, trees)
    return config
  tokenizer = _make(TokenizerConfig, _fields("tokenizer", tok), "tokenizer")
  transformer = TransformerConfig()
  if tr is None:
    if num_class is None or image_size is None:
      config = _preset_for("tokenizer", tok, "one tokenizer serves every image size; only the transformer's "
                                             "position embeddings give the latent grid and its vocabulary the classes")
      check_config(config, trees)
      return config
  else:
    fields = _fields("transformer", tr)
    seq_len, vocab = fields.pop("seq_len"), fields.pop("vocab_size")
    transformer = _make(TransformerConfig, fields, "transformer")
    side = math.isqrt(seq_len - 1)
    if side * side != seq_len - 1:
      raise ConversionError(f"{seq_len} position embeddings is not 1 class token + a square of image tokens")
    implied = {"num_class": vocab - tokenizer.codebook_size - 1,
               "image_size": side * 2 ** (len(tokenizer.channel_multipliers) - 1)}
    for name, given in (("num_class", num_class), ("image_size", image_size)):
      if given is not None and given != implied[name]:
        raise ConversionError(f"{name}={given} was given but the checkpoints imply {name}={implied[name]}")
    num_class, image_size = implied["num_class"], implied["image_size"]
  try:
    config = MaskGITConfig(name="converted", image_size=image_size, num_class=num_class, tokenizer=tokenizer,
                           transformer=transformer)
  except ConfigError as e:
    raise ConversionError(f"the checkpoints imply an invalid config: {e}") from None
  for make in PRESETS.values():  # a released model gets its preset's name and sampler settings
    preset = make()
    if (preset.image_size, preset.num_class, preset.tokenizer, preset.transformer) == (
        config.image_size, config.num_class, config.tokenizer, config.transformer):
      config = preset
      break
  check_config(config, trees)
  return config
