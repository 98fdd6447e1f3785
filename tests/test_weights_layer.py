"""The weights layer (`conversion`) as a layer: framework-free, no cycle, one registry, one check, one message format;
and issue 14's findings on reading checkpoints (3, 4, 6b, 6c, 6d) at the library level.

The CLI-level battery (what `run.py convert` refuses, kill -9 leftovers, released names) is tests/test_convert_cli.py.
"""

import ast
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import conversion
from configs import imagenet_256, imagenet_512
from conversion import formats
from conversion.formats import flax_msgpack
from maskgit_jax import checkpoint as jax_checkpoint
from maskgit_jax import pipeline as jax_pipeline
from maskgit_torch import checkpoint as torch_checkpoint
from maskgit_torch import pipeline as torch_pipeline
from maskgit_common.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("tokenizer", "transformer")


def shapes_only(config, part) -> dict:
  """A part's canonical weights as zero-memory broadcast arrays: real shapes and dtype, no data (ImageNet sizes)."""
  return {r.jax_path: np.broadcast_to(np.float32(0), r.shape) for r in conversion.param_table(config, part)}


# The layer's shape ----------------------------------------------------------------------------------------------
def test_every_conversion_module_imports_without_torch_or_jax():
  modules = sorted({os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    for p in glob.glob(os.path.join(ROOT, "conversion", "**", "*.py"), recursive=True)})
  assert "conversion.formats.flax_msgpack" in modules and "conversion.tables.official" in modules
  code = ("import importlib, sys\n"
          f"for m in {modules!r}: importlib.import_module(m)\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'jaxlib', 'flax'))\n"
          "assert not bad, bad\nprint(len(sys.modules))")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 0, done.stderr


def test_the_jax_backend_reads_torch_checkpoints_without_torch():
  """A torch checkpoint directory loads into the JAX backend through the weights layer, torch never imported."""
  code = ("import sys\nfrom maskgit_jax import checkpoint\n"
          f"config, variables = checkpoint.load_checkpoint({os.path.join(ROOT, 'demo', 'checkpoint')!r})\n"
          "assert set(variables) == {'tokenizer', 'transformer'}\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\nassert not bad, bad")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 0, done.stderr


def _imports(tree, *, in_functions: bool) -> set:
  """Modules imported at module level (or, with in_functions, inside function bodies)."""
  found = set()

  def visit(node, inside):
    for child in ast.iter_child_nodes(node):
      here = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if here == in_functions and isinstance(child, ast.Import):
        found.update(a.name for a in child.names)
      elif here == in_functions and isinstance(child, ast.ImportFrom) and child.module:
        found.add(child.module)
      visit(child, here)

  visit(tree, False)
  return found


def test_conversion_never_imports_a_backend():
  """Backends import the weights layer, never the reverse (the old conversion -> maskgit_torch cycle). The one
  exception is the seed's pickled checkpoints: they can only be read by torch.load(weights_only=True), imported
  inside the functions of the pickle codec (formats/torch_pickle.py) and the seed's readers that use it, never at
  module level (and never a backend package)."""
  frameworks = ("torch", "jax", "flax")
  for path in glob.glob(os.path.join(ROOT, "conversion", "**", "*.py"), recursive=True):
    tree = ast.parse(open(path).read())
    top = {m for m in _imports(tree, in_functions=False) if m.split(".")[0] in ("maskgit_torch", "maskgit_jax",
                                                                                  *frameworks)}
    assert not top, (path, top)
    lazy = {m for m in _imports(tree, in_functions=True) if m.split(".")[0] in ("maskgit_torch", "maskgit_jax",
                                                                                  "jax", "flax")}
    assert not lazy, (path, lazy)
    if "torch" in {m.split(".")[0] for m in _imports(tree, in_functions=True)}:
      name = os.path.basename(path)
      assert name == "torch_pickle.py" or name.startswith("seed"), (path, "only the pickle readers may use torch")


def test_one_check_one_message_format_in_both_layouts(one_golden_case, golden_config):
  config = golden_config(one_golden_case)
  flat = conversion.read(one_golden_case).parts["transformer"]
  assert conversion.check(config, "transformer", flat) == []
  state = conversion.to_torch_layout(config, "transformer", flat)
  assert conversion.check(config, "transformer", state, layout="torch") == []
  key, tkey = "params/MlmLayer_0/mlm_bias/bias", "mlm.mlm_bias"
  v = config.vocab_size
  bad = dict(flat, **{key: np.zeros(v + 1, np.float32), "params/Extra/kernel": np.zeros(2, np.float32)})
  del bad["params/Embed_0/embeddings_ln/scale"]
  bad["params/MlmLayer_0/mlm_ln/bias"] = np.zeros(flat["params/MlmLayer_0/mlm_ln/bias"].shape, np.int32)
  assert sorted(conversion.check(config, "transformer", bad)) == sorted([
      f"missing: params/Embed_0/embeddings_ln/scale (expected shape {(config.transformer.num_embeds,)})",
      "unexpected: params/Extra/kernel (shape (2,))",
      f"wrong shape: {key}: got {(v + 1,)}, expected {(v,)}",
      "wrong dtype: params/MlmLayer_0/mlm_ln/bias: got int32, expected a floating point type"])
  torch_bad = dict(state, **{tkey: torch.zeros(v + 1)})
  assert conversion.check(config, "transformer", torch_bad, layout="torch") == [
      f"wrong shape: {tkey}: got {(v + 1,)}, expected {(v,)}"]
  # Every loader reports through it: the same line from the torch backend and the JAX backend.
  for backend in (torch_checkpoint, jax_checkpoint):
    with pytest.raises(conversion.ConversionError, match=rf"wrong shape: {key}: got \({v + 1},\)"):
      backend.from_flat(config, "transformer", bad)


def test_torch_layout_round_trip_is_bit_exact_and_consumes(one_golden_case, golden_config):
  config = golden_config(one_golden_case)
  for part in PARTS:
    flat = conversion.read(one_golden_case).parts[part]
    source = dict(flat)
    state = conversion.to_torch_layout(config, part, source, consume=True)
    assert source == {}  # every array dropped as converted: one copy of the part in memory
    back = conversion.from_torch_layout(config, part, state)
    assert list(back) == list(flat)  # flax's key order
    assert all(back[k].dtype == flat[k].dtype and back[k].tobytes() == flat[k].tobytes() for k in flat)


def test_table_registry_selects_by_arch_and_refuses_unknown_archs():
  config = imagenet_256()
  assert conversion.tables.arch(config, "transformer") == "maskgit"  # the default when the schema has no field
  assert conversion.TABLES[("transformer", "maskgit")].rules(config, "transformer")
  fake = type("Section", (), {"arch": "no_such_family"})()
  with pytest.raises(ValueError, match="no_such_family"):
    conversion.param_table(type("Cfg", (), {"transformer": fake})(), "transformer")


def test_formats_are_registered_in_one_place_and_ambiguity_is_refused(tmp_path, one_golden_case):
  assert set(formats.FORMATS) >= {"official", "torch", "jax", "file", "seed"}
  assert set(formats.writers()) == {"torch", "jax", "seed"}
  mixed = tmp_path / "mixed"
  conversion.convert(one_golden_case, str(tmp_path / "t"), to="torch")
  shutil.copytree(tmp_path / "t", mixed)
  shutil.copy(os.path.join(one_golden_case, "tokenizer.msgpack"), mixed / "tokenizer.msgpack")
  with pytest.raises(conversion.ConversionError, match="ambiguous") as info:
    conversion.read(str(mixed))
  assert "tokenizer.safetensors" in str(info.value) and "tokenizer.msgpack" in str(info.value)
  two = tmp_path / "two"
  two.mkdir()
  for name in ("tokenizer_a_checkpoint", "tokenizer_b_checkpoint"):
    shutil.copy(os.path.join(one_golden_case, "tokenizer.msgpack"), two / name)
  with pytest.raises(conversion.ConversionError, match=r"several tokenizer checkpoints"):
    conversion.read(str(two))


def test_write_refuses_mismatched_weights_before_writing(tmp_path, one_golden_case, golden_config):
  config = golden_config(one_golden_case)
  flat = dict(conversion.read(one_golden_case).parts["tokenizer"])
  flat.pop("params/quantizer/codebook")
  with pytest.raises(conversion.ConversionError, match="missing: params/quantizer/codebook"):
    conversion.write(str(tmp_path / "out"), config, {"tokenizer": flat}, format="jax")
  assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


# Finding 3: a checkpoint without both models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory, one_golden_case):
  """A torch and a JAX checkpoint directory holding the tokenizer alone."""
  root = tmp_path_factory.mktemp("tokenizer_only")
  src = root / "src"
  src.mkdir()
  shutil.copy(os.path.join(one_golden_case, "config.json"), src / "config.json")
  shutil.copy(os.path.join(one_golden_case, "tokenizer.msgpack"), src / "tokenizer.msgpack")
  out = {to: conversion.convert(str(src), str(root / to), to=to) for to in ("torch", "jax")}
  return root, out


def test_convert_says_which_model_is_absent(tokenizer_only):
  _, out = tokenizer_only
  for to, done in out.items():
    assert done.parts == ("tokenizer",)
    assert "holds no transformer" in done.summary(to), done.summary(to)


@pytest.mark.parametrize("layout", ["torch", "jax"])
@pytest.mark.parametrize("pipeline", [torch_pipeline, jax_pipeline], ids=["torch", "jax"])
def test_sampling_a_tokenizer_only_checkpoint_is_a_checkpoint_error(tokenizer_only, pipeline, layout):
  root, _ = tokenizer_only
  with pytest.raises(conversion.CheckpointError) as info:
    pipeline.MaskGIT.from_checkpoint(str(root / layout), device="cpu")
  assert isinstance(info.value, UserError)
  message = str(info.value)
  assert "holds no transformer" in message and str(root / layout) in message, message
  assert ("transformer.safetensors" if layout == "torch" else "transformer.msgpack") in message, message


# Finding 4: PyTorch pickles where msgpack is expected; damaged files ---------------------------------------------
@pytest.fixture(scope="module", params=["zip", "legacy"])
def pytorch_file(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("pth") / f"model_{request.param}.pth")
  torch.save({"state_dict": {"w": torch.zeros(3)}}, path, _use_new_zipfile_serialization=request.param == "zip")
  return path


def test_a_pytorch_pickle_is_named_as_such(pytorch_file, tmp_path, one_golden_case, golden_config):
  with pytest.raises(conversion.CheckpointFormatError) as info:
    flax_msgpack.read_msgpack(pytorch_file)
  message = str(info.value)
  assert pytorch_file in message and "is a PyTorch checkpoint" in message and "extra data" not in message
  with pytest.raises(conversion.CheckpointError, match="is a PyTorch checkpoint"):
    conversion.read(pytorch_file)
  # Renamed into the place of a msgpack file of a checkpoint directory: the same, naming that file.
  directory = tmp_path / "jax"
  directory.mkdir()
  golden_config(one_golden_case).save(str(directory / "config.json"))
  shutil.copy(pytorch_file, directory / "tokenizer.msgpack")
  with pytest.raises(conversion.CheckpointFormatError) as info:
    conversion.read(str(directory), parts=("tokenizer",))
  assert str(directory / "tokenizer.msgpack") in str(info.value) and "PyTorch checkpoint" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated_header", "truncated_data", "empty"])
def test_damaged_safetensors_is_a_format_error_naming_the_file(tmp_path, damage, one_golden_case):
  conversion.convert(one_golden_case, str(tmp_path / "t"), to="torch")
  target = tmp_path / "t" / "transformer.safetensors"
  data = target.read_bytes()
  target.write_bytes({"truncated_header": data[:20], "truncated_data": data[:-100], "empty": b""}[damage])
  with pytest.raises(conversion.CheckpointFormatError, match=str(target)):
    conversion.read(str(tmp_path / "t"))


# Finding 6b: the ImageNet 256 and 512 tokenizers have the same shapes --------------------------------------------
def test_imagenet_256_and_512_told_apart_by_the_transformer():
  tokenizer = shapes_only(imagenet_256(), "tokenizer")
  for preset in (imagenet_256(), imagenet_512()):
    assert conversion.check(preset, "tokenizer", tokenizer) == []  # the tokenizers are identical
    inferred = conversion.infer_config(tokenizer, shapes_only(preset, "transformer"))
    assert inferred.name == preset.name and inferred == preset


def test_a_lone_imagenet_tokenizer_asks_for_config_naming_both_presets():
  with pytest.raises(conversion.ConversionError) as info:
    conversion.infer_config(shapes_only(imagenet_256(), "tokenizer"), None)
  message = str(info.value)
  assert "--config imagenet_256" in message and "--config imagenet_512" in message, message
  # Given the size and classes, or a config, it is read.
  assert conversion.infer_config(shapes_only(imagenet_256(), "tokenizer"), None, 1000, 512).image_size == 512


# Finding 6c: safetensors outputs are byte-identical run to run ---------------------------------------------------
def test_torch_outputs_are_byte_identical_run_to_run(tmp_path, one_golden_case, golden_config):
  """safetensors keeps metadata in a hash map seeded per map: with two entries, repeated writes of the same weights
  in one process came out in different orders about half the time."""
  config = golden_config(one_golden_case)
  parts = {p: conversion.read(one_golden_case).parts[p] for p in PARTS}
  outputs = []
  for i in range(6):
    conversion.write(str(tmp_path / str(i)), config, parts, format="torch")
    outputs.append({n: (tmp_path / str(i) / n).read_bytes() for n in sorted(os.listdir(tmp_path / str(i)))})
  assert all(o == outputs[0] for o in outputs[1:])
  assert set(outputs[0]) == {"config.json", "manifest.json", "tokenizer.safetensors", "transformer.safetensors"}


# Finding 6d: messages that ask for a config name the CLI flag ----------------------------------------------------
def test_config_requests_name_the_flag(tmp_path, one_golden_case):
  conversion.convert(one_golden_case, str(tmp_path / "t"), to="torch")
  (tmp_path / "t" / "config.json").unlink()
  (tmp_path / "t" / "manifest.json").unlink()
  # A transformer alone: K cannot be split from V = K + num_class + 1 (unless its shapes are a preset's, as the
  # vendored tiny case's are: one more class than any preset has makes sure they are not).
  transformer = dict(conversion.read(one_golden_case).parts["transformer"])
  embedding = next(k for k in transformer if k.endswith("word_embeddings/embedding"))
  transformer[embedding] = np.concatenate([transformer[embedding], transformer[embedding][:1]])
  cases = [lambda: conversion.read(str(tmp_path / "t")),  # torch weights without a config.json
           lambda: conversion.read(str(tmp_path / "t" / "tokenizer.safetensors")),  # a bare torch file
           lambda: conversion.infer_config(None, transformer)]
  for make in cases:
    with pytest.raises(conversion.ConversionError) as info:
      make()
    assert "--config" in str(info.value), str(info.value)
