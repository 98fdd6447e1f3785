"""PyTorch side of the seed checks (`seed_checks.py`): maskgit_torch's seed family behind numpy in / numpy out.

Never imports jax. The case's seed files are loaded as a user would: `maskgit_torch.checkpoint.load_checkpoint`
(`conversion.read` -> the seed table -> `MaskTransformer` / `VQModel`, `load_state_dict(strict=True)`). Intermediates
come from forward hooks on the modules named in `seed_checks.INTERMEDIATES` (the seed's own module names). Arrays
are NCHW, as the fixtures.
"""

import contextlib
import functools

import numpy as np
import torch

from maskgit_torch import checkpoint
from parity_tests import seed_checks

NAME = "torch"
LOGITS_REL_TOLERANCE = 1e-6  # x max(1, max|logits|): the same framework as the seed
DECODE_TOLERANCE = 1e-5


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


@contextlib.contextmanager
def reference_threads(case, device):
  """The block runs on the torch CPU thread count the fixture was made with (config.json
  versions.torch_num_threads; the seed fixtures record 1), then the count is restored.

  torch's CPU convolution and norm kernels split their float32 reductions by thread, so the thread count changes
  the rounding: a random 128 px taming decode differs by 1.4e-5 between 1 and 2 threads, above the 1e-5 bound,
  while on the recorded count our modules give the seed's arrays bit for bit (the dev cases: max diff 0).
  """
  threads = case.official.get("versions", {}).get("torch_num_threads")
  if device.type != "cpu" or not threads:
    yield
    return
  previous = torch.get_num_threads()
  torch.set_num_threads(int(threads))
  try:
    yield
  finally:
    torch.set_num_threads(previous)


def _on_reference_threads(method):
  @functools.wraps(method)
  def wrapper(self, *args):
    with self.reference_threads():
      return method(self, *args)
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
    self._models = None

  def model(self, which):
    """The case's `which` ("tokenizer" or "transformer") module, both loaded on first use."""
    if self._models is None:
      _, self._models = checkpoint.load_checkpoint(self.case.path, seed_checks.case_config(self.case),
                                                   device=self.device)
    return self._models[which]

  def reference_threads(self):
    return reference_threads(self.case, self.device)

  def _tensor(self, x):
    x = np.asarray(x)
    return torch.from_numpy(x.astype(np.int64) if x.dtype.kind in "iub" else np.ascontiguousarray(x)).to(self.device)

  @staticmethod
  def _numpy(x):
    return x.detach().cpu().numpy()

  @_on_reference_threads
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

  @_on_reference_threads
  @torch.inference_mode()
  def encode_to_indices(self, images_nhwc):
    return self._numpy(self.model("tokenizer").encode_to_indices(self._tensor(images_nhwc)))

  @_on_reference_threads
  @torch.inference_mode()
  def decode_code(self, codes):
    return self._numpy(self.model("tokenizer").decode_code(self._tensor(codes)))

  @_on_reference_threads
  @torch.inference_mode()
  def decode(self, quantized):
    return self._numpy(self.model("tokenizer").decode(self._tensor(quantized)))

  @_on_reference_threads
  @torch.inference_mode()
  def decode_from_indices(self, codes):
    return self._numpy(self.model("tokenizer").decode_from_indices(self._tensor(codes)))

  @_on_reference_threads
  @torch.inference_mode()
  def logits(self, ids):
    return self._numpy(self.model("transformer")(self._tensor(ids)))

  @property
  def tokens_to_logits(self):
    """The decoder's model call (torch in, torch out): (N, S) ids -> (N, L, K + 1) logits."""
    model = self.model("transformer")
    return torch.inference_mode()(lambda ids: model(ids.to(self.device)))

  @_on_reference_threads
  @torch.inference_mode()
  def intermediates(self, ids):
    model = self.model("transformer")
    names = {key: module for key, module, _ in seed_checks.INTERMEDIATES}
    with record(model, list(names.values())) as captured:
      model(self._tensor(ids))
    return {key: captured[module] for key, module in names.items()}
