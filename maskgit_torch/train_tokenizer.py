"""Train the VQGAN tokenizer (PyTorch): reconstruction + vector-quantization losses, the "basic" VQGAN recipe.

Losses, optimizer and codebook restarts are described once in maskgit_common/tokenizer_losses.py; the quantizer
terms are `vq_losses` here and in maskgit_jax/train_tokenizer.py (the official VectorQuantizer's train mode, term
for term). The perceptual and adversarial terms of the full VQGAN recipe are off (their pretrained weights are not
available offline). The loop is maskgit_common/train_loop.py, shared by every trainer.

  from maskgit_torch.train_tokenizer import train_tokenizer
  summary = train_tokenizer(configs.tiny(), "runs/tok", num_steps=2000)

Workdir layout (the same in maskgit_jax/train_tokenizer.py):
  tokenizer/                          portable checkpoint: config.json + tokenizer.safetensors, read by
                                      checkpoint.load_checkpoint, the transformer trainer and `conversion`
  tokenizer_train/checkpoints/ckpt_N/ resumable state (maskgit_torch/train_state.py), last N kept
  tokenizer_train/metrics.jsonl       losses, codebook usage, lr, speed (+ a TensorBoard event file beside it)
  tokenizer_train/reconstructions.png originals above their reconstructions after training
The data order (maskgit_common.training.DataOrder) and the flips are pure functions of (seed, position, step), so
a killed run resumes from its last checkpoint to the same losses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os

import numpy as np
import torch

import conversion
from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import tokenizer_losses as common
from maskgit_common import train_loop, training, workdir as workdir_lib
from maskgit_torch import checkpoint as checkpoint_lib
from maskgit_torch import device as device_lib
from maskgit_torch import train_state
from maskgit_torch.tokenizer import VQVAE, entropy_loss, squared_distances

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


def vq_losses(z: torch.Tensor, quantized: torch.Tensor, codebook: torch.Tensor, tc) -> dict:
  """The quantizer's training terms (maskgit_common/tokenizer_losses.py) for encoder outputs z and their nearest
  codebook rows `quantized` (through which the gradient reaches the codebook)."""
  e_latent_loss = torch.mean((quantized.detach() - z) ** 2) * tc.commitment_cost
  q_latent_loss = torch.mean((quantized - z.detach()) ** 2)
  entropy = z.new_zeros(())
  if tc.entropy_loss_ratio != 0:
    with torch.autocast(device_type=z.device.type, enabled=False):
      distances = squared_distances(z.float().reshape(-1, z.shape[-1]), codebook.float())
      entropy = entropy_loss(-distances, tc.entropy_loss_type, tc.entropy_temperature) * tc.entropy_loss_ratio
  return {"quantizer_loss": e_latent_loss + q_latent_loss + entropy, "e_latent_loss": e_latent_loss,
          "q_latent_loss": q_latent_loss, "entropy_loss": entropy}


def compute_losses(model: VQVAE, images: torch.Tensor, config: MaskGITConfig) -> tuple[torch.Tensor, dict]:
  """(loss, aux) for images (B, H, H, 3) in [0, 1]; aux holds every loss term (detached), codes and latents."""
  quantized, result = model.encode(images)  # quantized: codebook rows (grad flows to the codebook)
  z = result["raw"]
  vq = vq_losses(z, quantized, model.quantizer.codebook, config.tokenizer)
  straight_through = z + (quantized - z).detach()
  reconstructions = model.decode(straight_through)
  reconstruction_loss = torch.mean((images - reconstructions.float()) ** 2)  # official losses.l2_loss
  loss = reconstruction_loss + vq["quantizer_loss"]
  aux = {"loss": loss, "reconstruction_loss": reconstruction_loss, **vq}
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


# Export and evaluation ------------------------------------------------------------------------------------------
def export_tokenizer(export_dir: str, config: MaskGITConfig, model: VQVAE) -> str:
  """Portable checkpoint directory: config.json + tokenizer.safetensors (maskgit_torch.checkpoint)."""
  checkpoint_lib.save_checkpoint(export_dir, config, {"tokenizer": model}, overwrite=True)
  return export_dir


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
  return common.eval_metrics(images, outputs, np.concatenate(codes), config.codebook_size), outputs


# The loop -------------------------------------------------------------------------------------------------------
class TokenizerTask(train_loop.TrainTask):
  """The torch framework parts of tokenizer training for maskgit_common.train_loop."""
  backend, label, progress_keys = "torch", "tokenizer (torch)", ("reconstruction_loss", "codebook_usage")

  def __init__(self, config: MaskGITConfig, settings: common.TokenizerTrainSettings, model: VQVAE, dataset,
               workdir: str, eval_images: int):
    self.config, self.settings, self.model, self.dataset = config, settings, model, dataset
    self.workdir, self.eval_images = workdir, eval_images
    self.optimizer = make_optimizer(model, settings)
    self.order = training.DataOrder(len(dataset), settings.seed)
    self.device = next(model.parameters()).device
    workers = config.data.num_workers
    self.pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None
    self.export_dir = os.path.join(workdir, training.TOKENIZER_DIR)
    self.rng_scheme = {"seed": settings.seed, "data_order": "numpy default_rng([seed, 0, epoch]).permutation",
                       "flips": "numpy default_rng([seed, 1, step])", "restarts": "numpy default_rng([seed, 2, step])"}

  def train_step(self, step: int, position: int, lr: float) -> dict:
    s = self.settings
    images = common.load_batch(self.dataset, self.order, position, step, s.batch_size, self.config.data.random_flip,
                               self.pool)
    aux = train_step(self.model, self.optimizer, torch.from_numpy(images).to(self.device), self.config, lr,
                     s.precision)
    if common.is_restart_step(s, step):
      aux["codes_restarted"] = restart_codes(self.model, aux, s.seed, step)
    del aux["latents"]
    return aux

  def fetch(self, window: list) -> list[dict]:
    return [{k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in w.items()} for w in window]

  def summarize(self, records: list[dict]) -> dict:
    return common.window_record(records, self.config.codebook_size)

  def save(self, directory: str) -> None:
    train_state.save(directory, self.model, self.optimizer)

  def restore(self, directory: str) -> None:
    train_state.restore(directory, self.model, self.optimizer)

  def finish(self, step: int) -> dict:
    """Exports workdir/tokenizer, evaluates the first `eval_images` images, writes the reconstructions picture."""
    if self.pool:
      self.pool.shutdown()
    model = self.model.eval()
    export_tokenizer(self.export_dir, self.config, model)
    originals = np.stack([self.dataset[int(i)][0] for i in common.eval_indices(len(self.dataset), self.eval_images)])
    metrics, outputs = evaluate(model, self.config, originals)
    common.save_reconstructions(originals[:20], outputs[:20],
                                os.path.join(self.workdir, common.TRAIN_DIR, common.RECONSTRUCTIONS_PNG))
    return metrics


def train_tokenizer(config: MaskGITConfig, workdir: str, num_steps: int | None = None, *, dataset=None,
                    lr: float | None = None, beta1: float | None = None, beta2: float | None = None,
                    warmup_steps: int | None = None, batch_size: int | None = None,
                    codebook_restart_every: int | None = None, resume: bool = True, init_params=None,
                    eval_images: int = 100, progress: bool = True, device: str | None = None,
                    allow_config_change: bool = False, ignore_corrupt_checkpoints: bool = False) -> dict:
  """Trains `config.tokenizer` on `dataset` (default: `config.data`, see maskgit_common/data.py).

  Args: as maskgit_jax.train_tokenizer.train_tokenizer, with `init_params` a torch state dict, and
    device: "cpu", "cuda", ... (default: "auto", a GPU when there is one).

  Returns:
    A summary: "step", "export_dir", "settings", the last logged training metrics and the eval metrics.

  Raises:
    training.NonFiniteLossError: a loss became NaN/inf (the last good checkpoint is kept).
  """
  settings = common.resolve_settings(config, lr=lr, beta1=beta1, beta2=beta2, warmup_steps=warmup_steps,
                                     batch_size=batch_size, num_steps=num_steps,
                                     codebook_restart_every=codebook_restart_every)
  device = device_lib.resolve(device or "auto")
  with workdir_lib.RunDir(workdir, os.path.join(workdir, common.TRAIN_DIR), backend="torch",
                          fingerprint=common.run_fingerprint(config, settings), fixed=common.FIXED,
                          keep_checkpoints=settings.keep_checkpoints, allow_config_change=allow_config_change,
                          ignore_corrupt_checkpoints=ignore_corrupt_checkpoints, resume=resume) as run:
    dataset = data_lib.make_dataset(config) if dataset is None else dataset
    task = TokenizerTask(config, settings, init_model(config, settings.seed, init_params, device), dataset, workdir,
                         eval_images)
    result = train_loop.run(task, run, common.loop_settings(settings), progress=progress)
  return {"step": result["step"], "export_dir": task.export_dir, "settings": dataclasses.asdict(settings),
          **result["record"], **result["final"]}
