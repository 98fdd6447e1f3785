"""One golden case on disk, and the numpy comparisons every parity check is made of.

Framework-free (numpy only): both backends' checks read the fixtures and compare through this module, so the two
backends are judged by exactly the same code. Every size is read from `config.json` and the array shapes.
"""

import json
import os

import numpy as np
from maskgit_common.errors import UserError


class GoldenDirError(UserError, ValueError):
  """The --golden directory is missing or holds no case."""


def find_cases(golden):
  """Case directories under `golden`: itself if it holds config.json, else its subdirectories that do."""
  if not golden or not os.path.isdir(golden):
    raise GoldenDirError(f"golden directory {golden!r} does not exist (or is not a directory)")
  if os.path.isfile(os.path.join(golden, "config.json")):
    return [os.path.abspath(golden)]
  cases = sorted(os.path.join(golden, d) for d in os.listdir(golden)
                 if os.path.isfile(os.path.join(golden, d, "config.json")))
  if not cases:
    raise GoldenDirError(f"golden directory {golden!r} holds no case: expected it, or a subdirectory of it, to "
                         "contain config.json (fixture format: parity_tests/data/FORMAT.md)")
  return [os.path.abspath(c) for c in cases]


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

  @property
  def official(self):
    """config.json as written by the fixture generator (official ConfigDict sections + derived + versions)."""
    if self._official is None:
      with open(self.file("config.json")) as f:
        self._official = json.load(f)
    return self._official

  @property
  def config(self):
    if self._config is None:
      from configs import MaskGITConfig
      self._config = MaskGITConfig.from_official(self.official, name=self.name)
    return self._config

  def npz(self, filename):
    """All arrays of one npz file, as a dict (read fully, so the file is closed at once)."""
    if filename not in self._npz:
      with np.load(self.file(filename)) as data:
        self._npz[filename] = {k: data[k] for k in data.files}
    return self._npz[filename]

  def decode_record(self, filename, prefix=""):
    """decode.npz (prefix "") or edit.npz (prefix "edit_") with the prefix stripped from the keys."""
    data = self.npz(filename)
    return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


# Results -------------------------------------------------------------------------------------------------------
def result(passed, max_abs_diff=None, tolerance=None, detail=""):
  """One check's entry in the report (DESIGN §4). Non-finite diffs become null: JSON has no NaN/inf."""
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
