"""Evaluation samples from a MaskGIT pipeline of either backend: what `run.py eval` runs.

Framework-free: the pipelines come in as objects with the interface of docs/API.md ("Pipelines"). Tokens are drawn
by `model` (torch or JAX); images are decoded from them by `decoder`, a torch pipeline in float32 (eager, parity
precision) for every backend. The two tokenizers agree to ~5e-6, which still flips a few uint8 pixels in 1e5, so
decoding each backend's tokens with its own tokenizer would make identical tokens score slightly differently; with
one decoder, identical tokens give identical images, features and metrics (tests/test_eval_backends.py).

The samples are keyed on content (evaluation/shards.py): the sha256 of the weight files and every setting that
changes a sample, so re-running into the same folder after the weights at the same path changed (as `train` does
to `<workdir>/export`) is refused instead of reporting the old model's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os

from evaluation import report as report_lib
from evaluation.features import EvalError, FeatureExtractor
from maskgit_common import fileio
from maskgit_common.generate import check_steps

DECODER = "torch float32 (eager, parity precision)"
# Files of a checkpoint directory that are not weights: config.json is keyed through the effective config instead
# (its sampling-relevant sections, after --set overrides), the manifest through the hashes it lists.
_NOT_WEIGHTS = ("config.json", fileio.MANIFEST)


def weights_sha256(path: str) -> str:
  """One sha256 over the weight files of a checkpoint (a directory, or a single weights file).

  Per file, the sha256 recorded in the directory's manifest.json when it lists the file with its current size and
  the file is not newer than the manifest (checkpoints this project writes), else the file is hashed here
  (official files, older checkpoints, a file copied over by hand).
  """
  if os.path.isfile(path):
    return fileio.sha256_file(path)
  if not os.path.isdir(path):
    raise EvalError(f"checkpoint {path}: no such file or directory")
  manifest = fileio.read_manifest(path)
  listed = manifest.get("files", {}) if manifest else {}
  written = os.path.getmtime(os.path.join(path, fileio.MANIFEST)) if manifest else 0.0
  entries = []
  for name in fileio.files_below(path):
    if name in _NOT_WEIGHTS:
      continue
    file = os.path.join(path, *name.split("/"))
    info, stat = listed.get(name) or {}, os.stat(file)
    # A file replaced after the manifest was written (newer, or another size) is hashed, never trusted.
    trusted = info.get("bytes") == stat.st_size and stat.st_mtime <= written
    entries.append((name, info["sha256"] if trusted else fileio.sha256_file(file)))
  if not entries:
    raise EvalError(f"checkpoint {path} holds no weight files")
  return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def sample_settings(config, checkpoint: str, *, backend: str, steps: int, precision: str,
                    torch_compile: bool = False) -> dict:
  """What makes the samples, as JSON values: joins the shard plan, so a change is refused on resume."""
  data = json.loads(config.to_json())
  settings = {
      "weights_sha256": weights_sha256(checkpoint),
      "checkpoint": os.path.abspath(checkpoint),  # informative: resuming is keyed on the hash, not on the path
      "model": {k: data[k] for k in ("image_size", "num_class", "tokenizer", "transformer")},
      "sampler": data["sampler"],
      "steps": int(steps),
      "backend": backend,
      "precision": precision,
      "decoder": DECODER,
  }
  if torch_compile:  # compiled kernels round differently: not the same samples as an eager run's
    settings["torch_compile"] = True
  return settings


def generate_fn(model, decoder, steps: int, noise_for=None):
  """generate_fn(labels, seed) for `evaluation.evaluate`: tokens from `model`, images decoded by `decoder`.

  `noise_for(labels, seed)` injects the draws (tests: the same recorded draws in both backends); by default each
  backend draws from `seed`.
  """
  def generate(labels, seed):
    labels = [int(l) for l in labels]
    noise = noise_for(labels, seed) if noise_for else None
    _, tokens = model.generate(labels, seed=seed, num_iter=steps, noise=noise)
    return decoder.decode_tokens(tokens), tokens
  return generate


def evaluate_pipeline(model, decoder, checkpoint: str, extractor: FeatureExtractor, ref: str, out_dir: str, *,
                      backend: str, num_samples: int, batch_size: int = 50, seed: int = 0, steps: int | None = None,
                      precision: str = "parity", torch_compile: bool = False, noise_for=None, log=print) -> dict:
  """`num_samples` class-balanced samples of `model` scored against `ref` (resumable in `out_dir`); the report."""
  steps = check_steps(steps, model.config)
  settings = sample_settings(model.config, checkpoint, backend=backend, steps=steps, precision=precision,
                             torch_compile=torch_compile)
  return report_lib.evaluate(generate_fn(model, decoder, steps, noise_for), extractor, num_samples,
                             model.config.num_class, out_dir, ref, batch_size=batch_size, seed=seed,
                             settings=settings, log=log)
