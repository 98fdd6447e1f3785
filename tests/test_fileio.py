"""maskgit_common.fileio: the one atomic file and directory writer (issue: nothing lost, nothing silently wrong)."""

import os
import stat
import subprocess
import sys

import pytest

from maskgit_common import fileio


def _write_dir(path, files, **kwargs):
  with fileio.atomic_directory(str(path), **kwargs) as tmp:
    for name, text in files.items():
      os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
      with open(os.path.join(tmp, name), "w") as f:
        f.write(text)


def test_atomic_write_uses_the_umask_and_leaves_no_temporary(tmp_path):
  old = os.umask(0o022)
  try:
    path = fileio.atomic_write(str(tmp_path / "a" / "x.bin"), b"abc")
  finally:
    os.umask(old)
  assert open(path, "rb").read() == b"abc"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not mkstemp's 0o600
  assert os.listdir(tmp_path / "a") == ["x.bin"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
  path = tmp_path / "x.txt"
  path.write_text("old")

  def boom(f):
    f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    fileio.atomic_write(str(path), boom)
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_directory_is_replaced_only_when_this_project_wrote_it(tmp_path):
  dst = tmp_path / "ckpt"
  _write_dir(dst, {"config.json": "{}", "w.bin": "1"})
  assert sorted(os.listdir(dst)) == ["config.json", "manifest.json", "w.bin"]
  with pytest.raises(fileio.DestinationError, match="not empty"):
    _write_dir(dst, {"config.json": "{}"})
  _write_dir(dst, {"config.json": "{}", "v.bin": "2"}, overwrite=True)  # ours: replaced whole
  assert sorted(os.listdir(dst)) == ["config.json", "manifest.json", "v.bin"]
  (dst / "thesis.tex").write_text("two years of work")
  with pytest.raises(fileio.DestinationError, match="thesis.tex"):
    _write_dir(dst, {"config.json": "{}"}, overwrite=True)
  assert (dst / "thesis.tex").read_text() == "two years of work" and (dst / "v.bin").exists()


def test_a_user_directory_is_never_replaced(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  (home / "thesis.tex").write_text("x")
  with pytest.raises(fileio.DestinationError, match="not a checkpoint directory written by this project"):
    _write_dir(home, {"config.json": "{}"}, overwrite=True)
  (home / "thesis.tex").unlink()
  (home / "empty_subdir").mkdir()
  with pytest.raises(fileio.DestinationError, match="empty_subdir/"):
    _write_dir(home, {"config.json": "{}"}, overwrite=True)
  assert (home / "empty_subdir").is_dir()


def test_legacy_checkpoint_directories_are_recognised(tmp_path):
  legacy = tmp_path / "old"
  legacy.mkdir()
  for name in ("config.json", "tokenizer.safetensors", "transformer.safetensors"):
    (legacy / name).write_text("x")
  _write_dir(legacy, {"config.json": "{}"}, overwrite=True)
  assert sorted(os.listdir(legacy)) == ["config.json", "manifest.json"]


def test_destination_equal_to_or_containing_a_protected_path_is_refused(tmp_path, monkeypatch):
  src = tmp_path / "run1" / "export"
  _write_dir(src, {"config.json": "{}"})
  with pytest.raises(fileio.DestinationError, match="is .*export"):
    _write_dir(src, {"config.json": "{}"}, overwrite=True, protect=[str(src)])
  with pytest.raises(fileio.DestinationError, match="contains .*export"):
    _write_dir(tmp_path / "run1", {"config.json": "{}"}, overwrite=True, protect=[str(src)])
  monkeypatch.chdir(tmp_path / "run1")
  with pytest.raises(fileio.DestinationError, match="current directory"):
    _write_dir(tmp_path / "run1", {"config.json": "{}"}, overwrite=True)
  assert (src / "config.json").exists()


def test_failed_directory_write_leaves_the_destination_and_no_temporary(tmp_path):
  dst = tmp_path / "ckpt"
  _write_dir(dst, {"config.json": "{}"})
  with pytest.raises(RuntimeError):
    with fileio.atomic_directory(str(dst), overwrite=True) as tmp:
      open(os.path.join(tmp, "config.json"), "w").close()
      raise RuntimeError("killed")
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  assert fileio.verify_directory(str(dst))[0]


def test_leftovers_of_killed_writers_are_removed_and_reported(tmp_path, caplog):
  dst = tmp_path / "out"
  # A writer killed with -9 inside the block leaves its temporary directory behind.
  script = (f"import os, sys; sys.path.insert(0, {os.getcwd()!r}); from maskgit_common import fileio\n"
            f"with fileio.atomic_directory({str(dst)!r}) as tmp:\n"
            f"  open(os.path.join(tmp, 'big.bin'), 'wb').write(b'0' * 1000); os.kill(os.getpid(), 9)\n")
  subprocess.run([sys.executable, "-c", script], check=False)
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
  assert len(leftovers) == 1
  live = tmp_path / f".out.tmp-{fileio._HOST}-{os.getpid()}-abcd1234"  # a live writer's (ours): kept
  live.mkdir()
  with caplog.at_level("WARNING"):
    _write_dir(dst, {"config.json": "{}"})
  assert leftovers[0] in caplog.text and "interrupted run" in caplog.text
  assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name])


def test_verify_directory_detects_damage(tmp_path):
  dst = tmp_path / "ckpt"
  _write_dir(dst, {"config.json": "{}", "sub/w.bin": "12345"})
  assert fileio.verify_directory(str(dst)) [0]
  (dst / "sub" / "w.bin").write_text("12346")
  ok, reason, _ = fileio.verify_directory(str(dst))
  assert not ok and "sub/w.bin" in reason


def test_check_writable(tmp_path):
  assert fileio.check_writable(str(tmp_path / "new" / "deeper" / "x.png"))
  with pytest.raises(fileio.DestinationError, match="is a directory"):
    fileio.check_writable(str(tmp_path))
  (tmp_path / "file").write_text("")
  with pytest.raises(fileio.DestinationError, match="not a directory"):
    fileio.check_writable(str(tmp_path / "file" / "x.png"))
  if os.geteuid() != 0:  # root may write anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(fileio.DestinationError, match="not writable"):
      fileio.check_writable(str(locked / "x.png"))
