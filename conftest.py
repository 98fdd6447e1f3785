"""Test-wide settings, set before any test imports jax or torch: parity precision (float32 matmuls at
full precision, docs/ARCHITECTURE.md) and one JAX compilation cache for the session; and `run_py`, run.py in this
process (tests/ and parity_tests/ both use it). The shared models and data are tests/conftest.py's.

Most of the suite's time is XLA compiling: the same programs come back under new `jax.jit` wrappers (a pipeline
loaded again, our module and the official one lowering to the same HLO, a `run.py` subprocess). A persistent cache
in a fresh temporary directory serves those repeats from disk; it is empty at the start of every session (the
numbers of a clean clone, nothing carried over between runs) and is passed to subprocesses through the environment.
A cache directory the caller already set is kept.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="maskgit-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  # Every compilation is stored: most programs here compile in well under the default 1 s threshold.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture
def run_py(capsys):
  """run_py(*argv) -> (exit status, stdout, stderr) of `python run.py ARGV`, run in this process (the frameworks are
  imported once; what a separate process adds, absl's app.run, is tested once in tests/test_cli.py)."""
  import run  # pylint: disable=import-outside-toplevel

  def call(*argv):
    try:
      rc = run.main(run.FLAGS(["run.py", *argv]))
    finally:
      run.FLAGS.unparse_flags()
    out, err = capsys.readouterr()
    return rc, out, err
  return call


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
