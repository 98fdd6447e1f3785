"""The seed's files as a format of the weights layer (conversion/formats/seed.py): `conversion.read`, `write(...,
format="seed")` and `convert(src, dst, to=...)` of valeoai MaskGIT-pytorch files, with the guarantees of every
format (one error listing every problem, atomic destination, nothing overwritten without asking, the source
protected), and the extras (iter, epoch, the AdamW state, the lightning dict) carried through."""

import os
import shutil

import numpy as np
import pytest

import conversion
from conversion import seed_formats
from conversion.tables import seed as seed_table
from maskgit_common.errors import UserError
from parity_tests import seed_checks
from parity_tests.case import Case
from tests.conftest import seed_cases

CASE = seed_cases()[0]


def _same(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _identical(a, b):
  return seed_checks.same_tree(a, b)


@pytest.fixture(scope="module")
def config():
  return seed_checks.case_config(Case(CASE))


@pytest.fixture
def download(tmp_path):
  """The first dev case's seed files in the Hugging Face download layout, under its names."""
  root = tmp_path / "pretrained_maskgit"
  (root / "MaskGIT").mkdir(parents=True)
  (root / "VQGAN").mkdir()
  shutil.copy(os.path.join(CASE, "MaskGIT", "current.pth"), root / "MaskGIT" / "MaskGIT_ImageNet_256.pth")
  for name in ("last.ckpt", "model.yaml"):
    shutil.copy(os.path.join(CASE, "VQGAN", name), root / "VQGAN" / name)
  return root


def test_read_gives_canonical_weights_through_the_seed_table(download, config):
  ck = conversion.read(str(download), config)
  assert ck.format == "seed" and ck.config == config
  files = seed_formats.read_seed(str(download), config)
  for part in ("tokenizer", "transformer"):
    rules = seed_table.param_table(config, part)
    assert list(ck.parts[part]) == [r.jax_path for r in rules]  # flax order, every parameter
    for r in rules:
      assert _same(ck.parts[part][r.jax_path], seed_table.to_jax(r, files.weights[part][r.torch_key]))
  assert ck.paths == {"tokenizer": str(download / "VQGAN" / "last.ckpt"),
                      "transformer": str(download / "MaskGIT" / "MaskGIT_ImageNet_256.pth")}
  extras = ck.extras["transformer"]
  assert extras["file_name"] == "MaskGIT_ImageNet_256.pth" and {"iter", "global_epoch"} <= set(extras)
  assert len(extras["optimizer_state_dict"]["state"]) == len(seed_table.state_dict_order(config, "transformer"))
  assert {"loss_state", "epoch", "lossconfig"} <= set(ck.extras["tokenizer"])


@pytest.mark.parametrize("which", ["pth", "maskgit_dir", "vqgan_dir", "vqgan_folder_layout", "ckpt", "yaml"])
def test_every_seed_path_is_detected(download, which, tmp_path):
  if which == "vqgan_folder_layout":  # the seed's --vqgan-folder: configs/model.yaml + ckpts/last.ckpt
    folder = tmp_path / "vqgan"
    (folder / "configs").mkdir(parents=True)
    (folder / "ckpts").mkdir()
    shutil.copy(download / "VQGAN" / "model.yaml", folder / "configs" / "model.yaml")
    shutil.copy(download / "VQGAN" / "last.ckpt", folder / "ckpts" / "last.ckpt")
    path, parts = folder, {"tokenizer"}
  else:
    path, parts = {"pth": (download / "MaskGIT" / "MaskGIT_ImageNet_256.pth", {"tokenizer", "transformer"}),
                   "maskgit_dir": (download / "MaskGIT", {"tokenizer", "transformer"}),
                   "vqgan_dir": (download / "VQGAN", {"tokenizer"}),
                   "ckpt": (download / "VQGAN" / "last.ckpt", {"tokenizer"}),
                   "yaml": (download / "VQGAN" / "model.yaml", {"tokenizer"})}[which]  # last.ckpt beside it
  fmt, files = conversion.formats.detect(str(path))
  assert fmt.NAME == "seed"
  assert {p for p in files if p in ("tokenizer", "transformer")} == parts


def test_a_directory_beside_a_vqgan_folder_is_not_taken_for_seed_files(download, config):
  """Only a folder of seed files looks for ../VQGAN: our checkpoint directory next to one stays ours."""
  ours = download / "converted"
  conversion.convert(str(download), str(ours), to="torch", config=config)
  assert conversion.formats.detect(str(ours))[0].NAME == "torch"
  assert conversion.read(str(ours)).format == "torch"


def test_write_seed_format_reads_back_bit_exact_with_its_extras(download, config, tmp_path):
  ck = conversion.read(str(download), config)
  dst = conversion.write(str(tmp_path / "out"), config, ck.parts, format="seed", extras=ck.extras)
  assert sorted(os.listdir(dst)) == ["MaskGIT", "VQGAN", "manifest.json"]
  assert os.listdir(os.path.join(dst, "MaskGIT")) == ["MaskGIT_ImageNet_256.pth"]
  back = conversion.read(dst, config)
  for part, flat in ck.parts.items():
    assert list(back.parts[part]) == list(flat) and all(_same(back.parts[part][k], v) for k, v in flat.items())
  drop = lambda e: {p: {k: v for k, v in x.items() if k != "callbacks"} for p, x in e.items()}  # lightning's class
  assert _identical(drop(back.extras), drop(ck.extras))


def test_the_seed_format_writes_only_the_seed_family(tmp_path):
  import configs  # pylint: disable=import-outside-toplevel
  from maskgit_torch import checkpoint  # pylint: disable=import-outside-toplevel
  config = configs.tiny()
  flat = checkpoint.to_flat(config, "transformer", checkpoint.make_model(config, "transformer"))
  with pytest.raises(conversion.ConversionError, match=r"format 'seed' writes .*transformer\.arch='maskgit'"):
    conversion.write(str(tmp_path / "out"), config, {"transformer": flat}, format="seed")
  assert not os.path.exists(tmp_path / "out")


def test_convert_to_seed_and_back_through_torch_and_jax_is_bit_exact(download, config, tmp_path):
  out = {}
  for src, to in ((download, "torch"), (tmp_path / "torch", "jax"), (tmp_path / "jax", "seed")):
    out[to] = conversion.convert(str(src), str(tmp_path / to), to=to, config=config if to == "torch" else None)
  assert out["seed"].source_format == "jax" and out["torch"].source_format == "seed"
  first, last = conversion.read(str(download), config), conversion.read(str(tmp_path / "seed"), config)
  for part, flat in first.parts.items():
    assert all(_same(last.parts[part][k], v) for k, v in flat.items()), part
  assert conversion.read(str(tmp_path / "jax")).config == config  # the config travels in config.json
  # The AdamW state, iter, epoch, the .pth's name and the lightning entries travel in our directories' extras.
  drop = lambda e: {p: {k: v for k, v in x.items() if k != "callbacks"} for p, x in e.items()}  # lightning's class
  assert _identical(drop(last.extras), drop(first.extras))
  assert os.listdir(tmp_path / "seed" / "MaskGIT") == ["MaskGIT_ImageNet_256.pth"]
  assert {"extras.json", "extras.safetensors"} <= set(os.listdir(tmp_path / "jax"))


def test_extras_keep_every_container_key_type_and_dtype(tmp_path):
  from conversion.formats import extras  # pylint: disable=import-outside-toplevel
  tree = {"transformer": {"iter": 7, "optimizer_state_dict": {
      "state": {0: {"step": np.array(3.0, np.float32), "exp_avg": np.arange(6, dtype=np.float32).reshape(2, 3)}},
      "param_groups": [{"betas": (0.9, 0.96), "lr": 1e-4, "foreach": None, "params": [0]}]}},
      "tokenizer": {"a/b": np.float64(0.5), "a": {"b": np.zeros(2, np.int64)}, "big": 1 << 40, "flag": True}}
  extras.write_extras(str(tmp_path), tree)
  back = extras.read_extras(str(tmp_path))
  assert _identical(back, tree)
  assert type(back["tokenizer"]["a/b"]) is np.float64 and back["transformer"]["optimizer_state_dict"]["state"][0][
      "step"].shape == ()
  (tmp_path / "extras.json").write_text("{not json")
  with pytest.raises(conversion.CheckpointFormatError, match="extras.json"):
    extras.read_extras(str(tmp_path))
  with pytest.raises(conversion.ConversionError, match="cannot be stored"):
    extras.write_extras(str(tmp_path / "x"), {"transformer": {"f": object()}})


def test_convert_never_overwrites_and_protects_the_source(download, config, tmp_path):
  dst = tmp_path / "seed_out"
  conversion.convert(str(download), str(dst), to="seed", config=config)
  before = {n: os.path.getmtime(dst / "MaskGIT" / n) for n in os.listdir(dst / "MaskGIT")}
  with pytest.raises(conversion.ConversionError, match="exists and is not empty"):
    conversion.convert(str(download), str(dst), to="seed", config=config)
  assert {n: os.path.getmtime(dst / "MaskGIT" / n) for n in os.listdir(dst / "MaskGIT")} == before
  conversion.convert(str(download), str(dst), to="seed", config=config, overwrite=True)  # ours: replaceable
  for bad in (download, download / "MaskGIT"):  # the source itself, or a directory holding it
    with pytest.raises(conversion.ConversionError, match="nothing was written"):
      conversion.convert(str(download / "MaskGIT" / "MaskGIT_ImageNet_256.pth"), str(bad), to="seed",
                         config=config, overwrite=True)
  assert sorted(os.listdir(download / "MaskGIT")) == ["MaskGIT_ImageNet_256.pth"]


def test_every_problem_of_the_files_is_in_one_error(download, config):
  (download / "VQGAN" / "model.yaml").write_text("model: [unclosed\n")
  pth = download / "MaskGIT" / "MaskGIT_ImageNet_256.pth"
  pth.write_bytes(pth.read_bytes()[:1000])
  with pytest.raises(conversion.ConversionError) as e:
    conversion.read(str(download), config)
  assert isinstance(e.value, UserError)
  assert str(pth) in str(e.value) and "model.yaml" in str(e.value)
