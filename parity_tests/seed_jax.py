"""JAX side of the seed checks (`seed_checks.py`): maskgit_jax's seed family behind numpy in / numpy out.

Never imports torch. The case's seed files are loaded as a user would: `maskgit_jax.checkpoint.load_checkpoint`
(`conversion.read` -> the seed table -> flax variables, checked against the config). Intermediates come from flax
`capture_intermediates`, keyed by module path (`seed_checks.INTERMEDIATES`). The adapter speaks NCHW, as the
fixtures; the models are NHWC.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax import checkpoint, families
from maskgit_jax import device as device_lib
from parity_tests.intermediates import flatten_flax
from parity_tests import seed_checks

NAME = "jax"
LOGITS_REL_TOLERANCE = 1e-5  # x max(1, max|logits|): across frameworks
DECODE_TOLERANCE = 1e-4


def _nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


# Jitted model functions, one per (config, model, method, options), shared by every adapter of the process (the
# tests and the runner see the same cases): each compiles once. Parameters are arguments, never baked in.
_JITTED = {}


def _jitted(config, which, method, capture):
  """model.apply(variables, x, method=method) jitted; with `capture`, also the intermediates (by module path)."""
  key = (config, which, method, capture)
  if key not in _JITTED:
    cls = families.model_class(config, which)
    model = cls(config)
    fn = getattr(cls, method) if isinstance(method, str) else method
    kwargs = {"capture_intermediates": True, "mutable": ["intermediates"]} if capture else {}
    _JITTED[key] = jax.jit(lambda v, x: model.apply(v, x, method=fn, **kwargs))
  return _JITTED[key]


def _distances(model, flat):
  return model.quantize.squared_distances(flat)


def open_case(case, device=None):
  """`device`: a jax.Device, a device string for maskgit_jax.device.resolve ("cpu", "gpu", "auto"), or None."""
  return SeedJaxCase(case, device_lib.resolve(device) if isinstance(device, str) else device)


class SeedJaxCase:
  name = NAME
  logits_rel_tolerance = LOGITS_REL_TOLERANCE
  decode_tolerance = DECODE_TOLERANCE

  def __init__(self, case, device=None):
    self.case = case
    self.device = device
    self._variables = None

  @property
  def config(self):
    return seed_checks.case_config(self.case)  # read when first needed: opening never fails

  def variables(self, which):
    """The case's `which` variables, both loaded on first use (on the adapter's device)."""
    if self._variables is None:
      _, variables = checkpoint.load_checkpoint(self.case.path, self.config)
      self._variables = jax.device_put(variables, self.device) if self.device is not None else variables
    return self._variables[which]

  def reference_threads(self):
    return contextlib.nullcontext()  # XLA's CPU kernels do not round by thread count

  def _apply(self, which, method, x, capture=False):
    return _jitted(self.config, which, method, capture)(self.variables(which), jnp.asarray(x))

  def encode(self, images):
    """The seed's encode on [-1, 1] NCHW images -> its latents, codes and codebook distances."""
    (quantized, emb_loss, indices), state = self._apply("tokenizer", "encode", _nhwc(images), capture=True)
    flat = flatten_flax(state)
    z = flat["quant_conv"]
    distances = self._apply("tokenizer", _distances, np.asarray(z).reshape(-1, z.shape[-1]))
    b, h, w, _ = quantized.shape
    return {"encoder_output": _nchw(flat["encoder"]), "quant_conv_output": _nchw(z), "quantized": _nchw(quantized),
            "emb_loss": np.asarray(emb_loss), "codes": np.asarray(indices).reshape(b, h, w),
            "distances": np.asarray(distances)}

  def encode_to_indices(self, images_nhwc):
    return np.asarray(self._apply("tokenizer", "encode_to_indices", images_nhwc))

  def decode_code(self, codes):
    return _nchw(self._apply("tokenizer", "decode_code", codes))

  def decode(self, quantized):
    return _nchw(self._apply("tokenizer", "decode", _nhwc(quantized)))

  def decode_from_indices(self, codes):
    return np.asarray(self._apply("tokenizer", "decode_from_indices", codes))

  def logits(self, ids):
    return np.asarray(self._apply("transformer", None, ids))

  @property
  def tokens_to_logits(self):
    """The decoder's model call (JAX in, JAX out): (N, S) ids -> (N, L, K + 1) logits. The variables are loaded
    here, outside the decoder's traced loop (a load inside it would leak tracers)."""
    fn, variables = _jitted(self.config, "transformer", None, False), self.variables("transformer")
    return lambda ids: fn(variables, ids)

  def intermediates(self, ids):
    _, state = self._apply("transformer", None, ids, capture=True)
    flat = flatten_flax(state)
    return {key: np.asarray(flat[path]) for key, _, path in seed_checks.INTERMEDIATES if path in flat}
