"""The one training loop of the four trainers: transformer and tokenizer, torch and JAX.

docs/ARCHITECTURE.md, "Training driver". A backend trainer builds its model, optimizer and data, opens its
`workdir.RunDir` (checks, lock, resume point) and hands the loop a `TrainTask` with the framework parts: one
optimizer step, one device->host fetch, save/restore of its state, an export. The loop owns the rest, once:
  - the learning rate of every step (training.learning_rate), the step count and the data position;
  - metrics stay on the device and are fetched once per logging window (one transfer, no host sync per step);
    each fetch is checked for NaN/inf, which stops training with NonFiniteLossError. A checkpoint is written only
    after the metrics of the steps before it were checked, so the last checkpoint is always a good one;
  - checkpoint cadence (training.CheckpointDir: atomic, manifest meta with backend, step, data position, state
    format, RNG scheme and the run's settings, which the next resume compares);
  - resume from the RunDir's resume point, reported as "resumed from step N";
  - logs: metrics.jsonl and TensorBoard scalars (training.MetricsWriter), a tqdm progress bar.
What a recipe changes (masking, loss, label dropout, accumulation, precision, augmentation, EMA) lives in the
task's step and the data it builds, configured by the config's `train` section, never in this loop.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import tqdm

from maskgit_common import training
from maskgit_common.workdir import STATE_FORMAT, RunDir, say


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long the loop runs and how often it logs and saves; the learning-rate schedule's parameters."""
  num_steps: int
  batch_size: int  # examples per optimizer step: the data position advances by it
  lr: float
  warmup_steps: int = 0
  lr_schedule: str = "constant"
  log_every_steps: int = 50
  checkpoint_every_steps: int = 1000
  warmup_rule: str = "official"  # training.learning_rate's rule
  grad_accum: int = 1  # micro-batches per step (the seed's warmup counts them)

  @classmethod
  def from_train(cls, train) -> "LoopSettings":
    """From a config's `train` section (the transformer's settings)."""
    return cls(num_steps=train.num_train_steps, batch_size=train.batch_size, lr=train.lr,
               warmup_steps=train.warmup_steps, lr_schedule=train.lr_schedule,
               log_every_steps=train.log_every_steps, checkpoint_every_steps=train.checkpoint_every_steps,
               warmup_rule=train.warmup_rule, grad_accum=train.grad_accum)

  def learning_rate(self, step: int) -> float:
    return training.learning_rate(step, self.lr, self.warmup_steps, self.lr_schedule, self.num_steps,
                                  self.warmup_rule, self.grad_accum)


class TrainTask:
  """The framework parts of a trainer; maskgit_{torch,jax}/train.py and train_tokenizer.py implement one each."""
  backend = "?"  # "torch" | "jax": recorded in every checkpoint
  label = "train"  # progress bar
  progress_keys: tuple[str, ...] = ("loss",)  # metrics shown on the bar at each log
  finite_keys: tuple[str, ...] = ("loss",)  # metrics that must stay finite (diagnostics like norms may overflow)
  is_main = True  # the process that writes checkpoints, logs and exports
  world_size = 1  # data-parallel workers (devices or ranks), recorded in checkpoints
  rng_scheme: dict = {}  # how each random draw is seeded, recorded in checkpoints

  def train_step(self, step: int, position: int, lr: float) -> Any:
    """One optimizer step on the batch at data `position`; returns its metrics left on the device."""
    raise NotImplementedError

  def fetch(self, window: list) -> list[dict]:
    """The metrics of the steps in `window` on the host, in one transfer: one dict per step, 'loss' in each."""
    raise NotImplementedError

  def summarize(self, records: list[dict]) -> dict:
    """The logged record of a window of host metrics; default: the last step's scalars."""
    return {k: v for k, v in records[-1].items() if np.ndim(v) == 0}

  def save(self, directory: str) -> None:
    """Writes the resumable state into `directory` (the main process only)."""
    raise NotImplementedError

  def restore(self, directory: str) -> None:
    """Loads what `save` wrote (every process)."""
    raise NotImplementedError

  def after_checkpoint(self, step: int) -> None:
    """Runs on the main process after each checkpoint (the transformer refreshes its export)."""

  def barrier(self, name: str) -> None:
    """Waits until every process got here (multi-process runs)."""

  def finish(self, step: int) -> dict:
    """Runs on the main process after the last step (the tokenizer exports and evaluates); the scalars it returns
    are logged at `step`."""
    return {}


def _check_finite(records: list[dict], keys: tuple[str, ...], first_step: int, last_good) -> None:
  for i, record in enumerate(records):
    if not all(np.isfinite(record[k]) for k in keys):
      shown = ", ".join(f"{k}={record[k]}" for k in keys)
      keep = (f"the last good checkpoint (step {last_good[0]}, {last_good[1]}) is kept" if last_good
              else "no checkpoint was written yet")
      raise training.NonFiniteLossError(
          f"non-finite training values at step {first_step + i} ({shown}); training stopped and {keep}. Try a "
          f"lower train.lr, train.grad_clip_norm > 0, or train.precision=parity.")


def _save(task: TrainTask, run: RunDir, step: int, position: int, meta: dict) -> str:
  path = run.checkpoints.path(step)
  if task.is_main:
    full = {"backend": task.backend, "state_format": STATE_FORMAT, "position": position,
            "world_size": task.world_size, "rng": task.rng_scheme, "run": run.fingerprint, **meta}
    path = run.checkpoints.save(step, task.save, full)
    task.after_checkpoint(step)
  task.barrier(f"checkpoint_{step}")
  return path


def run(task: TrainTask, run_dir: RunDir, loop: LoopSettings, *, meta: dict | None = None,
        stop_after: int | None = None, progress: bool = True, start: tuple[int, int] | None = None) -> dict:
  """Trains from the resume point to loop.num_steps; returns {"step", "position", "losses" (this call's, per
  step), "record" (the last logged), "final" (what task.finish returned), "last_checkpoint", "resumed_from"}.

  `stop_after`: stop after this many steps of this call without saving (simulates a kill; tests).
  `start`: (step, data position) where a run that begins from another run's state starts (train --init: a seed
  checkpoint's iter and epoch, the task holding its weights); only when the workdir has no checkpoint to resume.
  """
  step, position, last_good = 0, 0, None
  if run_dir.resume is not None:
    step, path, manifest = run_dir.resume
    task.restore(path)
    position, last_good = manifest["meta"]["position"], (step, path)
    if task.is_main:
      say(f"resumed from step {step} ({path})")
  elif start is not None:
    step, position = start
  resumed_from = step
  writer = training.MetricsWriter(run_dir.run_dir, enabled=task.is_main, resume_step=step)
  bar = tqdm.tqdm(total=loop.num_steps, initial=step, desc=task.label, unit="step",
                  disable=not (progress and task.is_main))
  losses, window, pending, record, done, tic = [], [], [], {}, 0, time.perf_counter()
  try:
    while step < loop.num_steps and (stop_after is None or done < stop_after):
      lr = loop.learning_rate(step)
      window.append(task.train_step(step, position, lr))
      step, done, position = step + 1, done + 1, position + loop.batch_size
      bar.update(1)
      log_now = step % loop.log_every_steps == 0 or step == loop.num_steps
      save_now = step % loop.checkpoint_every_steps == 0 or step == loop.num_steps
      if not (log_now or save_now or done == stop_after):
        continue
      records = task.fetch(window)  # the window's one device -> host transfer
      _check_finite(records, task.finite_keys, step - len(records), last_good)
      losses += [float(r["loss"]) for r in records]
      pending, window = pending + records, []
      if log_now:
        now = time.perf_counter()
        record = {**task.summarize(pending), "lr": lr, "steps_per_sec": len(pending) / max(now - tic, 1e-9)}
        writer.write(step, record)
        bar.set_postfix({**{k: f"{record[k]:.4f}" for k in task.progress_keys if k in record}, "lr": f"{lr:.2e}"})
        pending, tic = [], now
      if save_now:
        last_good = (step, _save(task, run_dir, step, position, meta or {}))
    final = task.finish(step) if task.is_main and stop_after is None else {}
    if final:
      writer.write(step, final)
  finally:
    writer.close()
    bar.close()
  return {"step": step, "position": position, "losses": losses, "record": record, "final": final,
          "last_checkpoint": last_good[1] if last_good else None, "resumed_from": resumed_from}
