"""Train the VQGAN tokenizer (PyTorch): reconstruction + vector-quantization losses, the "basic" VQGAN recipe.

Losses, optimizer and codebook restarts are described once in maskgit_common/tokenizer_losses.py. The quantizer
terms mirror maskgit_jax's `VectorQuantizer(train=True)` (the official train mode) term for term; the perceptual
and adversarial terms of the full VQGAN recipe are off (their pretrained weights are not available offline).

  from maskgit_torch.train_tokenizer import train_tokenizer
  summary = train_tokenizer(configs.tiny(), "runs/tok", num_steps=2000)

Workdir layout (the same in maskgit_jax/train_tokenizer.py):
  tokenizer/                          portable checkpoint (DESIGN §4): config.json + tokenizer.safetensors, read by
                                      checkpoint.load_checkpoint, the transformer trainer and `conversion`
  tokenizer_train/checkpoints/ckpt_N/ resumable state (weights, Adam moments; step in the manifest), last N kept
  tokenizer_train/metrics.jsonl       losses, codebook usage, lr, speed (+ a TensorBoard event file beside it)
  tokenizer_train/reconstructions.png originals above their reconstructions after training
The data order is a pure function of (seed, step), so a killed run resumes from its last checkpoint to the same
losses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import time

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import tqdm

import conversion
from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import tokenizer_losses as common
from maskgit_common import training
from maskgit_torch import checkpoint as checkpoint_lib
from maskgit_torch.tokenizer import VQVAE

STATE_FILE = "state.safetensors"


def make_optimizer(model: torch.nn.Module, settings: common.TokenizerTrainSettings) -> torch.optim.Adam:
  """Adam with the official betas; the learning rate is set before every step from `common.learning_rate`."""
  return torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2),
                          eps=common.ADAM_EPS)


def init_model(config: MaskGITConfig, seed: int, state_dict=None, device="cpu") -> VQVAE:
  """The official initializers drawn from torch seed `seed` (global RNG untouched), or the given weights."""
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    model = VQVAE(config)
  if state_dict is not None:
    conversion.check_config(config, {"tokenizer": state_dict}, layout="torch")
    model.load_state_dict(state_dict)
  return model.to(device).train()


def entropy_loss(affinity: torch.Tensor, loss_type: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
  """Codebook-usage regulariser of the official trainer (maskgit/libml/losses.py): per-sample minus batch entropy."""
  flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = F.softmax(flat, dim=-1)
  log_probs = F.log_softmax(flat + 1e-5, dim=-1)
  if loss_type == "softmax":
    target = probs
  elif loss_type == "argmax":
    onehot = F.one_hot(flat.argmax(dim=-1), flat.shape[-1]).to(flat.dtype)
    target = probs - (probs - onehot).detach()  # straight-through
  else:
    raise ValueError(f"entropy loss type {loss_type!r} is not 'softmax' or 'argmax'")
  avg_probs = target.mean(dim=0)
  avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
  sample_entropy = -(target * log_probs).sum(dim=-1).mean()
  return sample_entropy - avg_entropy


def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
  """|z|^2 - 2 z.c + |c|^2 for flat z (N, E) and codebook (K, E) in float32, the official order of operations."""
  return (z ** 2).sum(dim=1, keepdim=True) - 2 * (z @ codebook.t()) + (codebook ** 2).sum(dim=1)[None, :]


def compute_losses(model: VQVAE, images: torch.Tensor, config: MaskGITConfig) -> tuple[torch.Tensor, dict]:
  """(loss, aux) for images (B, H, H, 3) in [0, 1]; aux holds every loss term (detached), codes and latents."""
  tc = config.tokenizer
  quantized, result = model.encode(images)  # quantized: codebook rows (grad flows to the codebook)
  z = result["raw"]
  e_latent_loss = torch.mean((quantized.detach() - z) ** 2) * tc.commitment_cost
  q_latent_loss = torch.mean((quantized - z.detach()) ** 2)
  entropy = z.new_zeros(())
  if tc.entropy_loss_ratio != 0:
    with torch.autocast(device_type=z.device.type, enabled=False):
      distances = squared_distances(z.float().reshape(-1, z.shape[-1]), model.quantizer.codebook.float())
      entropy = entropy_loss(-distances, tc.entropy_loss_type, tc.entropy_temperature) * tc.entropy_loss_ratio
  quantizer_loss = e_latent_loss + q_latent_loss + entropy
  straight_through = z + (quantized - z).detach()
  reconstructions = model.decode(straight_through)
  reconstruction_loss = torch.mean((images - reconstructions.float()) ** 2)  # official losses.l2_loss
  loss = reconstruction_loss + quantizer_loss
  aux = {"loss": loss, "reconstruction_loss": reconstruction_loss, "quantizer_loss": quantizer_loss,
         "e_latent_loss": e_latent_loss, "q_latent_loss": q_latent_loss, "entropy_loss": entropy}
  aux = {k: v.detach() for k, v in aux.items()}
  aux.update(codes=result["encoding_indices"], latents=z.detach())
  return loss, aux


def train_step(model: VQVAE, optimizer: torch.optim.Optimizer, images: torch.Tensor, config: MaskGITConfig,
               lr: float, precision: str = "parity") -> dict:
  """One Adam update at learning rate `lr`; returns aux of the losses before the update."""
  for group in optimizer.param_groups:
    group["lr"] = lr
  optimizer.zero_grad(set_to_none=True)
  autocast = (torch.autocast(device_type=images.device.type, dtype=torch.bfloat16) if precision == "fast"
              else contextlib.nullcontext())
  with autocast:
    loss, aux = compute_losses(model, images, config)
  loss.backward()
  optimizer.step()
  return aux


def restart_codes(model: VQVAE, aux: dict, seed: int, step: int) -> int:
  """common.restart_dead_codes applied in place to the quantizer codebook -> number of codes restarted."""
  codebook = model.quantizer.codebook
  new, count = common.restart_dead_codes(codebook.detach().cpu().numpy(), aux["codes"].cpu().numpy(),
                                         aux["latents"].cpu().numpy(), seed, step)
  if count:
    with torch.no_grad():
      codebook.copy_(torch.from_numpy(new).to(codebook.device, codebook.dtype))
  return count


# Checkpoints ----------------------------------------------------------------------------------------------------
def save_state(checkpoints: training.CheckpointDir, step: int, model: VQVAE, optimizer: torch.optim.Adam,
               settings) -> str:
  """checkpoints/ckpt_<step>/state.safetensors: "model/<name>" weights and "adam/<name>/exp_avg[_sq]" moments."""
  tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
  for name, p in model.named_parameters():
    for key, value in optimizer.state.get(p, {}).items():
      if key != "step":  # every parameter's step equals the global step, stored in the manifest
        tensors[f"adam/{name}/{key}"] = value.detach().cpu().contiguous()
  write = lambda tmp: safetensors.torch.save_file(tensors, os.path.join(tmp, STATE_FILE))
  return checkpoints.save(step, write, {"backend": "torch", "step": step, "settings": dataclasses.asdict(settings)})


def restore_state(checkpoints: training.CheckpointDir, model: VQVAE, optimizer: torch.optim.Adam) -> int:
  """Loads the newest checkpoint that verifies (a corrupt one is skipped with a warning) -> its step (0 if none)."""
  latest = checkpoints.latest()
  if latest is None:
    return 0
  step, path, _ = latest
  device = next(model.parameters()).device
  tensors = safetensors.torch.load_file(os.path.join(path, STATE_FILE), device=str(device))
  model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
  state = {}
  for index, (name, _) in enumerate(model.named_parameters()):
    moments = {key: tensors[f"adam/{name}/{key}"] for key in ("exp_avg", "exp_avg_sq")
               if f"adam/{name}/{key}" in tensors}
    if moments:
      state[index] = {"step": torch.tensor(float(step)), **moments}
  optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
  return step


def export_tokenizer(export_dir: str, config: MaskGITConfig, model: VQVAE) -> str:
  """Portable checkpoint directory: config.json + tokenizer.safetensors (maskgit_torch.checkpoint)."""
  checkpoint_lib.save_checkpoint(export_dir, config, {"tokenizer": model}, overwrite=True)
  return export_dir


# Evaluation -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: VQVAE, config: MaskGITConfig, images: np.ndarray, batch_size: int = 64) -> tuple[dict, np.ndarray]:
  """Eval-mode round trip images -> codes -> images: reconstruction MSE and codebook usage -> (metrics, outputs)."""
  device = next(model.parameters()).device
  codes, outputs = [], []
  for start in range(0, len(images), batch_size):
    batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
    batch_codes = model.encode_to_indices(batch)
    outputs.append(model.decode_from_indices(batch_codes).cpu().numpy())
    codes.append(batch_codes.cpu().numpy())
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
                    eval_images: int = 100, progress: bool = True, device: str | None = None) -> dict:
  """Trains `config.tokenizer` on `dataset` (default: `config.data`, see maskgit_common/data.py).

  Args: as maskgit_jax.train_tokenizer.train_tokenizer, with `init_params` a torch state dict, and
    device: "cpu", "cuda", ... (default: cuda when available).

  Returns:
    A summary: "step", "export_dir", "settings", the last logged training metrics and the eval metrics.

  Raises:
    training.NonFiniteLossError: a loss became NaN/inf (the last good checkpoint is kept).
  """
  settings = common.resolve_settings(config, lr=lr, beta1=beta1, beta2=beta2, warmup_steps=warmup_steps,
                                     batch_size=batch_size, num_steps=num_steps,
                                     codebook_restart_every=codebook_restart_every)
  device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
  dataset = data_lib.make_dataset(config) if dataset is None else dataset
  train_dir = os.path.join(workdir, common.TRAIN_DIR)
  checkpoints = training.CheckpointDir(os.path.join(train_dir, "checkpoints"), settings.keep_checkpoints)
  model = init_model(config, settings.seed, init_params, device)
  optimizer = make_optimizer(model, settings)
  start = restore_state(checkpoints, model, optimizer) if resume else 0
  writer = training.MetricsWriter(train_dir, resume_step=start)
  pool = concurrent.futures.ThreadPoolExecutor(config.data.num_workers) if config.data.num_workers > 0 else None
  window, last, tic = [], {}, time.perf_counter()
  bar = tqdm.tqdm(total=settings.num_steps, initial=start, desc="tokenizer (torch)", disable=not progress)
  try:
    for step in range(start, settings.num_steps):
      images = common.load_batch(dataset, step, settings.batch_size, settings.seed, config.data.random_flip, pool)
      aux = train_step(model, optimizer, torch.from_numpy(images).to(device), config,
                       common.learning_rate(settings, step), settings.precision)
      if common.is_restart_step(settings, step):
        aux["codes_restarted"] = restart_codes(model, aux, settings.seed, step)
      del aux["latents"]
      window.append(aux)
      done = step + 1
      log_now = done % settings.log_every_steps == 0 or done == settings.num_steps
      save_now = done % settings.checkpoint_every_steps == 0 or done == settings.num_steps
      if log_now or save_now:
        window = [{k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in w.items()} for w in window]
        _check_finite(window, done)
        if log_now:
          last = common.window_record(window, done, settings, config.codebook_size, time.perf_counter() - tic)
          writer.write(done, last)
          bar.set_postfix(rec=f"{last['reconstruction_loss']:.4f}", usage=f"{last['codebook_usage']:.2f}")
          window, tic = [], time.perf_counter()
        if save_now:
          save_state(checkpoints, done, model, optimizer, settings)
      bar.update(1)
  finally:
    bar.close()
    if pool:
      pool.shutdown()

  model.eval()
  export_dir = export_tokenizer(os.path.join(workdir, training.TOKENIZER_DIR), config, model)
  originals = np.stack([dataset[int(i)][0] for i in common.eval_indices(len(dataset), eval_images)])
  eval_metrics, outputs = evaluate(model, config, originals)
  final_step = max(start, settings.num_steps)
  writer.write(final_step, eval_metrics)
  writer.close()
  common.save_reconstructions(originals[:20], outputs[:20], os.path.join(train_dir, common.RECONSTRUCTIONS_PNG))
  return {"step": final_step, "export_dir": export_dir, "settings": dataclasses.asdict(settings), **last,
          **eval_metrics}


def _check_finite(window: list[dict], step: int) -> None:
  for i, aux in enumerate(window):
    if not np.isfinite(aux["loss"]):
      raise training.NonFiniteLossError(
          f"tokenizer loss is {aux['loss']} at step {step - len(window) + i + 1}; stopping (the last good "
          f"checkpoint is kept). Try a lower learning rate or precision='parity'.")
