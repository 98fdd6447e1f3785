"""Shared test helpers: the vendored golden cases and tiny configs."""

import json
import os

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity_tests", "data")


def _cases(fmt):
  from parity_tests import plan  # pylint: disable=import-outside-toplevel
  from parity_tests.case import Case  # pylint: disable=import-outside-toplevel
  return sorted(os.path.join(GOLDEN_DIR, d) for d in os.listdir(GOLDEN_DIR)
                if os.path.isfile(os.path.join(GOLDEN_DIR, d, "config.json"))
                and plan.case_format(Case(os.path.join(GOLDEN_DIR, d))).name == fmt)


def golden_cases():
  """Case directories of the vendored official golden fixtures (google-research/maskgit; parity_tests/data)."""
  return _cases("official")


def seed_cases():
  """Case directories of the vendored seed fixtures (valeoai MaskGIT-pytorch v1: MaskGIT/, VQGAN/, config.json;
  parity_tests/data/SEED_FORMAT.md), beside the official ones."""
  return _cases("seed")


def golden_config(case_dir):
  from configs import MaskGITConfig
  with open(os.path.join(case_dir, "config.json")) as f:
    return MaskGITConfig.from_official(json.load(f), name=os.path.basename(case_dir))


def tensorboard_scalars(logdir):
  """Every scalar of a log directory as TensorBoard reads it ({tag: [(step, value)]}, its EventAccumulator:
  several event files in order, with the steps a resumed run purged left out)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # pylint: disable=import-outside-toplevel
  events = EventAccumulator(logdir)
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# Training ------------------------------------------------------------------------------------------------------
def patch_encoder(config):
  """A stand-in tokenizer: the mean colour of each f x f patch quantised to 4 levels per channel (64 codes).

  It gives token caches with real structure in milliseconds, so training tests exercise the loop, not the VQGAN."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  f = config.downsample_factor

  def encode(images):
    b, h, w, _ = images.shape
    mean = images.reshape(b, h // f, f, w // f, f, 3).mean(axis=(2, 4))
    q = np.clip((mean * 4).astype(np.int64), 0, 3)
    return (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]) % config.codebook_size
  return encode


def small_train_config(cache: str = "", **train):
  """The tiny preset with a 1-layer 32-wide transformer and batch 16 (seconds per run on a CPU); `cache`: read
  this token cache; `train`: train.<field> overrides."""
  import configs  # pylint: disable=import-outside-toplevel
  overrides = {"transformer.num_layers": 1, "transformer.num_embeds": 32, "transformer.num_heads": 2,
               "transformer.intermediate_size": 64, "train.batch_size": 16, "train.warmup_steps": 5,
               "train.num_train_steps": 30, "train.checkpoint_every_steps": 10, "train.log_every_steps": 5}
  if cache:
    overrides.update({"data.dataset": "tokens", "data.token_cache": cache})
  overrides.update({f"train.{k}": v for k, v in train.items()})
  return configs.get_preset("tiny").with_overrides(overrides)
