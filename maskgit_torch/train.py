"""MaskGIT transformer training in PyTorch: DDP under torchrun, exact resume.

One recipe with maskgit_jax/train.py (both read the config's `train` section):
  batch      host-built by maskgit_common (token cache -> masks -> input ids), identical in both backends; each DDP
             rank takes its contiguous slice of the global batch
  loss       label-smoothed cross entropy over the codebook logits [..., :K] on masked tokens (or all tokens), each
             example's loss the weighted mean over its tokens, then the batch mean (the official
             `weighted_sequence_cross_entropy_loss`, maskgit/libml/losses.py:258-280, with `apply_label_smoothing`,
             losses.py:91-120: targets * (1 - eps) + eps / K)
  optimizer  global-norm gradient clipping with optax's rule (scale by max_norm / norm only when norm > max_norm;
             torch's clip_grad_norm_ adds 1e-6 to the norm, which we avoid to stay equal to JAX), then
             torch.optim.AdamW (eps 1e-8, decoupled decay on every parameter, like optax.adamw); the learning rate
             comes from maskgit_common.training.learning_rate each step
  EMA        polyak averaging of the weights after every step (train.polyak_decay)
  dropout    whatever dropout the model applies in train mode, from torch's global RNG re-seeded every step from
             (seed, step, rank), so a resumed run draws the same masks
  precision  "parity": float32 (run.py turns TF32 off); "fast": torch.autocast bfloat16, float32 master weights
Checkpoints (maskgit_common.training.CheckpointDir, checkpoints/ckpt_<step>/): model.safetensors, ema.safetensors,
optimizer.safetensors, with step, data position and RNG scheme in a sha256 manifest; no pickle anywhere. The newest
checkpoint that verifies is resumed, a corrupt one is skipped with a warning. At every checkpoint the portable
directory `export/` (config.json + tokenizer.safetensors + transformer.safetensors, DESIGN §4) is refreshed.
Tokenizer weights: `training.find_tokenizer` (explicit path, else <workdir>/tokenizer, else random).
DDP: under torchrun (WORLD_SIZE > 1) the process group is gloo on CPU and NCCL on GPU. When training created the
group, it ends with barrier, destroy_process_group and os._exit(0): torchrun with gloo can otherwise abort at
interpreter exit.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from configs import MaskGITConfig
from maskgit_common import data as data_lib
from maskgit_common import token_cache as token_cache_lib
from maskgit_common import training
from maskgit_torch import device as device_lib
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import Transformer

BATCH_KEYS = ("input_ids", "targets", "weights")


# Loss, optimizer, one step -------------------------------------------------------------------------------------
def cross_entropy_loss(logits, targets, weights, label_smoothing: float, codebook_size: int):
  """(loss, (sum of correct weights, sum of weights)) for logits (B, S, V); position 0 is the class token."""
  logits = logits[:, 1:, :codebook_size].float()
  logp = F.log_softmax(logits, dim=-1)
  on, off = 1.0 - label_smoothing, label_smoothing / codebook_size
  target_logp = torch.gather(logp, -1, targets.long()[..., None])[..., 0]
  per_token = -(on * target_logp + off * logp.sum(-1))
  per_example = (per_token * weights).sum(-1) / weights.sum(-1)
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
  if max_norm > 0 and norm > max_norm:
    scale = max_norm / norm
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


def train_step(model, optimizer, ema: EMA | None, batch: dict, lr: float, config: MaskGITConfig,
               world_size: int = 1) -> dict:
  """One optimizer step on a (local) batch of tensors; returns float metrics averaged over the DDP ranks."""
  train = config.train
  for group in optimizer.param_groups:
    group["lr"] = lr
  device = batch["input_ids"].device
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if train.precision == "fast"
              else contextlib.nullcontext())
  with autocast:
    logits = model(batch["input_ids"])
  loss, (correct, counted) = cross_entropy_loss(logits, batch["targets"], batch["weights"], train.label_smoothing,
                                                config.codebook_size)
  optimizer.zero_grad(set_to_none=True)
  loss.backward()  # DDP averages the gradients over the ranks here
  params = list(_unwrap(model).parameters())
  grad_norm = clip_grad_norm(params, train.grad_clip_norm)
  optimizer.step()
  if ema is not None:
    ema.update(_unwrap(model), train.polyak_decay)
  with torch.no_grad():
    param_norm = torch.sqrt(sum(torch.sum(p.float() ** 2) for p in params))
    stats = torch.stack([loss.detach(), correct, counted, grad_norm, param_norm])
    if world_size > 1:
      summed = stats[:3].clone()
      dist.all_reduce(summed)
      stats = torch.cat([torch.stack([summed[0] / world_size, summed[1], summed[2]]), stats[3:]])
  loss_v, correct_v, counted_v, grad_v, param_v = stats.cpu().tolist()
  return {"loss": loss_v, "accuracy": correct_v / counted_v, "grad_norm": grad_v, "param_norm": param_v}


# Checkpoints ---------------------------------------------------------------------------------------------------
def _save_state(directory: str, model, optimizer, ema: EMA | None) -> None:
  model = _unwrap(model)
  safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                              os.path.join(directory, "model.safetensors"))
  if ema is not None:
    safetensors.torch.save_file({k: v.cpu().contiguous() for k, v in ema.params.items()},
                                os.path.join(directory, "ema.safetensors"))
  names = {id(p): n for n, p in model.named_parameters()}
  tensors = {}
  for p, state in optimizer.state.items():
    for key, value in state.items():
      tensors[f"{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
  safetensors.torch.save_file(tensors, os.path.join(directory, "optimizer.safetensors"))


def _load_state(directory: str, model, optimizer, ema: EMA | None, device) -> None:
  model = _unwrap(model)
  model.load_state_dict(safetensors.torch.load_file(os.path.join(directory, "model.safetensors"), device=str(device)))
  if ema is not None:
    loaded = safetensors.torch.load_file(os.path.join(directory, "ema.safetensors"), device=str(device))
    for n in ema.params:
      ema.params[n].copy_(loaded[n])
  tensors = safetensors.torch.load_file(os.path.join(directory, "optimizer.safetensors"))
  state = {}
  for i, (name, p) in enumerate(model.named_parameters()):
    entry = {key[len(name) + 1:]: value for key, value in tensors.items() if key.rsplit(".", 1)[0] == name}
    if entry:
      state[i] = {k: (v if k == "step" else v.to(p.device)) for k, v in entry.items()}
  optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


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
def _check_workdir_config(config: MaskGITConfig, workdir: str, rank: int) -> None:
  """A workdir holds one model: resuming with another architecture is refused; train/data changes are allowed."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    old = MaskGITConfig.load(path)
    for field in ("image_size", "num_class", "tokenizer", "transformer"):
      if getattr(old, field) != getattr(config, field):
        raise ValueError(f"{workdir} holds a run with another `{field}` ({getattr(old, field)} vs "
                         f"{getattr(config, field)}); use a new --workdir")
  if rank == 0:
    config.save(path)


def _nonfinite_message(step: int, metrics: dict, last_good) -> str:
  bad = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm"))
  keep = (f"the last good checkpoint (step {last_good[0]}, {last_good[1]}) is kept" if last_good
          else "no checkpoint was written yet")
  return (f"non-finite training values at step {step} ({bad}); training stopped and {keep}. Try a lower "
          f"train.lr, train.grad_clip_norm > 0, or train.precision=parity.")


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


def train(config: MaskGITConfig, workdir: str, *, tokenizer: str | None = None, init_state_dict=None,
          stop_after: int | None = None, num_synthetic: int = data_lib.SYNTHETIC_NUM_EXAMPLES,
          progress: bool = True, device: str = "auto") -> dict:
  """Trains (or resumes) the transformer in `workdir`; returns {"step", "losses" (this call's, per step), ...}.

  Args:
    config: the whole MaskGITConfig; `train` and `data` sections drive the run.
    workdir: checkpoints/, metrics.jsonl and TensorBoard events, tokens/ (built cache), export/ at the end.
    tokenizer: tokenizer used to build the token cache from images (checkpoint directory or .safetensors).
    init_state_dict: initial transformer weights (e.g. converted from JAX); default: official init from train.seed.
    stop_after: stop after this many steps of this call without saving (simulates a kill; tests).
    num_synthetic: size of the synthetic dataset.
    device: "auto" (cuda:LOCAL_RANK if available, else cpu), or a torch device string.
  Under torchrun (WORLD_SIZE > 1) this joins/creates the process group; if it created it, the process exits with
  os._exit(0) when training ends (rank 0 has written metrics.jsonl, checkpoints and export/ by then).
  """
  train_cfg = config.train
  world = int(os.environ.get("WORLD_SIZE", "1"))
  owns_group = False
  dev = device_lib.resolve(device)
  if world > 1 and not dist.is_initialized():
    if dev.type == "cuda":
      torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    owns_group = True
  rank = dist.get_rank() if dist.is_initialized() else 0
  world = dist.get_world_size() if dist.is_initialized() else 1
  main_process = rank == 0
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(config, workdir, rank)
  cache, tokenizer_model = open_token_cache(config, workdir, tokenizer, dev, rank, num_synthetic,
                                            progress and main_process)
  data = training.TrainingData(cache, config)

  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(train_cfg.seed)
    model = Transformer(config)
  has_dropout = any(isinstance(m, torch.nn.Dropout) for m in model.modules())
  if config.transformer.dropout_rate > 0 and not has_dropout and main_process:
    warnings.warn(f"transformer.dropout_rate={config.transformer.dropout_rate}, but maskgit_torch.transformer has "
                  f"no dropout layers yet: torch trains without dropout (the JAX trainer applies it)")
  if init_state_dict is not None:
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in init_state_dict.items()})
  model.to(dev)
  optimizer = make_optimizer(model, train_cfg)
  ema = EMA(model)
  ckpts = training.CheckpointDir(os.path.join(workdir, "checkpoints"), train_cfg.keep_checkpoints)
  step, position, last_good = 0, 0, None
  latest = ckpts.latest()
  if latest is not None:
    step, path, manifest = latest
    _load_state(path, model, optimizer, ema, dev)
    position, last_good = manifest["meta"]["position"], (step, path)
  if world > 1:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
  model.train()

  def local_batch(s: int, pos: int) -> dict:
    local = training.shard(data.global_batch(s, pos), rank, world)
    return {k: torch.from_numpy(local[k]).to(dev, non_blocking=True) for k in BATCH_KEYS}

  def save(s: int, pos: int):
    nonlocal last_good
    if main_process:
      meta = {"backend": "torch", "step": s, "position": pos, "rng": {"seed": train_cfg.seed, "dropout":
              "torch.manual_seed(training.step_seed(seed, 2, step, rank)) per step",
              "masks": "numpy default_rng([seed, 1, step])"}, "world_size": world, "config": config.to_dict()}
      last_good = (s, ckpts.save(s, lambda d: _save_state(d, model, optimizer, ema), meta))
      export(workdir, config, model, ema, tokenizer_model)
    if world > 1:
      dist.barrier()

  writer = training.MetricsWriter(workdir, enabled=main_process, resume_step=step)
  bar = None
  if progress and main_process:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=train_cfg.num_train_steps, initial=step, desc="train (torch)", unit="step")
  losses, done, t0 = [], 0, time.perf_counter()
  try:
    while step < train_cfg.num_train_steps and (stop_after is None or done < stop_after):
      lr = training.learning_rate(step, train_cfg)
      torch.manual_seed(training.step_seed(train_cfg.seed, training.STREAM_DROPOUT, step, rank))
      metrics = train_step(model, optimizer, ema, local_batch(step, position), lr, config, world)
      position += train_cfg.batch_size
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
  result = {"step": step, "position": position, "losses": losses, "export": exported,
            "last_checkpoint": last_good[1] if last_good else None}
  if owns_group:
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # pylint: disable=protected-access
  return result
