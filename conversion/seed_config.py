"""The seed's own names <-> this project's config, the config the seed's files imply, and the check of files
against a config (every problem in one list).

The seed describes its models in two places: the VQGAN in taming's model.yaml (`model.params`: embed_dim,
n_embed, ddconfig{ch, ch_mult, ...}) and the transformer in `MaskTransformer(img_size, hidden_dim, codebook_size,
f_factor, depth, heads, mlp_dim, dropout, nclass)` arguments, which its Trainer hard-codes per `--vit-size`. The
state_dict shapes give all of them but the number of heads and the dropout rate; those default to the seed's
(16 heads for every `--vit-size`, dropout 0.1) unless a config is given. Numpy only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import numpy as np

from configs import ConfigError, DataConfig, MaskGITConfig, TokenizerConfig, TransformerConfig
from configs import presets
from conversion.checks import message
from conversion.tables import seed as seed_table
from conversion.errors import ConversionError

SEED_HEADS = 16  # Trainer/vit.py get_network("vit"): heads=16 for "base", "big" and "huge"
SEED_DROPOUT = 0.1
# model.yaml keys taming's VQModel/Encoder/Decoder accept, and the values this implementation requires of the
# keys that would change the architecture (anything else in the yaml is an error: nothing is ignored unseen).
_PARAMS_FIXED = {"remap": None, "colorize_nlabels": None}
_PARAMS_FREE = {"embed_dim", "n_embed", "ddconfig", "lossconfig", "ckpt_path", "ignore_keys", "image_key",
                "monitor", "sane_index_shape"}
_DDCONFIG_FIXED = {"double_z": False, "resamp_with_conv": True, "give_pre_end": False}
_DDCONFIG_REQUIRED = ("z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                      "attn_resolutions")


# model.yaml <-> TokenizerConfig ------------------------------------------------------------------------------------
def tokenizer_from_taming(params: Mapping, source: str = "model.yaml") -> TokenizerConfig:
  """taming `model.params` -> TokenizerConfig(arch="taming"); every unsupported or missing key in one error."""
  dd = params.get("ddconfig")
  problems = [f"model.params.{k}: unknown key" for k in params if k not in _PARAMS_FREE | set(_PARAMS_FIXED)]
  problems += [f"model.params.{k}: must be {v!r} (got {params[k]!r})" for k, v in _PARAMS_FIXED.items()
               if params.get(k, v) != v]
  problems += [f"model.params.{k}: missing" for k in ("embed_dim", "n_embed") if k not in params]
  if not isinstance(dd, Mapping):
    problems.append("model.params.ddconfig: missing")
  else:
    known = set(_DDCONFIG_REQUIRED) | set(_DDCONFIG_FIXED) | {"dropout"}
    problems += [f"model.params.ddconfig.{k}: unknown key" for k in dd if k not in known]
    problems += [f"model.params.ddconfig.{k}: missing" for k in _DDCONFIG_REQUIRED if k not in dd]
    problems += [f"model.params.ddconfig.{k}: only {v!r} builds a VQModel this project implements (got {dd[k]!r})"
                 for k, v in _DDCONFIG_FIXED.items() if k in dd and dd[k] != v]
  if problems:
    raise ConversionError(f"{source}: not a supported taming VQGAN config:\n  " + "\n  ".join(problems))
  try:
    return TokenizerConfig(
        arch="taming", filters=dd["ch"], channel_multipliers=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"], embedding_dim=params["embed_dim"], codebook_size=params["n_embed"],
        z_channels=dd["z_channels"], resolution=dd["resolution"], attn_resolutions=tuple(dd["attn_resolutions"]),
        dropout_rate=float(dd.get("dropout", 0.0)), in_channels=dd["in_channels"], out_channels=dd["out_ch"])
  except (ConfigError, TypeError) as e:
    raise ConversionError(f"{source}: the VQGAN config is invalid here: {e} (taming names: ch -> filters, "
                          f"ch_mult -> channel_multipliers, embed_dim -> embedding_dim, n_embed -> codebook_size, "
                          f"out_ch -> out_channels)") from None


def taming_params(tok: TokenizerConfig) -> dict:
  """TokenizerConfig -> taming `model.params` (without lossconfig), as VQModel(**params) takes them."""
  return {"embed_dim": tok.embedding_dim, "n_embed": tok.codebook_size,
          "ddconfig": {"double_z": False, "z_channels": tok.z_channels, "resolution": tok.resolution,
                       "in_channels": tok.in_channels, "out_ch": tok.out_channels, "ch": tok.filters,
                       "ch_mult": list(tok.channel_multipliers), "num_res_blocks": tok.num_res_blocks,
                       "attn_resolutions": list(tok.attn_resolutions), "dropout": tok.dropout_rate}}


# MaskTransformer arguments <-> TransformerConfig -----------------------------------------------------------------
def transformer_kwargs(config: MaskGITConfig) -> dict:
  """The seed's `MaskTransformer(**kwargs)` for this config (f_factor is the latent side h, not f)."""
  tr = config.transformer
  return {"img_size": config.image_size, "hidden_dim": tr.num_embeds, "codebook_size": config.codebook_size,
          "f_factor": config.latent_size, "depth": tr.num_layers, "heads": tr.num_heads,
          "mlp_dim": tr.intermediate_size, "dropout": tr.dropout_rate, "nclass": config.num_class}


def config_from_seed(vqgan_params: Mapping, maskgit: Mapping | None = None, name: str = "seed",
                     like: MaskGITConfig | None = None, source: str = "") -> MaskGITConfig:
  """A MaskGITConfig from taming `model.params` and (optionally) MaskTransformer's arguments.

  Sampler and training settings come from `like`, else from the seed preset (the seed's recipe). A model that is
  exactly a seed preset's architecture gets that preset (its name and sampling settings).
  """
  tokenizer = tokenizer_from_taming(vqgan_params, source or "model.yaml")
  base = like if like is not None else presets.seed_imagenet_256().replace(data=DataConfig())
  if maskgit is None:
    transformer = base.transformer if base.transformer.arch == "seed" else TransformerConfig(arch="seed")
    image_size, num_class = base.image_size, base.num_class
  else:
    image_size, num_class = maskgit["img_size"], maskgit["nclass"]
    problems = []
    if maskgit.get("codebook_size", tokenizer.codebook_size) != tokenizer.codebook_size:
      problems.append(f"codebook_size={maskgit['codebook_size']} but the VQGAN has n_embed={tokenizer.codebook_size}")
    side = image_size // tokenizer.downsample_factor
    if maskgit.get("f_factor", side) != side:
      problems.append(f"f_factor={maskgit['f_factor']} (the latent side) but img_size {image_size} / "
                      f"f {tokenizer.downsample_factor} = {side}")
    if problems:
      raise ConversionError(f"{source or 'MaskTransformer arguments'}: " + "; ".join(problems))
    transformer = TransformerConfig(
        arch="seed", num_layers=maskgit["depth"], num_embeds=maskgit["hidden_dim"], num_heads=maskgit["heads"],
        intermediate_size=maskgit["mlp_dim"], dropout_rate=float(maskgit["dropout"]))
  try:
    config = base.replace(name=name, image_size=image_size, num_class=num_class, tokenizer=tokenizer,
                          transformer=transformer)
  except ConfigError as e:
    raise ConversionError(f"{source or 'the seed files'} imply an invalid config: {e}") from None
  for make in (presets.seed_imagenet_256, presets.seed_imagenet_512):
    preset = make()
    if like is None and _architecture(preset) == _architecture(config):
      return preset
  return config


def _architecture(config: MaskGITConfig) -> tuple:
  return config.image_size, config.num_class, config.tokenizer, config.transformer


def implied_maskgit(state: Mapping, tokenizer: TokenizerConfig, heads: int = SEED_HEADS,
                    dropout: float = SEED_DROPOUT, source: str = "") -> dict:
  """MaskTransformer's arguments implied by a state_dict's shapes (heads and dropout are not in them)."""
  where = f"{source}: " if source else ""
  need = ("tok_emb.weight", "pos_emb", "first_layer.0.weight")
  missing = [k for k in need if k not in state]
  depth = len({int(m.group(1)) for k in state for m in [re.match(r"transformer\.layers\.(\d+)\.", k)] if m})
  if missing or depth == 0 or "transformer.layers.0.1.fn.net.0.weight" not in state:
    raise ConversionError(f"{where}cannot infer the transformer: no {missing or ['transformer.layers.0.*']}")
  vocab, hidden = np.shape(state["tok_emb.weight"])
  seq_len = np.shape(state["pos_emb"])[1]
  side = math.isqrt(seq_len - 1)
  nclass = vocab - tokenizer.codebook_size - 2
  if side * side != seq_len - 1 or nclass < 1:
    raise ConversionError(f"{where}pos_emb has {seq_len} positions and tok_emb {vocab} rows: not 1 class token + "
                          f"a square of image tokens with K={tokenizer.codebook_size} codes + mask + classes + null")
  return {"img_size": side * tokenizer.downsample_factor, "hidden_dim": int(hidden),
          "codebook_size": tokenizer.codebook_size, "f_factor": side, "depth": depth, "heads": heads,
          "mlp_dim": int(np.shape(state["transformer.layers.0.1.fn.net.0.weight"])[0]), "dropout": dropout,
          "nclass": int(nclass)}


# Checks ------------------------------------------------------------------------------------------------------------
def field_differences(config: MaskGITConfig, implied: MaskGITConfig) -> list[str]:
  """The architecture fields (image_size, num_class, tokenizer.*, transformer.*) where the files differ."""
  differences = [f"{name}: the config has {getattr(config, name)!r}, the files imply {getattr(implied, name)!r}"
                 for name in ("image_size", "num_class") if getattr(config, name) != getattr(implied, name)]
  for section in ("tokenizer", "transformer"):
    ours, theirs = dataclasses.asdict(getattr(config, section)), dataclasses.asdict(getattr(implied, section))
    differences += [f"{section}.{k}: the config has {ours[k]!r}, the files imply {theirs[k]!r}"
                    for k in ours if ours[k] != theirs[k]]
  return differences


def check_files(config: MaskGITConfig, states: Mapping[str, Mapping], sources: Mapping[str, str],
                implied: MaskGITConfig | None = None) -> None:
  """Raises one ConversionError listing the config fields the files imply differently (when known) and every
  key problem of every state_dict ({"transformer": ..., "tokenizer": ...})."""
  sections = []
  if implied is not None:
    differences = field_differences(config, implied)
    if differences:
      sections.append("config fields differ from the files:\n  " + "\n  ".join(differences))
  for which, state in states.items():
    if state is None:
      continue
    arch = getattr(config, which).arch
    if arch != seed_table.ARCHS[which]:
      sections.append(f"{which}.arch: the config has {arch!r}; {sources.get(which, 'the files')} hold the seed "
                      f"family's {seed_table.ARCHS[which]!r}")
      continue
    problem = message(config, which, state, "torch", sources.get(which, ""))
    if problem:
      sections.append(problem)
  if sections:
    raise ConversionError("\n".join(sections))
