"""`<backend>.train.step`: one step of the seed's `MaskGIT.train_one_epoch` (train_step.npz of a seed case),
reproduced by our trainers with the recorded draws (parity_tests/data/SEED_FORMAT.md, "train_step.npz").

The step is the seed's `--resume`: the weights of MaskGIT/current.pth, a FRESH AdamW (the seed never loads
optimizer_state_dict) and the learning rate of its iter (`adapt_learning_rate`). The config is the case's, with
`train.recipe=seed` and the recorded settings (lr, betas, weight decay, label smoothing, label dropout, warmup,
clip norm, batch). What runs is ours, as a user's run would:
  - codes: the backend's tokenizer on images_01 (`encode_to_indices`), which must give `code` exactly;
  - batch: `maskgit_common.masking.make_batch` from the recorded draws (TrainingNoise: the drop-label, mask-rate
    and mask-position `torch.rand` results) with Bernoulli arccos masking and the seed token layout;
  - step: the trainer's own `train_step` (torch) / `make_loss_and_grads` + `make_train_step` (JAX), in train mode,
    with the recorded dropout keep masks injected at every dropout call in forward order (torch: F.dropout, which
    nn.Dropout and nn.MultiheadAttention's attention-weights dropout both call; JAX: flax's nn.Dropout through
    `nn.intercept_methods`), each output `input * keep * dropout_scale` as the seed's kernel computes it.
Bounds (SEED_FORMAT.md "Suggested tolerances"): masked batch (mask, masked code, dropped labels, class ids) exact; loss
<= 1e-6 relative; every gradient (before clipping) <= 1e-5 absolute; gradient norm <= 1e-5 relative; every
parameter after the AdamW step <= 1e-6 absolute, EXCEPT entries whose recorded gradient is below float32 noise
(|g| < 1e-6, e.g. the key rows of every in_proj_bias, whose gradient is mathematically zero): Adam's first step
turns their rounding noise into a move of up to lr * g / (|g| + eps), so those are held to lr_used. The detail says
how many entries that exemption covers. The learning rate of the step must equal the recorded lr_used. torch runs
on the CPU thread count the case records (its reductions round by thread count).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from parity_tests import seed_checks
from parity_tests.case import result

RECORD = "train_step.npz"
BATCH_KEYS = ("input_ids", "targets", "weights")
LOSS_RTOL, GRAD_ATOL, NORM_RTOL, PARAM_ATOL, NOISE_GRAD = 1e-6, 1e-5, 1e-5, 1e-6, 1e-6


class UnsupportedRecord(ValueError):
  """A train_step.npz this check cannot replay (named in the failure)."""


# The recorded step -> our config, batch and dropout masks --------------------------------------------------------
def step_config(case, record):
  """The case's config under the seed recipe with the recorded training settings."""
  train = case.official.get("train", {})
  if int(record["grad_cum"]) != 1:
    raise UnsupportedRecord(f"grad_cum={int(record['grad_cum'])}: the seed fixtures record grad_cum 1 only "
                            f"(SEED_FORMAT.md quirk 36: the accumulation path is not recorded)")
  if float(record["adam_eps"]) != 1e-8:
    raise UnsupportedRecord(f"adam_eps={float(record['adam_eps'])}: the trainers use AdamW eps 1e-8 (the seed's)")
  betas = [float(b) for b in record["betas"]]
  overrides = {
      "train.recipe": "seed", "train.batch_size": int(record["images_01"].shape[0]),
      "train.lr": float(record["lr_base"]), "train.beta1": betas[0], "train.beta2": betas[1],
      "train.weight_decay": float(record["weight_decay"]), "train.label_smoothing": float(record["label_smoothing"]),
      "train.class_dropout": float(train.get("drop_label", 0.1)), "train.warmup_steps": int(record["warm_up"]),
      "train.grad_accum": 1, "train.grad_clip_norm": float(record["max_norm"]),
      "train.mask_schedule": train.get("mask_mode", "arccos"), "train.precision": "parity", "data.random_crops": 1}
  return seed_checks.case_config(case).with_overrides(overrides)


def case_weights(case, config):
  """The canonical transformer weights of MaskGIT/current.pth, read through conversion as a user would."""
  import conversion  # pylint: disable=import-outside-toplevel
  return conversion.read(case.path, config, parts=("transformer",), require=("transformer",)).parts["transformer"]


def recorded_batch(config, record, codes):
  """Our training batch of `codes` from the recorded draws (no flip: the seed's loader flipped the images already)."""
  from maskgit_common import masking  # pylint: disable=import-outside-toplevel
  b = codes.shape[0]
  noise = masking.TrainingNoise(ratio=np.asarray(record["draw_mask_rate_rand"], np.float32),
                                position=np.asarray(record["draw_mask_position_rand"], np.float32).reshape(b, -1),
                                class_drop=np.asarray(record["draw_drop_label_rand"], np.float32),
                                flip=np.ones(b, np.float32))
  return masking.make_batch(codes, np.asarray(record["labels"]), noise, config), noise


def dropout_masks(record):
  """[(site, p, scale, keep)] in forward order, of the calls that drew a mask (p > 0; a p = 0 dropout is the
  identity in both frameworks, replayed as such)."""
  keys = sorted((k for k in record if k.startswith("dropout_keep_")), key=lambda k: int(k.rsplit("_", 1)[1]))
  sites = [str(s) for s in record["dropout_sites"]] if "dropout_sites" in record else [""] * len(keys)
  return [(site, float(p), np.float32(scale), np.asarray(record[k], bool))
          for site, p, scale, k in zip(sites, record["dropout_p"], record["dropout_scale"], keys) if p > 0]


def _take(queue, shape, p=None):
  if not queue:
    raise AssertionError(f"a dropout call of shape {tuple(shape)} beyond the {len(queue)} recorded ones")
  site, rp, scale, keep = queue.pop(0)
  if keep.size != int(np.prod(shape)) or (p is not None and not math.isclose(p, rp)):
    raise AssertionError(f"dropout call of shape {tuple(shape)}, p={p} does not match the recorded site {site!r} "
                         f"(shape {keep.shape}, p={rp}): forward orders differ")
  return scale, keep.reshape(shape)


# torch -----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_dropout(masks):
  """F.dropout replays the recorded masks in call order (nn.Dropout and MHA's attention dropout both call it)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  original, queue = F.dropout, list(masks)

  def replay(input, p=0.5, training=True, inplace=False):  # pylint: disable=redefined-builtin
    if not training or p == 0:
      return original(input, p, training, inplace)
    scale, keep = _take(queue, input.shape, p)
    return input * (torch.from_numpy(keep).to(input.device, input.dtype) * torch.tensor(scale, dtype=input.dtype))

  F.dropout = replay
  try:
    yield queue
  finally:
    F.dropout = original


def torch_step(case, config, weights, batch, lr, masks, device):
  """The torch trainer's step -> {loss, grad_norm, logits, grads, params} (torch keys, numpy)."""
  import torch  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  from parity_tests import seed_torch  # pylint: disable=import-outside-toplevel
  with seed_torch.reference_threads(case, device):
    model = torch_train.build_model(config, "transformer", dict(weights)).to(device)
    optimizer = torch_train.make_optimizer(model, config.train)  # fresh, as the seed's --resume
    grads, logits, original_clip = {}, [], torch_train.clip_grad_norm

    def recording_clip(parameters, max_norm, rule="optax"):
      parameters = list(parameters)
      grads.update({n: p.grad.detach().cpu().numpy().copy() for n, p in model.named_parameters()})
      return original_clip(parameters, max_norm, rule)

    hook = model.register_forward_hook(lambda m, args, out: logits.append(out.detach().cpu().numpy()))
    torch_train.clip_grad_norm = recording_clip
    try:
      with _torch_dropout(masks) as queue:
        tensors = {k: torch.from_numpy(batch[k]).to(device) for k in BATCH_KEYS}
        metrics = torch_train.train_step(model.train(), optimizer, None, tensors, lr, config)
    finally:
      torch_train.clip_grad_norm = original_clip
      hook.remove()
    if queue:
      raise AssertionError(f"{len(queue)} recorded dropout masks were not used (first: {queue[0][0]!r})")
    return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]), "logits": logits[0],
            "grads": grads, "params": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}}


# JAX -------------------------------------------------------------------------------------------------------------
def _jax_dropout(masks, queue):
  """flax.linen.intercept_methods: every nn.Dropout call in forward order returns x * keep * scale."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  queue[:] = list(masks)

  def interceptor(next_fun, args, kwargs, context):
    if (not isinstance(context.module, nn.Dropout) or context.method_name != "__call__"
        or context.module.rate == 0):
      return next_fun(*args, **kwargs)
    x = args[0]
    scale, keep = _take(queue, x.shape)
    return x * (jnp.asarray(keep, x.dtype) * jnp.asarray(scale, x.dtype))

  return nn.intercept_methods(interceptor)


def _replayed(masks, fn, *args):
  """jax.jit(fn)(*args), traced (so compiled) with `masks` replayed in call order; every one must be used."""
  import jax  # pylint: disable=import-outside-toplevel
  queue = []
  with _jax_dropout(masks, queue):
    out = jax.jit(fn)(*args)
  if queue:
    raise AssertionError(f"{len(queue)} recorded dropout masks were not used (first: {queue[0][0]!r})")
  return out


def jax_step(case, config, weights, batch, lr, masks, device):
  """The JAX trainer's gradients and step -> {loss, grad_norm, logits, grads, params} (torch keys, numpy)."""
  del case
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import conversion  # pylint: disable=import-outside-toplevel
  from maskgit_jax import checkpoint as jax_checkpoint, families  # pylint: disable=import-outside-toplevel
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  with jax.default_device(device):
    params = jax_checkpoint.from_flat(config, "transformer", dict(weights))["params"]
    train_state = jax_train.create_state(config, params)  # a fresh Adam, as the seed's --resume
    arrays = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    key = jax.random.PRNGKey(0)  # unused: every dropout call is replayed
    model = families.model_class(config, "transformer")(config)
    forward = lambda p, ids: model.apply({"params": p}, ids, deterministic=False, rngs={"dropout": key})
    loss_and_grads, step_fn = jax_train.make_loss_and_grads(config), jax_train.make_train_step(config)

    def replayed(params, train_state, arrays, lr):  # three forward passes, each replaying the masks: one program
      (_, _), grads = loss_and_grads(params, arrays, key)
      return forward(params, arrays["input_ids"]), grads, *step_fn(train_state, arrays, lr, jnp.int32(0))

    logits, grads, new_state, metrics = _replayed(masks * 3, replayed, params, train_state, arrays, jnp.float32(lr))
  torch_layout = lambda tree: conversion.to_torch_layout(config, "transformer",
                                                         conversion.flatten({"params": jax.device_get(tree)}))
  return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
          "logits": np.asarray(logits), "grads": torch_layout(grads),
          "params": torch_layout(new_state["params"])}


STEPS = {"torch": torch_step, "jax": jax_step}


# The check -------------------------------------------------------------------------------------------------------
def _ulps(a, b):
  a, b = np.asarray(a, np.float32).view(np.int32).astype(np.int64), np.asarray(b, np.float32).view(np.int32)
  return int(np.max(np.abs(a - b.astype(np.int64)), initial=0))


def _batch_notes(config, record, codes, batch, noise):
  """(exact, notes) of the masked batch against the record."""
  from maskgit_common import masking  # pylint: disable=import-outside-toplevel
  from maskgit_common.token_layout import token_layout  # pylint: disable=import-outside-toplevel
  layout, b = token_layout(config), codes.shape[0]
  ids = batch["input_ids"]
  masked = ids[:, layout.image_slice()].reshape(record["masked_code"].shape)
  cls = ids[:, layout.class_position]
  want_cls = np.where(record["drop_label"], layout.null_class_id, layout.class_tokens(record["labels"]))
  checks = {"code": np.array_equal(codes, record["code"]),
            "mask": np.array_equal(batch["mask"].reshape(record["mask"].shape), record["mask"]),
            "masked_code": np.array_equal(masked, record["masked_code"]),
            "drop_label / class ids": np.array_equal(cls, want_cls),
            "loss weights (all tokens)": bool(np.all(batch["weights"] == 1.0))}
  rate = masking.seed_mask_rate(noise.ratio, config.train.mask_schedule, config.num_tokens)
  bad = [name for name, ok in checks.items() if not ok]
  note = (f"masked batch ({b} rows) exact" if not bad else f"masked batch differs: {bad}") + (
      f"; val_to_mask within {_ulps(rate, record['val_to_mask'])} ulp (torch's SLEEF acos rounds ~7% of values one "
      f"ulp from the correctly rounded one; the mask moves only if a draw falls inside that ulp)")
  return not bad, note


def _param_notes(ours, record, lr_used):
  """(passed, worst non-exempt diff, notes) of the parameters after the step, with the |g| < 1e-6 exemption."""
  worst, worst_exempt, exempt_count, total, bad = 0.0, 0.0, 0, 0, []
  for key in (k[len("param_after/"):] for k in record if k.startswith("param_after/")):
    diff = np.abs(np.asarray(ours[key], np.float64) - record[f"param_after/{key}"])
    grad = record[f"grad/{key}"] if f"grad/{key}" in record else np.ones_like(diff)
    exempt = np.abs(grad) < NOISE_GRAD
    held, noisy = diff[~exempt], diff[exempt]
    worst, total = max(worst, float(np.max(held, initial=0.0))), total + diff.size
    exempt_count += noisy.size
    worst_exempt = max(worst_exempt, float(np.max(noisy, initial=0.0)))
    if np.max(held, initial=0.0) > PARAM_ATOL or np.max(noisy, initial=0.0) > lr_used:
      bad.append(key)
  note = (f"parameters after AdamW: max diff {worst:.3g} (bound {PARAM_ATOL:g}) over {total - exempt_count} "
          f"entries; {exempt_count} entries with |recorded grad| < {NOISE_GRAD:g} held to lr_used {lr_used:.3g}: "
          f"max diff {worst_exempt:.3g}" + (f"; out of bounds: {bad[:4]}" if bad else ""))
  return not bad, worst, note


def check_train_step(b, case):
  """The registered check (parity_tests/checks.py CHECKS[("seed", "train.step")]); `b` is the runner's adapter."""
  from maskgit_common import training  # pylint: disable=import-outside-toplevel
  record = case.npz(RECORD)
  try:
    config = step_config(case, record)
  except UnsupportedRecord as e:
    return result(False, None, None, f"{RECORD}: {e}")
  notes = []
  images = np.transpose(np.asarray(record["images_01"], np.float32), (0, 2, 3, 1))
  codes = np.asarray(seed_checks.open_backend(b.name, case, b.device).encode_to_indices(images)).astype(np.int64)
  batch, noise = recorded_batch(config, record, codes)
  batch_ok, note = _batch_notes(config, record, codes, batch, noise)
  notes.append(note)
  t = config.train
  step = int(record["iter_before"]) // t.grad_accum
  lr = training.learning_rate(step, t.lr, t.warmup_steps, t.lr_schedule, t.num_train_steps, t.warmup_rule,
                              t.grad_accum)
  lr_used = float(record["lr_used"])
  lr_ok = math.isclose(lr, lr_used, rel_tol=1e-12, abs_tol=0.0)
  notes.append(f"lr at iter {int(record['iter_before'])}: {lr:.6g} (recorded {lr_used:.6g})")
  out = STEPS[b.name](case, config, case_weights(case, config), batch, lr, dropout_masks(record), b.device)
  loss_rel = abs(out["loss"] - float(record["loss"])) / max(abs(float(record["loss"])), 1e-30)
  norm_rel = abs(out["grad_norm"] - float(record["grad_norm"])) / max(abs(float(record["grad_norm"])), 1e-30)
  grad_diff = max(float(np.max(np.abs(out["grads"][k] - record[f"grad/{k}"]), initial=0.0))
                  for k in map(str, record["param_names"]))
  logits_diff = float(np.max(np.abs(out["logits"] - record["pred"])))
  notes.append(f"loss {out['loss']:.9g} vs {float(record['loss']):.9g}: rel {loss_rel:.3g} (bound {LOSS_RTOL:g}); "
               f"logits max diff {logits_diff:.3g}; gradients max diff {grad_diff:.3g} (bound {GRAD_ATOL:g}); "
               f"grad norm rel {norm_rel:.3g} (bound {NORM_RTOL:g})")
  params_ok, param_diff, note = _param_notes(out["params"], record, lr_used)
  notes.append(note)
  passed = (batch_ok and lr_ok and loss_rel <= LOSS_RTOL and grad_diff <= GRAD_ATOL and norm_rel <= NORM_RTOL
            and params_ok)
  return result(passed, param_diff, PARAM_ATOL, "; ".join(notes))
