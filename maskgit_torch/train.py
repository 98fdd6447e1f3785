"""MaskGIT transformer training in PyTorch: DDP under torchrun, exact resume.

The loop (steps, logging, checkpoints, resume, NaN stop) is maskgit_common/train_loop.py, shared by every trainer;
this file is the framework part. One recipe with maskgit_jax/train.py (both read the config's `train` section):
  batch      host-built by maskgit_common (token cache -> masks -> input ids, maskgit_common/masking.py), identical
             in both backends; each DDP rank takes its contiguous slice of the global batch, split into
             train.grad_accum micro-batches whose gradients add up to the batch's
  loss       label-smoothed cross entropy over the token layout's code logits on masked tokens (or all tokens),
             each example's loss the weighted mean over its tokens, then the batch mean (the official
             `weighted_sequence_cross_entropy_loss`, maskgit/libml/losses.py:258-280, with `apply_label_smoothing`,
             losses.py:91-120: targets * (1 - eps) + eps / K)
  optimizer  global-norm gradient clipping with optax's rule (scale by max_norm / norm only when norm > max_norm;
             torch's clip_grad_norm_ adds 1e-6 to the norm, which we avoid to stay equal to JAX), then
             torch.optim.AdamW (eps 1e-8, decoupled decay on every parameter, like optax.adamw); the learning rate
             comes from the loop each step
  EMA        polyak averaging of the weights after every step (train.polyak_decay)
  dropout    the model's dropout in train mode, from torch's global RNG re-seeded every step from (seed, step,
             rank), so a resumed run draws the same masks
  precision  "parity": float32 (run.py turns TF32 off); "fast": torch.autocast bfloat16, float32 master weights
             (`autocast`, the one place a float16 + GradScaler mode would go)
Checkpoints: maskgit_torch/train_state.py (model, optimizer and EMA in one state.safetensors; no pickle). At every
checkpoint the portable directory `export/` (config.json + tokenizer.safetensors + transformer.safetensors) is
refreshed. Tokenizer weights: `training.find_tokenizer` (explicit path, else <workdir>/tokenizer, else random).
DDP: under torchrun (WORLD_SIZE > 1) the process group is gloo on CPU and NCCL on GPU; a group this module created
is destroyed when training ends.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import token_cache as token_cache_lib
from maskgit_common import train_loop, training, workdir as workdir_lib
from maskgit_common.token_layout import TokenLayout, token_layout
from maskgit_torch import device as device_lib
from maskgit_torch import train_state
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer

BATCH_KEYS = ("input_ids", "targets", "weights")
METRIC_KEYS = ("loss", "correct", "counted", "grad_norm", "param_norm")


# Loss, optimizer, one step -------------------------------------------------------------------------------------
def cross_entropy_loss(logits, targets, weights, label_smoothing: float, layout: TokenLayout):
  """(loss, (sum of correct weights, sum of weights)) for logits (B, S, V) and targets (B, L).

  The image positions and the classes a token can take (official: the K codes) come from the token layout. A row
  with no weight (possible with Bernoulli masking) contributes 0, not 0 / 0.
  """
  num_classes = layout.sample_width
  logits = logits[:, layout.image_slice(), :num_classes].float()
  logp = F.log_softmax(logits, dim=-1)
  on, off = 1.0 - label_smoothing, label_smoothing / num_classes
  target_logp = torch.gather(logp, -1, targets.long()[..., None])[..., 0]
  per_token = -(on * target_logp + off * logp.sum(-1))
  per_example = (per_token * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
  correct = (logits.argmax(-1) == targets).float()
  return per_example.mean(), ((correct * weights).sum(), weights.sum())


def make_optimizer(model: torch.nn.Module, train) -> torch.optim.AdamW:
  return torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8,
                           weight_decay=train.weight_decay)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
  """optax.clip_by_global_norm: g * (max_norm / norm) if norm > max_norm, else g. Returns the norm before."""
  grads = [p.grad for p in parameters if p.grad is not None]
  norm = torch.sqrt(sum(torch.sum(g.float() ** 2) for g in grads))
  if max_norm > 0:
    # A device-side choice (no `if norm > max_norm`, which would wait for the GPU every step); x 1.0 is exact.
    scale = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
    for g in grads:
      g.mul_(scale)
  return norm


class EMA:
  """Polyak average of the model's parameters (float32), keyed by parameter name."""

  def __init__(self, model: torch.nn.Module):
    self.params = {n: p.detach().clone().float() for n, p in model.named_parameters()}

  @torch.no_grad()
  def update(self, model: torch.nn.Module, decay: float) -> None:
    for n, p in model.named_parameters():
      e = self.params[n]
      e.copy_(decay * e + (1.0 - decay) * p.detach().float())  # the JAX expression, d * e + (1 - d) * p


def _unwrap(model):
  return model.module if hasattr(model, "module") else model


def autocast(precision: str, device: torch.device):
  """The compute precision of a step: bfloat16 autocast for "fast", float32 for "parity"."""
  if precision == "fast":
    return torch.autocast(device.type, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def micro_batches(batch: dict, count: int) -> list[dict]:
  """`count` equal consecutive slices of every array's leading axis (gradient accumulation)."""
  if count == 1:
    return [batch]
  b = batch["input_ids"].shape[0]
  if b % count:
    raise ValueError(f"a local batch of {b} examples does not split into train.grad_accum={count} micro-batches")
  return [{k: v[i * (b // count):(i + 1) * (b // count)] for k, v in batch.items()} for i in range(count)]


def train_step(model, optimizer, ema: EMA | None, batch: dict, lr: float, config: MaskGITConfig,
               world_size: int = 1) -> dict:
  """One optimizer step on a (local) batch of tensors -> METRIC_KEYS as 0-d tensors on the device (loss, correct
  and counted summed over the DDP ranks, loss averaged); nothing is copied to the host here."""
  train, layout = config.train, token_layout(config)
  for group in optimizer.param_groups:
    group["lr"] = lr
  optimizer.zero_grad(set_to_none=True)
  parts = micro_batches(batch, train.grad_accum)
  losses, correct, counted = [], 0.0, 0.0
  for i, part in enumerate(parts):
    # DDP all-reduces the gradients on the last micro-batch's backward only.
    last = i == len(parts) - 1
    with (contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
      with autocast(train.precision, part["input_ids"].device):
        logits = model(part["input_ids"])
      loss, (c, n) = cross_entropy_loss(logits, part["targets"], part["weights"], train.label_smoothing, layout)
      (loss if len(parts) == 1 else loss / len(parts)).backward()
    losses, correct, counted = losses + [loss.detach()], correct + c, counted + n
  loss = losses[0] if len(parts) == 1 else torch.stack(losses).mean()
  params = list(_unwrap(model).parameters())
  grad_norm = clip_grad_norm(params, train.grad_clip_norm)
  optimizer.step()
  if ema is not None:
    ema.update(_unwrap(model), train.polyak_decay)
  with torch.no_grad():
    param_norm = torch.sqrt(sum(torch.sum(p.float() ** 2) for p in params))
    if world_size > 1:
      summed = torch.stack([loss, correct, counted])
      dist.all_reduce(summed)
      loss, correct, counted = summed[0] / world_size, summed[1], summed[2]
  return {"loss": loss, "correct": correct, "counted": counted, "grad_norm": grad_norm, "param_norm": param_norm}


def host_metrics(window: list[dict]) -> list[dict]:
  """train_step's metrics of several steps -> one host copy -> [{loss, accuracy, grad_norm, param_norm}]."""
  rows = torch.stack([torch.stack([m[k].float() for k in METRIC_KEYS]) for m in window]).cpu().tolist()
  return [{"loss": loss, "accuracy": correct / counted, "grad_norm": grad, "param_norm": param}
          for loss, correct, counted, grad, param in rows]


# Data and tokenizer --------------------------------------------------------------------------------------------
def load_tokenizer(config: MaskGITConfig, path: str | None, device) -> tuple[VQVAE, bool]:
  """(tokenizer, trained) from a tokenizer checkpoint; randomly initialised (seed train.seed) without one.

  `path`: any checkpoint `conversion.read` accepts that holds a tokenizer (a torch or JAX export directory, the
  official files, or one weights file), checked against `config`.
  """
  if path is None:
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(config.train.seed)
      return VQVAE(config).to(device).eval(), False
  from maskgit_torch import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  _, models = checkpoint_lib.load_checkpoint(path, config, parts=("tokenizer",), device=device)
  return models["tokenizer"], True


def open_token_cache(config: MaskGITConfig, workdir: str, tokenizer: str | None, device, rank: int = 0,
                     num_synthetic: int = data_lib.SYNTHETIC_NUM_EXAMPLES, progress: bool = True):
  """The training token cache: data.token_cache (tokens) or built from images (rank 0) into data.token_cache or
  workdir/tokens. Returns (cache, tokenizer module or None)."""
  if config.data.dataset == "tokens":
    return token_cache_lib.TokenCache(config.data.token_cache, config), None
  path = config.data.token_cache or os.path.join(workdir, "tokens")
  model, trained = load_tokenizer(config, training.find_tokenizer(workdir, tokenizer), device)
  weights_hash = "torch:" + token_cache_lib.weights_hash(
      {k: v.cpu().numpy() for k, v in model.state_dict().items()})
  if not os.path.exists(os.path.join(path, "index.json")) and rank == 0:
    if not trained:
      warnings.warn("no tokenizer checkpoint given: tokenizing with a randomly initialised tokenizer (fine for "
                    "testing the training loop; samples decoded with it will not look like the data)")

    @torch.no_grad()
    def encode(images):
      return model.encode_to_indices(torch.from_numpy(images).to(device)).cpu().numpy()

    token_cache_lib.build(path, data_lib.make_dataset(config, num_synthetic), encode, config,
                          flip=config.data.random_flip, tokenizer_weights_hash=weights_hash,
                          num_workers=config.data.num_workers, progress=progress)
  if dist.is_initialized():
    dist.barrier()
  return token_cache_lib.TokenCache(path, config, weights_hash), model


# The loop ------------------------------------------------------------------------------------------------------
def export(workdir: str, config: MaskGITConfig, model, ema: EMA | None, tokenizer) -> str:
  """Writes the portable checkpoint directory workdir/export (config.json + safetensors) with the EMA weights."""
  from maskgit_torch import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  weights = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
  if ema is not None and config.train.polyak_decay > 0:
    weights.update({k: v.detach().cpu() for k, v in ema.params.items()})
  tokenizer_state = None if tokenizer is None else {k: v.cpu() for k, v in tokenizer.state_dict().items()}
  out = os.path.join(workdir, training.EXPORT_DIR)
  checkpoint_lib.save_checkpoint(out, data_lib.with_class_names(config),
                                 {"tokenizer": tokenizer_state, "transformer": weights}, overwrite=True)
  return out


class TransformerTask(train_loop.TrainTask):
  """The torch framework parts of transformer training for maskgit_common.train_loop."""
  backend, label, finite_keys = "torch", "train (torch)", ("loss", "grad_norm")

  def __init__(self, config: MaskGITConfig, workdir: str, model, data: training.TrainingData, tokenizer, device,
               rank: int, world: int):
    self.config, self.workdir, self.data, self.tokenizer, self.device = config, workdir, data, tokenizer, device
    self.rank, self.world_size, self.is_main = rank, world, rank == 0
    self.optimizer = make_optimizer(model, config.train)
    self.ema = EMA(model)
    if world > 1:
      model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    self.model = model.train()
    self.rng_scheme = {"seed": config.train.seed, "data_order": "numpy default_rng([seed, 0, epoch]).permutation",
                       "masks": "numpy default_rng([seed, 1, step])",
                       "dropout": "torch.manual_seed(training.step_seed(seed, 2, step, rank)) per step"}

  def train_step(self, step: int, position: int, lr: float):
    torch.manual_seed(training.step_seed(self.config.train.seed, training.STREAM_DROPOUT, step, self.rank))
    local = training.shard(self.data.global_batch(step, position), self.rank, self.world_size)
    batch = {k: torch.from_numpy(local[k]).to(self.device, non_blocking=True) for k in BATCH_KEYS}
    return train_step(self.model, self.optimizer, self.ema, batch, lr, self.config, self.world_size)

  def fetch(self, window: list) -> list[dict]:
    return host_metrics(window)

  def save(self, directory: str) -> None:
    train_state.save(directory, _unwrap(self.model), self.optimizer, {"ema": self.ema.params})

  def restore(self, directory: str) -> None:
    train_state.restore(directory, _unwrap(self.model), self.optimizer, {"ema": self.ema.params})

  def after_checkpoint(self, step: int) -> None:
    export(self.workdir, self.config, self.model, self.ema, self.tokenizer)

  def barrier(self, name: str) -> None:
    if self.world_size > 1:
      dist.barrier()


def _join_process_group(device) -> bool:
  """Under torchrun (WORLD_SIZE > 1) joins the process group (gloo on CPU, NCCL on GPU) -> whether it created it."""
  if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
    return False
  if device.type == "cuda":
    torch.cuda.set_device(device)
  dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
  return True


def train(config: MaskGITConfig, workdir: str, *, tokenizer: str | None = None, init_state_dict=None,
          stop_after: int | None = None, num_synthetic: int = data_lib.SYNTHETIC_NUM_EXAMPLES,
          progress: bool = True, device: str = "auto", allow_config_change: bool = False,
          ignore_corrupt_checkpoints: bool = False) -> dict:
  """Trains (or resumes) the transformer in `workdir`; returns {"step", "losses" (this call's, per step), ...}.

  Args:
    config: the whole MaskGITConfig; `train` and `data` sections drive the run.
    workdir: checkpoints/, metrics.jsonl and TensorBoard events, tokens/ (built cache), export/ at the end.
    tokenizer: tokenizer used to build the token cache from images (checkpoint directory or .safetensors).
    init_state_dict: initial transformer weights (e.g. converted from JAX); default: official init from train.seed.
    stop_after: stop after this many steps of this call without saving (simulates a kill; tests).
    num_synthetic: size of the synthetic dataset.
    device: "auto" (cuda:LOCAL_RANK if available, else cpu), or a torch device string.
    allow_config_change, ignore_corrupt_checkpoints: resume policies (maskgit_common/workdir.py).
  Under torchrun (WORLD_SIZE > 1) this joins the process group, creating it when needed; a group it created is
  destroyed when training ends (rank 0 has written metrics.jsonl, checkpoints and export/ by then).
  """
  dev = device_lib.resolve(device)
  owns_group = _join_process_group(dev)
  rank = dist.get_rank() if dist.is_initialized() else 0
  world = dist.get_world_size() if dist.is_initialized() else 1
  if config.train.batch_size % (world * config.train.grad_accum):
    raise workdir_lib.TrainingSetupError(
        f"train.batch_size={config.train.batch_size} must be divisible by {world} DDP process(es) x "
        f"train.grad_accum={config.train.grad_accum}")
  barrier = (lambda name: dist.barrier()) if world > 1 else None
  with workdir_lib.RunDir(workdir, workdir, backend="torch", fingerprint=training.transformer_fingerprint(config),
                          fixed=training.TRANSFORMER_FIXED, keep_checkpoints=config.train.keep_checkpoints,
                          is_main=rank == 0, barrier=barrier, allow_config_change=allow_config_change,
                          ignore_corrupt_checkpoints=ignore_corrupt_checkpoints) as run:
    if rank == 0:
      config.save(os.path.join(workdir, "config.json"))
    cache, tokenizer_model = open_token_cache(config, workdir, tokenizer, dev, rank, num_synthetic,
                                              progress and rank == 0)
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(config.train.seed)
      model = Transformer(config)
    if init_state_dict is not None:
      model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in init_state_dict.items()})
    task = TransformerTask(config, workdir, model.to(dev), training.TrainingData(cache, config), tokenizer_model,
                           dev, rank, world)
    result = train_loop.run(task, run, train_loop.LoopSettings.from_train(config.train),
                            meta={"config": config.to_dict()}, stop_after=stop_after, progress=progress)
  if owns_group:
    dist.barrier()
    dist.destroy_process_group()
  exported = result["last_checkpoint"] and result["last_checkpoint"] == run.checkpoints.path(result["step"])
  result["export"] = os.path.join(workdir, training.EXPORT_DIR) if exported else None
  return result
