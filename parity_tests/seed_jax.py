"""JAX side of the seed checks (`seed_checks.py`): maskgit_jax's seed family behind numpy in / numpy out.

Never imports torch. The case's seed files come through `conversion.seed_formats` (numpy) and
`conversion.seed_table` into flax trees, checked leaf by leaf against the modules' own shapes. Intermediates come
from flax `capture_intermediates`, keyed by module path (`seed_checks.INTERMEDIATES`). The adapter speaks NCHW, as
the fixtures; the models are NHWC.
"""

import jax
import jax.numpy as jnp
import numpy as np

from conversion.tables import seed as seed_table
import conversion
from maskgit_jax import device as device_lib
from maskgit_jax.seed_transformer import MaskTransformer
from maskgit_jax.taming import VQModel
from parity_tests.intermediates import flatten_flax
from parity_tests import seed_checks

NAME = "jax"
LOGITS_REL_TOLERANCE = 1e-5  # x max(1, max|logits|): across frameworks
DECODE_TOLERANCE = 1e-4
MODULES = {"transformer": MaskTransformer, "tokenizer": VQModel}


def _dummy_input(config, which):
  if which == "tokenizer":
    return jnp.zeros((1, config.image_size, config.image_size, config.tokenizer.in_channels), jnp.float32)
  return jnp.zeros((1, config.seq_len), jnp.int32)


def param_shapes(config, which):
  """{flat 'params/...' path: shape} of the module's own init, via jax.eval_shape (nothing is allocated)."""
  model = MODULES[which](config)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_input(config, which)))
  return {k: tuple(v.shape) for k, v in conversion.flatten(tree).items()}


def variables(config, which, state):
  """A seed state_dict ({torch key: np.ndarray}) -> {"params": ...} for maskgit_jax, through the table."""
  flat = {r.jax_path: seed_table.to_jax(r, state[r.torch_key]) for r in seed_table.param_table(config, which)}
  expected = param_shapes(config, which)
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != expected:
    differ = sorted(set(got.items()) ^ set(expected.items()))
    raise ValueError(f"{which}: the table's tree differs from maskgit_jax's: {differ[:6]}")
  return conversion.unflatten(flat)


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
    model = MODULES[which](config)
    fn = getattr(MODULES[which], method) if isinstance(method, str) else method
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
    self._variables = {}
    self.config = seed_checks.checkpoint(case).config

  def variables(self, which):
    if which not in self._variables:
      tree = variables(self.config, which, seed_checks.checkpoint(self.case).weights[which])
      self._variables[which] = jax.device_put(tree, self.device) if self.device is not None else tree
    return self._variables[which]

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

  def intermediates(self, ids):
    _, state = self._apply("transformer", None, ids, capture=True)
    flat = flatten_flax(state)
    return {key: np.asarray(flat[path]) for key, _, path in seed_checks.INTERMEDIATES if path in flat}
