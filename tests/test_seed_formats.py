"""The seed's file formats (conversion/seed_formats.py, conversion/seed_config.py): both download layouts, config
inference and checks, every problem in one error, unsafe pickles refused without running them, truncated files,
writers that the seed's loaders read back bit-exact, and no torch import at module level."""

import dataclasses
import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conversion import seed_config, seed_formats
from conversion.tables import seed as seed_table
from conversion import CheckpointFormatError, ConversionError
from maskgit_common.errors import UserError
from parity_tests import seed_checks
from parity_tests.case import Case
from tests.conftest import GOLDEN_DIR, seed_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = GOLDEN_DIR
CASES = [os.path.basename(c) for c in seed_cases()]


def _case(name=None):
  return Case(os.path.join(DATA, name or CASES[0]))


def _same(a, b):
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture
def case_copy(tmp_path):
  """A writable copy of the first dev case's seed files (Hugging Face layout), and its config."""
  case = _case()
  dst = tmp_path / "pretrained_maskgit"
  for rel in seed_checks.SEED_FILES:
    os.makedirs(dst / os.path.dirname(rel), exist_ok=True)
    shutil.copy(case.file(rel), dst / rel)
  return dst, seed_checks.case_config(case)


# Reading -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_name", CASES)
def test_both_layouts_read_the_same_weights(case_name, tmp_path):
  case = _case(case_name)
  config = seed_checks.case_config(case)
  hf = seed_formats.read_seed(case.path, config)
  assert set(hf.weights) == {"transformer", "tokenizer"}
  assert hf.files.transformer.endswith(os.path.join("MaskGIT", "current.pth"))
  # The seed's --vqgan-folder layout: configs/model.yaml + ckpts/last.ckpt.
  folder = tmp_path / "vqgan"
  os.makedirs(folder / "configs")
  os.makedirs(folder / "ckpts")
  shutil.copy(hf.files.vqgan_yaml, folder / "configs" / "model.yaml")
  shutil.copy(hf.files.vqgan_ckpt, folder / "ckpts" / "last.ckpt")
  vq = seed_formats.read_seed(str(folder), config)
  assert set(vq.weights) == {"tokenizer"}
  assert all(_same(vq.weights["tokenizer"][k], v) for k, v in hf.weights["tokenizer"].items())
  # A single .pth finds its VQGAN in ../VQGAN (the download's layout).
  single = seed_formats.read_seed(hf.files.transformer, config)
  assert single.files == hf.files


@pytest.mark.parametrize("case_name", CASES)
def test_extras_keep_iter_epoch_and_the_adamw_state_per_parameter(case_name):
  case = _case(case_name)
  ck = seed_formats.read_seed(case.path, seed_checks.case_config(case))
  meta = case.official["checkpoints"]["maskgit_meta"]
  extras = ck.extras["transformer"]
  assert (extras["iter"], extras["global_epoch"]) == (meta["iter"], meta["global_epoch"])
  order = seed_table.state_dict_order(ck.config, "transformer")
  assert order == case.official["derived"]["optimizer_state_index_to_param"]
  state = extras["optimizer_state_dict"]["state"]
  assert sorted(state) == list(range(len(order)))
  for i, key in enumerate(order):
    assert state[i]["exp_avg"].shape == state[i]["exp_avg_sq"].shape == ck.weights["transformer"][key].shape
    assert isinstance(state[i]["exp_avg"], np.ndarray)
  assert extras["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.96)


def test_loss_entries_are_named_skipped_and_kept(caplog):
  case = _case()
  with caplog.at_level(logging.WARNING, logger="conversion.seed_formats"):
    state, extras = seed_formats.read_vqgan(case.file("VQGAN/last.ckpt"))
  assert not any(k.startswith("loss.") for k in state)
  assert extras["loss_state"] and all(k.startswith("loss.") for k in extras["loss_state"])
  message = " ".join(r.getMessage() for r in caplog.records)
  assert f"skipped {len(extras['loss_state'])} training-loss entries" in message
  assert "loss.discriminator.*" in message and "loss.perceptual_loss.*" in message


def test_inferred_config_equals_the_case_but_for_the_heads():
  """Shapes + model.yaml give every field but the head count (not in any shape): the seed's 16 by default."""
  case = _case()
  given = seed_checks.case_config(case)
  inferred = seed_formats.read_seed(case.path).config
  assert inferred.transformer.num_heads == seed_config.SEED_HEADS
  assert inferred.tokenizer == given.tokenizer
  assert dataclasses.replace(inferred.transformer, num_heads=given.transformer.num_heads) == given.transformer
  assert (inferred.image_size, inferred.num_class) == (given.image_size, given.num_class)
  assert seed_config.field_differences(given, inferred) == (
      [] if given.transformer.num_heads == 16 else
      [f"transformer.num_heads: the config has {given.transformer.num_heads}, the files imply 16"])


def test_a_different_config_names_every_field_and_key_in_one_error():
  case = _case()
  config = seed_checks.case_config(case)
  wrong = config.with_overrides([f"transformer.num_layers={config.transformer.num_layers + 1}",
                                 f"tokenizer.codebook_size={config.codebook_size * 2}"])
  with pytest.raises(ConversionError) as e:
    seed_formats.read_seed(case.path, wrong)
  text = str(e.value)
  assert f"transformer.num_layers: the config has {config.transformer.num_layers + 1}" in text
  assert f"tokenizer.codebook_size: the config has {config.codebook_size * 2}" in text
  assert f"missing: transformer.layers.{config.transformer.num_layers}.0.norm.weight" in text
  assert "wrong shape: quantize.embedding.weight" in text and "wrong shape: tok_emb.weight" in text
  assert isinstance(e.value, UserError)


def test_renamed_missing_and_misshaped_keys_all_listed(case_copy):
  dst, config = case_copy
  path = str(dst / "MaskGIT" / "current.pth")
  ck = torch.load(path, weights_only=True)
  sd = ck["model_state_dict"]
  sd["first_layer.9.weight"] = sd.pop("first_layer.6.weight")  # renamed: one missing + one unexpected
  del sd["last_layer.4.bias"]
  sd["bias"] = sd["bias"][:-1]
  torch.save(ck, path)
  with pytest.raises(ConversionError) as e:
    seed_formats.read_seed(str(dst), config)
  text = str(e.value)
  for expected in ("missing: first_layer.6.weight", "unexpected: first_layer.9.weight", "missing: last_layer.4.bias",
                   "wrong shape: bias", "2 missing, 1 unexpected, 1 mis-shaped"):
    assert expected in text, expected


def test_an_unknown_vqgan_key_is_an_error_but_loss_keys_are_not(case_copy):
  dst, config = case_copy
  path = str(dst / "VQGAN" / "last.ckpt")
  with torch.serialization.safe_globals([(seed_formats._InertCallback, seed_formats.LIGHTNING_CALLBACK)]):
    ck = torch.load(path, weights_only=True)
  ck["state_dict"]["encoder.extra.weight"] = torch.zeros(3)
  ck["callbacks"] = {}
  torch.save(ck, path)
  with pytest.raises(ConversionError, match=r"unexpected: encoder\.extra\.weight"):
    seed_formats.read_seed(str(dst), config)


def test_ddp_prefix_bare_state_dict_and_unknown_top_level_keys(tmp_path):
  case = _case()
  config = seed_checks.case_config(case)
  ck = torch.load(case.file("MaskGIT/current.pth"), weights_only=True)
  original, _ = seed_formats.read_transformer(case.file("MaskGIT/current.pth"))
  for name, obj in (("ddp.pth", dict(ck, model_state_dict={"module." + k: v
                                                           for k, v in ck["model_state_dict"].items()})),
                    ("bare.pth", ck["model_state_dict"]),
                    ("bare_ddp.pth", {"module." + k: v for k, v in ck["model_state_dict"].items()})):
    torch.save(obj, tmp_path / name)
    state, extras = seed_formats.read_transformer(str(tmp_path / name))
    assert list(state) == list(original) and all(_same(state[k], original[k]) for k in state), name
    assert ("iter" in extras) == (name == "ddp.pth")
  mixed = dict(ck["model_state_dict"])
  mixed["module.bias"] = mixed.pop("bias")
  torch.save(mixed, tmp_path / "mixed.pth")
  with pytest.raises(ConversionError, match="only some keys carry DDP's 'module.' prefix"):
    seed_formats.read_transformer(str(tmp_path / "mixed.pth"))
  torch.save(dict(ck, args={"lr": 1}), tmp_path / "extra.pth")
  with pytest.raises(ConversionError, match=r"unexpected top-level entries \['args'\]"):
    seed_formats.read_transformer(str(tmp_path / "extra.pth"))
  del config


# Safety ------------------------------------------------------------------------------------------------------------
class _CreatesAFile:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))  # unpickling this would create the file


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("reader", ["read_transformer", "read_vqgan"])
def test_a_pickled_object_is_refused_without_running_it(tmp_path, writer, reader):
  marker = tmp_path / "created_by_the_pickle"
  path = tmp_path / ("evil.pth" if reader == "read_transformer" else "last.ckpt")
  payload = {"model_state_dict": {"bias": torch.zeros(2)}, "iter": _CreatesAFile(str(marker))}
  if writer == "torch.save":
    torch.save(payload, path)
  else:
    with open(path, "wb") as f:
      pickle.dump(payload, f)
  with pytest.raises(CheckpointFormatError, match=r"refused") as e:
    getattr(seed_formats, reader)(str(path))
  assert not marker.exists()
  assert str(path) in str(e.value)
  if writer == "torch.save":
    assert "io.open" in str(e.value) or "builtins.open" in str(e.value)  # the global is named


def test_only_the_lightning_class_is_allowed_in_last_ckpt(tmp_path):
  path = tmp_path / "last.ckpt"
  torch.save({"state_dict": {"quant_conv.bias": torch.zeros(2)}, "hook": os.system}, path)
  with pytest.raises(CheckpointFormatError, match=r"refused: the pickle names (posix|nt)\.system"):
    seed_formats.read_vqgan(str(path))


@pytest.mark.parametrize("rel", ["MaskGIT/current.pth", "VQGAN/last.ckpt", "VQGAN/model.yaml"])
def test_truncated_files_fail_clearly(case_copy, rel):
  dst, config = case_copy
  path = dst / rel
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2] if rel.endswith((".pth", ".ckpt")) else b"model: [unclosed\n")
  with pytest.raises(CheckpointFormatError, match=r"(truncated|cannot read)") as e:
    seed_formats.read_seed(str(dst), config)
  assert str(path) in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (("ddconfig", "double_z", True), r"ddconfig\.double_z: only False"),
    (("ddconfig", "temb_ch", 4), r"ddconfig\.temb_ch: unknown key"),
    (("remap", None, "used.npy"), r"model\.params\.remap: must be None"),
])
def test_unsupported_model_yaml_is_refused_naming_the_key(case_copy, edit, message):
  import yaml  # pylint: disable=import-outside-toplevel
  dst, _ = case_copy
  path = dst / "VQGAN" / "model.yaml"
  data = yaml.safe_load(path.read_text())
  section, key, value = edit
  if key is None:
    data["model"]["params"][section] = value
  else:
    data["model"]["params"][section][key] = value
  path.write_text(yaml.safe_dump(data))
  with pytest.raises(ConversionError, match=message):
    seed_formats.read_seed(str(dst))


def test_missing_and_ambiguous_sources(tmp_path, case_copy):
  with pytest.raises(ConversionError, match="does not exist"):
    seed_formats.read_seed(str(tmp_path / "nothing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ConversionError, match="holds no seed checkpoint"):
    seed_formats.read_seed(str(tmp_path / "empty"))
  dst, _ = case_copy
  shutil.copy(dst / "MaskGIT" / "current.pth", dst / "MaskGIT" / "other.pth")
  with pytest.raises(ConversionError, match=r"several transformer checkpoints \['current.pth', 'other.pth'\]"):
    seed_formats.read_seed(str(dst))
  os.remove(dst / "VQGAN" / "model.yaml")
  with pytest.raises(ConversionError, match="model.yaml is not beside it"):
    seed_formats.read_seed(str(dst / "VQGAN" / "last.ckpt"))


# Writing -----------------------------------------------------------------------------------------------------------
def test_written_files_read_back_bit_exact_and_in_the_seeds_structure(tmp_path):
  case = _case()
  ck = seed_formats.read_seed(case.path, seed_checks.case_config(case))
  extras = dict(ck.extras, transformer=dict(ck.extras["transformer"], file_name="MaskGIT_ImageNet_256.pth"))
  files = seed_formats.write_seed(str(tmp_path / "out"), ck.config, ck.weights, extras)
  saved = torch.load(files.transformer, weights_only=True)
  assert list(saved) == ["iter", "global_epoch", "model_state_dict", "optimizer_state_dict"]
  original = torch.load(case.file("MaskGIT/current.pth"), weights_only=True)
  assert list(saved["model_state_dict"]) == list(original["model_state_dict"])
  assert all(torch.equal(saved["model_state_dict"][k], v) for k, v in original["model_state_dict"].items())
  assert saved["optimizer_state_dict"]["param_groups"] == original["optimizer_state_dict"]["param_groups"]
  for i, s in original["optimizer_state_dict"]["state"].items():
    assert all(torch.equal(saved["optimizer_state_dict"]["state"][i][k], v) for k, v in s.items())
  back = seed_formats.read_seed(str(tmp_path / "out" / "MaskGIT" / "MaskGIT_ImageNet_256.pth"), ck.config)
  for which, state in ck.weights.items():
    assert all(_same(back.weights[which][k], v) for k, v in state.items())
  with open(files.vqgan_yaml) as f, open(case.file("VQGAN/model.yaml")) as g:
    assert f.read() == g.read()  # the same yaml text as taming's OmegaConf.save wrote


def test_writes_are_atomic_and_never_overwrite_without_asking(tmp_path):
  ck = seed_formats.read_seed(_case().path, seed_checks.case_config(_case()))
  dst = str(tmp_path / "out")
  seed_formats.write_seed(dst, ck.config, ck.weights, ck.extras)
  before = sorted(os.listdir(dst))
  with pytest.raises(ConversionError, match="nothing was written"):
    seed_formats.write_seed(dst, ck.config, ck.weights, ck.extras)
  broken = {"transformer": {k: v for k, v in ck.weights["transformer"].items() if k != "bias"}}
  with pytest.raises(ConversionError, match="missing: bias"):
    seed_formats.write_seed(str(tmp_path / "other"), ck.config, broken)
  assert not os.path.exists(tmp_path / "other") and sorted(os.listdir(dst)) == before
  seed_formats.write_seed(dst, ck.config, ck.weights, layout="vqgan_folder", overwrite=True)
  assert os.path.isfile(os.path.join(dst, "VQGAN", "configs", "model.yaml"))
  assert os.path.isfile(os.path.join(dst, "VQGAN", "ckpts", "last.ckpt"))


def test_config_round_trips_through_the_seeds_names():
  for case_name in CASES:
    case = _case(case_name)
    config = seed_checks.case_config(case)
    assert seed_config.transformer_kwargs(config) == {k: v for k, v in case.official["maskgit"].items()
                                                      if k != "mask_value"}
    params = seed_config.taming_params(config.tokenizer)
    assert params["ddconfig"] == case.official["vqgan"]["ddconfig"]
    assert (params["embed_dim"], params["n_embed"]) == (case.official["vqgan"]["embed_dim"],
                                                        case.official["vqgan"]["n_embed"])
  import configs  # pylint: disable=import-outside-toplevel
  preset = configs.seed_imagenet_256()
  assert seed_config.config_from_seed(seed_config.taming_params(preset.tokenizer),
                                      seed_config.transformer_kwargs(preset)) == preset


def test_formats_import_neither_torch_nor_jax():
  code = ("import sys, conversion.seed_formats, conversion.tables.seed, conversion.seed_config; "
          "import parity_tests.seed_checks; "
          "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_a_lone_transformer_is_checked_against_the_given_config(tmp_path):
  case = _case()
  config = seed_checks.case_config(case)
  shutil.copy(case.file("MaskGIT/current.pth"), tmp_path / "current.pth")
  with pytest.raises(ConversionError, match="no VQGAN model.yaml beside it"):
    seed_formats.read_seed(str(tmp_path / "current.pth"))
  alone = seed_formats.read_seed(str(tmp_path / "current.pth"), config)
  assert set(alone.weights) == {"transformer"} and alone.config == config
  with pytest.raises(ConversionError, match=r"transformer\.intermediate_size: the config has 8, the files imply"):
    seed_formats.read_seed(str(tmp_path / "current.pth"), config.with_overrides(["transformer.intermediate_size=8"]))
  import configs  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConversionError, match=r"transformer\.arch: the config has 'maskgit'"):
    seed_formats.read_seed(case.path, configs.tiny())


def test_every_damaged_file_and_key_problem_is_in_the_one_error(case_copy):
  dst, config = case_copy
  pth = dst / "MaskGIT" / "current.pth"
  pth.write_bytes(pth.read_bytes()[:1000])
  (dst / "VQGAN" / "model.yaml").write_text("model: [unclosed\n")
  with pytest.raises(ConversionError) as e:
    seed_formats.read_seed(str(dst), config.with_overrides([f"tokenizer.codebook_size={config.codebook_size + 1}"]))
  text = str(e.value)
  assert str(pth) in text and "model.yaml" in text and "wrong shape: quantize.embedding.weight" in text
