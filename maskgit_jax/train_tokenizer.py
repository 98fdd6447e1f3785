"""Train the VQGAN tokenizer (JAX): reconstruction + vector-quantization losses, the "basic" VQGAN recipe.

Losses, optimizer and codebook restarts are described once in maskgit_common/tokenizer_losses.py; the quantizer
terms come from our `VQVAE(config, train=True)`, which computes them as the official VectorQuantizer does in train
mode. The perceptual and adversarial terms of the full VQGAN recipe are off (their pretrained weights are not
available offline).

  from maskgit_jax.train_tokenizer import train_tokenizer
  summary = train_tokenizer(configs.tiny(), "runs/tok", num_steps=2000)

Workdir layout (the same in maskgit_torch/train_tokenizer.py):
  tokenizer/                          portable checkpoint (DESIGN §4): config.json + tokenizer.msgpack (official
                                      flax layout), read by the transformer trainer and by `conversion`
  tokenizer_train/checkpoints/ckpt_N/ resumable state (params, Adam state, step) with a sha256 manifest, last N kept
  tokenizer_train/metrics.jsonl       losses, codebook usage, lr, speed (+ a TensorBoard event file beside it)
  tokenizer_train/reconstructions.png originals above their reconstructions after training
The data order is a pure function of (seed, step), so a killed run resumes from its last checkpoint to the same
losses.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import Any

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import tokenizer_losses as common
from maskgit_common import training
from maskgit_jax import checkpoint as checkpoint_lib
from maskgit_jax.tokenizer import VQVAE

STATE_FILE = "state.msgpack"
WEIGHTS_FILE = "tokenizer.msgpack"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(settings: common.TokenizerTrainSettings) -> optax.GradientTransformation:
  """Adam with the official betas; optax counts updates from 0, like `common.learning_rate`'s step."""
  def schedule(count):
    if settings.warmup_steps > 0:
      return settings.lr * jnp.minimum(1.0, (count + 1) / settings.warmup_steps)
    return settings.lr
  return optax.adam(schedule, b1=settings.beta1, b2=settings.beta2, eps=common.ADAM_EPS)


def _model_config(config: MaskGITConfig) -> MaskGITConfig:
  """The fields the tokenizer's computation depends on (image and tokenizer), as a key for compiled functions."""
  return MaskGITConfig(name="tokenizer", image_size=config.image_size, num_class=config.num_class,
                       tokenizer=config.tokenizer)


@functools.lru_cache(maxsize=8)
def _init_function(model_config: MaskGITConfig):
  return jax.jit(lambda key: checkpoint_lib.init_variables(model_config, "tokenizer", key)["params"])


@functools.lru_cache(maxsize=8)
def _step_function(model_config: MaskGITConfig, optimizer_settings: tuple, dtype):
  """(optax transformation, jitted train_step), compiled once per model and optimizer (runs and tests reuse it)."""
  lr, beta1, beta2, warmup_steps = optimizer_settings
  settings = common.TokenizerTrainSettings(lr=lr, beta1=beta1, beta2=beta2, warmup_steps=warmup_steps,
                                           batch_size=1, num_steps=0, log_every_steps=1, checkpoint_every_steps=1,
                                           keep_checkpoints=1, seed=0, precision="parity", codebook_restart_every=0)
  tx = make_optimizer(settings)
  return tx, jax.jit(functools.partial(train_step, config=model_config, tx=tx, dtype=dtype), donate_argnums=(0,))


def init_state(config: MaskGITConfig, tx: optax.GradientTransformation, seed: int, params=None) -> TrainState:
  """Official initializers from PRNGKey(seed) (checkpoint.init_variables), or the given tokenizer params."""
  if params is None:
    params = _init_function(_model_config(config))(jax.random.PRNGKey(seed))
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params))


def compute_losses(params, images, config: MaskGITConfig, dtype=jnp.float32):
  """(loss, aux) for images (B, H, H, 3) in [0, 1]; aux holds every loss term, the codes, latents, reconstructions."""
  def forward(module, x):
    quantized, result = module.encode(x)  # straight-through quantized, quantizer losses (train mode)
    return module.decode(quantized), result

  model = VQVAE(config, train=True, dtype=dtype)
  reconstructions, result = model.apply({"params": params}, images, method=forward)
  reconstructions = reconstructions.astype(jnp.float32)
  reconstruction_loss = jnp.mean(jnp.square(images - reconstructions))  # official losses.l2_loss
  loss = reconstruction_loss + result["quantizer_loss"]
  aux = {"loss": loss, "reconstruction_loss": reconstruction_loss,
         **{k: result[k] for k in ("quantizer_loss", "e_latent_loss", "q_latent_loss", "entropy_loss")},
         "codes": result["encoding_indices"], "latents": result["raw"].astype(jnp.float32),
         "reconstructions": reconstructions}
  return loss, aux


def train_step(state: TrainState, images, config: MaskGITConfig, tx: optax.GradientTransformation,
               dtype=jnp.float32):
  """One Adam update -> (new state, aux of the losses before the update, grads)."""
  grads, aux = jax.grad(compute_losses, has_aux=True)(state.params, images, config, dtype)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  del aux["reconstructions"]
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), aux, grads


def restart_codes(state: TrainState, aux: dict, seed: int, step: int) -> tuple[TrainState, int]:
  """common.restart_dead_codes applied to the quantizer codebook of `state`."""
  codebook, count = common.restart_dead_codes(np.asarray(state.params["quantizer"]["codebook"]),
                                              np.asarray(aux["codes"]), np.asarray(aux["latents"]), seed, step)
  if not count:
    return state, 0
  params = flax.core.unfreeze(state.params) if isinstance(state.params, flax.core.FrozenDict) else dict(state.params)
  params["quantizer"] = dict(params["quantizer"], codebook=jnp.asarray(codebook))
  return state.replace(params=params), count


# Checkpoints ----------------------------------------------------------------------------------------------------
def save_state(checkpoints: training.CheckpointDir, state: TrainState, settings) -> str:
  """checkpoints/ckpt_<step>/state.msgpack (flax bytes of the whole TrainState), published atomically."""
  data = flax.serialization.to_bytes(jax.device_get(state))

  def write(tmp):
    with open(os.path.join(tmp, STATE_FILE), "wb") as f:
      f.write(data)
  return checkpoints.save(int(state.step), write, {"backend": "jax", "settings": dataclasses.asdict(settings)})


def restore_state(checkpoints: training.CheckpointDir, template: TrainState) -> TrainState | None:
  """The newest checkpoint that verifies (a corrupt one is skipped with a warning), or None."""
  latest = checkpoints.latest()
  if latest is None:
    return None
  with open(os.path.join(latest[1], STATE_FILE), "rb") as f:
    return flax.serialization.from_bytes(template, f.read())


def export_tokenizer(export_dir: str, config: MaskGITConfig, params) -> str:
  """Portable checkpoint directory: config.json + tokenizer.msgpack (flax `to_bytes({"params"})`, official layout)."""
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  return checkpoint_lib.save_checkpoint(export_dir, config, {"tokenizer": {"params": params}}, overwrite=True)


# Evaluation -----------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(1,))
def reconstruct(params, config: MaskGITConfig, images):
  """(codes, decode_from_indices(codes)) of images: the eval-mode round trip a user of the tokenizer sees."""
  model = VQVAE(config)
  codes = model.apply({"params": params}, images, method=VQVAE.encode_to_indices)
  return codes, model.apply({"params": params}, codes, method=VQVAE.decode_from_indices)


def evaluate(params, config: MaskGITConfig, images: np.ndarray, batch_size: int = 64) -> tuple[dict, np.ndarray]:
  """Reconstruction MSE and codebook usage over `images` -> (metrics, reconstructions)."""
  codes, outputs = [], []
  for start in range(0, len(images), batch_size):
    batch_codes, batch_out = reconstruct(params, config, jnp.asarray(images[start:start + batch_size]))
    codes.append(np.asarray(batch_codes))
    outputs.append(np.asarray(batch_out))
  outputs = np.concatenate(outputs)
  stats = common.codebook_stats(np.concatenate(codes), config.codebook_size)
  metrics = {"eval_reconstruction_mse": float(np.mean(np.square(outputs - images))),
             **{f"eval_{k}": v for k, v in stats.items()}}
  return metrics, outputs


# The loop -------------------------------------------------------------------------------------------------------
def train_tokenizer(config: MaskGITConfig, workdir: str, num_steps: int | None = None, *, dataset=None,
                    lr: float | None = None, beta1: float | None = None, beta2: float | None = None,
                    warmup_steps: int | None = None, batch_size: int | None = None,
                    codebook_restart_every: int | None = None, resume: bool = True, init_params=None,
                    eval_images: int = 100, progress: bool = True) -> dict:
  """Trains `config.tokenizer` on `dataset` (default: `config.data`, see maskgit_common/data.py).

  Args:
    config: the whole MaskGITConfig; architecture and loss weights from `config.tokenizer`; batch size, steps, seed,
      logging and checkpoint cadence from `config.train` (see `common.resolve_settings`).
    workdir: where the export, resumable checkpoints and logs go (layout in the module doc).
    num_steps: total number of updates (default `config.train.num_train_steps`); a resumed run continues to it.
    dataset: anything with `len()` and `[i] -> (image (H, H, 3) float32 in [0, 1], label)`.
    lr, beta1, beta2, warmup_steps, batch_size, codebook_restart_every: override the resolved settings.
    resume: continue from the newest valid checkpoint in workdir when there is one.
    init_params: start from these tokenizer params (the contents of {"params"}) instead of a fresh init.
    eval_images: how many images (the first of the dataset) the final evaluation and picture use.
    progress: show a tqdm bar.

  Returns:
    A summary: "step", "export_dir", "settings", the last logged training metrics and the eval metrics.

  Raises:
    training.NonFiniteLossError: a loss became NaN/inf (the last good checkpoint is kept).
  """
  settings = common.resolve_settings(config, lr=lr, beta1=beta1, beta2=beta2, warmup_steps=warmup_steps,
                                     batch_size=batch_size, num_steps=num_steps,
                                     codebook_restart_every=codebook_restart_every)
  dataset = data_lib.make_dataset(config) if dataset is None else dataset
  train_dir = os.path.join(workdir, common.TRAIN_DIR)
  checkpoints = training.CheckpointDir(os.path.join(train_dir, "checkpoints"), settings.keep_checkpoints)
  dtype = jnp.bfloat16 if settings.precision == "fast" else jnp.float32
  tx, step_fn = _step_function(_model_config(config),
                               (settings.lr, settings.beta1, settings.beta2, settings.warmup_steps), dtype)
  state = init_state(config, tx, settings.seed, init_params)
  if resume:
    state = restore_state(checkpoints, state) or state
  start = int(state.step)
  writer = training.MetricsWriter(train_dir, resume_step=start)
  pool = concurrent.futures.ThreadPoolExecutor(config.data.num_workers) if config.data.num_workers > 0 else None
  window, last, tic = [], {}, time.perf_counter()
  bar = tqdm.tqdm(total=settings.num_steps, initial=start, desc="tokenizer (jax)", disable=not progress)
  try:
    for step in range(start, settings.num_steps):
      images = common.load_batch(dataset, step, settings.batch_size, settings.seed, config.data.random_flip, pool)
      state, aux, _ = step_fn(state, jnp.asarray(images))
      if common.is_restart_step(settings, step):
        state, aux["codes_restarted"] = restart_codes(state, aux, settings.seed, step)
      del aux["latents"]
      window.append(aux)
      done = step + 1
      if done % settings.log_every_steps == 0 or done % settings.checkpoint_every_steps == 0 \
          or done == settings.num_steps:
        window = jax.device_get(window)
        _check_finite(window, done)
        if done % settings.log_every_steps == 0 or done == settings.num_steps:
          last = common.window_record(window, done, settings, config.codebook_size, time.perf_counter() - tic)
          writer.write(done, last)
          bar.set_postfix(rec=f"{last['reconstruction_loss']:.4f}", usage=f"{last['codebook_usage']:.2f}")
          window, tic = [], time.perf_counter()
        if done % settings.checkpoint_every_steps == 0 or done == settings.num_steps:
          save_state(checkpoints, state, settings)
      bar.update(1)
  finally:
    bar.close()
    if pool:
      pool.shutdown()

  export_dir = export_tokenizer(os.path.join(workdir, training.TOKENIZER_DIR), config, state.params)
  originals = np.stack([dataset[int(i)][0] for i in common.eval_indices(len(dataset), eval_images)])
  eval_metrics, outputs = evaluate(state.params, _model_config(config), originals)
  writer.write(int(state.step), eval_metrics)
  writer.close()
  common.save_reconstructions(originals[:20], outputs[:20], os.path.join(train_dir, common.RECONSTRUCTIONS_PNG))
  return {"step": int(state.step), "export_dir": export_dir, "settings": dataclasses.asdict(settings), **last,
          **eval_metrics}


def _check_finite(window: list[dict], step: int) -> None:
  for i, aux in enumerate(window):
    if not np.isfinite(aux["loss"]):
      raise training.NonFiniteLossError(
          f"tokenizer loss is {aux['loss']} at step {step - len(window) + i + 1}; stopping (the last good "
          f"checkpoint is kept). Try a lower learning rate or precision='parity'.")
