"""One golden case on disk, and the numpy comparisons every parity check is made of.

Framework-free (numpy only): both backends' checks read the fixtures and compare through this module, so the two
backends are judged by exactly the same code. Every size is read from `config.json` and the array shapes. A file
that cannot be read is a CaseFileError naming it (a damaged .npz included; nothing here ever unpickles).
"""

import json
import os
import zipfile
import zlib

import numpy as np
from maskgit_common.errors import UserError

from parity_tests import plan


class GoldenDirError(UserError, ValueError):
  """The --golden directory is missing or holds no case."""


class CaseFileError(UserError, ValueError):
  """A file of a case is missing, damaged or not in the fixture format; the message names it."""


def find_cases(golden):
  """Case directories under `golden`: itself if it holds config.json, else its subdirectories that do."""
  if not golden or not os.path.isdir(golden):
    raise GoldenDirError(f"golden directory {golden!r} does not exist (or is not a directory)")
  if os.path.isfile(os.path.join(golden, "config.json")):
    return [os.path.abspath(golden)]
  subdirs = sorted(d for d in os.listdir(golden) if os.path.isdir(os.path.join(golden, d)))
  cases = [os.path.join(golden, d) for d in subdirs if os.path.isfile(os.path.join(golden, d, "config.json"))]
  if not cases:
    # Directories that look like cases without their config.json are named: the likely mistake.
    partial = [d for d in subdirs if any(f.endswith((".npz", ".msgpack")) for f in os.listdir(os.path.join(golden, d)))]
    hint = f" ({', '.join(d + '/' for d in partial)} hold fixture files but no config.json)" if partial else ""
    raise GoldenDirError(
        f"no case found in golden directory {golden!r}{hint}: a case is a directory (DIR itself or a subdirectory "
        f"of it) holding config.json and its fixture files, {plan.what_a_case_looks_like()}")
  return [os.path.abspath(c) for c in cases]


def case_size(case_dir) -> int:
  """Bytes of every file under a case directory: how tests order cases from cheapest to dearest."""
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(case_dir) for f in files)


def _npz_reason(e):
  """Why numpy could not read an .npz (or one of its arrays), in words that never advise unpickling."""
  text = str(e)
  if "Object arrays" in text:
    return "it holds Python objects, not numbers (fixture arrays are plain numeric arrays; nothing is unpickled)"
  if "pickle" in text:  # numpy falls back to unpickling what is neither an .npz nor an .npy file
    return "not a numpy .npz archive (fixture arrays are plain numeric arrays; nothing is unpickled)"
  if isinstance(e, (zipfile.BadZipFile, zlib.error, EOFError)):
    return f"damaged or truncated zip archive ({type(e).__name__}: {text})"
  return f"{type(e).__name__}: {text}"


class Case:
  """Lazy view of one case directory: the config and the npz files, each read once."""

  def __init__(self, path):
    self.path = os.path.abspath(path)
    self.name = os.path.basename(self.path.rstrip(os.sep))
    self._npz = {}
    self._config = None
    self._official = None

  def file(self, filename):
    return os.path.join(self.path, filename)

  def has(self, filename):
    return os.path.isfile(self.file(filename))

  def missing(self, filenames):
    """The files of `filenames` this case does not hold."""
    return [f for f in filenames if not self.has(f)]

  @property
  def official(self):
    """config.json as written by the fixture generator (official ConfigDict sections + derived + versions)."""
    if self._official is None:
      path = self.file("config.json")
      try:
        with open(path) as f:
          data = json.load(f)
      except OSError as e:
        raise CaseFileError(f"{path}: cannot read ({e.strerror})") from None
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaseFileError(f"{path}: not valid JSON ({e})") from None
      if not isinstance(data, dict):
        raise CaseFileError(f"{path}: must hold a JSON object, got {type(data).__name__}")
      self._official = data
    return self._official

  def official_or_none(self):
    """config.json, or None when it cannot be read (the checks that need it then fail saying why)."""
    try:
      return self.official
    except CaseFileError:
      return None

  @property
  def config(self):
    if self._config is None:
      from configs import MaskGITConfig
      try:
        self._config = MaskGITConfig.from_official(self.official, name=self.name)
      except UserError as e:
        raise CaseFileError(f"{self.file('config.json')}: {e}") from None
    return self._config

  def npz(self, filename):
    """All arrays of one npz file, as a dict (read fully, so the file is closed at once)."""
    if filename not in self._npz:
      path = self.file(filename)
      if not os.path.isfile(path):
        raise CaseFileError(f"{path}: missing (the fixture format puts it in every case of its kind)")
      # numpy raises many kinds of error for a damaged file (ValueError, OSError, BadZipFile, zlib.error, ...).
      try:
        data = np.load(path, allow_pickle=False)
      except Exception as e:  # pylint: disable=broad-except
        raise CaseFileError(f"{path}: cannot be read: {_npz_reason(e)}") from None
      if not isinstance(data, np.lib.npyio.NpzFile):
        raise CaseFileError(f"{path}: a single .npy array, not an .npz archive of named arrays")
      arrays = {}
      with data:
        for key in data.files:
          try:
            arrays[key] = data[key]
          except Exception as e:  # pylint: disable=broad-except
            raise CaseFileError(f"{path}: array {key!r} cannot be read: {_npz_reason(e)}") from None
      self._npz[filename] = arrays
    return self._npz[filename]

  def decode_record(self, filename, prefix=""):
    """decode.npz (prefix "") or edit.npz (prefix "edit_") with the prefix stripped from the keys."""
    data = self.npz(filename)
    return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


# Results -------------------------------------------------------------------------------------------------------
def result(passed, max_abs_diff=None, tolerance=None, detail=""):
  """One check's entry in the report (docs/ARCHITECTURE.md, 'Parity runner and report'). Non-finite diffs become
  null: JSON has no NaN/inf."""
  if max_abs_diff is not None:
    max_abs_diff = float(max_abs_diff)
    if not np.isfinite(max_abs_diff):
      max_abs_diff = None
  return {"passed": bool(passed), "max_abs_diff": max_abs_diff,
          "tolerance": None if tolerance is None else float(tolerance), "detail": detail}


# Comparisons ---------------------------------------------------------------------------------------------------
class Comparison:
  """Max abs diff of one named array against its reference, with what went wrong if anything."""

  def __init__(self, name, ours, ref, tolerance):
    self.name = name
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    self.tolerance = tolerance
    self.shape_ok = ours.shape == ref.shape
    self.count = 0
    self.first = None
    if not self.shape_ok:
      self.max_abs_diff = float("inf")
      self.ok = False
      self.note = f"{name}: shape {ours.shape} != expected {ref.shape}"
      return
    if ref.dtype.kind in "biu":  # integer/bool arrays must be identical; tolerance 0.
      diff = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
      self.max_abs_diff = float(diff.max()) if diff.size else 0.0
      bad = diff != 0
    else:
      diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
      diff = np.where(np.isnan(diff), np.inf, diff)  # a NaN anywhere is a failure, never a pass
      self.max_abs_diff = float(diff.max()) if diff.size else 0.0
      bad = diff > tolerance
    self.count = int(bad.sum())
    if self.count:
      self.first = tuple(int(i) for i in np.argwhere(bad)[0])
    self.ok = self.count == 0
    self.note = (f"{name}: max diff {self.max_abs_diff:.3g}" if ref.dtype.kind == "f"
                 else f"{name}: identical" if self.ok else f"{name}: differs")
    if self.count:
      self.note += f" ({self.count}/{bad.size} elements off, first at index {self.first})"


def compare_all(named, tolerance):
  """Compares (name, ours, ref) triples; returns (passed, max diff, detail)."""
  comparisons = [Comparison(name, ours, ref, tolerance) for name, ours, ref in named]
  passed = all(c.ok for c in comparisons)
  max_diff = max((c.max_abs_diff for c in comparisons), default=0.0)
  return passed, max_diff, "; ".join(c.note for c in comparisons)
