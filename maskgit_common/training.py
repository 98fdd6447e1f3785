"""Framework-free pieces of training, shared by the four trainers (docs/ARCHITECTURE.md, "Training driver").

  learning_rate      the one schedule: linear warmup, then constant or cosine (plain math: every backend gets the
                     same float)
  DataOrder          the one data order: epochs of fresh permutations drawn from (seed, epoch), read from a position
  TrainingData       the transformer's global batches: a pure function of (seed, step, position)
  CheckpointDir      step directories written atomically with a sha256 manifest, keep-last-N, newest valid restore
  MetricsWriter      metrics.jsonl plus TensorBoard scalars (tensorboardX)
  NonFiniteLossError raised when a loss is NaN/inf (training stops; the last good checkpoint stays)
The loop that uses them is maskgit_common/train_loop.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import warnings
from typing import Callable

import numpy as np

from maskgit_common import fileio, masking
from maskgit_common.errors import UserError

CHECKPOINT_PREFIX = "ckpt_"
CORRUPT_SUFFIX = ".corrupt"  # a corrupt checkpoint set aside (kept for inspection, never resumed or pruned)
MANIFEST = fileio.MANIFEST
TOKENIZER_DIR = "tokenizer"  # <workdir>/tokenizer: the tokenizer export read by default (train_tokenizer writes it)
EXPORT_DIR = "export"  # <workdir>/export: the portable checkpoint directory (docs/ARCHITECTURE.md, "Checkpoints")
# Independent numpy streams per purpose: np.random.default_rng([seed, STREAM, counter]).
STREAM_DATA_ORDER, STREAM_MASKS, STREAM_DROPOUT = 0, 1, 2


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss became NaN or inf."""


class TrainingSetupError(UserError, ValueError):
  """A training input (workdir, tokenizer, checkpoint) cannot be used; the message names it and says why."""


def learning_rate(step: int, lr: float, warmup_steps: int, schedule: str = "constant", num_steps: int = 0,
                  rule: str = "official", grad_accum: int = 1) -> float:
  """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then constant or cosine to 0.

  rule "official": warmup reaches lr at step warmup_steps - 1 ((step + 1) / warmup_steps), so the first step moves.
  rule "seed": the seed's Trainer.adapt_learning_rate, lr * iter / (warmup_steps * grad_accum) while
    iter < warmup_steps * grad_accum, where iter counts micro-batches and the optimizer steps on the last one of
    each group (iter = step * grad_accum + grad_accum - 1): 0 at the first step when grad_accum is 1. (The seed
    leaves the last warmup value, lr * (1 - 1 / (W k)), in the optimizer after warmup until a --resume resets it to
    lr; the rate here is lr after warmup, as every resumed seed run has it.)
  `num_steps` (the run's total) is where the cosine reaches 0.
  """
  if rule == "seed":
    it, end = step * grad_accum + grad_accum - 1, warmup_steps * grad_accum
    if it < end:
      return lr * (it / end)
  elif rule != "official":
    raise ValueError(f"warmup rule {rule!r} is not 'official' or 'seed'")
  elif warmup_steps > 0 and step < warmup_steps:
    return lr * (step + 1) / warmup_steps
  if schedule == "cosine":
    decay_steps = max(1, num_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
  if schedule != "constant":
    raise ValueError(f"learning-rate schedule {schedule!r} is not 'constant' or 'cosine'")
  return lr


def find_tokenizer(workdir: str, tokenizer: str | None = None) -> str | None:
  """Where the tokenizer weights that build the token cache come from.

  In order: the explicit `tokenizer` path (a checkpoint directory or a weights file), else `<workdir>/tokenizer`
  when it exists (where `train_tokenizer(config, workdir)` exports), else None (a randomly initialised tokenizer,
  with a warning: fine for exercising the loop, but its samples do not look like the data).
  """
  if tokenizer:
    if not os.path.exists(tokenizer):
      raise TrainingSetupError(f"--tokenizer {tokenizer}: no such file or directory (give a tokenizer checkpoint "
                               f"directory, e.g. <workdir>/{TOKENIZER_DIR}, or its weights file)")
    return tokenizer
  default = os.path.join(workdir, TOKENIZER_DIR)
  return default if os.path.isdir(default) else None


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; tuples become lists (as JSON stores them)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


# Fingerprint keys that can never change when a transformer run resumes: its state would not load.
TRANSFORMER_FIXED = ("image_size", "num_class", "tokenizer.", "transformer.")


def transformer_fingerprint(config) -> dict:
  """What defines a transformer run, as flat `key: value` (the resume check compares it with the checkpoint's):
  the model and the train and data sections, without the tokenizer trainer's own `train.tokenizer_*` fields."""
  tree = config.to_dict()
  out = flatten({k: tree[k] for k in ("image_size", "num_class", "tokenizer", "transformer", "train", "data")})
  return {k: v for k, v in out.items() if not k.startswith("train.tokenizer_")}


def step_seed(seed: int, stream: int, *counters: int) -> int:
  """A 63-bit seed for frameworks that want one integer (e.g. torch.manual_seed), from independent counters."""
  return int(np.random.SeedSequence([seed, stream, *counters]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# Data order and masks ------------------------------------------------------------------------------------------
class DataOrder:
  """Which examples a run reads, for every trainer: epochs, each a fresh permutation drawn from (seed, epoch).

  `position` counts the examples consumed so far (stored in every checkpoint); a batch of n examples starting at
  `position` reads the next n of this endless sequence, crossing an epoch boundary when it reaches one. A pure
  function of (seed, position), so a resumed run, any device count and either backend read the same examples.
  """

  def __init__(self, num_examples: int, seed: int):
    if num_examples < 1:
      raise ValueError("the dataset is empty")
    self.num_examples, self.seed = num_examples, seed
    self._perms: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, STREAM_DATA_ORDER, epoch]).permutation(
          self.num_examples)
    return self._perms[epoch]

  def indices(self, position: int, count: int) -> np.ndarray:
    n = self.num_examples
    pos = np.arange(position, position + count, dtype=np.int64)
    return np.concatenate([self._permutation(int(e))[pos[pos // n == e] % n] for e in np.unique(pos // n)])


class TrainingData:
  """The transformer's global batches from a token cache, identical in every backend and for any number of devices.

  Examples follow `DataOrder`; the masking draws of step s come from (seed, s). Each data-parallel worker takes
  its contiguous slice of the global batch (`shard`).
  """

  def __init__(self, cache, config):
    self.cache, self.config = cache, config
    self.batch_size = config.train.batch_size
    self.seed = config.train.seed
    self.order = DataOrder(len(cache), self.seed)
    self.crops = cache.num_crops if config.data.random_crops > 1 else 1
    if config.data.random_crops > 1 and cache.crops_requested != config.data.random_crops:
      from maskgit_common.token_cache import TokenCacheError  # pylint: disable=import-outside-toplevel
      raise TokenCacheError(f"token cache {cache.path} was built with {cache.crops_requested} crop(s) per image, "
                            f"data.random_crops={config.data.random_crops}: delete it to rebuild it (or set "
                            f"data.random_crops={cache.crops_requested})")

  def indices(self, position: int, count: int) -> np.ndarray:
    return self.order.indices(position, count)

  def noise(self, step: int) -> masking.TrainingNoise:
    rng = np.random.default_rng([self.seed, STREAM_MASKS, step])
    return masking.draw_noise(rng, self.batch_size, self.config.num_tokens)

  def global_batch(self, step: int, position: int) -> dict[str, np.ndarray]:
    """The batch of optimizer step `step`, starting at data position `position` (numpy arrays)."""
    idx, noise = self.indices(position, self.batch_size), self.noise(step)
    # Random crop: one of the cache's crops per example (with one crop, or crops off, the cache's centre crop).
    crops = np.minimum((noise.crop * self.crops).astype(np.int64), self.crops - 1) if self.crops > 1 else None
    codes = self.cache.codes(idx, crops=crops)
    flipped = self.cache.codes(idx, flipped=True, crops=crops) if self.cache.has_flipped else None
    return masking.make_batch(codes, self.cache.labels[idx], noise, self.config, flipped)


def shard(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
  """Worker `index` of `count`: its contiguous slice of every array's leading (batch) axis."""
  b = next(iter(batch.values())).shape[0]
  if b % count:
    raise ValueError(f"train.batch_size={b} is not divisible by the {count} data-parallel workers")
  per = b // count
  return {k: v[index * per:(index + 1) * per] for k, v in batch.items()}


# Checkpoint directories ----------------------------------------------------------------------------------------
def publish_dir(final: str, write_files: Callable[[str], None]) -> str:
  """Writes a directory through `write_files(tmp)` beside `final`, then swaps it in (fileio.atomic_directory; an
  existing `final` is replaced only when this project wrote it)."""
  with fileio.atomic_directory(final, overwrite=True) as tmp:
    write_files(tmp)
  return os.path.abspath(final)


sha256_file = fileio.sha256_file  # one definition (fileio); re-exported for older callers


class CheckpointDir:
  """`root/ckpt_<step>/` directories, each written whole or not at all, checked on restore.

  `save` writes every file into a temporary directory (fileio.atomic_directory: sha256 manifest with `meta`,
  fsync, rename into place): a kill at any moment leaves either the previous state or the complete new checkpoint.
  `latest` returns the newest checkpoint whose manifest verifies; a corrupt one is skipped with a warning and never
  deleted (`set_aside` renames it to `<name>.corrupt` so it can be inspected).
  """

  def __init__(self, root: str, keep: int = 3):
    self.root, self.keep = root, keep
    os.makedirs(root, exist_ok=True)

  def path(self, step: int) -> str:
    return os.path.join(self.root, f"{CHECKPOINT_PREFIX}{step:09d}")

  def steps(self) -> list[int]:
    out = []
    for name in os.listdir(self.root):
      if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        out.append(int(name[len(CHECKPOINT_PREFIX):]))
    return sorted(out)

  def save(self, step: int, write_files: Callable[[str], None], meta: dict) -> str:
    """`write_files(tmp_dir)` writes the state files; they are hashed, manifested and published atomically."""
    final = self.path(step)
    if os.path.isdir(final) and not self.verify(step)[0]:
      self.set_aside(step)  # a corrupt one is kept for inspection, not overwritten
    # Re-saving a step (e.g. after a fallback restore) replaces it.
    with fileio.atomic_directory(final, overwrite=True, meta={"step": step, "time": time.time(),
                                                              "host": socket.gethostname(), **meta}) as tmp:
      write_files(tmp)
    self._prune(keep_step=step)
    return final

  def _prune(self, keep_step: int) -> None:
    steps = [s for s in self.steps() if s != keep_step]
    for s in steps[:max(0, len(steps) - (self.keep - 1))]:
      shutil.rmtree(self.path(s), ignore_errors=True)
    fileio.remove_stale_temporaries(self.root, any_name=True)  # left by killed runs

  def verify(self, step: int) -> tuple[bool, str, dict]:
    """(ok, reason, manifest) for checkpoint `step`; the manifest's `meta` holds what `save` was given."""
    return fileio.verify_directory(self.path(step))

  def set_aside(self, step: int) -> str:
    """Renames checkpoint `step` to `<name>.corrupt[-N]`: kept for inspection, no longer resumed or pruned."""
    src = self.path(step)
    dst, n = src + CORRUPT_SUFFIX, 1
    while os.path.lexists(dst):
      dst, n = f"{src}{CORRUPT_SUFFIX}-{n}", n + 1
    os.rename(src, dst)
    return dst

  def latest(self) -> tuple[int, str, dict] | None:
    """(step, path, manifest) of the newest checkpoint that verifies, or None; warns about every corrupt one."""
    for step in reversed(self.steps()):
      ok, reason, manifest = self.verify(step)
      if ok:
        return step, self.path(step), manifest
      warnings.warn(f"checkpoint {self.path(step)} is corrupt ({reason}); falling back to an earlier one",
                    RuntimeWarning, stacklevel=2)
    return None


# Scalar logs ---------------------------------------------------------------------------------------------------
def truncate_jsonl(path: str, after_step: int) -> None:
  """Drops the lines of a metrics.jsonl logged after `after_step` (a resumed run logs those steps again)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line).get("step", 0) <= after_step:
          keep.append(line)
      except json.JSONDecodeError:
        pass  # a line cut short by a kill
  fileio.atomic_write_text(path, "".join(keep))


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl; a last line cut short (a kill, or a writer mid-line) is skipped."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        if line.endswith("\n"):
          raise
  return out


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors as values; we pass floats. The
  JAX trainers must not load torch (the backends never import each other), so torch is hidden while tensorboardX
  loads (its import is guarded: without torch it falls back to numpy). A process that already has torch keeps it.
  """
  import sys  # pylint: disable=import-outside-toplevel
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` now raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends scalars to `logdir/metrics.jsonl` and to a TensorBoard event file (`tensorboard --logdir LOGDIR`).

  `resume_step`: a resumed run first drops the JSONL lines logged after its checkpoint, so every step appears once;
  its event file starts with tensorboardX's `purge_step`, so TensorBoard discards the old files' later steps too.
  Both are append-only logs (a kill loses at most the line being written), not atomic files.
  """

  def __init__(self, logdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
    os.makedirs(logdir, exist_ok=True)
    truncate_jsonl(os.path.join(logdir, "metrics.jsonl"), resume_step)
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")  # pylint: disable=consider-using-with
    # The nanosecond suffix keeps two writers started in the same second apart, in the order they started.
    self._events = SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step else None,
                                 filename_suffix=f".{time.time_ns()}.{os.getpid()}")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    now = time.time()
    self._jsonl.write(json.dumps({"step": int(step), "time": now, **scalars}) + "\n")
    self._jsonl.flush()
    for tag, value in scalars.items():
      self._events.add_scalar(tag, value, int(step), walltime=now)
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()
