"""MaskGIT transformer training in JAX: data parallel over a `jax.sharding.Mesh`, multi-host, exact resume.

The loop (steps, logging, checkpoints, resume, NaN stop) is maskgit_common/train_loop.py, shared by every trainer;
this file is the framework part. One recipe with maskgit_torch/train.py (both read the config's `train` section; the
official and the seed's values of every field are configs/recipes.py):
  model      the config's family (maskgit_jax/families.py): the official Transformer or the seed's MaskTransformer,
             and its tokenizer (VQVAE or taming's VQModel) for the token cache
  batch      host-built by maskgit_common (token cache -> crop/flip -> masks -> input ids, maskgit_common/masking.py),
             identical in both backends and for any device count; the global batch is sharded over the mesh axis
             "data" and split into train.grad_accum micro-batches (lax.scan) whose gradients add up to the batch's
  loss       label-smoothed cross entropy over the token layout's classes on masked tokens, each example's loss the
             weighted mean over its tokens, then the batch mean: the official `weighted_sequence_cross_entropy_loss`
             (maskgit/libml/losses.py:258-280) with `apply_label_smoothing` (losses.py:91-120: targets * (1 - eps) +
             eps / K); with train.compute_loss_for_all the mean over every token, in the seed's
             nn.CrossEntropyLoss(label_smoothing) form
  optimizer  global-norm clipping (train.clip_rule: optax.clip_by_global_norm, or the seed's torch rule
             `clip_like_torch`), Adam (betas from the config, eps 1e-8) with decoupled weight decay on every
             parameter (optax.adamw's default), learning rate from the loop passed in each step
  EMA        polyak averaging of the weights after every step (train.polyak_decay; official default 0.999)
  dropout    the model's own dropout (transformer.dropout_rate), key fold_in(PRNGKey(seed), step), so it does not
             depend on the device count (threefry is partitionable) and resumes exactly
  precision  "parity": float32 (run.py sets matmul precision "highest"); "fast": bfloat16 compute, float32 params;
             "fp16" (the seed's CUDA torch setting) computes float32 here, as the seed on a CPU
Checkpoints: maskgit_jax/train_state.py (an orbax PyTree of params, optimizer state and EMA). At every checkpoint
the portable directory `export/` (config.json + official-layout transformer.msgpack and tokenizer.msgpack) is
refreshed, and for the seed family `seed/MaskGIT/current.pth`, the seed's own file (maskgit_common/train_init.py;
writing that pickle needs torch, which conversion imports for it; without torch it is skipped, saying so). `init`: start
from another checkpoint (run.py --init: a seed .pth with its AdamW state, converted to optax's, iter and epoch).
Tokenizer weights: `training.find_tokenizer` (explicit path, else <workdir>/tokenizer, else random).
Multi-host: `initialize_distributed` (run.py --multihost) before `train`; process 0 writes checkpoints and logs
(the state is replicated, so its host copy is the whole state).
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import conversion
from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import token_cache as token_cache_lib
from maskgit_common import train_init, train_loop, training, workdir as workdir_lib
from maskgit_common.errors import UserError
from maskgit_common.token_layout import TokenLayout, token_layout
from maskgit_jax import checkpoint as checkpoint_lib
from maskgit_jax import families, train_state

BATCH_KEYS = ("input_ids", "targets", "weights")


class DistributedSetupError(UserError, ValueError):
  """Incomplete or inconsistent multi-host settings (--coordinator_address, --num_processes, --process_id)."""


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """jax.distributed.initialize for multi-host training (run.py --multihost), with one-line errors.

  With no argument, jax detects the cluster itself (TPU pods, SLURM, Open MPI). Elsewhere (a GPU cluster, or
  several processes on one machine) all three are needed: the coordinator's host:port (process 0 listens there),
  the number of processes and this process's id in [0, num_processes). CPU collectives use gloo.
  """
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  missing = [flag for flag, value in given.items() if value is None]
  if len(missing) not in (0, 3):
    raise DistributedSetupError(f"--multihost: {', '.join(missing)} missing; give all three of --coordinator_address "
                                f"HOST:PORT, --num_processes N and --process_id I (or JAX_COORDINATOR_ADDRESS, "
                                f"JAX_NUM_PROCESSES, JAX_PROCESS_ID), or none of them on a TPU pod / SLURM / Open MPI")
  if not missing:
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedSetupError(f"--coordinator_address {coordinator_address!r} must be HOST:PORT "
                                  f"(e.g. 10.0.0.1:1234)")
    if num_processes < 1:
      raise DistributedSetupError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise DistributedSetupError(f"--process_id {process_id} must lie in [0, --num_processes={num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs and TPUs ignore it
  try:
    if missing:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (ValueError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = (" jax found no cluster to join: give --coordinator_address, --num_processes and --process_id (or the "
            "JAX_* environment variables)" if missing else "")
    raise DistributedSetupError(f"jax.distributed.initialize failed: {first.rstrip('.')}.{hint}") from None


# Loss, optimizer, one step -------------------------------------------------------------------------------------
def cross_entropy_loss(logits, targets, weights, label_smoothing: float, layout: TokenLayout,
                       all_tokens: bool = False):
  """(loss, (sum of correct weights, sum of weights)) for logits (B, S or L, V) and targets (B, L).

  The image positions and the classes a token can take (official: the K codes; seed: K + 1) come from the token
  layout. A row with no weight (possible with Bernoulli masking) contributes 0, not 0 / 0. `all_tokens` (every
  weight 1): the mean over all B * L tokens in the seed's nn.CrossEntropyLoss(label_smoothing) form,
  (1 - eps) * mean(nll) + eps / C * mean(-sum log p).
  """
  num_classes = layout.sample_width
  logits = logits[:, layout.image_slice(), :num_classes].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  counts = (jnp.sum(correct * weights), jnp.sum(weights))
  # sum_k soft_k * logp_k with soft = onehot * on + off, without materialising a (B, L, K) one-hot.
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if all_tokens:
    smooth = -jnp.sum(logp, axis=-1)
    return (1.0 - label_smoothing) * jnp.mean(-target_logp) + jnp.mean(smooth) * (label_smoothing / num_classes), counts
  on, off = 1.0 - label_smoothing, label_smoothing / num_classes
  per_token = -(on * target_logp + off * jnp.sum(logp, axis=-1))
  per_example = jnp.sum(per_token * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
  return jnp.mean(per_example), counts


def clip_like_torch(max_norm: float) -> optax.GradientTransformation:
  """The seed's nn.utils.clip_grad_norm_(params, max_norm): every gradient times min(1, max_norm / (norm + 1e-6))."""

  def update(updates, state, params=None):
    del params
    coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree_util.tree_map(lambda g: g * coef, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train) -> optax.GradientTransformation:
  """Clipping + Adam + decoupled weight decay; the learning rate is applied in `train_step` (AdamW = this * -lr)."""
  clip = optax.clip_by_global_norm if train.clip_rule == "optax" else clip_like_torch
  parts = [clip(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
  parts += [optax.scale_by_adam(b1=train.beta1, b2=train.beta2, eps=1e-8),
            optax.add_decayed_weights(train.weight_decay)]
  return optax.chain(*parts)


def _dummy_input(config: MaskGITConfig, which: str):
  if which == "tokenizer":
    return jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return jnp.zeros((1, config.seq_len), jnp.int32)


def init_variables(config: MaskGITConfig, which: str, key) -> dict:
  """The family's own initialisation of `which` from `key` (official: checkpoint.init_variables' tree)."""
  return dict(families.model_class(config, which)(config).init(key, _dummy_input(config, which)))


def with_adam(opt_state, adam: dict | None):
  """`opt_state` (make_optimizer's) with its Adam moments and count replaced by canonical ones (train --init), or
  as it is; `adam_of` reads them back."""
  if adam is None:
    return opt_state
  tree = lambda flat: conversion.unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})["params"]
  adam_state = optax.ScaleByAdamState(count=jnp.asarray(adam["count"], jnp.int32), mu=tree(adam["mu"]),
                                      nu=tree(adam["nu"]))
  return tuple(adam_state if isinstance(s, optax.ScaleByAdamState) else s for s in opt_state)


def adam_of(opt_state) -> dict:
  """The canonical {"count", "mu", "nu"} of an opt_state (host numpy)."""
  adam = next(s for s in opt_state if isinstance(s, optax.ScaleByAdamState))
  flat = lambda t: {k: np.asarray(v) for k, v in conversion.flatten({"params": jax.device_get(t)}).items()}
  return {"count": int(adam.count), "mu": flat(adam.mu), "nu": flat(adam.nu)}


def create_state(config: MaskGITConfig, params, adam: dict | None = None) -> dict:
  """{"params", "opt_state", "ema_params"}; jitted, since eager JAX compiles every small op on its own (slow).
  `adam`: Adam moments to start from (train --init), else fresh."""

  def create(params):
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return {"params": params, "opt_state": make_optimizer(config.train).init(params),
            "ema_params": jax.tree_util.tree_map(jnp.copy, params)}

  state = jax.jit(create)(params)
  return {**state, "opt_state": with_adam(state["opt_state"], adam)}


def initial_params(config: MaskGITConfig, seed: int):
  """The family's own initialisation of the transformer from PRNGKey(seed) (jitted: one compile, not one per op)."""
  return jax.jit(lambda key: init_variables(config, "transformer", key))(jax.random.PRNGKey(seed))["params"]


def micro_batches(batch: dict, count: int) -> dict:
  """(B, ...) arrays -> (count, B / count, ...): micro-batch j holds rows j, j + count, ... so that each stays
  spread over every device of the "data" axis (gradient accumulation)."""
  return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 1, 0),
                                batch)


def make_loss_and_grads(config: MaskGITConfig, deterministic: bool = False):
  """(params, batch, dropout_key) -> ((loss, (correct, counted)), grads): the mean loss and gradient of the
  train.grad_accum micro-batches, before clipping (the pure function the step and the parity check share)."""
  train, layout = config.train, token_layout(config)
  dtype = jnp.bfloat16 if train.precision == "fast" else jnp.float32
  model = families.model_class(config, "transformer")(config, dtype=dtype)
  no_dropout = deterministic or config.transformer.dropout_rate == 0.0

  def loss_fn(params, batch, dropout_key):
    logits = model.apply({"params": params}, batch["input_ids"], deterministic=no_dropout,
                         rngs=None if no_dropout else {"dropout": dropout_key})
    return cross_entropy_loss(logits, batch["targets"], batch["weights"], train.label_smoothing, layout,
                              all_tokens=train.compute_loss_for_all)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, batch, dropout_key):
    k = train.grad_accum
    if k == 1:
      return grad_fn(params, batch, dropout_key)

    def add(carry, inputs):
      part, j = inputs
      out = grad_fn(params, part, jax.random.fold_in(dropout_key, j))
      return jax.tree_util.tree_map(jnp.add, carry, out), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, dropout_key))
    ((loss, aux), grads), _ = jax.lax.scan(add, zeros, (micro_batches(batch, k), jnp.arange(k)))
    return (loss / k, aux), jax.tree_util.tree_map(lambda g: g / k, grads)

  return accumulated


def make_train_step(config: MaskGITConfig, deterministic: bool = False):
  """The pure step (state, batch, lr, step) -> (state, metrics); jit it with the shardings you want."""
  train = config.train
  tx = make_optimizer(train)
  base_key = jax.random.PRNGKey(train.seed)
  loss_and_grads = make_loss_and_grads(config, deterministic)

  def step_fn(state, batch, lr, step):
    (loss, (correct, counted)), grads = loss_and_grads(state["params"], batch, jax.random.fold_in(base_key, step))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state["params"], updates)
    d = train.polyak_decay
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
    metrics = {"loss": loss, "accuracy": correct / counted, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    return {"params": params, "opt_state": opt_state, "ema_params": ema}, metrics

  return step_fn


# Data and tokenizer --------------------------------------------------------------------------------------------
def load_tokenizer_params(config: MaskGITConfig, path: str | None) -> tuple[dict, bool]:
  """({"params": ...}, trained) from a tokenizer checkpoint; randomly initialised (seed train.seed) without one.

  `path`: any checkpoint `conversion.read` accepts that holds a tokenizer (a JAX or torch export directory, the
  official files, or one weights file; no torch needed), or the seed's VQGAN folder / last.ckpt (read with torch's
  safe loader, which conversion imports for it), checked against `config`.
  """
  if path is None:
    init = jax.jit(lambda key: init_variables(config, "tokenizer", key))
    return init(jax.random.PRNGKey(config.train.seed)), False
  return checkpoint_lib.from_flat(config, "tokenizer", train_init.read_tokenizer(path, config)), True


def open_token_cache(config: MaskGITConfig, workdir: str, tokenizer: str | None = None,
                     num_synthetic: int = data_lib.SYNTHETIC_NUM_EXAMPLES, progress: bool = True):
  """The training token cache: data.token_cache (tokens) or built from images into data.token_cache/workdir/tokens.

  Returns (cache, tokenizer_variables or None).
  """
  if config.data.dataset == "tokens":
    return token_cache_lib.TokenCache(config.data.token_cache, config), None
  path = config.data.token_cache or os.path.join(workdir, "tokens")
  variables, trained = load_tokenizer_params(config, training.find_tokenizer(workdir, tokenizer))
  weights_hash = "jax:" + token_cache_lib.weights_hash(conversion.flatten(variables))
  if os.path.exists(os.path.join(path, "index.json")):
    return token_cache_lib.TokenCache(path, config, weights_hash), variables
  if jax.process_index() == 0:
    if not trained:
      warnings.warn("no tokenizer checkpoint given: tokenizing with a randomly initialised tokenizer (fine for "
                    "testing the training loop; samples decoded with it will not look like the data)")
    # The weights are an argument, not a closure constant: XLA would spend minutes constant-folding them.
    cls = families.model_class(config, "tokenizer")
    encode = jax.jit(lambda v, x: cls(config).apply(v, x, method=cls.encode_to_indices))
    dataset = data_lib.make_dataset(config, num_synthetic)
    token_cache_lib.build(path, dataset, lambda im: np.asarray(encode(variables, jnp.asarray(im))), config,
                          flip=config.data.random_flip, tokenizer_weights_hash=weights_hash,
                          num_workers=config.data.num_workers, progress=progress, crops=config.data.random_crops)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("token_cache")
  return token_cache_lib.TokenCache(path, config, weights_hash), variables


# The loop ------------------------------------------------------------------------------------------------------
def export(workdir: str, config: MaskGITConfig, state, tokenizer_variables) -> str:
  """Writes the portable checkpoint directory workdir/export (config.json + official-layout msgpack files).

  The transformer weights are the EMA weights (train.polyak_decay > 0), as MaskGIT evaluates polyak weights. The
  directory is assembled beside its destination and swapped in whole.
  """
  params = state["ema_params"] if config.train.polyak_decay > 0 else state["params"]
  models = {"transformer": {"params": params}, "tokenizer": tokenizer_variables}
  return checkpoint_lib.save_checkpoint(os.path.join(workdir, training.EXPORT_DIR), data_lib.with_class_names(config),
                                        models, overwrite=True)


def export_seed(workdir: str, config: MaskGITConfig, state, step: int, position: int, num_examples: int,
                lr: float) -> str | None:
  """workdir/seed/MaskGIT/current.pth, the seed's own file (weights, AdamW state, iter, epoch); None (said once)
  when torch, which writes that pickle, is not installed."""
  try:
    return train_init.write_seed(train_init.seed_export_path(workdir), config,
                                 conversion.flatten({"params": state["params"]}), adam_of(state["opt_state"]), step,
                                 position, num_examples, lr)
  except ImportError as e:
    workdir_lib.say(f"skipped {train_init.seed_export_path(workdir)}: writing the seed's .pth needs torch ({e})")
    return None


class TransformerTask(train_loop.TrainTask):
  """The JAX framework parts of transformer training for maskgit_common.train_loop."""
  backend, label, finite_keys = "jax", "train (jax)", ("loss", "grad_norm")

  def __init__(self, config: MaskGITConfig, workdir: str, state, data: training.TrainingData, tokenizer_variables):
    self.config, self.workdir, self.data, self.tokenizer_variables = config, workdir, data, tokenizer_variables
    devices = np.asarray(jax.devices())
    self.world_size, self.is_main = int(devices.size), jax.process_index() == 0
    mesh = Mesh(devices, ("data",))
    self.replicated, self.batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    self.state = jax.device_put(state, self.replicated)
    # Donating the old state halves peak memory on accelerators; the CPU backend cannot use donations (it warns).
    donate = (0,) if jax.default_backend() != "cpu" else ()
    self.step_fn = jax.jit(make_train_step(config), in_shardings=(self.replicated, self.batch_sharding, None, None),
                           out_shardings=(self.replicated, self.replicated), donate_argnums=donate)
    self.position, self.lr = 0, config.train.lr  # after the last step, for the seed export
    self._seed_export = config.transformer.arch == "seed"
    self.rng_scheme = {"seed": config.train.seed, "data_order": "numpy default_rng([seed, 0, epoch]).permutation",
                       "masks": "numpy default_rng([seed, 1, step])", "dropout": "fold_in(PRNGKey(seed), step)"}

  def train_step(self, step: int, position: int, lr: float):
    # Dispatch is asynchronous: this host builds the next batch while the devices run the previous step.
    local = training.shard(self.data.global_batch(step, position), jax.process_index(), jax.process_count())
    batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, local[k]) for k in BATCH_KEYS}
    self.state, metrics = self.step_fn(self.state, batch, jnp.float32(lr), jnp.int32(step))
    self.position, self.lr = position + self.data.batch_size, lr
    return metrics

  def fetch(self, window: list) -> list[dict]:
    return [{k: float(v) for k, v in m.items()} for m in jax.device_get(window)]

  def save(self, directory: str) -> None:
    train_state.save(directory, self.state)

  def restore(self, directory: str) -> None:
    self.state = jax.device_put(train_state.restore(directory, jax.device_get(self.state)), self.replicated)

  def after_checkpoint(self, step: int) -> None:
    state = jax.device_get(self.state)
    export(self.workdir, self.config, state, self.tokenizer_variables)
    if self._seed_export:
      self._seed_export = export_seed(self.workdir, self.config, state, step, self.position, len(self.data.cache),
                                      self.lr) is not None

  def barrier(self, name: str) -> None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(name)


def train(config: MaskGITConfig, workdir: str, *, tokenizer: str | None = None, init: str | None = None,
          init_optimizer: bool = True, init_params=None, stop_after: int | None = None,
          num_synthetic: int = data_lib.SYNTHETIC_NUM_EXAMPLES, progress: bool = True,
          allow_config_change: bool = False, ignore_corrupt_checkpoints: bool = False) -> dict:
  """Trains (or resumes) the transformer in `workdir`; returns {"step", "losses" (this call's, per step), ...}.

  Args:
    config: the whole MaskGITConfig; `train` and `data` sections drive the run.
    workdir: checkpoints/, metrics.jsonl and TensorBoard events, tokens/ (built cache), export/ at the end.
    tokenizer: tokenizer weights used to build the token cache from images (msgpack file, directory, or the seed's
      VQGAN folder).
    init: a checkpoint to start from when the workdir has none (maskgit_common/train_init.py): any transformer
      checkpoint, or the seed's .pth with its AdamW state (unless not init_optimizer; converted to optax's through
      the seed table's parameter order), iter and global_epoch.
    init_params: initial transformer params (e.g. converted from torch); default: the family's own init from
      train.seed.
    stop_after: stop after this many steps of this call without saving (simulates a kill; tests).
    num_synthetic: size of the synthetic dataset.
    allow_config_change, ignore_corrupt_checkpoints: resume policies (maskgit_common/workdir.py).
  Multi-host: call `initialize_distributed` first; every process runs this with the same arguments.
  """
  train_cfg = config.train
  devices = jax.device_count()
  if train_cfg.batch_size % (devices * train_cfg.grad_accum):
    raise workdir_lib.TrainingSetupError(
        f"train.batch_size={train_cfg.batch_size} must be divisible by the {devices} devices x "
        f"train.grad_accum={train_cfg.grad_accum}")
  barrier = multihost_utils.sync_global_devices if jax.process_count() > 1 else None
  main = jax.process_index() == 0
  with workdir_lib.RunDir(workdir, workdir, backend="jax", fingerprint=training.transformer_fingerprint(config),
                          fixed=training.TRANSFORMER_FIXED, keep_checkpoints=train_cfg.keep_checkpoints,
                          is_main=main, barrier=barrier, allow_config_change=allow_config_change,
                          ignore_corrupt_checkpoints=ignore_corrupt_checkpoints) as run:
    if main:
      config.save(os.path.join(workdir, "config.json"))
      train_init.announce(config, "jax", jax.default_backend() == "gpu")
    cache, tokenizer_variables = open_token_cache(config, workdir, tokenizer, num_synthetic, progress and main)
    start = train_init.read_init(init, config, len(cache), init_optimizer) if init and run.resume is None else None
    if start is not None:
      init_params = checkpoint_lib.from_flat(config, "transformer", start.weights)["params"]
    elif init_params is None:
      init_params = initial_params(config, train_cfg.seed)
    state = create_state(config, init_params, start.adam if start is not None else None)
    task = TransformerTask(config, workdir, state, training.TrainingData(cache, config), tokenizer_variables)
    meta = {"config": config.to_dict(), **({"init": {"path": start.path, **start.source}} if start else {})}
    if start is not None and main:
      workdir_lib.say(start.describe())
    elif init and main:
      workdir_lib.say(f"--init {init} not used: the workdir's run resumes from its own checkpoint")
    result = train_loop.run(task, run, train_loop.LoopSettings.from_train(train_cfg), meta=meta,
                            stop_after=stop_after, progress=progress,
                            start=(start.step, start.position) if start else None)
  exported = result["last_checkpoint"] and result["last_checkpoint"] == run.checkpoints.path(result["step"])
  result["export"] = os.path.join(workdir, training.EXPORT_DIR) if exported else None
  return result
