"""PyTorch side of the seed checks (`seed_checks.py`): maskgit_torch's seed family behind numpy in / numpy out.

Never imports jax. The case's seed files come through `conversion.seed_formats` (seed_checks.checkpoint) and load
into `MaskTransformer` / `VQModel` with `load_state_dict(strict=True)`. Intermediates come from forward hooks on
the modules named in `seed_checks.INTERMEDIATES` (the seed's own module names). Arrays are NCHW, as the fixtures.
"""

import contextlib
import functools

import numpy as np
import torch

from maskgit_torch.seed_transformer import MaskTransformer
from maskgit_torch.taming import VQModel
from parity_tests import seed_checks

NAME = "torch"
LOGITS_REL_TOLERANCE = 1e-6  # x max(1, max|logits|): the same framework as the seed
DECODE_TOLERANCE = 1e-5
MODULES = {"transformer": MaskTransformer, "tokenizer": VQModel}


def load_module(config, which, state, device="cpu"):
  """A maskgit_torch module holding `state` ({key: np.ndarray}), loaded strictly, in eval mode."""
  with torch.device("meta"):  # shapes only: the weights are assigned, no random init is drawn
    module = MODULES[which](config)
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True, assign=True)
  return module.to(device).eval()


def strict_state_dicts(config, weights):
  """{which: numpy state} -> the same after a strict load into maskgit_torch and `state_dict()` (the torch step of
  the round trip: proves the keys are the modules' own)."""
  return {w: {k: v.detach().numpy() for k, v in load_module(config, w, state).state_dict().items()}
          for w, state in weights.items()}


@contextlib.contextmanager
def record(model, names):
  """Captures module outputs by name during the block: "a.b" (its output), "a.b:input" (its first input),
  "a.b:weights" (the second output, e.g. nn.MultiheadAttention's head-averaged weights), "" (the model)."""
  captured, handles = {}, []
  modules = dict(model.named_modules())

  def keep(name, value):
    captured[name] = value.detach().cpu().numpy()

  for name in names:
    module_name, _, part = name.partition(":")
    module = modules[module_name]
    if part == "input":
      handles.append(module.register_forward_pre_hook(lambda m, args, n=name: keep(n, args[0])))
    else:
      handles.append(module.register_forward_hook(
          lambda m, args, out, n=name, i=int(part == "weights"): keep(n, out[i] if isinstance(out, tuple) else out)))
  try:
    yield captured
  finally:
    for handle in handles:
      handle.remove()


def _reference_threads(method):
  """Runs an adapter method on the torch CPU thread count the fixture was made with (config.json
  versions.torch_num_threads; the seed fixtures record 1), then restores the count.

  torch's CPU convolution and norm kernels split their float32 reductions by thread, so the thread count changes
  the rounding: a random 128 px taming decode differs by 1.4e-5 between 1 and 2 threads, above the 1e-5 bound,
  while on the recorded count our modules give the seed's arrays bit for bit (the dev cases: max diff 0).
  """
  @functools.wraps(method)
  def wrapper(self, *args):
    threads = self.case.official.get("versions", {}).get("torch_num_threads")
    if self.device.type != "cpu" or not threads:
      return method(self, *args)
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
      return method(self, *args)
    finally:
      torch.set_num_threads(previous)
  return wrapper


def open_case(case, device="cpu"):
  return SeedTorchCase(case, device)


class SeedTorchCase:
  name = NAME
  logits_rel_tolerance = LOGITS_REL_TOLERANCE
  decode_tolerance = DECODE_TOLERANCE

  def __init__(self, case, device="cpu"):
    self.case = case
    self.device = torch.device(device)
    self._models = {}

  def model(self, which):
    if which not in self._models:
      ck = seed_checks.checkpoint(self.case)
      self._models[which] = load_module(ck.config, which, ck.weights[which], self.device)
    return self._models[which]

  def _tensor(self, x):
    x = np.asarray(x)
    return torch.from_numpy(x.astype(np.int64) if x.dtype.kind in "iub" else np.ascontiguousarray(x)).to(self.device)

  @staticmethod
  def _numpy(x):
    return x.detach().cpu().numpy()

  @_reference_threads
  @torch.inference_mode()
  def encode(self, images):
    """The seed's encode on [-1, 1] NCHW images -> its latents, codes and codebook distances."""
    model = self.model("tokenizer")
    with record(model, ["encoder", "quant_conv"]) as captured:
      quantized, emb_loss, (_, _, indices) = model.encode(self._tensor(images))
    z = torch.from_numpy(captured["quant_conv"]).to(self.device).permute(0, 2, 3, 1)
    distances = model.quantize.squared_distances(z.reshape(-1, z.shape[-1]))
    b, _, h, w = quantized.shape
    return {"encoder_output": captured["encoder"], "quant_conv_output": captured["quant_conv"],
            "quantized": self._numpy(quantized), "emb_loss": self._numpy(emb_loss),
            "codes": self._numpy(indices.reshape(b, h, w)), "distances": self._numpy(distances)}

  @_reference_threads
  @torch.inference_mode()
  def encode_to_indices(self, images_nhwc):
    return self._numpy(self.model("tokenizer").encode_to_indices(self._tensor(images_nhwc)))

  @_reference_threads
  @torch.inference_mode()
  def decode_code(self, codes):
    return self._numpy(self.model("tokenizer").decode_code(self._tensor(codes)))

  @_reference_threads
  @torch.inference_mode()
  def decode(self, quantized):
    return self._numpy(self.model("tokenizer").decode(self._tensor(quantized)))

  @_reference_threads
  @torch.inference_mode()
  def decode_from_indices(self, codes):
    return self._numpy(self.model("tokenizer").decode_from_indices(self._tensor(codes)))

  @_reference_threads
  @torch.inference_mode()
  def logits(self, ids):
    return self._numpy(self.model("transformer")(self._tensor(ids)))

  @_reference_threads
  @torch.inference_mode()
  def intermediates(self, ids):
    model = self.model("transformer")
    names = {key: module for key, module, _ in seed_checks.INTERMEDIATES}
    with record(model, list(names.values())) as captured:
      model(self._tensor(ids))
    return {key: captured[module] for key, module in names.items()}
