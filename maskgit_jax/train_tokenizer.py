"""Train the VQGAN tokenizer (JAX): reconstruction + vector-quantization losses, the "basic" VQGAN recipe.

Losses, optimizer and codebook restarts are described once in maskgit_common/tokenizer_losses.py; the quantizer
terms are `vq_losses` here and in maskgit_torch/train_tokenizer.py (the official VectorQuantizer's train mode, term
for term). The perceptual and adversarial terms of the full VQGAN recipe are off (their pretrained weights are not
available offline). The loop is maskgit_common/train_loop.py, shared by every trainer.

  from maskgit_jax.train_tokenizer import train_tokenizer
  summary = train_tokenizer(configs.tiny(), "runs/tok", num_steps=2000)

Workdir layout (the same in maskgit_torch/train_tokenizer.py):
  tokenizer/                          portable checkpoint: config.json + tokenizer.msgpack (official flax layout),
                                      read by the transformer trainer and by `conversion`
  tokenizer_train/checkpoints/ckpt_N/ resumable state (maskgit_jax/train_state.py), last N kept
  tokenizer_train/metrics.jsonl       losses, codebook usage, lr, speed (+ a TensorBoard event file beside it)
  tokenizer_train/reconstructions.png originals above their reconstructions after training
The data order (maskgit_common.training.DataOrder) and the flips are pure functions of (seed, position, step), so
a killed run resumes from its last checkpoint to the same losses.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import tokenizer_losses as common
from maskgit_common import train_loop, training, workdir as workdir_lib
from maskgit_jax import checkpoint as checkpoint_lib
from maskgit_jax import train_state
from maskgit_jax.tokenizer import VQVAE, entropy_loss, squared_distances

WEIGHTS_FILE = "tokenizer.msgpack"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(beta1: float, beta2: float) -> optax.GradientTransformation:
  """Adam with the official betas; the learning rate is applied in `train_step` (Adam = this * -lr)."""
  return optax.scale_by_adam(b1=beta1, b2=beta2, eps=common.ADAM_EPS)


def _model_config(config: MaskGITConfig) -> MaskGITConfig:
  """The fields the tokenizer's computation depends on (image and tokenizer), as a key for compiled functions."""
  return MaskGITConfig(name="tokenizer", image_size=config.image_size, num_class=config.num_class,
                       tokenizer=config.tokenizer)


@functools.lru_cache(maxsize=8)
def _init_function(model_config: MaskGITConfig):
  return jax.jit(lambda key: checkpoint_lib.init_variables(model_config, "tokenizer", key)["params"])


@functools.lru_cache(maxsize=8)
def _step_function(model_config: MaskGITConfig, betas: tuple[float, float], dtype):
  """(optax transformation, jitted train_step), compiled once per model and optimizer (runs and tests reuse it)."""
  tx = make_optimizer(*betas)
  return tx, jax.jit(functools.partial(train_step, config=model_config, tx=tx, dtype=dtype), donate_argnums=(0,))


def init_state(config: MaskGITConfig, tx: optax.GradientTransformation, seed: int, params=None) -> TrainState:
  """Official initializers from PRNGKey(seed) (checkpoint.init_variables), or the given tokenizer params."""
  if params is None:
    params = _init_function(_model_config(config))(jax.random.PRNGKey(seed))
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params))


def vq_losses(z, quantized, distances, tc) -> dict:
  """The quantizer's training terms (maskgit_common/tokenizer_losses.py) for encoder outputs z, their nearest
  codebook rows `quantized` (through which the gradient reaches the codebook) and the squared distances of the
  flat z to every code (None when the entropy term is off)."""
  z32, q32 = z.astype(jnp.float32), quantized.astype(jnp.float32)
  e_latent_loss = jnp.mean((jax.lax.stop_gradient(q32) - z32) ** 2) * tc.commitment_cost
  q_latent_loss = jnp.mean((q32 - jax.lax.stop_gradient(z32)) ** 2)
  entropy = jnp.asarray(0.0, jnp.float32)
  if tc.entropy_loss_ratio != 0:
    entropy = entropy_loss(-distances, tc.entropy_loss_type, tc.entropy_temperature) * tc.entropy_loss_ratio
  return {"quantizer_loss": e_latent_loss + q_latent_loss + entropy, "e_latent_loss": e_latent_loss,
          "q_latent_loss": q_latent_loss, "entropy_loss": entropy}


def compute_losses(params, images, config: MaskGITConfig, dtype=jnp.float32):
  """(loss, aux) for images (B, H, H, 3) in [0, 1]; aux holds every loss term, the codes, latents, reconstructions."""
  tc = config.tokenizer

  def forward(module, x):
    z = module.encoder(x)
    # The entropy term's distances are computed before the quantizer, as the official train-mode quantizer computes
    # its one set of distances first: the gradients then sum their parts in the official order, bit for bit.
    distances = (squared_distances(z.reshape(-1, z.shape[-1]), params["quantizer"]["codebook"])
                 if tc.entropy_loss_ratio != 0 else None)
    quantized, result = module.quantizer(z)  # nearest codebook rows (gradient to the codebook), codes, latents
    vq = vq_losses(z, quantized, distances, tc)
    straight_through = z + jax.lax.stop_gradient(quantized - z)
    return module.decode(straight_through), vq, result

  reconstructions, vq, result = VQVAE(config, dtype=dtype).apply({"params": params}, images, method=forward)
  reconstructions = reconstructions.astype(jnp.float32)
  reconstruction_loss = jnp.mean(jnp.square(images - reconstructions))  # official losses.l2_loss
  loss = reconstruction_loss + vq["quantizer_loss"]
  aux = {"loss": loss, "reconstruction_loss": reconstruction_loss, **vq, "codes": result["encoding_indices"],
         "latents": result["raw"].astype(jnp.float32), "reconstructions": reconstructions}
  return loss, aux


def train_step(state: TrainState, images, lr, config: MaskGITConfig, tx: optax.GradientTransformation,
               dtype=jnp.float32):
  """One Adam update at learning rate `lr` -> (new state, aux of the losses before the update, grads)."""
  grads, aux = jax.grad(compute_losses, has_aux=True)(state.params, images, config, dtype)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
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


# Export and evaluation ------------------------------------------------------------------------------------------
def export_tokenizer(export_dir: str, config: MaskGITConfig, params) -> str:
  """Portable checkpoint directory: config.json + tokenizer.msgpack (flax `to_bytes({"params"})`, official layout)."""
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  return checkpoint_lib.save_checkpoint(export_dir, config, {"tokenizer": {"params": params}}, overwrite=True)


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
  return common.eval_metrics(images, outputs, np.concatenate(codes), config.codebook_size), outputs


# The loop -------------------------------------------------------------------------------------------------------
class TokenizerTask(train_loop.TrainTask):
  """The JAX framework parts of tokenizer training for maskgit_common.train_loop."""
  backend, label, progress_keys = "jax", "tokenizer (jax)", ("reconstruction_loss", "codebook_usage")

  def __init__(self, config: MaskGITConfig, settings: common.TokenizerTrainSettings, init_params, dataset,
               workdir: str, eval_images: int):
    self.config, self.settings, self.dataset = config, settings, dataset
    self.workdir, self.eval_images = workdir, eval_images
    dtype = jnp.bfloat16 if settings.precision == "fast" else jnp.float32
    tx, self.step_fn = _step_function(_model_config(config), (settings.beta1, settings.beta2), dtype)
    self.state = init_state(config, tx, settings.seed, init_params)
    self.order = training.DataOrder(len(dataset), settings.seed)
    workers = config.data.num_workers
    self.pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None
    self.export_dir = os.path.join(workdir, training.TOKENIZER_DIR)
    self.rng_scheme = {"seed": settings.seed, "data_order": "numpy default_rng([seed, 0, epoch]).permutation",
                       "flips": "numpy default_rng([seed, 1, step])", "restarts": "numpy default_rng([seed, 2, step])"}

  def train_step(self, step: int, position: int, lr: float) -> dict:
    s = self.settings
    images = common.load_batch(self.dataset, self.order, position, step, s.batch_size, self.config.data.random_flip,
                               self.pool)
    self.state, aux, _ = self.step_fn(self.state, jnp.asarray(images), jnp.float32(lr))
    if common.is_restart_step(s, step):
      self.state, aux["codes_restarted"] = restart_codes(self.state, aux, s.seed, step)
    del aux["latents"]
    return aux

  def fetch(self, window: list) -> list[dict]:
    return jax.device_get(window)

  def summarize(self, records: list[dict]) -> dict:
    return common.window_record(records, self.config.codebook_size)

  def save(self, directory: str) -> None:
    train_state.save(directory, self.state)

  def restore(self, directory: str) -> None:
    self.state = jax.tree_util.tree_map(jnp.asarray, train_state.restore(directory, jax.device_get(self.state)))

  def finish(self, step: int) -> dict:
    """Exports workdir/tokenizer, evaluates the first `eval_images` images, writes the reconstructions picture."""
    if self.pool:
      self.pool.shutdown()
    export_tokenizer(self.export_dir, self.config, self.state.params)
    originals = np.stack([self.dataset[int(i)][0] for i in common.eval_indices(len(self.dataset), self.eval_images)])
    metrics, outputs = evaluate(self.state.params, _model_config(self.config), originals)
    common.save_reconstructions(originals[:20], outputs[:20],
                                os.path.join(self.workdir, common.TRAIN_DIR, common.RECONSTRUCTIONS_PNG))
    return metrics


def train_tokenizer(config: MaskGITConfig, workdir: str, num_steps: int | None = None, *, dataset=None,
                    lr: float | None = None, beta1: float | None = None, beta2: float | None = None,
                    warmup_steps: int | None = None, batch_size: int | None = None,
                    codebook_restart_every: int | None = None, resume: bool = True, init_params=None,
                    eval_images: int = 100, progress: bool = True, allow_config_change: bool = False,
                    ignore_corrupt_checkpoints: bool = False) -> dict:
  """Trains `config.tokenizer` on `dataset` (default: `config.data`, see maskgit_common/data.py).

  Args:
    config: the whole MaskGITConfig; architecture and loss weights from `config.tokenizer`; batch size, steps, seed,
      logging and checkpoint cadence, Adam betas from `config.train` (see `common.resolve_settings`).
    workdir: where the export, resumable checkpoints and logs go (layout in the module doc).
    num_steps: total number of updates (default `config.train.num_train_steps`); a resumed run continues to it.
    dataset: anything with `len()` and `[i] -> (image (H, H, 3) float32 in [0, 1], label)`.
    lr, beta1, beta2, warmup_steps, batch_size, codebook_restart_every: override the resolved settings.
    resume: continue from the newest valid checkpoint in workdir when there is one.
    init_params: start from these tokenizer params (the contents of {"params"}) instead of a fresh init.
    eval_images: how many images (the first of the dataset) the final evaluation and picture use.
    progress: show a tqdm bar.
    allow_config_change, ignore_corrupt_checkpoints: resume policies (maskgit_common/workdir.py).

  Returns:
    A summary: "step", "export_dir", "settings", the last logged training metrics and the eval metrics.

  Raises:
    training.NonFiniteLossError: a loss became NaN/inf (the last good checkpoint is kept).
  """
  settings = common.resolve_settings(config, lr=lr, beta1=beta1, beta2=beta2, warmup_steps=warmup_steps,
                                     batch_size=batch_size, num_steps=num_steps,
                                     codebook_restart_every=codebook_restart_every)
  with workdir_lib.RunDir(workdir, os.path.join(workdir, common.TRAIN_DIR), backend="jax",
                          fingerprint=common.run_fingerprint(config, settings), fixed=common.FIXED,
                          keep_checkpoints=settings.keep_checkpoints, allow_config_change=allow_config_change,
                          ignore_corrupt_checkpoints=ignore_corrupt_checkpoints, resume=resume) as run:
    dataset = data_lib.make_dataset(config) if dataset is None else dataset
    task = TokenizerTask(config, settings, init_params, dataset, workdir, eval_images)
    result = train_loop.run(task, run, common.loop_settings(settings), progress=progress)
  return {"step": result["step"], "export_dir": task.export_dir, "settings": dataclasses.asdict(settings),
          **result["record"], **result["final"]}
