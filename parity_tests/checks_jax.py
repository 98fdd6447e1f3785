"""JAX side of the parity runner: `maskgit_jax` behind the numpy-in / numpy-out adapter of `checks.py`.

Imported only for `--backend jax|both`, so a torch-only install can run `--backend torch`. The case's official
msgpack checkpoints restore into `maskgit_jax` with no renaming (docs/ARCHITECTURE.md, 'Numerics contract').
Latents, reconstructions and logits must be within 1e-5 of the official code (docs/ARCHITECTURE.md, 'Parity
targets'); codes, schedules and tokens identical.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax import device as device_lib
from parity_tests import intermediates, plan, seed_checks
from parity_tests.checks import DECODE_FIELDS

NAME = "jax"
TOLERANCE = 1e-5  # docs/ARCHITECTURE.md, 'Parity targets': JAX vs official latents, reconstructions, logits (max abs)

# Jitted model functions, one per (what, config): a second run in the same process (the tests) reuses the
# compiled code. The parameters are arguments, never closed over, so they are not baked in as constants.
_JITTED = {}


def _module(name):
  # Imported on use, so one broken or missing module fails only the checks that need it.
  return importlib.import_module(f"maskgit_jax.{name}")


def _jitted(what, config):
  key = (what, config)
  if key not in _JITTED:
    if what == "transformer":
      model = _module("transformer").Transformer(config)
      fn = lambda variables, ids: model.apply(variables, ids, deterministic=True)
    elif what == "encode":
      vqvae = _module("tokenizer").VQVAE
      model = vqvae(config)

      def fn(variables, images):
        # One program for both calls: XLA shares the encoder between them, so it compiles once.
        quantized, result = model.apply(variables, images, method=vqvae.encode)
        return model.apply(variables, images, method=vqvae.encode_to_indices), quantized, result["raw"]
    else:
      vqvae = _module("tokenizer").VQVAE
      model, method = vqvae(config), getattr(vqvae, what)
      fn = lambda variables, x: model.apply(variables, x, method=method)
    _JITTED[key] = jax.jit(fn)
  return _JITTED[key]


class Session:
  """Parity precision and the device for every JAX check; restores the previous settings on exit."""
  name = NAME

  def __init__(self, device="auto", precision="parity"):
    if precision != "parity":
      raise ValueError(f"precision {precision!r}: the parity tolerances are defined for 'parity' only")
    self.device = device_lib.resolve(device)
    self.description = f"{self.device.platform}:{self.device.id} ({self.device.device_kind})"

  def __enter__(self):
    self._previous = jax.config.jax_default_matmul_precision
    # Parity mode (docs/ARCHITECTURE.md, 'Numerics contract'): float32 matmuls/convs at full precision (no bf16
    # passes on TPU/GPU TF32).
    jax.config.update("jax_default_matmul_precision", "highest")
    self._device_ctx = jax.default_device(self.device)
    self._device_ctx.__enter__()
    return self

  def __exit__(self, *exc):
    self._device_ctx.__exit__(*exc)
    jax.config.update("jax_default_matmul_precision", self._previous)

  def open(self, case):
    """The case's adapter: the official family's here, the seed's (seed_checks.open_backend) for a seed case."""
    if plan.case_format(case).name == "seed":
      return seed_checks.open_backend(NAME, case, self.device)
    return JaxCase(case, self.device)


class JaxCase:
  """One case's models in `maskgit_jax`, loaded on first use; every method takes and returns numpy."""
  name = NAME
  tolerance = TOLERANCE
  has_prng_noise = True

  def __init__(self, case, device):
    self.case = case
    self.device = device
    self._variables = {}

  def variables(self, which):
    if which not in self._variables:
      checkpoint = _module("checkpoint")
      # The official file must restore with no renaming: every leaf is checked against the official table.
      _, loaded = checkpoint.load_checkpoint(self.case.file(f"{which}.msgpack"), self.case.config, parts=(which,))
      variables = loaded[which]
      self._variables[which] = jax.device_put(variables, self.device)
    return self._variables[which]

  def _tokenizer(self, method, x):
    return _jitted(method, self.case.config)(self.variables("tokenizer"), jnp.asarray(x))

  def encode(self, images):
    return tuple(np.asarray(x) for x in self._tokenizer("encode", images))

  def decode_from_indices(self, codes):
    return np.asarray(self._tokenizer("decode_from_indices", codes))

  def official_outputs(self, what, x):
    """The official code's own output on this host (live oracle), or None when the package is unavailable.

    what: "decode_from_indices" (tokenizer) or "logits" (transformer). Used only to explain a failed float check:
    float32 convolutions round differently on different CPU ISAs, so the official code itself can miss a fixture
    made on another host.
    """
    from parity_tests import oracle  # pylint: disable=import-outside-toplevel
    if oracle.official_skip_reason() is not None:
      return None
    if what == "decode_from_indices":
      model = oracle.official_tokenizer(self.case.config)
      fn = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_from_indices))
      return np.asarray(fn(self.variables("tokenizer"), jnp.asarray(x)))
    model = oracle.official_transformer(self.case.config)
    fn = jax.jit(lambda v, ids: model.apply(v, ids, deterministic=True))
    return np.asarray(fn(self.variables("transformer"), jnp.asarray(x)))

  def logits(self, ids):
    return np.asarray(_jitted("transformer", self.case.config)(self.variables("transformer"), jnp.asarray(ids)))

  def intermediates(self, ids):
    model = _module("transformer").Transformer(self.case.config)
    _, state = model.apply(self.variables("transformer"), jnp.asarray(ids), deterministic=True,
                           capture_intermediates=True, mutable=["intermediates"])
    return {k: np.asarray(v) for k, v in intermediates.flatten_flax(state).items()}

  def schedule(self, ratio, total_unknown, method):
    return np.asarray(_module("sampler").schedule(jnp.asarray(ratio), jnp.asarray(total_unknown), method))

  def decode_mask_ratio(self, step, num_iter, n0, method):
    return np.asarray(_module("sampler").decode_mask_ratio(step, num_iter, n0, method))

  def decode(self, init_ids, noise, *, num_iter, start_iter, choice_temperature, mask_schedule):
    sampler = _module("sampler")
    if noise[0] == "recorded":
      noise = sampler.RecordedNoise(jnp.asarray(noise[1]), jnp.asarray(noise[2]))
    else:
      noise = sampler.PRNGNoise(jnp.asarray(noise[1], jnp.uint32))
    apply = _jitted("transformer", self.case.config)
    variables = self.variables("transformer")
    k = self.case.config.codebook_size
    # As the official generate_samples: full-vocabulary logits, sampled over the K image codes only.
    tokens_to_logits = lambda ids: apply(variables, ids)[..., :k]
    out = sampler.decode(jnp.asarray(init_ids), tokens_to_logits, noise, num_iter=num_iter,
                             start_iter=start_iter, choice_temperature=choice_temperature,
                             mask_schedule=mask_schedule)
    return {f: np.asarray(getattr(out, f)) for f in DECODE_FIELDS}

  def prng_applicable(self, case):
    """The fixture's raw keys give its recorded draws only on the same jax PRNG bits (docs/ARCHITECTURE.md,
    'Official facts')."""
    fixture_jax = case.official.get("versions", {}).get("jax")
    if fixture_jax is None:
      return False, "the fixture records no jax version"
    if fixture_jax != jax.__version__:
      return False, (f"installed jax {jax.__version__} != fixture jax {fixture_jax}; JAX changed its PRNG bit "
                     "generation across versions, so the recorded-noise trajectory above is the parity check")
    fixture_partitionable = case.official.get("prng", {}).get("jax_threefry_partitionable")
    installed = bool(jax.config.jax_threefry_partitionable)
    if fixture_partitionable is not None and bool(fixture_partitionable) != installed:
      return False, f"jax_threefry_partitionable is {installed}, the fixture used {fixture_partitionable}"
    return True, f"jax {jax.__version__} as the fixture"
