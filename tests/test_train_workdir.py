"""The training workdir: changed settings on resume, corrupt checkpoints, wrong paths, the other backend, two
trainers at once, leftovers of killed runs, the resume message (maskgit_common/workdir.py, one place for all four
trainers). The torch transformer trainer is the fast witness; the tokenizer and JAX cases check the same driver.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from maskgit_common import data as data_lib
from maskgit_common import token_cache, training, workdir as workdir_lib
from maskgit_common.errors import UserError
from tests.conftest import small_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch = pytest.importorskip("torch")
from maskgit_torch import train as torch_train  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def cache(train_token_cache):
  return train_token_cache


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def short(cache, **train):
  return small_train_config(cache, **{"num_train_steps": 10, "checkpoint_every_steps": 5, **train})


def train(config, workdir, **kwargs):
  return torch_train.train(config, str(workdir), progress=False, **kwargs)


def corrupt(path):
  """Flips bytes in the middle of the largest file of a checkpoint directory."""
  victim = max((os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f != training.MANIFEST),
               key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\xff\x00\xff\x00")


# Issue 14 finding 3: a resume with other settings; every checkpoint corrupt ----------------------------------------
def test_resume_with_another_lr_or_batch_size_is_refused_unless_allowed(cache, tmp_path, capsys):
  first = train(short(cache), tmp_path)
  assert first["step"] == 10
  for change, named in (({"lr": 3e-4}, "train.lr: 0.001 -> 0.0003"), ({"batch_size": 8}, "train.batch_size: 16 -> 8")):
    with pytest.raises(workdir_lib.ConfigChangedError, match=r"other settings than it was trained with") as error:
      train(short(cache, num_train_steps=12, **change), tmp_path)
    assert named in str(error.value) and "--allow_config_change" in str(error.value)
    assert isinstance(error.value, UserError)
  assert training.CheckpointDir(str(tmp_path / "checkpoints")).steps() == [5, 10]  # nothing was trained or written
  # More steps is not a change of the run (constant schedule); the resume says where it starts.
  capsys.readouterr()
  longer = train(short(cache, num_train_steps=12), tmp_path)
  assert longer["step"] == 12 and len(longer["losses"]) == 2
  assert "resumed from step 10" in capsys.readouterr().out
  with pytest.warns(RuntimeWarning, match=r"changed settings .*train.lr: 0.001 -> 0.0003"):
    accepted = train(short(cache, num_train_steps=14, lr=3e-4), tmp_path, allow_config_change=True)
  assert accepted["step"] == 14 and accepted["resumed_from"] == 12


def test_more_steps_under_a_cosine_schedule_is_a_change(cache, tmp_path):
  """With a cosine schedule num_train_steps sets every later learning rate, so it counts as a change."""
  train(short(cache, lr_schedule="cosine"), tmp_path)
  with pytest.raises(workdir_lib.ConfigChangedError, match=r"train.num_train_steps: 10 -> 20"):
    train(short(cache, lr_schedule="cosine", num_train_steps=20), tmp_path)


def test_every_checkpoint_corrupt_is_refused_unless_asked(cache, tmp_path, capsys):
  fresh = train(short(cache), tmp_path / "fresh")
  workdir = tmp_path / "run"
  train(short(cache), workdir)
  ckpts = training.CheckpointDir(str(workdir / "checkpoints"))
  for step in ckpts.steps():
    corrupt(ckpts.path(step))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(training.TrainingSetupError, match=r"every checkpoint .* is corrupt") as error:
      train(short(cache), workdir)
    assert ckpts.path(5) in str(error.value) and ckpts.path(10) in str(error.value)
    assert "--ignore_corrupt_checkpoints" in str(error.value)
    assert ckpts.steps() == [5, 10]  # nothing was changed
    capsys.readouterr()
    again = train(short(cache), workdir, ignore_corrupt_checkpoints=True)
  out = capsys.readouterr().out
  assert "set aside the corrupt checkpoint" in out and again["resumed_from"] == 0
  np.testing.assert_array_equal(again["losses"], fresh["losses"])  # a clean start from step 0
  assert sorted(os.listdir(ckpts.root)) == ["ckpt_000000005", "ckpt_000000005.corrupt", "ckpt_000000010",
                                            "ckpt_000000010.corrupt"]


# Issue 14 finding 4: one-line errors for a file as workdir, a missing tokenizer, the other backend, a second trainer
def test_workdir_that_is_a_file_and_missing_tokenizer_are_user_errors(cache, tmp_path):
  afile = tmp_path / "notes.txt"
  afile.write_text("mine")
  with pytest.raises(training.TrainingSetupError, match=r"--workdir .*notes.txt exists and is not a directory"):
    train(short(cache), afile)
  assert afile.read_text() == "mine"
  config = small_train_config(num_train_steps=2)  # images -> tokens: the tokenizer is needed
  with pytest.raises(training.TrainingSetupError, match=r"--tokenizer .*no_such_tokenizer: no such file"):
    train(config, tmp_path / "run", tokenizer=str(tmp_path / "no_such_tokenizer"))


def test_run_py_prints_one_line_for_a_file_workdir_and_a_missing_tokenizer(tmp_path):
  afile = tmp_path / "notes.txt"
  afile.write_text("mine")
  for argv, expected in ((["--workdir", str(afile)], "exists and is not a directory"),
                         (["--workdir", str(tmp_path / "w"), "--tokenizer", str(tmp_path / "nope")],
                          "nope: no such file or directory")):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "train", "--backend", "torch",
                           "--set", "train.num_train_steps=1", *argv], capture_output=True, text=True, timeout=300,
                          check=False, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-2000:]
  assert afile.read_text() == "mine"


def test_resuming_with_the_other_backend_names_the_writer(cache, tmp_path):
  pytest.importorskip("flax")
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  train(short(cache, num_train_steps=5), tmp_path / "torch_run")
  with pytest.raises(training.TrainingSetupError, match=r"holds a run of the torch trainer .*--backend torch"):
    jax_train.train(short(cache, num_train_steps=5), str(tmp_path / "torch_run"), progress=False)
  # A JAX run's checkpoint, as the JAX trainer records it (tests/test_train.py checks that it does): its manifest
  # names the backend. (Training one here would cost a JAX compile for a check made before any compile.)
  ckpts = training.CheckpointDir(str(tmp_path / "jax_run" / "checkpoints"))
  ckpts.save(5, lambda d: open(os.path.join(d, "state.bin"), "wb").close(),
             {"backend": "jax", "state_format": workdir_lib.STATE_FORMAT, "position": 80})
  with pytest.raises(training.TrainingSetupError, match=r"holds a run of the jax trainer .*--backend jax"):
    train(short(cache, num_train_steps=5), tmp_path / "jax_run")


def test_second_trainer_in_one_workdir_is_refused_with_the_holders_pid(cache, tmp_path, capsys):
  os.makedirs(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from maskgit_common import workdir; "
       f"workdir.WorkdirLock({str(tmp_path / 'run')!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
      stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirInUseError, match=rf"in use by another trainer \(pid {holder.pid} "):
      train(short(cache), tmp_path / "run")
  finally:
    holder.kill()
    holder.wait()
  # The holder was killed: its lock is stale; the next trainer takes it over and says whose it was.
  capsys.readouterr()
  out = train(short(cache, num_train_steps=5), tmp_path / "run")
  assert out["step"] == 5
  assert f"took over the lock {tmp_path / 'run' / workdir_lib.LOCK_FILE} of pid {holder.pid}" in \
      capsys.readouterr().out


# Issue 14 finding 5: leftovers of a kill -9 during the token cache build -------------------------------------------
_SLOW_BUILD = """
import sys, time
sys.path.insert(0, {repo!r})
from maskgit_common import data as data_lib, token_cache
from tests.conftest import small_train_config
config = small_train_config()
def encode(images):
  time.sleep(0.2)
  return (images[:, ::4, ::4, 0] * 63).astype("int64")
token_cache.build({path!r}, data_lib.SyntheticDataset(2000, 32, 10), encode, config, batch_size=8, progress=False)
"""


def test_token_cache_leftover_of_a_killed_run_is_removed_and_reported(tmp_path, capsys):
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD.format(repo=REPO, path=str(workdir / "tokens"))])
  deadline = time.time() + 120
  while not [n for n in os.listdir(workdir) if n.startswith(".tokens.tmp-")] and time.time() < deadline:
    time.sleep(0.1)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  leftovers = [n for n in os.listdir(workdir) if n.startswith(".tokens.tmp-")]
  assert leftovers and f"-{proc.pid}-" in leftovers[0]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the random tokenizer's warning
    out = train(small_train_config(num_train_steps=2, checkpoint_every_steps=2), workdir, num_synthetic=32)
  assert out["step"] == 2
  assert not [n for n in os.listdir(workdir) if n.startswith(".tokens.tmp-")]
  assert f"removed {workdir / leftovers[0]}, left by a killed run" in capsys.readouterr().out
  assert len(token_cache.TokenCache(str(workdir / "tokens"))) == 32  # rebuilt whole


# The same driver for the tokenizer trainers ----------------------------------------------------------------------
def test_tokenizer_resume_checks_the_same_way(tmp_path, capsys):
  from configs import MaskGITConfig, TokenizerConfig, TrainConfig  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train_tokenizer  # pylint: disable=import-outside-toplevel
  config = MaskGITConfig(
      name="t", image_size=16, num_class=10,
      tokenizer=TokenizerConfig(filters=8, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=4,
                                codebook_size=8, num_groups=4),
      train=TrainConfig(batch_size=4, num_train_steps=2, lr=1e-3, warmup_steps=0, checkpoint_every_steps=2))
  dataset = data_lib.SyntheticDataset(16, 16, 10)
  run = lambda cfg, **kw: train_tokenizer.train_tokenizer(cfg, str(tmp_path), dataset=dataset, progress=False,
                                                          eval_images=4, device="cpu", **kw)
  run(config)
  with pytest.raises(workdir_lib.ConfigChangedError, match=r"settings.beta2: 0.99 -> 0.9"):
    run(config.with_overrides({"train.num_train_steps": 3, "train.tokenizer_beta2": 0.9}))
  with pytest.raises(training.TrainingSetupError, match=r"another model .*tokenizer.filters: 8 -> 16"):
    run(config.with_overrides({"tokenizer.filters": 16}))
  capsys.readouterr()
  assert run(config.with_overrides({"train.num_train_steps": 3}))["step"] == 3
  assert "resumed from step 2" in capsys.readouterr().out
  manifest = json.load(open(os.path.join(tmp_path, "tokenizer_train", "checkpoints", "ckpt_000000003",
                                         training.MANIFEST)))
  assert manifest["meta"]["backend"] == "torch" and manifest["meta"]["position"] == 12
