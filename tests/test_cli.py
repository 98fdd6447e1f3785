"""run.py as a user meets it (issue 14): nothing silently wrong, every user error one line naming the flag, file or
field, every cheap check before the slow work, evaluation resumed only from samples of the same weights.

Most runs call `run.main` in this process (fast: the frameworks are imported once); a few run `python run.py` to
see exactly what a user sees (no traceback). The model is a tiny random checkpoint, so nothing needs the demo.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

import configs
import evaluation
import run
from evaluation import inception, references
from maskgit_common import data, editing, images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
  return tiny_checkpoint[1]


@pytest.fixture
def picture(tmp_path):
  path = str(tmp_path / "in.png")
  Image.fromarray(images.to_uint8(data.synthetic_image(1, 32)[0])).save(path)
  return path


def refused(run_py, *argv, match):
  """Runs ARGV in this process (the run_py fixture), which must fail as one `error:` line naming `match`."""
  rc, out, err = run_py(*argv)
  assert rc == 2, (argv, out, err)
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert match in err, (match, err)
  return err


def never(name):
  def fail(*_, **__):
    raise AssertionError(f"{name} ran: a cheap check should have refused the command before it")
  return fail


# Finding 3: silently wrong results become errors -------------------------------------------------------------------
def test_steps_zero_is_an_error_not_the_default(run_py, checkpoint, picture, tmp_path):
  out = str(tmp_path / "x.png")
  refused(run_py, "sample", "--checkpoint", checkpoint, "--steps", "0", "--out", out, match="--steps")
  refused(run_py, "edit", "--checkpoint", checkpoint, "--image", picture, "--box", "8,8,8,8", "--class", "1",
          "--steps", "0", "--out", out, match="--steps")
  refused(run_py, "sample", "--checkpoint", checkpoint, "--steps", "-3", "--out", out, match="--steps")
  assert not os.path.exists(out)
  rc, stdout, _ = run_py("sample", "--checkpoint", checkpoint, "--steps", "2", "--out", out)
  assert rc == 0 and "2 steps" in stdout


@pytest.mark.parametrize("argv, flag, owner", [
    (["sample", "--class", "3"], "--class", "edit"),
    (["sample", "--num-samples", "5"], "--num_samples", "eval"),
    (["sample", "--num_samples", "5"], "--num_samples", "eval"),
    (["sample", "--tokenizer", "no/such/tokenizer"], "--tokenizer", "train"),
    (["edit", "--classes", "1,2"], "--classes", "sample"),
    (["eval", "--image", "x.png"], "--image", "edit"),
    (["convert", "--device", "cpu"], "--device", "sample"),
    (["convert", "--backend", "jax"], "--backend", "sample"),
    (["parity", "--checkpoint", "x"], "--checkpoint", "sample"),
    (["train", "--precision", "fast"], "--precision", "--set train.precision=fast"),
])
def test_a_flag_of_another_subcommand_is_refused_naming_its_owner(run_py, argv, flag, owner):
  err = refused(run_py, *argv, match=f"{argv[0]} does not use {flag}")
  assert owner in err


def test_eval_of_a_folder_refuses_the_flags_of_sampling(run_py, checkpoint, picture, tmp_path):
  folder = os.path.dirname(picture)
  refused(run_py, "eval", "--samples", folder, "--ref", folder, "--checkpoint", checkpoint, "--steps", "3",
          "--out", str(tmp_path / "e"), match="does not use --checkpoint, --steps")


def test_every_flag_of_run_py_says_which_subcommands_use_it():
  defined = {f.name for f in run.FLAGS.flags_by_module_dict()[run.__name__]}
  aliases = {name for name in defined if "-" in name}
  assert defined - aliases == set(run.USED_BY), "add the new flag to run.USED_BY"
  assert all(set(commands) <= set(run.COMMANDS) for commands in run.USED_BY.values())


def test_sampler_numbers_out_of_range_are_refused(run_py, checkpoint, tmp_path):
  out = str(tmp_path / "x.png")
  for override, field in (("sampler.guidance_scale=1e308", "sampler.guidance_scale: must be <= 1000"),
                          ("sampler.choice_temperature=1e300", "sampler.choice_temperature: must be <= 1000"),
                          ("sampler.softmax_temperature=1e-300", "sampler.softmax_temperature: must be >= 0.001")):
    refused(run_py, "sample", "--checkpoint", checkpoint, "--set", override, "--out", out, match=field)
  assert not os.path.exists(out)
  # The strongest values the option tests use stay valid.
  configs.tiny().with_overrides(["sampler.guidance_scale=100", "sampler.softmax_temperature=0.3"])


def test_out_is_written_in_the_format_its_suffix_names(run_py, checkpoint, tmp_path):
  for suffix, magic in ((".jpg", b"\xff\xd8\xff"), (".png", b"\x89PNG"), (".bmp", b"BM")):
    out = str(tmp_path / f"grid{suffix}")
    rc, _, err = run_py("sample", "--checkpoint", checkpoint, "--steps", "1", "--out", out)
    assert rc == 0, err
    with open(out, "rb") as f:
      assert f.read(len(magic)) == magic, suffix
  refused(run_py, "sample", "--checkpoint", checkpoint, "--out", str(tmp_path / "grid.foo"),
          match="the suffix '.foo' names no picture format")
  refused(run_py, "sample", "--checkpoint", checkpoint, "--out", str(tmp_path / "grid"), match="no suffix")
  assert not os.path.exists(tmp_path / "grid.foo") and not os.path.exists(tmp_path / "grid")


def test_out_never_overwrites_save_steps_the_grid_or_the_input(run_py, checkpoint, picture, tmp_path):
  same = str(tmp_path / "same.png")
  refused(run_py, "sample", "--checkpoint", checkpoint, "--out", same, "--save_steps", same,
          match="--save_steps")
  before = open(picture, "rb").read()
  edit = ["edit", "--checkpoint", checkpoint, "--box", "8,8,8,8", "--class", "1"]
  refused(run_py, *edit, "--image", picture, "--out", picture, match="is also --image")
  refused(run_py, *edit, "--image", picture, "--grid", picture, match="is also --image")
  refused(run_py, *edit, "--image", picture, "--out", same, "--grid", same, match="--grid")
  refused(run_py, *edit, "--image", picture, "--out", os.path.join(os.path.dirname(picture), ".", "in.png"),
          match="is also --image")  # the same file under another spelling
  assert open(picture, "rb").read() == before and not os.path.exists(same)


def test_16_bit_pngs_are_read_right_as_the_image_and_as_the_mask(run_py, checkpoint, tmp_path):
  image16, mask16 = str(tmp_path / "in16.png"), str(tmp_path / "mask16.png")
  Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))).save(image16)
  mask = np.zeros((32, 32), np.uint16)
  mask[:16, :16] = 65535  # a quarter: 16 of the 64 tokens
  Image.fromarray(mask).save(mask16)
  out, grid = str(tmp_path / "out.png"), str(tmp_path / "grid.png")
  rc, stdout, err = run_py("edit", "--checkpoint", checkpoint, "--image", image16, "--mask", mask16,
                        "--class", "0", "--out", out, "--grid", grid)
  assert rc == 0, err
  assert "(16/64 tokens regenerated)" in stdout  # read as solid white, the mask marked all 64
  edited = np.asarray(Image.open(out)).astype(int)
  ramp = np.round(np.linspace(0, 65535, 32) / 257.0)
  np.testing.assert_array_equal(edited[24:, 24:, 0], np.tile(ramp[24:], (8, 1)))  # kept far from the mask


# Findings 3 and 4: devices -------------------------------------------------------------------------------------------
SUBCOMMANDS = {
    "sample": lambda ck, pic, tmp: ["--checkpoint", ck, "--out", str(tmp / "x.png")],
    "edit": lambda ck, pic, tmp: ["--checkpoint", ck, "--image", pic, "--box", "8,8,8,8", "--class", "1",
                                  "--out", str(tmp / "x.png")],
    "eval": lambda ck, pic, tmp: ["--checkpoint", ck, "--ref", os.path.dirname(pic), "--out", str(tmp / "ev")],
    "train": lambda ck, pic, tmp: ["--config", "tiny", "--workdir", str(tmp / "w")],
    "parity": lambda ck, pic, tmp: ["--golden", os.path.join(REPO, "parity_tests", "data", "tiny")],
}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_device_this_machine_lacks_is_one_line_for_every_subcommand(run_py, checkpoint, picture, tmp_path,
                                                                      monkeypatch, command, backend):
  for slow in ("maskgit_torch.pipeline.MaskGIT.from_checkpoint", "maskgit_jax.pipeline.MaskGIT.from_checkpoint",
               "parity_tests.runner.run_parity", "maskgit_torch.train.train", "maskgit_jax.train.train"):
    monkeypatch.setattr(slow, never(slow))
  argv = [command, "--backend", backend, *SUBCOMMANDS[command](checkpoint, picture, tmp_path)]
  refused(run_py, *argv, "--device", "banana", match="--device 'banana' is not a device")
  if not HAS_CUDA:  # on a GPU machine cuda exists; the other half of the test is then the CPU run below
    refused(run_py, *argv, "--device", "cuda", match="--device cuda")
  assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["in.png"]


class Reached(run.UserError):
  """Raised by a recorder standing in for the slow work: the command got that far."""


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_device_flag_reaches_the_work_of_every_subcommand(run_py, checkpoint, picture, tmp_path, monkeypatch,
                                                              backend):
  seen = {}

  def recorder(name, key="device"):
    def record(*args, **kwargs):
      seen[name] = kwargs.get(key)
      raise Reached(name)
    return record

  monkeypatch.setattr(f"maskgit_{backend}.pipeline.MaskGIT.from_checkpoint", recorder("pipeline"))
  monkeypatch.setattr(inception, "build_extractor", recorder("extractor"))
  monkeypatch.setattr("parity_tests.runner.run_parity", recorder("parity"))
  monkeypatch.setattr("maskgit_torch.train.train", recorder("train"))
  for command, reaches in (("sample", "pipeline"), ("edit", "pipeline"), ("eval", "extractor"),
                           ("parity", "parity")) + ((("train", "train"),) if backend == "torch" else ()):
    seen.clear()
    argv = [command, "--backend", backend, "--device", "cpu", *SUBCOMMANDS[command](checkpoint, picture, tmp_path)]
    refused(run_py, *argv, match=reaches)
    assert {k: str(v) for k, v in seen.items()} == {reaches: "cpu"}, (command, seen)  # str or torch.device
  # The JAX trainer runs on every local device: a named device is refused rather than ignored.
  if backend == "jax":
    refused(run_py, "train", "--backend", "jax", "--device", "cpu", *SUBCOMMANDS["train"](checkpoint, picture,
                                                                                          tmp_path),
            match="leave --device at auto")


# Finding 4: tracebacks become one-line errors ------------------------------------------------------------------------
def test_edit_steps_at_or_below_edit_start_iter_is_one_line(run_py, checkpoint, picture, tmp_path):
  out = str(tmp_path / "x.png")
  for steps in ("1", "0"):  # the tiny checkpoint's sampler.edit_start_iter is 1
    refused(run_py, "edit", "--checkpoint", checkpoint, "--image", picture, "--box", "8,8,8,8", "--class", "1",
            "--steps", steps, "--out", out, match="--steps")
  rc, _, err = run_py("edit", "--checkpoint", checkpoint, "--image", picture, "--box", "8,8,8,8", "--class",
                   "1", "--steps", "2", "--out", out)
  assert rc == 0 and os.path.isfile(out), err


def test_a_tokenizer_only_checkpoint_is_one_line_for_sample_edit_and_eval(run_py, tokenizer_only_checkpoint, picture,
                                                                          tmp_path):
  out = str(tmp_path / "x.png")
  for argv in (["sample", "--out", out],
               ["edit", "--image", picture, "--box", "8,8,8,8", "--class", "1", "--out", out],
               ["eval", "--ref", os.path.dirname(picture), "--num_samples", "10", "--out", str(tmp_path / "e")]):
    refused(run_py, *argv, "--checkpoint", tokenizer_only_checkpoint, match="transformer")
  assert not os.path.exists(out)


def test_missing_paths_of_sample_edit_and_eval_are_one_line(run_py, checkpoint, picture, tmp_path):
  missing = str(tmp_path / "missing")
  refused(run_py, "sample", "--checkpoint", missing, match=f"--checkpoint {missing}")
  edit = ["edit", "--checkpoint", checkpoint, "--class", "1", "--out", str(tmp_path / "x.png")]
  refused(run_py, *edit, "--image", missing + ".png", "--box", "8,8,8,8", match="--image")
  refused(run_py, *edit, "--image", picture, "--mask", missing + ".png", match="--mask")
  refused(run_py, "eval", "--checkpoint", checkpoint, "--ref", missing, "--out", str(tmp_path / "e"),
          match=missing)
  refused(run_py, "eval", "--samples", missing, "--ref", os.path.dirname(picture), "--out", str(tmp_path / "e"),
          match="--samples")


def test_eval_sizes_are_checked_before_any_slow_work(run_py, checkpoint, picture, tmp_path, monkeypatch):
  # Finding 4 (one line) and finding 5 (before the reference features, the extractor and the model).
  monkeypatch.setattr(inception, "build_extractor", never("build_extractor"))
  monkeypatch.setattr(references, "source_features", never("reference feature extraction"))
  monkeypatch.setattr("maskgit_torch.pipeline.MaskGIT.from_checkpoint", never("loading the model"))
  args = ["eval", "--checkpoint", checkpoint, "--ref", os.path.dirname(picture), "--out", str(tmp_path / "e")]
  refused(run_py, *args, "--batch_size", "0", match="--batch_size must be a positive integer, got 0")
  refused(run_py, *args, "--num_samples", "1", match="--num_samples 1: the metrics need at least 10 samples")
  refused(run_py, *args, "--num-samples", "9", match="--num_samples 9")
  assert not os.path.exists(tmp_path / "e")


def test_unwritable_out_or_report_is_refused_before_the_work(run_py, checkpoint, picture, tmp_path, monkeypatch):
  monkeypatch.setattr("maskgit_torch.pipeline.MaskGIT.from_checkpoint", never("loading the model"))
  monkeypatch.setattr("parity_tests.runner.run_parity", never("the parity run"))
  monkeypatch.setattr(inception, "build_extractor", never("build_extractor"))
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  inside = str(blocker / "x.png")
  refused(run_py, "sample", "--checkpoint", checkpoint, "--out", inside, match="is not a directory")
  refused(run_py, "sample", "--checkpoint", checkpoint, "--save_steps", inside, match="is not a directory")
  refused(run_py, "edit", "--checkpoint", checkpoint, "--image", picture, "--box", "8,8,8,8", "--class", "1",
          "--grid", inside, match="is not a directory")
  (tmp_path / "folder.png").mkdir()
  refused(run_py, "sample", "--checkpoint", checkpoint, "--out", str(tmp_path / "folder.png"),
          match="not a regular file")
  refused(run_py, "eval", "--checkpoint", checkpoint, "--ref", os.path.dirname(picture), "--out", str(blocker),
          match="--out")
  refused(run_py, "parity", "--golden", os.path.join(REPO, "parity_tests", "data", "tiny"), "--report",
          str(blocker / "r.json"), match="--report")
  assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: permissions cannot be tested as root")
def test_a_read_only_out_directory_is_refused_before_the_work(run_py, checkpoint, tmp_path, monkeypatch):
  monkeypatch.setattr("maskgit_torch.pipeline.MaskGIT.from_checkpoint", never("loading the model"))
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    refused(run_py, "sample", "--checkpoint", checkpoint, "--out", str(locked / "x.png"), match="not writable")
  finally:
    locked.chmod(0o700)


def test_what_a_user_sees_is_one_line_without_a_traceback(tokenizer_only_checkpoint, tmp_path):
  """The same refusal from a real `python run.py` process (absl's app.run around main)."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "sample", "--checkpoint",
                         tokenizer_only_checkpoint, "--out", str(tmp_path / "x.png")], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.startswith("error: ") and "transformer" in proc.stderr, proc.stderr
  assert not os.listdir(tmp_path)


# Finding 6: edit writes the edited image alone; the grid's mask panel is visible -----------------------------------
def test_edit_out_is_the_edited_image_and_grid_the_four_panels(run_py, checkpoint, picture, tmp_path,
                                                                tiny_model_config):
  out, grid = str(tmp_path / "edited.png"), str(tmp_path / "panels.png")
  rc, stdout, err = run_py("edit", "--checkpoint", checkpoint, "--image", picture, "--box", "0,0,12,12",
                        "--class", "2", "--seed", "3", "--out", out, "--grid", grid)
  assert rc == 0, err
  edited = np.asarray(Image.open(out))
  assert edited.shape == (32, 32, 3) and "the edited image" in stdout
  panels = np.asarray(Image.open(grid))
  scale, pad, label = 3, 2, 12  # make_grid with scale 96 // 32, 2 px padding, 12 px label rows
  assert panels.shape == (pad + label + 32 * scale + pad, 4 * (32 * scale + pad) + pad, 3)
  tile = lambda i: panels[pad + label:pad + label + 32 * scale, pad + i * (32 * scale + pad):][:, :32 * scale]
  np.testing.assert_array_equal(tile(3)[::scale, ::scale], edited)  # the grid's last panel is the --out image
  original = np.asarray(Image.open(picture))
  np.testing.assert_array_equal(tile(0)[::scale, ::scale], original)
  # Far from the box (official blend: the mask blurred by image_size // 16 - 1 = 1 px), the input is kept.
  np.testing.assert_array_equal(edited[24:, 24:], original[24:, 24:])
  # The mask panel: red-tinted where regenerated, dimmed elsewhere; never the white of the background.
  mask = tile(1)[::scale, ::scale].astype(int)
  assert not (mask == 255).all(-1).any()
  latent = editing.latent_mask_from_bbox(tiny_model_config(), 0, 0, 12, 12)
  marked = np.kron(latent, np.ones((4, 4))) > 0
  assert (mask[marked][:, 0] >= 127).all() and (mask[~marked][:, 0] <= 90).all()


def test_the_mask_panel_is_visible_whatever_the_mask_and_the_image(tiny_model_config):
  config = tiny_model_config()
  for image in (np.ones((32, 32, 3), np.float32), np.zeros((32, 32, 3), np.float32)):
    for latent in (np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32), np.eye(8, dtype=np.float32)):
      panel = images.to_uint8(editing.mask_panel(image, latent, config))
      assert not (panel == 255).all(-1).any()  # the grid background (make_grid pads with white)
      marked = np.kron(latent, np.ones((4, 4))) > 0
      if marked.any() and (~marked).any():
        assert panel[marked][:, 0].min() > panel[~marked][:, 0].max()  # regenerated cells stand out


# Finding 2: evaluation resume is keyed on the weights, not on the path -----------------------------------------------
@pytest.fixture
def cheap_extractor(monkeypatch):
  """A numpy stand-in for the Inception network: this is about which samples are reused, not about features."""
  proj = np.random.default_rng(0).normal(size=(6, 8))

  def fn(pixels):
    x = pixels.astype(np.float64) / 255.0
    stats = np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)
    return stats @ proj, stats @ proj[:, :4]
  extractor = evaluation.FeatureExtractor(fn=fn, id="cheap", description="test extractor")
  monkeypatch.setattr(inception, "build_extractor", lambda *args, **kwargs: extractor)


def test_eval_into_the_same_out_after_the_weights_changed_is_refused(run_py, tmp_path, cheap_extractor,
                                                                    tiny_model_config, write_random_checkpoint):
  config = tiny_model_config()
  ckpt = write_random_checkpoint(str(tmp_path / "export"), config, seed=0)
  ref = data.write_synthetic_folder(str(tmp_path / "ref"), 20000, 10)
  argv = ["eval", "--checkpoint", ckpt, "--ref", ref, "--num_samples", "10", "--batch_size", "10", "--out",
          str(tmp_path / "ev")]
  rc, _, err = run_py(*argv)
  assert rc == 0, err
  first = evaluation.sampler.weights_sha256(ckpt)
  shutil.copytree(ckpt, tmp_path / "first_export")  # copy2: the bytes and the mtimes
  shard = open(tmp_path / "ev" / "samples" / "shard_00000.npz", "rb").read()
  # `train` rewrites <workdir>/export in place: same path, new weights (and a new manifest).
  write_random_checkpoint(ckpt, config, seed=1, overwrite=True)
  assert evaluation.sampler.weights_sha256(ckpt) != first
  err = refused(run_py, *argv, match="weights_sha256")
  assert "refusing to mix" in err and first in err
  assert open(tmp_path / "ev" / "samples" / "shard_00000.npz", "rb").read() == shard  # nothing was changed
  # The first weights back at that path: resumes.
  shutil.rmtree(ckpt)
  shutil.copytree(tmp_path / "first_export", ckpt)
  assert run_py(*argv)[0] == 0
  # Weights copied over by hand, the manifest left stale: the files are hashed, not the manifest trusted.
  weights = safetensors.numpy.load_file(os.path.join(ckpt, "transformer.safetensors"))
  name = sorted(weights)[0]
  weights[name] = weights[name] + 1.0  # same shapes, same file size
  safetensors.numpy.save_file(weights, os.path.join(ckpt, "transformer.safetensors"))
  refused(run_py, *argv, match="weights_sha256")
  # A setting that changes the samples is refused too; in a new folder the new weights are evaluated.
  shutil.rmtree(ckpt)
  write_random_checkpoint(ckpt, config, seed=0)
  refused(run_py, *argv, "--set", "sampler.choice_temperature=2.0", match="sampler")
  refused(run_py, *argv, "--steps", "3", match="steps: 4 there, 3 now")
  rc, _, err = run_py(*argv[:-1], str(tmp_path / "ev_new"), "--steps", "3")
  assert rc == 0, err


def test_every_setting_that_changes_samples_is_in_the_key(checkpoint, tiny_model_config):
  config = tiny_model_config()
  base = dict(backend="torch", steps=4, precision="parity")
  key = lambda **kw: evaluation.sampler.sample_settings(kw.pop("config", config), checkpoint, **{**base, **kw})
  reference = key()
  changed = [key(backend="jax"), key(steps=3), key(precision="fast"), key(torch_compile=True),
             key(config=config.with_overrides(["sampler.mask_schedule=linear"])),
             key(config=config.with_overrides(["sampler.guidance_scale=2"]))]
  assert all(c != reference for c in changed)
  assert key() == reference  # deterministic
  # The class names do not change a sample: the same key.
  renamed = config.replace(data=config.data.__class__(class_names=("a", "b", "c")))
  assert key(config=renamed) == reference
