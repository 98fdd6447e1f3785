"""A seed model (valeoai MaskGIT-pytorch v1) used as a user would: its files converted with `run.py convert`, then
sampled and edited through both pipelines and `run.py sample` / `edit` (the seed's token layout: class token last,
mask id K, K + 1 columns drawn; the taming VQGAN's [-1, 1] range inside its common interface)."""

import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

import run
from maskgit_jax import pipeline as jax_pipeline
from maskgit_jax import sampler as jax_sampler
from maskgit_torch import pipeline as torch_pipeline
from maskgit_torch import sampler as torch_sampler
from parity_tests import seed_checks, seed_sample_checks, seed_torch
from parity_tests.case import Case
from tests.conftest import seed_cases

CASE = Case(min(seed_cases(), key=lambda c: os.path.getsize(os.path.join(c, "MaskGIT", "current.pth"))))


def cli(*argv):
  try:
    return run.main(run.FLAGS(["run.py", *argv]))
  finally:
    run.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The case's seed files -> our torch directory -> our JAX directory, by run.py convert. The head count is in no
  file, so the config is given (config.json in the seed's names -> ours)."""
  root = tmp_path_factory.mktemp("seed_pipeline")
  config_path = str(root / "config.json")
  seed_checks.case_config(CASE).save(config_path)
  assert cli("convert", "--src", CASE.path, "--dst", str(root / "torch"), "--to", "torch",
             "--config", config_path) == 0
  assert cli("convert", "--src", str(root / "torch"), "--dst", str(root / "jax"), "--to", "jax") == 0
  return {"torch": str(root / "torch"), "jax": str(root / "jax")}


def test_both_pipelines_give_the_seeds_tokens_from_its_recorded_draws(converted):
  """The converted model in each backend's pipeline, with the seed's sampler settings of a record and its draws
  injected, generates exactly the seed's final tokens (so the two backends the same tokens), and images within
  1e-5 (torch, on the fixture's thread count) / 1e-4 (JAX) of the seed's, on the [0, 1] scale."""
  record = CASE.npz("sample_default.npz")
  labels, sampler = record["labels"], seed_sample_checks.seed_sampler(record)
  draws = (record["draws_categorical_gumbel"], record["draws_np_gumbel"], record["draws_rand_like"])
  expected_images = (np.transpose(record["images"], (0, 2, 3, 1)) + 1) / 2
  tokens = {}
  for backend, pipeline, noise, bound in (
      ("torch", torch_pipeline, torch_sampler.RecordedNoise(*draws), 1e-5),
      ("jax", jax_pipeline, jax_sampler.RecordedNoise(*draws), 1e-4)):
    model = pipeline.MaskGIT.from_checkpoint(converted[backend], device="cpu")
    if backend == "torch":  # the config's family, built by the checkpoint loader
      assert (type(model.tokenizer).__name__, type(model.transformer).__name__) == ("VQModel", "MaskTransformer")
    model.config = model.config.replace(sampler=sampler)
    threads = seed_torch.reference_threads(CASE, torch.device("cpu")) if backend == "torch" else None
    with threads or contextlib.nullcontext():
      images, tokens[backend] = model.generate(labels, noise=noise)
    np.testing.assert_array_equal(tokens[backend], record["final_code_clamped"], err_msg=backend)
    assert np.max(np.abs(images - expected_images)) <= bound, backend
  np.testing.assert_array_equal(tokens["torch"], tokens["jax"])


# JAX compiles a sampling and an editing program here (~40 s on 2 loaded cores): slow; its pipeline is covered above.
@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_run_py_samples_and_edits_a_converted_seed_model(converted, backend, tmp_path):
  out, steps = str(tmp_path / "samples.png"), str(tmp_path / "steps.png")
  assert cli("sample", "--checkpoint", converted["torch"], "--backend", backend, "--classes", "0,1", "--out", out,
             "--save_steps", steps) == 0
  grid = np.asarray(Image.open(out))
  assert grid.ndim == 3 and grid.std() > 0  # two decoded samples, not a blank image
  side = CASE.official["maskgit"]["img_size"]
  source = str(tmp_path / "in.png")
  Image.fromarray(np.asarray(Image.open(out).convert("RGB").resize((side, side)))).save(source)
  edited = str(tmp_path / "edited.png")
  half = side // 2
  assert cli("edit", "--checkpoint", converted[backend], "--backend", backend, "--image", source, "--box",
             f"0,0,{half},{half}", "--class", "1", "--out", edited, "--grid", str(tmp_path / "grid.png")) == 0
  before, after = np.asarray(Image.open(source)), np.asarray(Image.open(edited))
  assert after.shape == before.shape
  # Outside the regenerated tokens (the box grown by one token, blended over a few pixels) the input is kept.
  f = 2 ** (len(CASE.official["vqgan"]["ddconfig"]["ch_mult"]) - 1)
  keep = slice(half + 2 * f, None)
  np.testing.assert_array_equal(after[keep, keep], before[keep, keep])
  assert not np.array_equal(after[:half, :half], before[:half, :half])


def test_run_py_converts_back_to_the_seeds_own_files(converted, tmp_path, capsys):
  """JAX directory -> `--to seed`: the case's files again, bit for bit; a second run refuses to overwrite them."""
  from conversion import seed_formats  # pylint: disable=import-outside-toplevel
  dst = str(tmp_path / "seed")
  assert cli("convert", "--src", converted["jax"], "--dst", dst, "--to", "seed") == 0
  assert sorted(os.listdir(dst)) == ["MaskGIT", "VQGAN", "manifest.json"]
  config = seed_checks.case_config(CASE)
  original, back = seed_formats.read_seed(CASE.path, config), seed_formats.read_seed(dst, config)
  for part, state in original.weights.items():
    assert list(back.weights[part]) == list(state)
    assert all(seed_checks.same_tree(back.weights[part][k], v) for k, v in state.items()), part
  assert back.extras["transformer"]["iter"] == original.extras["transformer"]["iter"]
  capsys.readouterr()
  assert cli("convert", "--src", converted["jax"], "--dst", dst, "--to", "seed") == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "exists and is not empty" in err, err
