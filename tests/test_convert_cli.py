"""`python run.py convert` as a user runs it (subprocesses): issue 14, findings 1, 3, 4, 5, 6a and 6c.

  1   --overwrite never deletes what is not a checkpoint: `--dst .`, a destination holding the source, the source
      itself, a directory with the user's files; each refused with the reason, every file left as it was;
  3   a source with one model converts and says which is absent; sampling it is a one-line error naming it;
  4   a PyTorch pickle given as a checkpoint is named as such, not "extra data after the msgpack checkpoint";
  5   the hidden temporary of a conversion killed with SIGKILL is removed by the next run, which says so;
  6a  `--backend jax --checkpoint DIR` reads the official files as downloaded, under their released names;
  6c  the same conversion gives the same bytes run after run.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")
ENV = dict(os.environ, PYTHONPATH=ROOT)


def run(*args, cwd=ROOT, expect_rc=0):
  done = subprocess.run([sys.executable, RUN, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == expect_rc, f"rc={done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
  if expect_rc:
    assert "Traceback" not in done.stderr and done.stderr.startswith("error:"), done.stderr
  return done


def snapshot(root) -> dict:
  """{relative path: bytes} of everything under `root`."""
  out = {}
  for base, dirs, files in os.walk(root):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
    for name in dirs:
      out[os.path.relpath(os.path.join(base, name), root) + "/"] = b""
  return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, one_golden_case):
  """A torch checkpoint this project wrote (the golden case converted once)."""
  path = tmp_path_factory.mktemp("converted") / "torch"
  run("convert", "--src", one_golden_case, "--dst", str(path), "--to", "torch")
  return str(path)


# Finding 1 ------------------------------------------------------------------------------------------------------
def test_dst_dot_never_wipes_the_current_directory(tmp_path, one_golden_case):
  (tmp_path / "thesis.tex").write_text("\\chapter{Results}\n")
  before = snapshot(tmp_path)
  done = run("convert", "--src", one_golden_case, "--dst", ".", "--to", "torch", "--overwrite", cwd=str(tmp_path),
             expect_rc=2)
  assert "is the current directory" in done.stderr and "nothing was written" in done.stderr, done.stderr
  assert snapshot(tmp_path) == before


def test_dst_holding_the_source_is_refused(tmp_path, converted):
  run1 = tmp_path / "run1"
  shutil.copytree(converted, run1 / "export")
  (run1 / "checkpoints").mkdir()
  (run1 / "checkpoints" / "step_100.safetensors").write_bytes(b"weeks of training")
  before = snapshot(run1)
  done = run("convert", "--src", str(run1 / "export"), "--dst", str(run1), "--to", "jax", "--overwrite",
             expect_rc=2)
  assert f"destination {run1} contains {run1 / 'export'}" in done.stderr, done.stderr
  assert snapshot(run1) == before


def test_dst_equal_to_src_is_refused(tmp_path, converted):
  src = tmp_path / "x"
  shutil.copytree(converted, src)
  before = snapshot(src)
  done = run("convert", "--src", str(src), "--dst", str(src), "--to", "torch", "--overwrite", expect_rc=2)
  assert f"destination {src} is {src}" in done.stderr, done.stderr
  assert snapshot(src) == before


def test_dst_with_foreign_files_is_refused_and_ours_is_replaced(tmp_path, converted, one_golden_case):
  dst = tmp_path / "dst"
  shutil.copytree(converted, dst)
  (dst / "notes.txt").write_text("mine")
  before = snapshot(dst)
  done = run("convert", "--src", one_golden_case, "--dst", str(dst), "--to", "jax", "--overwrite", expect_rc=2)
  assert f"refusing to replace {dst}: it is not a checkpoint directory written by this project (it holds " \
         f"notes.txt)" in done.stderr, done.stderr
  assert snapshot(dst) == before
  (dst / "notes.txt").unlink()  # now only what this project wrote: --overwrite replaces it, completely
  run("convert", "--src", one_golden_case, "--dst", str(dst), "--to", "jax", "--overwrite")
  assert sorted(os.listdir(dst)) == ["config.json", "manifest.json", "tokenizer.msgpack", "transformer.msgpack"]


# Finding 3 ------------------------------------------------------------------------------------------------------
def test_one_model_is_converted_with_a_note_and_sampling_it_names_the_missing_one(tmp_path, one_golden_case, run_py):
  src = tmp_path / "tokenizer_only"
  src.mkdir()
  for name in ("config.json", "tokenizer.msgpack"):
    shutil.copy(os.path.join(one_golden_case, name), src / name)
  done = run("convert", "--src", str(src), "--dst", str(tmp_path / "out"), "--to", "torch")
  assert "tokenizer" in done.stdout and "The source holds no transformer" in done.stdout, done.stdout
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "manifest.json", "tokenizer.safetensors"]
  # Sampling it: in this process (the torch import of a `run.py sample` process is not the point here).
  rc, _, err = run_py("sample", "--checkpoint", str(tmp_path / "out"), "--out", str(tmp_path / "s.png"))
  assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, err
  assert "holds no transformer (transformer.safetensors)" in err, err
  assert not (tmp_path / "s.png").exists()


# Finding 4 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_pytorch_pickle_is_named_as_such(tmp_path, zipped):
  import torch  # pylint: disable=import-outside-toplevel
  pth = tmp_path / "maskgit.pth"
  torch.save({"model": {"w": torch.zeros(2)}}, str(pth), _use_new_zipfile_serialization=zipped)
  done = run("convert", "--src", str(pth), "--dst", str(tmp_path / "out"), "--to", "jax", expect_rc=2)
  assert f"{pth} is a PyTorch checkpoint" in done.stderr and "extra data" not in done.stderr, done.stderr
  assert not (tmp_path / "out").exists()


# Finding 5 ------------------------------------------------------------------------------------------------------
_SLOW_CHILD = textwrap.dedent("""
    import sys, time
    import conversion
    from conversion.formats import torch_dir
    write = torch_dir.write_safetensors

    def slow(path, state):  # the first file lands in the hidden temporary, then the process hangs
      write(path, state)
      print("written", flush=True)
      time.sleep(300)

    torch_dir.write_safetensors = slow
    conversion.convert(sys.argv[1], sys.argv[2], to="torch")
""")


def test_leftovers_of_a_killed_conversion_are_removed_and_reported(tmp_path, one_golden_case):
  dst = tmp_path / "out"
  child = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, one_golden_case, str(dst)], cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "written", child.stderr.read()
    os.kill(child.pid, signal.SIGKILL)
  finally:
    child.wait(timeout=60)
    child.stdout.close()
    child.stderr.close()
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
  assert len(leftovers) == 1 and not dst.exists(), os.listdir(tmp_path)
  done = run("convert", "--src", one_golden_case, "--dst", str(dst), "--to", "torch")
  assert f"removed {tmp_path / leftovers[0]}, left by an interrupted conversion" in done.stdout, done.stdout
  assert sorted(os.listdir(tmp_path)) == ["out"]
  assert sorted(os.listdir(dst)) == ["config.json", "manifest.json", "tokenizer.safetensors",
                                     "transformer.safetensors"]


# Finding 6a -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory, one_golden_case):
  """The official files under their released names, as `wget` leaves them: no config.json, nothing else."""
  path = tmp_path_factory.mktemp("official")
  name = os.path.basename(one_golden_case)
  shutil.copy(os.path.join(one_golden_case, "tokenizer.msgpack"), path / f"tokenizer_{name}_checkpoint")
  shutil.copy(os.path.join(one_golden_case, "transformer.msgpack"), path / f"maskgit_{name}_checkpoint")
  return path


@pytest.mark.slow  # a JAX sampling subprocess (~20 s); the library-level test below runs by default
def test_jax_backend_samples_the_released_files_as_downloaded(released, tmp_path):
  done = run("sample", "--backend", "jax", "--checkpoint", str(released), "--classes", "0,1", "--steps", "2",
             "--out", str(tmp_path / "s.png"))
  assert (tmp_path / "s.png").stat().st_size > 0, done.stdout


def test_both_pipelines_read_the_released_names_with_the_case_config(released, one_golden_case, golden_config):
  from maskgit_jax import pipeline as jax_pipeline  # pylint: disable=import-outside-toplevel
  from maskgit_torch import pipeline as torch_pipeline  # pylint: disable=import-outside-toplevel
  expected = golden_config(one_golden_case)
  for pipeline in (jax_pipeline, torch_pipeline):
    config = pipeline.MaskGIT.from_checkpoint(str(released), device="cpu").config  # the shapes give the config
    assert (config.tokenizer, config.transformer) == (expected.tokenizer, expected.transformer)
    assert (config.image_size, config.num_class) == (expected.image_size, expected.num_class)


# Finding 6c -----------------------------------------------------------------------------------------------------
def test_conversions_are_byte_identical_run_to_run(tmp_path, one_golden_case):
  """Four runs (fresh processes, fresh hash seeds): every file of every output identical. With the two metadata
  entries safetensors stored in run-dependent order, four runs agreed with probability 1/64."""
  outputs = []
  for i in range(4):
    run("convert", "--src", one_golden_case, "--dst", str(tmp_path / str(i)), "--to", "torch")
    outputs.append(snapshot(tmp_path / str(i)))
  assert all(o == outputs[0] for o in outputs[1:])
