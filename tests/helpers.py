"""Shared test helpers: the vendored golden cases and tiny configs."""

import json
import os

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity_tests", "data")


def golden_cases():
  """Case directories of the vendored golden fixtures (any directory holding a config.json)."""
  return sorted(os.path.join(GOLDEN_DIR, d) for d in os.listdir(GOLDEN_DIR)
                if os.path.isfile(os.path.join(GOLDEN_DIR, d, "config.json")))


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
