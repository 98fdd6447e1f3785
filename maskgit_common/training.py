"""Framework-free pieces of the training loop, shared by maskgit_jax/train.py and maskgit_torch/train.py.

  learning_rate      linear warmup, then constant or cosine (plain math: both backends get the same float)
  TrainingData       which examples and which masks every step uses: a pure function of (seed, step, position)
  CheckpointDir      step directories written atomically with a sha256 manifest, keep-last-N, newest valid restore
  MetricsWriter      metrics.jsonl plus a TensorBoard event file (a minimal tfevents writer, no tensorflow needed)
  NonFiniteLossError raised when a loss is NaN/inf (training stops; the last good checkpoint stays)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import time
import warnings
from typing import Callable

import numpy as np

from maskgit_common import fileio, masking
from maskgit_common.errors import UserError

CHECKPOINT_PREFIX = "ckpt_"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"  # <workdir>/tokenizer: the tokenizer export read by default (train_tokenizer writes it)
EXPORT_DIR = "export"  # <workdir>/export: the portable checkpoint directory (DESIGN §4)
# Independent numpy streams per purpose: np.random.default_rng([seed, STREAM, counter]).
STREAM_DATA_ORDER, STREAM_MASKS, STREAM_DROPOUT = 0, 1, 2


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss became NaN or inf."""


def learning_rate(step: int, train) -> float:
  """Learning rate of optimizer step `step` (0-based): linear warmup to train.lr, then constant or cosine to 0.

  Warmup reaches lr at step warmup_steps - 1 ((step + 1) / warmup_steps), so the first step already moves.
  """
  if train.warmup_steps > 0 and step < train.warmup_steps:
    return train.lr * (step + 1) / train.warmup_steps
  if train.lr_schedule == "cosine":
    decay_steps = max(1, train.num_train_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
  return train.lr


def find_tokenizer(workdir: str, tokenizer: str | None = None) -> str | None:
  """Where the tokenizer weights that build the token cache come from.

  In order: the explicit `tokenizer` path (a checkpoint directory or a weights file), else `<workdir>/tokenizer`
  when it exists (where `train_tokenizer(config, workdir)` exports), else None (a randomly initialised tokenizer,
  with a warning: fine for exercising the loop, but its samples do not look like the data).
  """
  if tokenizer:
    if not os.path.exists(tokenizer):
      raise FileNotFoundError(f"tokenizer checkpoint {tokenizer} does not exist")
    return tokenizer
  default = os.path.join(workdir, TOKENIZER_DIR)
  return default if os.path.isdir(default) else None


def step_seed(seed: int, stream: int, *counters: int) -> int:
  """A 63-bit seed for frameworks that want one integer (e.g. torch.manual_seed), from independent counters."""
  return int(np.random.SeedSequence([seed, stream, *counters]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# Data order and masks ------------------------------------------------------------------------------------------
class TrainingData:
  """Global batches from a token cache, identical in every backend and for any number of devices.

  Examples are read in epochs, each a fresh permutation drawn from (seed, epoch); `position` counts examples
  consumed so far (the data position stored in checkpoints). The masking draws of step s come from (seed, s). Each
  data-parallel worker takes its contiguous slice of the global batch (`shard`).
  """

  def __init__(self, cache, config):
    self.cache, self.config = cache, config
    self.batch_size = config.train.batch_size
    self.seed = config.train.seed
    self._perms: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, STREAM_DATA_ORDER, epoch]).permutation(len(self.cache))
    return self._perms[epoch]

  def indices(self, position: int, count: int) -> np.ndarray:
    n = len(self.cache)
    pos = np.arange(position, position + count, dtype=np.int64)
    return np.concatenate([self._permutation(int(e))[pos[pos // n == e] % n] for e in np.unique(pos // n)])

  def noise(self, step: int) -> masking.TrainingNoise:
    rng = np.random.default_rng([self.seed, STREAM_MASKS, step])
    return masking.draw_noise(rng, self.batch_size, self.config.num_tokens)

  def global_batch(self, step: int, position: int) -> dict[str, np.ndarray]:
    """The batch of optimizer step `step`, starting at data position `position` (numpy arrays)."""
    idx = self.indices(position, self.batch_size)
    codes = self.cache.codes(idx)
    flipped = self.cache.codes(idx, flipped=True) if self.cache.has_flipped else None
    return masking.make_batch(codes, self.cache.labels[idx], self.noise(step), self.config, flipped)


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


sha256_file = fileio.sha256_file  # one definition (fileio); re-exported for the trainers' callers


class CheckpointDir:
  """`root/ckpt_<step>/` directories, each written whole or not at all, checked on restore.

  `save` writes every file into a temporary directory, fsyncs, writes `manifest.json` (sha256 and size of every
  file, plus `meta`), then renames the directory into place: a kill at any moment leaves either the previous state or
  the complete new checkpoint. `latest` returns the newest checkpoint whose manifest verifies; a corrupt one is
  skipped with a warning (and never deleted, so it can be inspected).
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
def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # TFRecord's masked CRC


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  """A tensorflow.Event protobuf, hand-encoded (wall_time=1 double, step=2 int64, file_version=3, summary=5)."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    v = file_version.encode()
    out += b"\x1a" + _varint(len(v)) + v
  if scalars:
    summary = b""
    for tag, value in scalars.items():
      t = tag.encode()
      val = b"\x0a" + _varint(len(t)) + t + b"\x15" + struct.pack("<f", float(value))  # Value.tag, simple_value
      summary += b"\x0a" + _varint(len(val)) + val  # Summary.value (repeated)
    out += b"\x2a" + _varint(len(summary)) + summary
  return out


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


class MetricsWriter:
  """Appends scalars to `logdir/metrics.jsonl` and to a TensorBoard event file (`tensorboard --logdir LOGDIR`).

  `resume_step`: a resumed run first drops the JSONL lines logged after its checkpoint, so every step appears once
  (TensorBoard shows the repeated steps of a new event file on top of the old ones, which is harmless).
  """

  def __init__(self, logdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    truncate_jsonl(os.path.join(logdir, "metrics.jsonl"), resume_step)
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._events = open(os.path.join(logdir, name), "ab")
    self._record(_event(time.time(), 0, file_version="brain.Event:2"))

  def _record(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._events.write(header + struct.pack("<I", _masked_crc32c(header)) + data
                       + struct.pack("<I", _masked_crc32c(data)))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    self._record(_event(time.time(), int(step), scalars=scalars))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
  """Reads back (step, {tag: value}) from an event file written by MetricsWriter (checks every CRC)."""
  out = []
  with open(path, "rb") as f:
    blob = f.read()
  i = 0
  while i < len(blob):
    header = blob[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    if struct.unpack("<I", blob[i + 8:i + 12])[0] != _masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {i}")
    data = blob[i + 12:i + 12 + length]
    if struct.unpack("<I", blob[i + 12 + length:i + 16 + length])[0] != _masked_crc32c(data):
      raise ValueError(f"{path}: bad data CRC at byte {i}")
    i += 16 + length
    out.append(_parse_event(data))
  return [e for e in out if e[1]]


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  n = shift = 0
  while True:
    b = buf[i]
    i += 1
    n |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return n, i


def _fields(buf: bytes):
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    num, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _read_varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    elif wire == 2:
      n, i = _read_varint(buf, i)
      value, i = buf[i:i + n], i + n
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield num, value


def _parse_event(data: bytes) -> tuple[int, dict[str, float]]:
  step, scalars = 0, {}
  for num, value in _fields(data):
    if num == 2:
      step = value
    elif num == 5:
      for _, val in _fields(value):
        fields = dict(_fields(val))
        if 1 in fields and 2 in fields:
          scalars[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
  return step, scalars
