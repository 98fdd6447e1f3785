"""One typed config schema for both backends: `MaskGITConfig`, the whole config (its sections are
configs/sections.py).

Every config is a frozen dataclass, validated on construction; an invalid value raises `ConfigError` naming the
dotted field and what is allowed. The same object is passed whole to the JAX and the PyTorch modules, and stored as
`config.json` beside every checkpoint (`save` / `load`). Field names follow the official MaskGIT configs where one
exists (google-research/maskgit `configs/*.py`), so `MaskGITConfig.from_official` maps them one to one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Mapping, Sequence

from configs import recipes
from configs.sections import (ConfigError, DataConfig, SamplerConfig, TokenizerConfig, TrainConfig,
                              TransformerConfig, _check, _check_int)
from maskgit_common import fileio, token_layout

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MaskGITConfig:
  """The whole model: tokenizer + transformer + how to sample, train and read data.

  Derived sizes (FORMAT.md notation): f = downsample_factor, h = latent_size, L = num_tokens = h*h,
  S = seq_len = L + 1 (with the class token), K = codebook_size, V = vocab_size = rows of the token embedding:
  K + num_class + 1 (official) or K + 1 + num_class + 1 (seed: a mask row and a null-class row of their own).
  Where the class token sits and the special ids are the token layout's (maskgit_common/token_layout.py).
  """
  name: str = "custom"
  image_size: int = 256
  num_class: int = 1000
  tokenizer: TokenizerConfig = TokenizerConfig()
  transformer: TransformerConfig = TransformerConfig()
  sampler: SamplerConfig = SamplerConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    _check(isinstance(self.name, str), "name", "must be a string")
    _check_int(self.image_size, "image_size", 1)
    _check_int(self.num_class, "num_class", 1)
    for section in ("tokenizer", "transformer", "sampler", "train", "data"):
      getattr(self, section).validate(section)
    _check(not self.data.class_names or len(self.data.class_names) == self.num_class, "data.class_names",
           f"must be empty or name all num_class={self.num_class} classes, got {len(self.data.class_names)}")
    f = self.tokenizer.downsample_factor
    _check(self.image_size % f == 0, "image_size",
           f"must be a multiple of the tokenizer's downsampling factor {f} "
           f"(2 ** (len(tokenizer.channel_multipliers) - 1)), got {self.image_size}")

  # Derived sizes -------------------------------------------------------------------------------------------------
  @property
  def downsample_factor(self) -> int:
    return self.tokenizer.downsample_factor

  @property
  def latent_size(self) -> int:
    return self.image_size // self.downsample_factor

  @property
  def num_tokens(self) -> int:
    return self.latent_size ** 2

  @property
  def seq_len(self) -> int:
    return self.num_tokens + 1

  @property
  def codebook_size(self) -> int:
    return self.tokenizer.codebook_size

  @property
  def vocab_size(self) -> int:
    extra = 2 if self.transformer.arch == "seed" else 1  # seed: the mask id K has its own row
    return self.codebook_size + self.num_class + extra

  @property
  def mask_token_id(self) -> int:
    """The id of an unknown image token in the transformer input: -1 (official) or K (seed)."""
    return token_layout.token_layout(self).mask_id

  # Copies, overrides and JSON ------------------------------------------------------------------------------------
  def replace(self, **changes) -> "MaskGITConfig":
    return dataclasses.replace(self, **changes)

  def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> "MaskGITConfig":
    """Applies dotted overrides, e.g. ["transformer.num_layers=4", "sampler.mask_schedule=arccos"].

    Values are parsed as JSON where possible ("4", "true", "[1, 2]"), else taken as strings.
    """
    data = self.to_dict()
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [_split_override(o) for o in overrides]
    items = [(key, _parse_value(value) if isinstance(value, str) else value) for key, value in items]
    recipe = recipes.recipe_of(items)
    if recipe is not None:  # a recipe first sets every recipe field; the other overrides apply on top
      recipes.apply(data, recipe)
    for key, value in items:
      node = data
      parts = key.split(".")
      for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
          raise ConfigError(f"{key}: unknown config section {part!r}; sections: "
                            f"{sorted(k for k, v in data.items() if isinstance(v, dict))}")
        node = node[part]
      if parts[-1] not in node:
        raise ConfigError(f"{key}: unknown field {parts[-1]!r}; fields here: {sorted(node)}")
      node[parts[-1]] = value
    return MaskGITConfig.from_dict(data)

  def to_dict(self) -> dict:
    data = dataclasses.asdict(self)
    data["schema_version"] = SCHEMA_VERSION
    return data

  def to_json(self) -> str:
    return json.dumps(_jsonable(self.to_dict()), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "MaskGITConfig":
    data = dict(data)
    version = data.pop("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
      raise ConfigError(f"schema_version: this code reads version {SCHEMA_VERSION}, got {version!r}")
    recipe = data.get("train", {}).get("recipe") if isinstance(data.get("train"), Mapping) else None
    if recipe is not None:  # fields a partial train / data section leaves out take its recipe's values
      given = {k: dict(v) for k, v in data.items() if isinstance(v, Mapping)}
      data = {**data, **{k: dict(v) for k, v in given.items()}}
      recipes.apply(data, recipe, only_missing=given)
    return _build(cls, data, "")

  @classmethod
  def from_json(cls, text: str) -> "MaskGITConfig":
    return cls.from_dict(json.loads(text))

  def save(self, path: str) -> None:
    """Writes the JSON atomically (maskgit_common.fileio), so a crash never leaves half a config."""
    fileio.atomic_write_text(path, self.to_json() + "\n")

  @classmethod
  def load(cls, path: str) -> "MaskGITConfig":
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path) as f:
        text = f.read()
    except OSError as e:
      raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from None
    try:
      return cls.from_dict(data)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None

  @classmethod
  def from_official(cls, official: Mapping[str, Any], name: str = "official") -> "MaskGITConfig":
    """Builds the config from an official MaskGIT `ConfigDict` (as a dict), e.g. a golden fixture's config.json."""
    vq = official["vqvae"]
    tr = official["transformer"]
    tokenizer = TokenizerConfig(
        filters=vq["filters"], channel_multipliers=tuple(vq["channel_multipliers"]),
        num_res_blocks=vq["num_res_blocks"], embedding_dim=vq["embedding_dim"],
        codebook_size=vq["codebook_size"], norm_type=vq.get("norm_type", "GN"),
        activation_fn=vq.get("activation_fn", "swish"), quantizer=vq.get("quantizer", "vq"),
        conv_downsample=vq.get("conv_downsample", False),
        commitment_cost=vq.get("commitment_cost", 0.25),
        entropy_loss_ratio=vq.get("entropy_loss_ratio", 0.1),
        entropy_temperature=vq.get("entropy_temperature", 0.01),
        entropy_loss_type=vq.get("entropy_loss_type", "softmax"))
    transformer = TransformerConfig(
        num_layers=tr["num_layers"], num_embeds=tr["num_embeds"], num_heads=tr["num_heads"],
        intermediate_size=tr["intermediate_size"], dropout_rate=tr.get("dropout_rate", 0.1),
        mask_token_id=tr.get("mask_token_id", -1))
    decode = official.get("decode", {})
    schedule = decode.get("mask_scheduling_method", official.get("mask_scheduling_method", "cosine"))
    sampler = SamplerConfig(
        num_iter=decode.get("num_iter", SamplerConfig.num_iter),
        start_iter=decode.get("start_iter", 0),
        choice_temperature=decode.get("choice_temperature", official.get("sample_choice_temperature", 4.5)),
        mask_schedule=schedule,
        edit_start_iter=decode.get("edit_start_iter"))
    train = TrainConfig(
        label_smoothing=official.get("label_smoothing", 0.1),
        mask_schedule=official.get("mask_scheduling_method", "cosine"),
        compute_loss_for_all=official.get("compute_loss_for_all", False),
        polyak_decay=official.get("polyak_decay", 0.999),
        seed=official.get("seed", 42))
    return cls(name=name, image_size=official["image_size"], num_class=official["num_class"],
               tokenizer=tokenizer, transformer=transformer, sampler=sampler, train=train)


# Helpers -------------------------------------------------------------------------------------------------------
def _split_override(item: str) -> tuple[str, str]:
  if "=" not in item:
    raise ConfigError(f"override {item!r} must look like section.field=value")
  key, value = item.split("=", 1)
  return key.strip(), value.strip()


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def _build(cls, data: Mapping[str, Any], prefix: str):
  """Builds dataclass `cls` from a dict, recursively, with errors that name the dotted field."""
  if not isinstance(data, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a JSON object, got {type(data).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ConfigError(f"{prefix}{unknown[0]}: unknown field; fields of {prefix.rstrip('.') or 'the config'}: "
                      f"{sorted(fields)}")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in data.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      value = _build(hint, value, f"{prefix}{name}.")
    elif typing.get_origin(hint) is tuple:
      if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{prefix}{name}: must be a list, got {value!r}")
      value = tuple(value)
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif hint is bool and not isinstance(value, bool):
      raise ConfigError(f"{prefix}{name}: must be true or false, got {value!r}")
    elif hint is str and not isinstance(value, str):
      raise ConfigError(f"{prefix}{name}: must be a string, got {value!r}")
    kwargs[name] = value
  if cls is MaskGITConfig:
    return cls(**kwargs)
  obj = cls(**kwargs)
  obj.validate(prefix.rstrip(".") or cls.__name__)
  return obj
