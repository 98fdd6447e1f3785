"""Atomic files and directories: the one writer every file of the project goes through (docs/ARCHITECTURE.md, "Files").

A file appears whole or not at all: it is written to a hidden temporary name in the same directory, flushed and
fsynced, given the permissions a plain `open()` would give it (0o666 & ~umask, not mkstemp's 0o600), renamed over
the destination, and the directory entry fsynced.

A directory likewise (`atomic_directory`): it is assembled beside the destination, every file fsynced, a
`manifest.json` listing every file (size, sha256) written last, then renamed into place. An existing destination is
replaced only with `overwrite=True`, and then only when it is a directory this project wrote: one whose manifest
lists everything inside it (or, for directories written before manifests existed, one holding only a config.json and
checkpoint weight files). Nothing else, a user's thesis beside a checkpoint included, is ever removed. A destination
that equals or contains a protected path (the conversion's source, the current directory) is refused.

Temporary names carry the host and the pid (`.<name>.tmp-<host>-<pid>-<random>`), so a later run removes the
leftovers of a killed one (same host, pid no longer alive) and says so, and never touches a live writer's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from typing import Callable, Iterable, Iterator

from maskgit_common.errors import UserError

MANIFEST = "manifest.json"
WRITER = "maskgit-parity"
# What a checkpoint directory written before manifests existed may hold (torch and JAX export layouts).
LEGACY_CHECKPOINT_FILES = frozenset({"config.json", "tokenizer.safetensors", "transformer.safetensors",
                                     "tokenizer.msgpack", "transformer.msgpack"})

_log = logging.getLogger(__name__)
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TEMP = re.compile(r"^\.(?P<base>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+$")


class DestinationError(UserError, OSError):
  """A destination cannot be written or replaced; the message names the path and says why."""


# Permissions, temporary names, leftovers --------------------------------------------------------------------------
def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _temp_name(path: str, kind: str) -> str:
  parent, base = os.path.split(os.path.abspath(path))
  return os.path.join(parent, f".{base}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def remove_stale_temporaries(path: str, *, any_name: bool = False) -> list[str]:
  """Removes `.<base>.tmp-*` / `.<base>.old-*` beside `path` left by killed runs on this host; returns them.

  With `any_name`, `path` is a directory and every stale temporary inside it goes, whatever it was named for.
  """
  parent, base = (os.path.abspath(path), None) if any_name else os.path.split(os.path.abspath(path))
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:
    return removed
  for name in names:
    m = _TEMP.match(name)
    if not m or (base is not None and m.group("base") != base) or m.group("host") != _HOST or _pid_alive(int(m.group("pid"))):
      continue
    stale = os.path.join(parent, name)
    if os.path.isdir(stale) and not os.path.islink(stale):
      shutil.rmtree(stale, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(stale)
    removed.append(stale)
    _log.warning("removed %s, left by an interrupted run (pid %s, no longer alive)", stale, m.group("pid"))
  return removed


def _fsync_dir(directory: str) -> None:
  with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or fsynced
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def check_writable(path: str, what: str = "output") -> str:
  """Raises DestinationError unless a file can be created at `path`; call it before slow work, not after."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise DestinationError(f"{what} {path} is a directory; give a file name")
  parent = os.path.dirname(path)
  probe = parent
  while not os.path.exists(probe):  # the nearest existing ancestor decides whether the parent can be created
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise DestinationError(f"{what} {path}: {probe} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise DestinationError(f"{what} {path} is not writable (permission denied)")
  return path


# Files --------------------------------------------------------------------------------------------------------
def atomic_write(path: str, data: bytes | Callable) -> str:
  """Writes `data` (bytes, or a function given the open binary file) to `path` atomically; returns the path."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise DestinationError(f"cannot write {path}: it is a directory")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  remove_stale_temporaries(path)
  tmp = _temp_name(path, "tmp")
  try:
    with open(tmp, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(parent)
  return path


def atomic_write_text(path: str, text: str) -> str:
  return atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj, indent: int | None = 2) -> str:
  return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def sha256_file(path: str) -> str:
  """Hex SHA-256 of a file, read in blocks (manifests, weight identity, benchmark byte-identity)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


# Directories --------------------------------------------------------------------------------------------------
def files_below(root: str) -> list[str]:
  """Every file under `root`, recursively, as sorted '/'-joined relative paths."""
  out = []
  for dirpath, _, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    out += [f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}" for f in filenames]
  return sorted(out)


def read_manifest(directory: str) -> dict | None:
  """The manifest this project wrote into `directory`, or None when there is none (or it is not ours)."""
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) and manifest.get("writer") == WRITER else None


def foreign_entries(directory: str) -> list[str]:
  """What inside `directory` this project did not write (empty: the directory is ours to replace)."""
  present = files_below(directory)
  manifest = read_manifest(directory)
  if manifest is not None:
    known = set(manifest.get("files", {})) | {MANIFEST}
  elif "config.json" in present:
    known = LEGACY_CHECKPOINT_FILES
  else:
    known = set()
  foreign = [p for p in present if p not in known]
  # Empty subdirectories are not files, but removing them would still remove something the user made.
  for dirpath, dirnames, filenames in os.walk(directory):
    if dirpath != directory and not dirnames and not filenames:
      foreign.append(os.path.relpath(dirpath, directory).replace(os.sep, "/") + "/")
  return sorted(foreign)


def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_replaceable(path: str, *, overwrite: bool, protect: Iterable[str] = ()) -> None:
  """Raises DestinationError unless `path` may be (re)written as a whole directory (module docstring)."""
  real = os.path.realpath(path)
  for p in [os.getcwd(), *protect]:
    if p and _inside(os.path.realpath(p), real):
      what = "the current directory" if p == os.getcwd() else p
      raise DestinationError(f"destination {path} {'is' if os.path.realpath(p) == real else 'contains'} {what}; "
                             f"writing it would replace that. Choose a new directory")
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path) or os.path.islink(path):
    raise DestinationError(f"destination {path} exists and is not a directory")
  if not os.listdir(path):
    return
  if not overwrite:
    raise DestinationError(f"destination {path} exists and is not empty; choose another directory or pass "
                           f"--overwrite (overwrite=True)")
  foreign = foreign_entries(path)
  if foreign:
    shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    raise DestinationError(f"refusing to replace {path}: it is not a checkpoint directory written by this project "
                           f"(it holds {shown}); nothing was changed. Choose a new or empty directory")


def _write_manifest(tmp: str, meta: dict | None) -> None:
  files = {}
  for name in files_below(tmp):
    p = os.path.join(tmp, *name.split("/"))
    with open(p, "rb") as f:
      os.fsync(f.fileno())
    files[name] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
  manifest = {"writer": WRITER, "files": files}
  if meta is not None:
    manifest["meta"] = meta
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def _make_ordinary(root: str) -> None:
  """mkdtemp/mkstemp-style private permissions -> what plain mkdir/open give under the user's umask."""
  mask = _umask()
  for dirpath, _, filenames in os.walk(root):
    os.chmod(dirpath, 0o777 & ~mask)
    for name in filenames:
      os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False, protect: Iterable[str] = (),
                     meta: dict | None = None) -> Iterator[str]:
  """Yields a temporary directory beside `path`; on success it becomes `path` (module docstring), on error it is
  removed and `path` is left as it was. `meta` is stored in the manifest (e.g. a training step)."""
  path = os.path.abspath(path)
  check_replaceable(path, overwrite=overwrite, protect=protect)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  remove_stale_temporaries(path)
  tmp = _temp_name(path, "tmp")
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.exists(os.path.join(tmp, MANIFEST)):
      raise ValueError(f"atomic_directory: the writer may not create {MANIFEST} itself")
    _write_manifest(tmp, meta)
    _make_ordinary(tmp)
    check_replaceable(path, overwrite=overwrite, protect=protect)  # again: the work may have taken hours
    old = None
    if os.path.isdir(path):
      old = _temp_name(path, "old")
      os.rename(path, old)
    try:
      os.rename(tmp, path)
    except BaseException:
      if old is not None:
        os.rename(old, path)
      raise
    _fsync_dir(parent)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def verify_directory(directory: str) -> tuple[bool, str, dict]:
  """(ok, reason, manifest): every file the manifest lists is present with its size and sha256."""
  manifest = read_manifest(directory)
  if manifest is None:
    return False, f"no readable {MANIFEST}", {}
  files = manifest.get("files") or {}
  if not files:
    return False, f"{MANIFEST} lists no files", manifest
  for name, info in files.items():
    p = os.path.join(directory, *name.split("/"))
    if not os.path.isfile(p):
      return False, f"missing file {name}", manifest
    if os.path.getsize(p) != info.get("bytes") or sha256_file(p) != info.get("sha256"):
      return False, f"checksum mismatch in {name}", manifest
  return True, "", manifest
