"""MaskGIT transformer training in PyTorch: DDP under torchrun, exact resume, both recipes.

The loop (steps, logging, checkpoints, resume, NaN stop) is maskgit_common/train_loop.py, shared by every trainer;
this file is the framework part. One recipe with maskgit_jax/train.py (both read the config's `train` section; the
official and the seed's values of every field are configs/recipes.py):
  model      the config's family (maskgit_torch/families.py): the official Transformer or the seed's
             MaskTransformer, and its tokenizer (VQVAE or taming's VQModel) for the token cache
  batch      host-built by maskgit_common (token cache -> crop/flip -> masks -> input ids, maskgit_common/masking.py),
             identical in both backends; each DDP rank takes its contiguous slice of the global batch, split into
             train.grad_accum micro-batches whose gradients add up to the batch's (each micro-batch loss / k)
  loss       label-smoothed cross entropy over the token layout's classes: on masked tokens, each example's loss
             the weighted mean over its tokens, then the batch mean (the official
             `weighted_sequence_cross_entropy_loss`, maskgit/libml/losses.py:258-280, with `apply_label_smoothing`,
             losses.py:91-120: targets * (1 - eps) + eps / K); with train.compute_loss_for_all the mean over every
             token, computed as the seed's nn.CrossEntropyLoss(label_smoothing) (the same number in exact maths)
  optimizer  global-norm clipping, train.clip_rule "optax" (scale by max_norm / norm only when norm > max_norm, as
             optax) or "torch" (the seed's nn.utils.clip_grad_norm_: every g * min(1, max / (norm + 1e-6))), then
             torch.optim.AdamW (eps 1e-8, decoupled decay on every parameter, like optax.adamw); the learning rate
             comes from the loop each step (train.warmup_rule)
  EMA        polyak averaging of the weights after every step (train.polyak_decay; 0: none)
  dropout    the model's dropout in train mode, from torch's global RNG re-seeded every step from (seed, step,
             rank), so a resumed run draws the same masks
  precision  "parity": float32 (run.py turns TF32 off); "fast": torch.autocast bfloat16, float32 master weights;
             "fp16" on CUDA: float16 autocast and a torch.amp.GradScaler (the seed's torch.cuda.amp; a step whose
             scaled gradients overflow is skipped, as the scaler does), float32 elsewhere as the seed on a CPU
Checkpoints: maskgit_torch/train_state.py (model, optimizer, EMA and the loss scale in one state.safetensors; no
pickle). At every checkpoint the portable directory `export/` (config.json + tokenizer.safetensors +
transformer.safetensors) is refreshed, and for the seed family `seed/MaskGIT/current.pth`, the seed's own file
(maskgit_common/train_init.py: its main.py --resume continues from it). `init`: start from another checkpoint
(run.py --init, a seed .pth with its AdamW state, iter and epoch). Tokenizer weights: `training.find_tokenizer`
(explicit path, else <workdir>/tokenizer, else random).
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
from maskgit_common import train_init, train_loop, training, workdir as workdir_lib
from maskgit_common.token_layout import TokenLayout, token_layout
from maskgit_torch import device as device_lib
from maskgit_torch import families, train_state

BATCH_KEYS = ("input_ids", "targets", "weights")
METRIC_KEYS = ("loss", "correct", "counted", "grad_norm", "param_norm")


# Loss, optimizer, one step -------------------------------------------------------------------------------------
def cross_entropy_loss(logits, targets, weights, label_smoothing: float, layout: TokenLayout,
                       all_tokens: bool = False):
  """(loss, (sum of correct weights, sum of weights)) for logits (B, S or L, V) and targets (B, L).

  The image positions and the classes a token can take (official: the K codes; seed: K + 1) come from the token
  layout. A row with no weight (possible with Bernoulli masking) contributes 0, not 0 / 0. `all_tokens` (every
  weight 1): the mean over all B * L tokens as the seed computes it, nn.CrossEntropyLoss(label_smoothing) on the
  flattened logits, (1 - eps) * mean(nll) + eps / C * mean(-sum log p).
  """
  num_classes = layout.sample_width
  logits = logits[:, layout.image_slice(), :num_classes].float()
  correct = (logits.argmax(-1) == targets).float()
  counts = ((correct * weights).sum(), weights.sum())
  if all_tokens:
    flat = logits.reshape(-1, num_classes)
    return F.cross_entropy(flat, targets.reshape(-1).long(), label_smoothing=label_smoothing), counts
  logp = F.log_softmax(logits, dim=-1)
  on, off = 1.0 - label_smoothing, label_smoothing / num_classes
  target_logp = torch.gather(logp, -1, targets.long()[..., None])[..., 0]
  per_token = -(on * target_logp + off * logp.sum(-1))
  per_example = (per_token * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
  return per_example.mean(), counts


def make_optimizer(model: torch.nn.Module, train) -> torch.optim.AdamW:
  return torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8,
                           weight_decay=train.weight_decay)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, rule: str = "optax") -> torch.Tensor:
  """Global-norm clipping (train.clip_rule); returns the norm before.

  "optax": optax.clip_by_global_norm, g * (max_norm / norm) if norm > max_norm, else g (torch's clip_grad_norm_ adds
  1e-6 to the norm, which this avoids to stay equal to JAX). "torch": the seed's nn.utils.clip_grad_norm_ itself.
  """
  parameters = list(parameters)
  if rule == "torch" and max_norm > 0:
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
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


def fp16_enabled(precision: str, device: torch.device) -> bool:
  """train.precision=fp16 is float16 autocast + loss scaling on CUDA only (as the seed's torch.cuda.amp)."""
  return precision == "fp16" and device.type == "cuda"


def autocast(precision: str, device: torch.device):
  """The compute precision of a step: bfloat16 autocast for "fast", float16 for "fp16" on CUDA, else float32."""
  if precision == "fast":
    return torch.autocast(device.type, dtype=torch.bfloat16)
  if fp16_enabled(precision, device):
    return torch.autocast(device.type, dtype=torch.float16)
  return contextlib.nullcontext()


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
  """The seed's GradScaler (default growth settings) for fp16 on CUDA; a disabled one (a no-op) otherwise."""
  return torch.amp.GradScaler(device.type, enabled=fp16_enabled(precision, device))


def micro_batches(batch: dict, count: int) -> list[dict]:
  """`count` equal consecutive slices of every array's leading axis (gradient accumulation)."""
  if count == 1:
    return [batch]
  b = batch["input_ids"].shape[0]
  if b % count:
    raise ValueError(f"a local batch of {b} examples does not split into train.grad_accum={count} micro-batches")
  return [{k: v[i * (b // count):(i + 1) * (b // count)] for k, v in batch.items()} for i in range(count)]


def train_step(model, optimizer, ema: EMA | None, batch: dict, lr: float, config: MaskGITConfig,
               world_size: int = 1, scaler: torch.amp.GradScaler | None = None) -> dict:
  """One optimizer step on a (local) batch of tensors -> METRIC_KEYS as 0-d tensors on the device (loss, correct
  and counted summed over the DDP ranks, loss averaged); nothing is copied to the host here.

  As the seed's train_one_epoch: zero_grad, forward and loss under autocast, (scaled) backward of loss / k per
  micro-batch, unscale, clip, (scaler) step. (The seed calls zero_grad on the last micro-batch of each group, which
  drops the first k - 1 micro-batches' gradients; here all k add up, the one-batch-k-times-larger step.)
  """
  train, layout = config.train, token_layout(config)
  for group in optimizer.param_groups:
    group["lr"] = lr
  optimizer.zero_grad(set_to_none=True)
  scaling = scaler is not None and scaler.is_enabled()
  parts = micro_batches(batch, train.grad_accum)
  losses, correct, counted = [], 0.0, 0.0
  for i, part in enumerate(parts):
    # DDP all-reduces the gradients on the last micro-batch's backward only.
    last = i == len(parts) - 1
    with (contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
      with autocast(train.precision, part["input_ids"].device):
        logits = model(part["input_ids"])
        loss, (c, n) = cross_entropy_loss(logits, part["targets"], part["weights"], train.label_smoothing, layout,
                                          all_tokens=train.compute_loss_for_all)
      scaled = loss if len(parts) == 1 else loss / len(parts)
      (scaler.scale(scaled) if scaling else scaled).backward()
    losses, correct, counted = losses + [loss.detach()], correct + c, counted + n
  loss = losses[0] if len(parts) == 1 else torch.stack(losses).mean()
  params = list(_unwrap(model).parameters())
  if scaling:
    scaler.unscale_(optimizer)
  grad_norm = clip_grad_norm(params, train.grad_clip_norm, train.clip_rule)
  if scaling:
    scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
    scaler.update()
  else:
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


# Models, data and tokenizer -------------------------------------------------------------------------------------
def build_model(config: MaskGITConfig, which: str, flat: dict | None = None, seed: int = 0) -> torch.nn.Module:
  """The family's module of `which`: holding canonical weights `flat` (built on the meta device, then assigned), or
  its own initialisation drawn after torch.manual_seed(seed) (torch's global RNG is left as it was)."""
  cls = families.model_class(config, which)
  if flat is None:
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      return cls(config)
  from maskgit_torch import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  with torch.device("meta"):
    module = cls(config)
  module.load_state_dict(checkpoint_lib.from_flat(config, which, flat), strict=True, assign=True)
  return module


def load_tokenizer(config: MaskGITConfig, path: str | None, device) -> tuple[torch.nn.Module, bool]:
  """(tokenizer, trained) from a tokenizer checkpoint; randomly initialised (seed train.seed) without one.

  `path`: any checkpoint `conversion.read` accepts that holds a tokenizer (a torch or JAX export directory, the
  official files, or one weights file), or the seed's VQGAN folder / last.ckpt, checked against `config`.
  """
  flat = None if path is None else train_init.read_tokenizer(path, config)
  return build_model(config, "tokenizer", flat, config.train.seed).to(device).eval(), path is not None


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
                          num_workers=config.data.num_workers, progress=progress, crops=config.data.random_crops)
  if dist.is_initialized():
    dist.barrier()
  return token_cache_lib.TokenCache(path, config, weights_hash), model


# Optimizer state <-> canonical Adam moments (train --init, the seed export) ---------------------------------------
def load_adam(optimizer: torch.optim.Optimizer, model: torch.nn.Module, config: MaskGITConfig, adam: dict) -> None:
  """Canonical {"count", "mu", "nu"} (maskgit_common/train_init.py) -> the AdamW state of `model`'s parameters."""
  import conversion  # pylint: disable=import-outside-toplevel
  mu, nu = (conversion.to_torch_layout(config, "transformer", dict(adam[m])) for m in ("mu", "nu"))
  state = {}
  for index, (name, p) in enumerate(model.named_parameters()):
    # torch keeps Adam's `step` as a float32 CPU tensor; the moments live beside their parameter.
    state[index] = {"step": torch.tensor(float(adam["count"])),
                    "exp_avg": torch.from_numpy(np.array(mu[name])).to(p.device),
                    "exp_avg_sq": torch.from_numpy(np.array(nu[name])).to(p.device)}
  optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def adam_moments(optimizer: torch.optim.Optimizer, model: torch.nn.Module, config: MaskGITConfig) -> dict | None:
  """The inverse of load_adam (None before the first step)."""
  import conversion  # pylint: disable=import-outside-toplevel
  named = list(model.named_parameters())
  if not all(p in optimizer.state and "exp_avg" in optimizer.state[p] for _, p in named):
    return None
  out = {"count": int(float(optimizer.state[named[0][1]]["step"]))}
  for m, key in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):
    out[m] = conversion.from_torch_layout(config, "transformer", {
        n: optimizer.state[p][key].detach().cpu().numpy() for n, p in named})
  return out


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
  backend, label = "torch", "train (torch)"

  def __init__(self, config: MaskGITConfig, workdir: str, model, data: training.TrainingData, tokenizer, device,
               rank: int, world: int, init: train_init.InitPoint | None = None):
    self.config, self.workdir, self.data, self.tokenizer, self.device = config, workdir, data, tokenizer, device
    self.rank, self.world_size, self.is_main = rank, world, rank == 0
    self.optimizer = make_optimizer(model, config.train)
    if init is not None and init.adam is not None:
      load_adam(self.optimizer, model, config, init.adam)
    self.ema = EMA(model)
    self.scaler = make_scaler(config.train.precision, device)
    # A skipped fp16 step's gradient norm is inf by design (the scaler backs off); only the loss must stay finite.
    self.finite_keys = ("loss",) if self.scaler.is_enabled() else ("loss", "grad_norm")
    if world > 1:
      model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    self.model = model.train()
    self.position, self.lr = 0, config.train.lr  # after the last step, for the seed export
    self.rng_scheme = {"seed": config.train.seed, "data_order": "numpy default_rng([seed, 0, epoch]).permutation",
                       "masks": "numpy default_rng([seed, 1, step])",
                       "dropout": "torch.manual_seed(training.step_seed(seed, 2, step, rank)) per step"}

  def train_step(self, step: int, position: int, lr: float):
    torch.manual_seed(training.step_seed(self.config.train.seed, training.STREAM_DROPOUT, step, self.rank))
    local = training.shard(self.data.global_batch(step, position), self.rank, self.world_size)
    batch = {k: torch.from_numpy(local[k]).to(self.device, non_blocking=True) for k in BATCH_KEYS}
    self.position, self.lr = position + self.data.batch_size, lr
    return train_step(self.model, self.optimizer, self.ema, batch, lr, self.config, self.world_size, self.scaler)

  def fetch(self, window: list) -> list[dict]:
    return host_metrics(window)

  def save(self, directory: str) -> None:
    extra = {"ema": self.ema.params}
    if self.scaler.is_enabled():  # the loss scale and its growth counter: a resumed fp16 run scales the same
      state = self.scaler.state_dict()
      extra["scaler"] = {"scale": torch.tensor(float(state["scale"])),
                         "growth_tracker": torch.tensor(int(state["_growth_tracker"]))}
    train_state.save(directory, _unwrap(self.model), self.optimizer, extra)

  def restore(self, directory: str) -> None:
    extra = {"ema": self.ema.params}
    if self.scaler.is_enabled():
      extra["scaler"] = {"scale": torch.zeros(()), "growth_tracker": torch.zeros((), dtype=torch.int64)}
    train_state.restore(directory, _unwrap(self.model), self.optimizer, extra)
    if self.scaler.is_enabled():
      self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": float(extra["scaler"]["scale"]),
                                   "_growth_tracker": int(extra["scaler"]["growth_tracker"])})

  def after_checkpoint(self, step: int) -> None:
    export(self.workdir, self.config, self.model, self.ema, self.tokenizer)
    if self.config.transformer.arch == "seed":
      model = _unwrap(self.model)
      from maskgit_torch import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
      train_init.write_seed(train_init.seed_export_path(self.workdir), self.config,
                            checkpoint_lib.to_flat(self.config, "transformer", model),
                            adam_moments(self.optimizer, model, self.config), step, self.position,
                            len(self.data.cache), self.lr)

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


def train(config: MaskGITConfig, workdir: str, *, tokenizer: str | None = None, init: str | None = None,
          init_optimizer: bool = True, init_state_dict=None, stop_after: int | None = None,
          num_synthetic: int = data_lib.SYNTHETIC_NUM_EXAMPLES, progress: bool = True, device: str = "auto",
          allow_config_change: bool = False, ignore_corrupt_checkpoints: bool = False) -> dict:
  """Trains (or resumes) the transformer in `workdir`; returns {"step", "losses" (this call's, per step), ...}.

  Args:
    config: the whole MaskGITConfig; `train` and `data` sections drive the run.
    workdir: checkpoints/, metrics.jsonl and TensorBoard events, tokens/ (built cache), export/ at the end.
    tokenizer: tokenizer used to build the token cache from images (checkpoint directory, weights file, or the
      seed's VQGAN folder).
    init: a checkpoint to start from when the workdir has none (maskgit_common/train_init.py): any transformer
      checkpoint, or the seed's .pth with its AdamW state (unless not init_optimizer), iter and global_epoch.
    init_state_dict: initial transformer weights as a state dict (e.g. converted from JAX); default: the family's
      own init from train.seed.
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
      train_init.announce(config, "torch", dev.type == "cuda")
    cache, tokenizer_model = open_token_cache(config, workdir, tokenizer, dev, rank, num_synthetic,
                                              progress and rank == 0)
    start = train_init.read_init(init, config, len(cache), init_optimizer) if init and run.resume is None else None
    if start is not None:
      model = build_model(config, "transformer", start.weights)
    else:
      model = build_model(config, "transformer", seed=config.train.seed)
    if init_state_dict is not None:
      model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in init_state_dict.items()})
    task = TransformerTask(config, workdir, model.to(dev), training.TrainingData(cache, config), tokenizer_model,
                           dev, rank, world, start)
    meta = {"config": config.to_dict(), **({"init": {"path": start.path, **start.source}} if start else {})}
    if start is not None and rank == 0:
      workdir_lib.say(start.describe())
    elif init and rank == 0:
      workdir_lib.say(f"--init {init} not used: the workdir's run resumes from its own checkpoint")
    result = train_loop.run(task, run, train_loop.LoopSettings.from_train(config.train), meta=meta,
                            stop_after=stop_after, progress=progress,
                            start=(start.step, start.position) if start else None)
  if owns_group:
    dist.barrier()
    dist.destroy_process_group()
  exported = result["last_checkpoint"] and result["last_checkpoint"] == run.checkpoints.path(result["step"])
  result["export"] = os.path.join(workdir, training.EXPORT_DIR) if exported else None
  return result
