"""A training workdir: one trainer at a time, one backend, one run (docs/ARCHITECTURE.md, "Training driver").

Before a trainer does any slow work, `RunDir` checks and prepares the directory its run lives in:
  - the workdir is a directory (created if missing), not a file;
  - one trainer at a time: `<workdir>/train.lock` is held (flock) for the run; a second trainer is refused with the
    holder's pid and host; the kernel releases the lock of a killed process, and the next trainer takes it over
    and says whose it was;
  - leftovers of killed runs (fileio's `.<name>.tmp-<host>-<pid>-*` temporaries: a token cache, an export or a
    checkpoint being written) are removed and reported;
  - the run's checkpoints were written by this backend (a torch run is not resumed by JAX, nor the reverse);
  - the resume point: the newest checkpoint that verifies. If every checkpoint is corrupt, training is refused
    (naming them) unless `ignore_corrupt_checkpoints`, which sets them aside as `<name>.corrupt` and starts at 0;
  - the run is the same: every setting that changes the run (the trainer's `fingerprint`) is compared with the one
    stored in the checkpoint; a change is refused, naming each field, unless `allow_config_change`. Architecture
    fields (`fixed`) can never change: their state would not load.
In a multi-process run the main process prepares (lock, cleaning, setting aside) and the others wait at `barrier`;
every process then reads the same resume point.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from typing import Callable, Iterable

from maskgit_common import fileio, training
from maskgit_common.training import TrainingSetupError

LOCK_FILE = "train.lock"
STATE_FORMAT = 2  # the resumable-state layout of every trainer (maskgit_torch/jax train_state.py)
# Settings that may differ on resume without changing what is computed: how long, how often it logs/saves, how many
# checkpoints are kept, data loading threads, display names, and grad_accum (the same update within float rounding).
RESUME_EXEMPT = ("name", "train.num_train_steps", "train.log_every_steps", "train.checkpoint_every_steps",
                 "train.keep_checkpoints", "train.grad_accum", "data.num_workers", "data.class_names",
                 "settings.num_steps", "settings.log_every_steps", "settings.checkpoint_every_steps",
                 "settings.keep_checkpoints")


# Settings added since checkpoints of STATE_FORMAT 2 were first written, with the value every earlier run had: a
# fingerprint without the key (an older checkpoint) means that value, so those runs resume unchanged.
ADDED_SETTINGS = {"train.recipe": "official", "train.warmup_rule": "official", "train.clip_rule": "optax",
                  "data.random_crops": 1}


class WorkdirInUseError(TrainingSetupError):
  """Another trainer holds the workdir's lock."""


class ConfigChangedError(TrainingSetupError):
  """A resumed run would continue with other settings than the ones its checkpoint was trained with."""


def say(message: str) -> None:
  """A one-line report of the driver (resume point, cleaning); printed, since it answers what the user asked."""
  print(message, flush=True)


def check_workdir(workdir: str) -> str:
  """Creates `workdir` when missing; a one-line error when it is a file or cannot be created."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise TrainingSetupError(f"--workdir {workdir} exists and is not a directory; give a directory (it is created "
                             f"when missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise TrainingSetupError(f"--workdir {workdir}: cannot create it ({e.strerror})") from None
  return workdir


class WorkdirLock:
  """`<workdir>/train.lock`: an flock held for the run, the holder's pid, host and start time written inside.

  The file is never removed (unlinking it would let a waiting trainer lock a file nobody else sees), only emptied
  on release; it is a lock, not data, so it is written in place rather than through fileio's atomic writers.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  @staticmethod
  def _holder(fd: int) -> dict:
    try:
      return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> dict:
    """Takes the lock -> the previous holder's record ({} after a clean release); raises WorkdirInUseError."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = self._holder(fd)
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) if "time" in holder else "?"
      raise WorkdirInUseError(
          f"workdir {os.path.dirname(self.path)} is in use by another trainer (pid {holder.get('pid', '?')} on "
          f"host {holder.get('host', '?')}, started {started}; lock {self.path}). Wait for it to finish, stop it, "
          f"or use another --workdir") from None
    previous = self._holder(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return previous

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def config_changes(old: dict, new: dict, exempt: Iterable[str] = RESUME_EXEMPT) -> list[tuple[str, object, object]]:
  """(key, old, new) for every flat key whose value differs, except the exempt ones.

  `train.num_train_steps` is exempt unless a cosine schedule uses it (it then moves every later learning rate).
  """
  exempt = set(exempt)
  if "cosine" in (old.get("train.lr_schedule"), new.get("train.lr_schedule")):
    exempt.discard("train.num_train_steps")
  missing = object()
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, ADDED_SETTINGS.get(key, missing)), new.get(key, missing)
    if key not in exempt and a != b:
      out.append((key, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
  return out


def _describe(changes) -> str:
  return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


class RunDir:
  """One run's directory, checked, locked and cleaned, with its resume point (module docstring).

  Args:
    workdir: the directory the user named (the lock and the leftovers cleaning cover all of it).
    run_dir: where this run's checkpoints/ and logs live (the workdir, or workdir/tokenizer_train).
    backend: "torch" or "jax", recorded in and checked against every checkpoint.
    fingerprint: flat {key: value} of the settings that define the run.
    fixed: prefixes of fingerprint keys that can never change on resume (the architecture).
    is_main, barrier: multi-process runs: the main process prepares, `barrier(name)` waits for it.
    resume: False starts from step 0 whatever the checkpoints (which the first save then prunes).
  """

  def __init__(self, workdir: str, run_dir: str, *, backend: str, fingerprint: dict, fixed: tuple[str, ...] = (),
               keep_checkpoints: int = 3, is_main: bool = True, barrier: Callable[[str], None] | None = None,
               allow_config_change: bool = False, ignore_corrupt_checkpoints: bool = False, resume: bool = True):
    self.workdir, self.run_dir, self.backend = workdir, run_dir, backend
    self.fingerprint, self.fixed, self.keep = fingerprint, fixed, keep_checkpoints
    self.is_main, self.barrier = is_main, barrier or (lambda name: None)
    self.allow_config_change, self.ignore_corrupt = allow_config_change, ignore_corrupt_checkpoints
    self.wants_resume = resume
    self.lock = WorkdirLock(workdir)
    self.checkpoints: training.CheckpointDir | None = None
    self.resume: tuple[int, str, dict] | None = None  # (step, path, manifest) of the checkpoint to restore
    self._latest = None

  def __enter__(self) -> "RunDir":
    if self.is_main:
      check_workdir(self.workdir)
      previous = self.lock.acquire()
    try:
      if self.is_main:
        self._prepare(previous)
      self.barrier("workdir_ready")
      if not self.is_main:  # the main process has cleaned and set aside; every process reads the same state
        self.checkpoints = training.CheckpointDir(os.path.join(self.run_dir, "checkpoints"), self.keep)
        if self.wants_resume:
          self._check_backend()
          self._latest = self.checkpoints.latest()
      self.resume = self._check_resume(self._latest)
    except BaseException:
      self.lock.release()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.lock.release()

  def _prepare(self, previous: dict) -> None:
    if previous.get("pid") and previous.get("pid") != os.getpid():
      say(f"took over the lock {self.lock.path} of pid {previous['pid']} on {previous.get('host', '?')} (that "
          f"trainer is no longer running)")
    self.checkpoints = checkpoints = training.CheckpointDir(os.path.join(self.run_dir, "checkpoints"), self.keep)
    removed = []
    for root in (self.workdir, self.run_dir, checkpoints.root):
      removed += fileio.remove_stale_temporaries(root, any_name=True)
    for path in dict.fromkeys(removed):
      say(f"removed {path}, left by a killed run")
    if not self.wants_resume:
      return
    self._check_backend()
    self._latest = checkpoints.latest()  # warns about each corrupt one it skips
    if self._latest is None and checkpoints.steps():
      corrupt = [(s, checkpoints.verify(s)[1]) for s in reversed(checkpoints.steps())]
      names = ", ".join(f"{checkpoints.path(s)} ({reason})" for s, reason in corrupt)
      if not self.ignore_corrupt:
        raise TrainingSetupError(f"every checkpoint in {checkpoints.root} is corrupt: {names}. Nothing was "
                                 f"changed. Pass --ignore_corrupt_checkpoints to set them aside and start again "
                                 f"from step 0, or use another --workdir")
      for step, _ in corrupt:
        say(f"set aside the corrupt checkpoint {checkpoints.path(step)} as {checkpoints.set_aside(step)}; "
            f"starting from step 0 (--ignore_corrupt_checkpoints)")

  def _check_backend(self) -> None:
    for step in reversed(self.checkpoints.steps()):
      manifest = fileio.read_manifest(self.checkpoints.path(step))
      written_by = (manifest or {}).get("meta", {}).get("backend")
      if written_by:
        if written_by != self.backend:
          raise TrainingSetupError(
              f"{self.checkpoints.root} holds a run of the {written_by} trainer ({self.checkpoints.path(step)}); "
              f"resume it with --backend {written_by}, or train with --backend {self.backend} in another --workdir "
              f"(checkpoints convert with `run.py convert` once exported)")
        return

  def _check_resume(self, latest):
    if latest is None:
      return None
    step, path, manifest = latest
    meta = manifest.get("meta", {})
    if meta.get("state_format") != STATE_FORMAT:
      raise TrainingSetupError(f"checkpoint {path} was written by an older version of this project (state format "
                               f"{meta.get('state_format', 1)}, this version reads {STATE_FORMAT}); train in "
                               f"another --workdir")
    changes = config_changes(meta.get("run", {}), self.fingerprint)
    fixed = [c for c in changes if c[0].startswith(self.fixed)] if self.fixed else []
    if fixed:
      raise TrainingSetupError(f"{self.run_dir} holds a run of another model ({_describe(fixed)}); its checkpoints "
                               f"cannot be resumed with this config: use another --workdir")
    if changes and not self.allow_config_change:
      raise ConfigChangedError(f"resuming {path} with other settings than it was trained with: {_describe(changes)}. "
                               f"Pass --allow_config_change to continue with the new ones (the run then differs "
                               f"from an uninterrupted one), or use another --workdir")
    if changes and self.is_main:
      warnings.warn(f"resuming {path} with changed settings (--allow_config_change): {_describe(changes)}",
                    RuntimeWarning, stacklevel=2)
    return latest
