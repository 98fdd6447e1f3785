"""The config schema: JSON round trip, overrides, validation messages, presets against the official facts."""

import json
import os
import re

import pytest

import configs
from configs import ConfigError, MaskGITConfig


@pytest.mark.parametrize("name", sorted(configs.PRESETS))
def test_json_round_trip(name, tmp_path):
  config = configs.get_preset(name)
  assert MaskGITConfig.from_json(config.to_json()) == config
  path = tmp_path / "sub" / "config.json"
  config.save(str(path))
  assert MaskGITConfig.load(str(path)) == config
  assert MaskGITConfig.load(str(path.parent)) == config  # a checkpoint directory works too
  assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_overrides_parse_json_values():
  config = configs.tiny().with_overrides(["transformer.num_layers=3", "sampler.mask_schedule=pow2.5",
                                          "tokenizer.channel_multipliers=[1, 2]", "train.compute_loss_for_all=true",
                                          "name=mine"])
  assert config.transformer.num_layers == 3
  assert config.sampler.mask_schedule == "pow2.5"
  assert config.tokenizer.channel_multipliers == (1, 2)
  assert config.downsample_factor == 2 and config.latent_size == 16
  assert config.train.compute_loss_for_all is True
  assert config.name == "mine"
  assert configs.tiny().with_overrides({"train.lr": 3e-4}).train.lr == 3e-4


@pytest.mark.parametrize("override, message", [
    ("transformer.num_heads=5", r"transformer\.num_heads: must divide num_embeds=64"),
    ("transformer.num_layers=0", r"transformer\.num_layers: must be >= 1"),
    ("sampler.mask_schedule=foo", r"sampler\.mask_schedule: must be one of"),
    ("sampler.mask_schedule=pow-1", r"sampler\.mask_schedule: 'powX' needs a positive number"),
    ("sampler.start_iter=8", r"sampler\.start_iter: must be <= 7"),
    ("train.lr=-1", r"train\.lr: must be > 0"),
    ("train.precision=fp8", r"train\.precision: must be one of \['parity', 'fast', 'fp16'\]"),
    ("tokenizer.filters=48", r"tokenizer\.filters: .*multiple of num_groups=32"),
    ("image_size=30", r"image_size: must be a multiple of the tokenizer's downsampling factor 4"),
    ("transformer.mask_token_id=5", r"transformer\.mask_token_id: must be -1"),
    ("foo.bar=1", r"foo\.bar: unknown config section 'foo'"),
    ("sampler.steps=3", r"sampler\.steps: unknown field 'steps'"),
    ("data.dataset=folder", r"data\.data_dir: is required"),
    ("train.compute_loss_for_all=1", r"train\.compute_loss_for_all: must be true or false"),
    ("noequals", r"must look like section\.field=value"),
])
def test_invalid_values_name_the_field(override, message):
  with pytest.raises(ConfigError, match=message):
    configs.tiny().with_overrides([override])


def test_load_errors_name_the_file(tmp_path):
  bad = tmp_path / "config.json"
  bad.write_text("{not json")
  with pytest.raises(ConfigError, match=re.escape(str(bad)) + " is not valid JSON"):
    MaskGITConfig.load(str(bad))
  data = configs.tiny().to_dict()
  data["transformer"]["num_heads"] = 3
  bad.write_text(json.dumps(data))
  with pytest.raises(ConfigError, match=r"config\.json: transformer\.num_heads"):
    MaskGITConfig.load(str(bad))
  with pytest.raises(ConfigError, match="cannot read config file"):
    MaskGITConfig.load(str(tmp_path / "missing.json"))
  data = configs.tiny().to_dict()
  data["schema_version"] = 99
  bad.write_text(json.dumps(data))
  with pytest.raises(ConfigError, match="schema_version"):
    MaskGITConfig.load(str(bad))


def test_configs_are_frozen():
  config = configs.tiny()
  with pytest.raises(Exception):
    config.image_size = 64  # type: ignore[misc]


def test_from_official_matches_fixture_derived_sizes(golden_case):
  case = golden_case
  official = json.load(open(os.path.join(case, "config.json")))
  config = MaskGITConfig.from_official(official)
  derived = official["derived"]
  assert config.latent_size == derived["latent_size"]
  assert config.downsample_factor == derived["downsample_factor"]
  assert config.seq_len == derived["seq_len_with_class"]
  assert config.vocab_size == derived["vocab_size"]
  assert config.codebook_size == derived["codebook_size"]
  assert config.transformer.head_dim == derived["head_dim"]
  assert config.vocab_size - 1 == derived["mask_token_embedding_row"]
  assert config.sampler.num_iter == official["decode"]["num_iter"]
  assert config.sampler.choice_temperature == official["decode"]["choice_temperature"]


@pytest.mark.parametrize("name, seq_len", [("imagenet_256", 257), ("imagenet_512", 1025)])
def test_imagenet_presets_match_official_sizes(name, seq_len):
  config = configs.get_preset(name)
  # Official: V = 1024 codes + 1000 classes + 1 mask row = 2025; S = (image_size / 16)^2 + 1.
  assert config.vocab_size == 2025
  assert config.seq_len == seq_len
  assert config.downsample_factor == 16
  assert config.transformer.num_layers == 24 and config.transformer.num_embeds == 768
  assert config.transformer.layer_norm_eps == 1e-12
  assert config.tokenizer.norm_eps == 1e-6 and config.tokenizer.num_groups == 32


def test_resolve_accepts_preset_path_and_directory(tmp_path):
  assert configs.resolve("tiny") == configs.tiny()
  configs.tiny().save(str(tmp_path / "config.json"))
  assert configs.resolve(str(tmp_path)) == configs.tiny()
  with pytest.raises(ConfigError, match="neither a preset"):
    configs.resolve("nope")
