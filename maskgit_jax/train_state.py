"""Resumable training state in JAX: one orbax PyTree per checkpoint, for both trainers.

`state/` inside a checkpoint directory (maskgit_common.training.CheckpointDir) is an orbax PyTree checkpoint of the
trainer's state (params, optimizer state, EMA ...) as host arrays, optax's named tuples stored as dicts
(flax.serialization.to_state_dict). Step, data position and RNG scheme are in the checkpoint's manifest. The torch
trainers' counterpart is maskgit_torch/train_state.py (one safetensors file); these are the project's two
resumable-state formats.
"""

from __future__ import annotations

import os

import flax.serialization
import jax
import orbax.checkpoint as ocp

STATE_DIR = "state"


def _checkpointer(process: int = 0) -> ocp.Checkpointer:
  """An orbax PyTree checkpointer run by `process` alone. Process 0 writes: the state is replicated, so its host
  copy is the whole state and the other hosts neither write nor coordinate. Every process reads for itself."""
  options = ocp.options.MultiprocessingOptions(primary_host=process, active_processes={process})
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                          multiprocessing_options=options)


def save(directory: str, state) -> None:
  """Writes `state` (any PyTree of arrays, flax struct dataclasses included) to directory/state."""
  # orbax refuses relative paths: a relative --workdir is resolved here.
  _checkpointer().save(os.path.abspath(os.path.join(directory, STATE_DIR)),
                       flax.serialization.to_state_dict(jax.device_get(state)))


def restore(directory: str, template):
  """Restores `save`'s output into the structure of `template` (bit-exact float32 arrays, on the host)."""
  restored = _checkpointer(jax.process_index()).restore(os.path.abspath(os.path.join(directory, STATE_DIR)))
  return flax.serialization.from_state_dict(template, restored)
