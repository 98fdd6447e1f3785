"""PyTorch side of the parity runner: `maskgit_torch` behind the numpy-in / numpy-out adapter of `checks.py`.

Imported only for `--backend torch|both`, and never imports jax. The case's official msgpack checkpoints are loaded
exactly as a user would: `conversion.read` -> `maskgit_torch.checkpoint.from_flat` ->
`load_state_dict(strict=True)`. Latents, reconstructions and logits must be within 1e-4 of the official code
(docs/ARCHITECTURE.md, 'Parity targets'); codes, schedules and tokens identical, the decode driven by the recorded
official draws.
Also holds `conversion.roundtrip`: official msgpack -> torch state_dict -> canonical weights, every leaf bit-identical.
"""

import importlib

import numpy as np
import torch

from maskgit_torch import device as device_lib
from parity_tests import intermediates, plan, seed_checks
from parity_tests.case import result
from parity_tests.checks import DECODE_FIELDS

NAME = "torch"
TOLERANCE = 1e-4  # docs/ARCHITECTURE.md, 'Parity targets': torch vs official latents, reconstructions, logits (max abs)
WHICH = ("tokenizer", "transformer")


def _module(name):
  # Imported on use, so one broken or missing module fails only the checks that need it.
  return importlib.import_module(name)


class Session:
  """Parity precision (TF32 off) and the device for every torch check; restores the previous settings on exit."""
  name = NAME

  def __init__(self, device="auto", precision="parity"):
    if precision != "parity":
      raise ValueError(f"precision {precision!r}: the parity tolerances are defined for 'parity' only")
    self.device = device_lib.resolve(device)
    self.description = str(self.device)
    if self.device.type == "cuda":
      self.description += f" ({torch.cuda.get_device_name(self.device)})"

  def __enter__(self):
    self._previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision())
    # Parity mode (docs/ARCHITECTURE.md, 'Numerics contract'): full float32 matmuls and convolutions (TF32 would
    # cost ~1e-3 relative on GPU).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return self

  def __exit__(self, *exc):
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, precision) = self._previous
    torch.set_float32_matmul_precision(precision)

  def open(self, case):
    """The case's adapter: the official family's here, the seed's (seed_checks.open_backend) for a seed case."""
    if plan.case_format(case).name == "seed":
      return seed_checks.open_backend(NAME, case, self.device)
    return TorchCase(case, self.device)


def official_state_dict(case, which):
  """The case's official `<which>.msgpack` as a torch state_dict, through `conversion` as a user would."""
  flat = _module("conversion").read(case.file(f"{which}.msgpack"), case.config).parts[which]
  return _module("maskgit_torch.checkpoint").from_flat(case.config, which, flat)


class TorchCase:
  """One case's models in `maskgit_torch`, loaded on first use; every method takes and returns numpy."""
  name = NAME
  tolerance = TOLERANCE
  has_prng_noise = False  # torch's own noise (GeneratorNoise) cannot reproduce JAX draws; recorded draws only.

  def __init__(self, case, device):
    self.case = case
    self.device = device
    self._models = {}

  def model(self, which):
    if which not in self._models:
      cls = (_module("maskgit_torch.tokenizer").VQVAE if which == "tokenizer"
             else _module("maskgit_torch.transformer").Transformer)
      model = cls(self.case.config)
      model.load_state_dict(official_state_dict(self.case, which), strict=True)
      self._models[which] = model.to(self.device).eval()
    return self._models[which]

  def _tensor(self, x, integer=False):
    x = np.asarray(x)
    return torch.from_numpy(x.astype(np.int64) if integer else np.ascontiguousarray(x)).to(self.device)

  @staticmethod
  def _numpy(x):
    return x.detach().cpu().numpy()

  @torch.inference_mode()
  def encode(self, images):
    model, images = self.model("tokenizer"), self._tensor(images)
    quantized, result_dict = model.encode(images)
    return self._numpy(model.encode_to_indices(images)), self._numpy(quantized), self._numpy(result_dict["raw"])

  @torch.inference_mode()
  def decode_from_indices(self, codes):
    return self._numpy(self.model("tokenizer").decode_from_indices(self._tensor(codes, integer=True)))

  @torch.inference_mode()
  def logits(self, ids):
    return self._numpy(self.model("transformer")(self._tensor(ids, integer=True)))

  @torch.inference_mode()
  def intermediates(self, ids):
    model, ids = self.model("transformer"), self._tensor(ids, integer=True)
    rules = _module("conversion").param_table(self.case.config, "transformer")
    _, record = intermediates.capture_torch(model, rules, lambda: model(ids))
    return {k: self._numpy(v) for k, v in record.items()}

  @torch.inference_mode()
  def schedule(self, ratio, total_unknown, method):
    out = _module("maskgit_torch.sampler").schedule(self._tensor(ratio), self._tensor(total_unknown), method)
    return self._numpy(out) if isinstance(out, torch.Tensor) else np.asarray(out)

  @torch.inference_mode()
  def decode_mask_ratio(self, step, num_iter, n0, method):
    return _module("maskgit_torch.sampler").decode_mask_ratio(step, num_iter, n0, method).numpy()

  @torch.inference_mode()
  def decode(self, init_ids, noise, *, num_iter, start_iter, choice_temperature, mask_schedule):
    sampler = _module("maskgit_torch.sampler")
    if noise[0] != "recorded":
      raise ValueError("torch decodes only from recorded draws")
    noise = sampler.RecordedNoise(self._tensor(noise[1]), self._tensor(noise[2]))
    model = self.model("transformer")
    k = self.case.config.codebook_size
    # As the official generate_samples: full-vocabulary logits, sampled over the K image codes only.
    tokens_to_logits = lambda ids: model(ids)[..., :k]
    out = sampler.decode(self._tensor(init_ids, integer=True), tokens_to_logits, noise, num_iter=num_iter,
                         start_iter=start_iter, choice_temperature=choice_temperature, mask_schedule=mask_schedule)
    return {f: self._numpy(getattr(out, f)) for f in DECODE_FIELDS}


def conversion_roundtrip(case):
  """Official msgpack -> torch state_dict -> canonical weights (maskgit_torch.checkpoint): every leaf bit-identical."""
  checkpoint = _module("maskgit_torch.checkpoint")
  notes, passed, max_diff = [], True, 0.0
  for which in WHICH:
    official = _module("conversion").read(case.file(f"{which}.msgpack"), case.config).parts[which]
    back = checkpoint.to_flat(case.config, which, checkpoint.from_flat(case.config, which, official))
    missing, unexpected = sorted(set(official) - set(back)), sorted(set(back) - set(official))
    bad = [k for k in official if k in back and not _bit_identical(official[k], back[k])]
    for k in official:
      if k in back and official[k].shape == back[k].shape:
        max_diff = max(max_diff, float(np.max(np.abs(official[k].astype(np.float64) - back[k].astype(np.float64)),
                                              initial=0.0)))
    ok = not (missing or unexpected or bad)
    passed = passed and ok
    if ok:
      notes.append(f"{which}: {len(official)} leaves bit-identical")
    else:
      notes.append(f"{which}: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                   f"{len(bad)} not bit-identical {bad[:3]}")
  return result(passed, max_diff, 0, "; ".join(notes))


CHECKS = {("official", "conversion.roundtrip"): lambda b, case: conversion_roundtrip(case)}


def _bit_identical(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
