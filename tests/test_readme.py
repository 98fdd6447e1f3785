"""The README cannot rot: every `python run.py ...` command in it parses against run.py's flags (each flag one its
subcommand uses), and the ones that run on the embedded demo model (sample, edit) are executed as written. The
convert commands are exercised by tests/test_conversion.py (official fixtures through `run.py convert`), the parity
command by parity_tests/test_runner.py; the train and eval commands run here, shortened, under the `slow` marker.
"""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DEMO = os.path.join(REPO, "demo", "checkpoint")


def readme_commands() -> list[list[str]]:
  """Every `python run.py ...` command of the README's bash blocks, as argv (comments and `&&` chains split)."""
  with open(README) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    joined = block.replace("\\\n", " ")
    for line in joined.splitlines():
      line = line.split("#", 1)[0]
      for part in line.split("&&"):
        argv = shlex.split(part)
        if argv[:2] == ["python", "run.py"]:
          commands.append(argv[2:])
  return commands


def test_the_readme_has_the_two_setup_commands_first():
  with open(README) as f:
    text = f.read()
  first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
  assert len(first_block) == 2
  assert first_block[0].startswith('pip install -e ".[test]" torch==2.13.0 && python run.py sample')
  assert first_block[1].startswith("python -m pytest")
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert "python -m pytest" in f.read()  # CI runs the README's test command


def test_every_readme_command_parses_against_run_py_flags():
  sys.path.insert(0, REPO)
  import run  # pylint: disable=import-outside-toplevel
  commands = readme_commands()
  assert len(commands) >= 15
  for argv in commands:
    assert argv and argv[0] in run.COMMANDS, argv
    try:
      run.FLAGS(["run.py", *argv])  # raises on an unknown flag or a bad value
      run.check_flags(argv[0])  # raises on a flag this subcommand does not use
    finally:
      run.FLAGS.unparse_flags()


def _run(argv, cwd):
  result = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-2000:])
  return result.stdout


def _inputs(cwd):
  """The files the README's edit commands name: a 48x48 image (resized by the command) and a mask."""
  from maskgit_common.data import synthetic_image  # pylint: disable=import-outside-toplevel
  from maskgit_common.images import to_uint8  # pylint: disable=import-outside-toplevel
  image, _ = synthetic_image(2, 48)
  Image.fromarray(to_uint8(image)).save(os.path.join(cwd, "in.png"))
  mask = np.zeros((48, 48), np.uint8)
  mask[12:36, 12:36] = 255
  Image.fromarray(mask).save(os.path.join(cwd, "mask.png"))


@pytest.mark.skipif(not os.path.isdir(DEMO), reason="the embedded demo model is missing from this checkout")
def test_readme_sample_and_edit_commands_run_as_written(tmp_path, monkeypatch, run_py):
  """Each command through run.py's flags and main, in this process (one import of the frameworks for all of them;
  the separate process around main is tests/test_cli.py's), from the directory the README's paths are relative to."""
  _inputs(tmp_path)
  monkeypatch.chdir(tmp_path)
  commands = [argv for argv in readme_commands() if argv[0] in ("sample", "edit") and "--checkpoint" not in argv]
  assert any(argv[0] == "edit" for argv in commands) and any(argv[0] == "sample" for argv in commands)
  for argv in dict.fromkeys(map(tuple, commands)):  # a command the README repeats (plain `sample`) runs once
    rc, out, err = run_py(*argv)
    assert rc == 0, (argv, out[-2000:], err[-2000:])
    assert "wrote" in out, argv
  for name in ("samples.png", "grid.png", "steps.png"):  # labelled grids of 32 px tiles
    with Image.open(tmp_path / name) as picture:
      assert picture.size[0] > 32 and picture.size[1] > 32, name
  for name in ("edited.png", "wider.png"):  # `edit --out` is the edited image alone, at the model's size
    with Image.open(tmp_path / name) as picture:
      assert picture.size == (32, 32), name


@pytest.mark.slow
def test_readme_train_and_eval_commands_run_shortened(tmp_path):
  """The README's train commands with 3 steps each (and its eval command on the demo, 20 samples)."""
  short = ["--set", "train.num_train_steps=3", "--set", "train.batch_size=8", "--set", "train.log_every_steps=1",
           "--set", "train.checkpoint_every_steps=3"]
  for argv in readme_commands():
    if argv[0] == "train" and "tiny" in argv:
      _run([*argv, *short], tmp_path)
  assert os.path.isdir(tmp_path / "runs" / "mine" / "export")
  _run(["convert", "--src", "runs/mine/export", "--dst", "mine_torch", "--to", "torch"], tmp_path)
  from maskgit_common.data import write_synthetic_folder  # pylint: disable=import-outside-toplevel
  write_synthetic_folder(str(tmp_path / "ref_images"), 20000, 20)
  _run(["eval", "--checkpoint", DEMO, "--num_samples", "20", "--batch_size", "10", "--ref",
        str(tmp_path / "ref_images"), "--out", "eval_run"], tmp_path)
  assert os.path.isfile(tmp_path / "eval_run" / "metrics.json")
