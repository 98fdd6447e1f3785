"""MaskGIT transformer training in JAX: data parallel over a `jax.sharding.Mesh`, exact resume.

One recipe with maskgit_torch/train.py (both read the config's `train` section):
  batch      host-built by maskgit_common (token cache -> masks -> input ids), identical in both backends and for
             any device count; the global batch is sharded over the mesh axis "data"
  loss       label-smoothed cross entropy over the codebook logits [..., :K] on masked tokens (or all tokens), each
             example's loss the weighted mean over its tokens, then the batch mean: the official
             `weighted_sequence_cross_entropy_loss` (maskgit/libml/losses.py:258-280) with `apply_label_smoothing`
             (losses.py:91-120: targets * (1 - eps) + eps / K)
  optimizer  global-norm gradient clipping (optax.clip_by_global_norm), Adam (betas from the config, eps 1e-8) with
             decoupled weight decay on every parameter (optax.adamw's default), learning rate from
             maskgit_common.training.learning_rate passed in each step
  EMA        polyak averaging of the weights after every step (train.polyak_decay; official default 0.999)
  dropout    the model's own dropout (transformer.dropout_rate), key fold_in(PRNGKey(seed), step), so it does not
             depend on the device count (threefry is partitionable) and resumes exactly
  precision  "parity": float32 (run.py sets matmul precision "highest"); "fast": bfloat16 compute, float32 params
Checkpoints (maskgit_common.training.CheckpointDir, checkpoints/ckpt_<step>/): an orbax PyTree checkpoint `state/`
(params, optimizer state, EMA) with step, data position and RNG scheme in a sha256 manifest over every file; the
newest checkpoint that verifies is resumed, a corrupt one is skipped with a warning. At every checkpoint the portable
directory `export/` (config.json + official-layout transformer.msgpack and tokenizer.msgpack, DESIGN §4) is
refreshed. Tokenizer weights: `training.find_tokenizer` (explicit path, else <workdir>/tokenizer, else random).
Multi-host: jax.distributed.initialize() when `distributed=True` or JAX_COORDINATOR_ADDRESS is set; process 0
writes checkpoints and logs (the state is replicated, so its host copy is the whole state).
"""

from __future__ import annotations

import os
import time
import warnings

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import conversion
from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import token_cache as token_cache_lib
from maskgit_common import training
from maskgit_jax import checkpoint as checkpoint_lib
from maskgit_jax.tokenizer import VQVAE
from maskgit_jax.transformer import Transformer

STATE_DIR = "state"  # orbax PyTree directory inside each ckpt_<step>/
BATCH_KEYS = ("input_ids", "targets", "weights")


# Loss, optimizer, one step -------------------------------------------------------------------------------------
def cross_entropy_loss(logits, targets, weights, label_smoothing: float, codebook_size: int):
  """(loss, accuracy) of logits (B, S, V) against targets (B, L) with weights (B, L); position 0 is the class."""
  logits = logits[:, 1:, :codebook_size].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  on, off = 1.0 - label_smoothing, label_smoothing / codebook_size
  # sum_k soft_k * logp_k with soft = onehot * on + off, without materialising a (B, L, K) one-hot.
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  per_token = -(on * target_logp + off * jnp.sum(logp, axis=-1))
  per_example = jnp.sum(per_token * weights, axis=-1) / jnp.sum(weights, axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * weights) / jnp.sum(weights)
  return jnp.mean(per_example), accuracy


def make_optimizer(train) -> optax.GradientTransformation:
  """Clipping + Adam + decoupled weight decay; the learning rate is applied in `train_step` (AdamW = this * -lr)."""
  parts = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
  parts += [optax.scale_by_adam(b1=train.beta1, b2=train.beta2, eps=1e-8),
            optax.add_decayed_weights(train.weight_decay)]
  return optax.chain(*parts)


def create_state(config: MaskGITConfig, params) -> dict:
  """{"params", "opt_state", "ema_params"}; jitted, since eager JAX compiles every small op on its own (slow)."""

  def create(params):
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return {"params": params, "opt_state": make_optimizer(config.train).init(params),
            "ema_params": jax.tree_util.tree_map(jnp.copy, params)}

  return jax.jit(create)(params)


def initial_params(config: MaskGITConfig, seed: int):
  """The official initialisation of the transformer from PRNGKey(seed) (jitted: one compile, not one per op)."""
  return jax.jit(lambda key: checkpoint_lib.init_variables(config, "transformer", key))(
      jax.random.PRNGKey(seed))["params"]


def make_train_step(config: MaskGITConfig, deterministic: bool = False):
  """The pure step (state, batch, lr, step) -> (state, metrics); jit it with the shardings you want."""
  train = config.train
  dtype = jnp.bfloat16 if train.precision == "fast" else jnp.float32
  model = Transformer(config, dtype=dtype)
  tx = make_optimizer(train)
  base_key = jax.random.PRNGKey(train.seed)
  no_dropout = deterministic or config.transformer.dropout_rate == 0.0

  def step_fn(state, batch, lr, step):
    dropout_key = jax.random.fold_in(base_key, step)

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["input_ids"], deterministic=no_dropout,
                           rngs=None if no_dropout else {"dropout": dropout_key})
      return cross_entropy_loss(logits, batch["targets"], batch["weights"], train.label_smoothing,
                                config.codebook_size)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state["params"], updates)
    d = train.polyak_decay
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    return {"params": params, "opt_state": opt_state, "ema_params": ema}, metrics

  return step_fn


# Data and tokenizer --------------------------------------------------------------------------------------------
def load_tokenizer_params(config: MaskGITConfig, path: str | None) -> tuple[dict, bool]:
  """({"params": ...}, trained) from a tokenizer checkpoint; randomly initialised (seed train.seed) without one.

  `path`: any checkpoint `conversion.read` accepts that holds a tokenizer (a JAX or torch export directory, the
  official files, or one weights file; no torch needed), checked against `config`.
  """
  if path is None:
    init = jax.jit(lambda key: checkpoint_lib.init_variables(config, "tokenizer", key))
    return init(jax.random.PRNGKey(config.train.seed)), False
  _, variables = checkpoint_lib.load_checkpoint(path, config, parts=("tokenizer",))
  return variables["tokenizer"], True


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
    encode = jax.jit(lambda v, x: VQVAE(config).apply(v, x, method=VQVAE.encode_to_indices))
    dataset = data_lib.make_dataset(config, num_synthetic)
    token_cache_lib.build(path, dataset, lambda im: np.asarray(encode(variables, jnp.asarray(im))), config,
                          flip=config.data.random_flip, tokenizer_weights_hash=weights_hash,
                          num_workers=config.data.num_workers, progress=progress)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("token_cache")
  return token_cache_lib.TokenCache(path, config, weights_hash), variables


# The loop ------------------------------------------------------------------------------------------------------
def _check_workdir_config(config: MaskGITConfig, workdir: str) -> None:
  """A workdir holds one model: resuming with another architecture is refused; train/data changes are allowed."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    old = MaskGITConfig.load(path)
    for field in ("image_size", "num_class", "tokenizer", "transformer"):
      if getattr(old, field) != getattr(config, field):
        raise ValueError(f"{workdir} holds a run with another `{field}` ({getattr(old, field)} vs "
                         f"{getattr(config, field)}); use a new --workdir")
  if jax.process_index() == 0:
    config.save(path)


def _nonfinite_message(step: int, metrics: dict, last_good) -> str:
  bad = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm"))
  keep = (f"the last good checkpoint (step {last_good[0]}, {last_good[1]}) is kept" if last_good
          else "no checkpoint was written yet")
  return (f"non-finite training values at step {step} ({bad}); training stopped and {keep}. Try a lower "
          f"train.lr, train.grad_clip_norm > 0, or train.precision=parity.")


def export(workdir: str, config: MaskGITConfig, state, tokenizer_variables) -> str:
  """Writes the portable checkpoint directory workdir/export (config.json + official-layout msgpack files).

  The transformer weights are the EMA weights (train.polyak_decay > 0), as MaskGIT evaluates polyak weights. The
  directory is assembled beside its destination and swapped in whole.
  """
  params = state["ema_params"] if config.train.polyak_decay > 0 else state["params"]
  models = {"transformer": {"params": params}, "tokenizer": tokenizer_variables}
  return checkpoint_lib.save_checkpoint(os.path.join(workdir, training.EXPORT_DIR), data_lib.with_class_names(config),
                                        models, overwrite=True)


def _checkpointer() -> ocp.Checkpointer:
  """An orbax PyTree checkpointer run by process 0 alone (the state is replicated; other hosts do not write)."""
  options = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                          multiprocessing_options=options)


def save_state(directory: str, state) -> None:
  """The training state as an orbax PyTree of host arrays (optax named tuples as dicts: to_state_dict)."""
  # orbax refuses relative paths: a relative --workdir is resolved here.
  _checkpointer().save(os.path.abspath(os.path.join(directory, STATE_DIR)),
                       flax.serialization.to_state_dict(jax.device_get(state)))


def restore_state(directory: str, template):
  """Restores `save_state`'s output into the structure of `template` (bit-exact float32 arrays)."""
  restored = _checkpointer().restore(os.path.abspath(os.path.join(directory, STATE_DIR)))
  return flax.serialization.from_state_dict(template, restored)


def train(config: MaskGITConfig, workdir: str, *, tokenizer: str | None = None, init_params=None,
          stop_after: int | None = None, num_synthetic: int = data_lib.SYNTHETIC_NUM_EXAMPLES,
          progress: bool = True, distributed: bool | None = None) -> dict:
  """Trains (or resumes) the transformer in `workdir`; returns {"step", "losses" (this call's, per step), ...}.

  Args:
    config: the whole MaskGITConfig; `train` and `data` sections drive the run.
    workdir: checkpoints/, metrics.jsonl and TensorBoard events, tokens/ (built cache), export/ at the end.
    tokenizer: tokenizer weights used to build the token cache from images (msgpack file or directory).
    init_params: initial transformer params (e.g. converted from torch); default: official init from train.seed.
    stop_after: stop after this many steps of this call without saving (simulates a kill; tests).
    num_synthetic: size of the synthetic dataset.
    distributed: call jax.distributed.initialize() (multi-host); default when JAX_COORDINATOR_ADDRESS is set.
  """
  if distributed or (distributed is None and os.environ.get("JAX_COORDINATOR_ADDRESS")):
    jax.distributed.initialize()
  train_cfg = config.train
  main_process = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(config, workdir)
  cache, tokenizer_variables = open_token_cache(config, workdir, tokenizer, num_synthetic, progress and main_process)
  data = training.TrainingData(cache, config)

  devices = np.asarray(jax.devices())
  if train_cfg.batch_size % devices.size:
    raise ValueError(f"train.batch_size={train_cfg.batch_size} must be divisible by the {devices.size} devices")
  mesh = Mesh(devices, ("data",))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  ckpts = training.CheckpointDir(os.path.join(workdir, "checkpoints"), train_cfg.keep_checkpoints)
  if init_params is None:
    init_params = initial_params(config, train_cfg.seed)
  state = create_state(config, init_params)
  step, position, last_good = 0, 0, None
  latest = ckpts.latest()
  if latest is not None:
    step, path, manifest = latest
    state = restore_state(path, state)
    position, last_good = manifest["meta"]["position"], (step, path)
  state = jax.device_put(state, replicated)

  # Donating the old state halves peak memory on accelerators; the CPU backend cannot use donations (it warns).
  donate = (0,) if jax.default_backend() != "cpu" else ()
  step_fn = jax.jit(make_train_step(config), in_shardings=(replicated, batch_sharding, None, None),
                    out_shardings=(replicated, replicated), donate_argnums=donate)

  def device_batch(s: int, pos: int):
    local = training.shard(data.global_batch(s, pos), jax.process_index(), jax.process_count())
    return {k: jax.make_array_from_process_local_data(batch_sharding, local[k]) for k in BATCH_KEYS}

  def save(s: int, pos: int):
    nonlocal last_good
    if main_process:
      host_state = jax.device_get(state)
      meta = {"backend": "jax", "step": s, "position": pos, "rng": {"seed": train_cfg.seed, "dropout":
              "fold_in(PRNGKey(seed), step)", "masks": "numpy default_rng([seed, 1, step])"},
              "num_devices": int(devices.size), "config": config.to_dict()}
      last_good = (s, ckpts.save(s, lambda d: save_state(d, host_state), meta))
      export(workdir, config, host_state, tokenizer_variables)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_{s}")

  writer = training.MetricsWriter(workdir, enabled=main_process, resume_step=step)
  bar = None
  if progress and main_process:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=train_cfg.num_train_steps, initial=step, desc="train (jax)", unit="step")
  losses, done, t0 = [], 0, time.perf_counter()
  batch = device_batch(step, position) if step < train_cfg.num_train_steps else None
  try:
    while step < train_cfg.num_train_steps and (stop_after is None or done < stop_after):
      lr = training.learning_rate(step, train_cfg)
      state, metrics = step_fn(state, batch, jnp.float32(lr), jnp.int32(step))
      position += train_cfg.batch_size
      if step + 1 < train_cfg.num_train_steps:
        batch = device_batch(step + 1, position)  # host work overlaps the device step
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        raise training.NonFiniteLossError(_nonfinite_message(step, metrics, last_good))
      step, done = step + 1, done + 1
      losses.append(metrics["loss"])
      if step % train_cfg.log_every_steps == 0 or step == train_cfg.num_train_steps:
        elapsed = time.perf_counter() - t0
        writer.write(step, {**metrics, "lr": lr, "steps_per_sec": done / max(elapsed, 1e-9)})
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
      if step % train_cfg.checkpoint_every_steps == 0 or step == train_cfg.num_train_steps:
        save(step, position)
  finally:
    writer.close()
    if bar is not None:
      bar.close()
  exported = os.path.join(workdir, training.EXPORT_DIR) if last_good and last_good[0] == step else None
  return {"step": step, "position": position, "losses": losses, "export": exported,
          "last_checkpoint": last_good[1] if last_good else None}
