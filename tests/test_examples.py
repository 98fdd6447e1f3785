"""The walkthrough scripts in examples/ run end to end and do what they print, on a tiny random checkpoint.

The demo model is not needed: one checkpoint (tests/conftest.py's synthetic_checkpoint: the tiny preset over the ten
synthetic classes with a 1-layer transformer, random weights) stands in for it, so these tests pass on a fresh clone
before any training.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

import conversion
from maskgit_common import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

torch = pytest.importorskip("torch")
pytest.importorskip("flax")


def example(name):
  """examples/<name>.py as a module (the directory is not a package: the scripts are run as files)."""
  spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def checkpoint(synthetic_checkpoint):
  """The tiny model over the ten synthetic classes, random weights: the demo model's stand-in."""
  return synthetic_checkpoint[1]


def test_convert_checkpoint_round_trip_is_bit_identical_from_a_plain_shell(synthetic_checkpoint, tmp_path):
  config, checkpoint = synthetic_checkpoint
  # As a user runs it: a subprocess outside the repository, the script finding the packages by itself.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "convert_checkpoint.py"), "--checkpoint",
                         checkpoint, "--out", str(tmp_path)], cwd=str(tmp_path), env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert "bit-identical" in done.stdout and "transformer" in done.stdout
  for which in ("tokenizer", "transformer"):
    original = safetensors.numpy.load_file(os.path.join(checkpoint, f"{which}.safetensors"))
    back = safetensors.numpy.load_file(os.path.join(tmp_path, "torch", f"{which}.safetensors"))
    assert len(original) == len(conversion.param_table(config, which)) == len(back)
    for key, value in original.items():
      assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key
    assert os.path.getsize(os.path.join(tmp_path, "jax", f"{which}.msgpack")) > 0


@pytest.mark.parametrize("name", ["convert_checkpoint", "sample_both_backends", "inpaint", "train_tiny"])
def test_a_missing_checkpoint_is_a_usage_error_naming_it(name, tmp_path, capsys):
  missing = str(tmp_path / "no_such_checkpoint")
  with pytest.raises(SystemExit) as exit_info:
    example(name).main(["--checkpoint", missing])
  assert exit_info.value.code == 2
  assert f"--checkpoint {missing} is not a checkpoint directory" in capsys.readouterr().err


def test_check_parity_passes_on_the_tiny_fixture_and_writes_the_report(tmp_path, capsys):
  report_path = str(tmp_path / "report.json")
  # torch only: both backends of the same runner on every vendored case are parity_tests/test_runner.py's.
  report = example("check_parity").main(["--golden", os.path.join(REPO, "parity_tests", "data", "tiny"),
                                         "--backend", "torch", "--device", "cpu", "--report", report_path])
  assert report["passed"]
  with open(report_path) as f:
    written = json.load(f)
  checks = written["cases"]["tiny"]
  assert {"torch.decode.tokens", "torch.edit.tokens", "conversion.roundtrip"} <= set(checks)
  assert all(c["passed"] for c in checks.values())
  out = capsys.readouterr().out
  assert "torch.decode.tokens" in out and os.path.abspath(report_path) in out


def test_sample_both_backends_gives_identical_tokens_and_the_pictures(checkpoint, tmp_path):
  module = example("sample_both_backends")
  out, steps_out = str(tmp_path / "samples.png"), str(tmp_path / "steps.png")
  result = module.main(["--checkpoint", checkpoint, "--classes", "0,3,7", "--seed", "5", "--out", out,
                        "--steps_out", steps_out])
  tokens = result["tokens"]
  assert tokens["torch"].shape == (3, 8, 8)
  np.testing.assert_array_equal(tokens["torch"], tokens["jax"])
  assert result["max_image_diff"] < 1e-4
  # 32 px tiles enlarged 3x, 2 px padding, 12 px label rows: 3 columns x 2 rows, and 4 steps x 3 samples.
  assert Image.open(out).size == (3 * 98 + 2, 2 * 110 + 2)
  assert Image.open(steps_out).size == (4 * 98 + 2, 3 * 110 + 2)

  # The steps picture: grey cells are exactly the still-masked tokens, fewer after every step, none at the end.
  from maskgit_torch.pipeline import MaskGIT  # pylint: disable=import-outside-toplevel
  model = MaskGIT.from_checkpoint(checkpoint, device="cpu")
  _, final, output = model.generate([1, 2], seed=0, return_output=True)
  frames = module.decoding_steps(model, output).reshape(2, 4, 32, 32, 3)
  grey = (frames == module.GREY).all(-1).reshape(2, 4, 8, 4, 8, 4).all((3, 5))  # whole 4x4 cells
  masked = (output.step_state_after.numpy()[:, :, 1:] < 0).transpose(1, 0, 2).reshape(2, 4, 8, 8)
  masked[:, -1] = False  # the last column is the result, not the state re-masked after the last step
  np.testing.assert_array_equal(grey, masked)
  counts = masked.sum((2, 3))
  assert (counts[:, 0] > 0).all() and (np.diff(counts, axis=1) < 0).all()
  np.testing.assert_allclose(frames[:, -1], np.clip(model.decode_tokens(final), 0, 1), atol=0, rtol=0)  # as saved


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_inpaint_keeps_the_tokens_and_pixels_outside_the_box(checkpoint, tmp_path, backend):
  module = example("inpaint")
  out = str(tmp_path / "inpaint.png")
  args = ["--checkpoint", checkpoint, "--backend", backend, "--out", out, "--seed", "1"]
  if backend == "jax":  # a user picture and a class
    picture = str(tmp_path / "in.png")
    Image.fromarray(np.uint8(data.synthetic_image(4, 32)[0] * 255)).save(picture)
    args += ["--image", picture, "--box", "0,8,12,16", "--class", "2"]
  else:  # the default picture (synthetic image 0) and class; a box away from the centre
    args += ["--box", "20,20,8,8"]
  result = module.main(args)
  mask = result["latent_mask"]
  assert 0 < mask.sum() < mask.size
  keep = mask < 0.5
  np.testing.assert_array_equal(result["tokens"][keep], result["original_tokens"][keep])
  assert (result["tokens"][~keep] != result["original_tokens"][~keep]).any()  # the box was regenerated
  # More than one latent cell (4 px) away from the box, the feathered blend is the original, bit for bit.
  near = np.pad(mask > 0.5, 1)
  near = np.max([near[1 + dy:9 + dy, 1 + dx:9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
  far = np.repeat(np.repeat(~near, 4, 0), 4, 1)
  assert far.any()
  np.testing.assert_array_equal(result["blended"][far], result["image"][far])
  assert result["label"] == (2 if backend == "jax" else 1)  # synthetic image 0 is class 0; the default is next
  assert Image.open(out).size == (4 * 98 + 2, 110 + 2)


def test_train_tiny_learns_the_same_in_both_backends_and_swaps_exports(checkpoint, tmp_path):
  result = example("train_tiny").main(["--checkpoint", checkpoint, "--steps", "12", "--batch_size", "8",
                                       "--num_synthetic", "32", "--workdir", str(tmp_path)])
  losses = result["losses"]
  for name in ("torch", "jax"):
    assert losses[name].shape == (12,) and np.isfinite(losses[name]).all(), name
    assert losses[name][-3:].mean() < losses[name][:3].mean(), (name, losses[name])
  assert result["loss_diff"] < 1e-4, result["loss_diff"]  # same init, batches and masks; no dropout
  assert max(result["logits_diff"].values()) < 1e-4, result["logits_diff"]
  for name, export in result["exports"].items():
    assert os.path.isfile(os.path.join(export, "config.json")), name
