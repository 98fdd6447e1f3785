"""Live oracle (issue 3): our JAX modules against the official MaskGIT code (PyPI `maskgit`) run in this process.

Random small configs (tests/conftest.py's random_config) are built with the OFFICIAL modules
(maskgit.nets.maskgit_transformer.Transformer, maskgit.nets.vqgan_tokenizer.VQVAE, through parity_tests/oracle.py's
runtime shims) and with ours, and compared: parameter trees (paths, shapes, dtypes, and the initial values from the
same key), outputs at the tolerances of docs/ARCHITECTURE.md ('Parity targets': logits, latents, reconstructions
<= 1e-5; codes identical), decoding
trajectories from the same key (`maskgit.libml.parallel_decode.decode` vs `maskgit_jax.sampler.decode`), and every
mask schedule bit for bit. Weights: the official initialisation, and `random_params` (larger weights: peaked
logits, well separated codebook rows).
"""

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_common.schedules import decode_mask_ratio, mask_ratio
from maskgit_jax.checkpoint import init_variables
from maskgit_jax.tokenizer import VQVAE
from maskgit_jax.transformer import Transformer
from parity_tests import oracle

_REASON = oracle.official_skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"live oracle unavailable: {_REASON}")

TOL = 1e-5  # docs/ARCHITECTURE.md, 'Parity targets', JAX vs official
# Every official method (mask_schedule.py: uniform, cosine, log, exp, and powX for any X).
METHODS = ("uniform", "cosine", "log", "exp", "pow1", "pow2", "pow2.5", "pow3", "pow0.5")
# Each seed/case compiles the official and our model; the default run keeps a few, `-m slow` adds more.
_SLOW = pytest.mark.slow


def _official():
  return oracle.import_official()


def _sampler():
  return importlib.import_module("maskgit_jax.sampler")


def flat_tree(tree) -> dict:
  """{"params/a/b": (shape, dtype name)}."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves}


def _assert_same_tree_and_values(official, ours):
  assert flat_tree(ours) == flat_tree(official)  # paths, shapes, dtypes (a readable diff on failure)
  chex.assert_trees_all_equal_shapes_and_dtypes(ours, official)
  # Same initializers and the same per-module RNG streams: the initial values are identical too.
  chex.assert_trees_all_equal(ours, official, strict=True)


def _assert_close(ours, official, what):
  """|ours - official| <= TOL everywhere (docs/ARCHITECTURE.md, 'Parity targets'), compared in float64; NaN never
  counts as close."""
  chex.assert_tree_all_finite(ours)
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), ours),
                              jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), official),
                              atol=TOL, rtol=0, custom_message=what)


def _random_ids(config, seed, batch=3, known=0.5):
  rng = np.random.default_rng(seed)
  k = config.tokenizer.codebook_size
  ids = rng.integers(0, k, (batch, config.seq_len)).astype(np.int32)
  ids[:, 0] = k + rng.integers(0, config.num_class, batch)
  ids[:, 1:][rng.random((batch, config.seq_len - 1)) >= known] = -1
  return ids


# Transformer --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformer_pair(random_config):
  """transformer_pair(seed) -> (config, official module, our module, official init variables, our init variables)
  for random_config(seed), built once per seed for the module."""
  @functools.lru_cache(maxsize=None)
  def pair(seed):
    config = random_config(seed)
    official, ours = oracle.official_transformer(config), Transformer(config)
    dummy = jnp.zeros((1, config.seq_len), jnp.int32)
    key = jax.random.PRNGKey(seed)
    official_vars = jax.jit(lambda k: official.init(k, dummy, deterministic=True))(key)
    our_vars = jax.jit(lambda k: init_variables(config, "transformer", k))(key)
    return config, official, ours, official_vars, our_vars
  return pair


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=_SLOW), pytest.param(2, marks=_SLOW),
                                  pytest.param(4, marks=_SLOW)])
def test_transformer_tree_and_logits(seed, transformer_pair, random_params):
  config, official, ours, official_vars, our_vars = transformer_pair(seed)
  _assert_same_tree_and_values(official_vars, our_vars)
  apply_official = jax.jit(lambda v, x: official.apply(v, x, deterministic=True))
  apply_ours = jax.jit(lambda v, x: ours.apply(v, x, deterministic=True))
  ids = _random_ids(config, seed)
  for name, variables in (("official init", official_vars),
                          ("random weights", random_params(config, "transformer", seed))):
    expected, got = apply_official(variables, ids), apply_ours(variables, ids)
    chex.assert_shape(got, (ids.shape[0], config.seq_len, config.vocab_size))
    _assert_close(got, expected, f"{name}: logits ({config.transformer})")


# Tokenizer ----------------------------------------------------------------------------------------------------
def _official_init(model, key, images):
  # The official __call__ passes encode's (quantized, dict) tuple to the decoder and fails: init through
  # encode -> decode, the path the official inference uses.
  return model.init(key, images, method=lambda m, x: m.decode(m.encode({"image": x})[0]))


@pytest.mark.parametrize("seed", [1, pytest.param(0, marks=_SLOW), pytest.param(2, marks=_SLOW)])
def test_tokenizer_tree_and_outputs(seed, random_config, random_params):
  config = random_config(seed)
  official, ours = oracle.official_tokenizer(config), VQVAE(config)
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  key = jax.random.PRNGKey(seed)
  official_vars = jax.jit(lambda k: _official_init(official, k, dummy))(key)
  _assert_same_tree_and_values(official_vars, jax.jit(lambda k: init_variables(config, "tokenizer", k))(key))
  encode_official = jax.jit(lambda v, x: official.apply(v, {"image": x}, method=official.encode))
  encode_ours = jax.jit(lambda v, x: ours.apply(v, x, method=VQVAE.encode))
  decode_official = jax.jit(lambda v, c: official.apply(v, c, method=official.decode_from_indices))
  decode_ours = jax.jit(lambda v, c: ours.apply(v, c, method=VQVAE.decode_from_indices))
  images = np.random.default_rng(seed).random((2, config.image_size, config.image_size, 3), np.float32)
  for name, variables in (("official init", official_vars), ("random weights", random_params(config, "tokenizer",
                                                                                               seed))):
    (q_official, r_official), (q_ours, r_ours) = encode_official(variables, images), encode_ours(variables, images)
    codes = np.asarray(r_official["encoding_indices"])
    chex.assert_trees_all_equal(r_ours["encoding_indices"], codes, strict=True,
                                custom_message=f"{name}: codes differ")
    for what, a, b in (("latents", r_ours["raw"], r_official["raw"]), ("quantized", q_ours, q_official),
                       ("reconstructions", decode_ours(variables, codes), decode_official(variables, codes))):
      _assert_close(a, b, f"{name}: {what} ({config.tokenizer})")


# Schedules ----------------------------------------------------------------------------------------------------
def _schedule_inputs():
  ratios = np.concatenate([np.linspace(0, 1, 257, dtype=np.float32),
                           np.array([(t + 1) / n for n in (1, 2, 5, 7, 8, 12, 16) for t in range(n)], np.float32),
                           np.random.default_rng(0).random(300, dtype=np.float32)])
  unknown = np.array([1, 2, 3, 7, 16, 64, 255, 256, 1024, 1025], np.int32)
  return ratios, unknown


@pytest.mark.parametrize("method", METHODS)
def test_schedule_equals_official(method):
  """Official `mask_schedule.schedule(ratios, total_unknown, method)` on a (U, R) grid, bit for bit (NaN at
  log(1)/log(1), i.e. one unknown token with ratio 1, included: both give NaN)."""
  schedule = _official().mask_schedule.schedule
  ratios, unknown = _schedule_inputs()
  expected = np.asarray(schedule(jnp.asarray(ratios[None, :]), jnp.asarray(unknown[:, None]), method))
  got = mask_ratio(ratios[None, :], unknown[:, None], method)
  assert got.dtype == np.float32
  assert np.array_equal(got, expected, equal_nan=True), (
      f"{method}: {int((got != expected).sum())} of {got.size} values differ")


@pytest.mark.parametrize("method", METHODS)
def test_sampler_schedule_equals_official(method):
  sampler = _sampler()
  schedule = _official().mask_schedule.schedule
  ratios, unknown = _schedule_inputs()
  expected = np.asarray(schedule(jnp.asarray(ratios[None, :]), jnp.asarray(unknown[:, None]), method))
  ours = np.asarray(sampler.schedule(jnp.asarray(ratios[None, :]), jnp.asarray(unknown[:, None]), method))
  assert np.array_equal(ours, expected, equal_nan=True), f"maskgit_jax.sampler.schedule {method} differs"


def _official_mask_counts(num_iter, init_ids, method):
  """The official decoder's per-step number of masked tokens, read inside its jitted loop: the model stub records
  how many -1 each step's input holds (the count set by the previous step), then returns uniform logits."""
  official = _official()
  seen = []

  def tokens_to_logits(ids):
    jax.debug.callback(lambda c: seen.append(np.asarray(c)), jnp.sum(ids == -1, axis=-1), ordered=True)
    return jnp.zeros(ids.shape + (8,), jnp.float32)

  official.parallel_decode.decode(jnp.asarray(init_ids), jax.random.PRNGKey(0), tokens_to_logits, -1, num_iter, 0,
                                  4.5, method)
  jax.effects_barrier()
  return np.stack(seen[1:])  # (num_iter - 1, B): the count after steps 0 .. T-2


# The default run keeps the official default (cosine) and a fractional power, every method under -m slow; without
# the decoder, tests/test_sampler.py checks the loop's schedule arithmetic for every method in the default run.
@pytest.mark.parametrize("method", [m if m in ("cosine", "pow2.5") else pytest.param(m, marks=_SLOW) for m in METHODS])
def test_decoder_mask_counts_equal_official(method):
  """Per-step mask counts: floor(N0 * decode_mask_ratio(t, T, N0)) clamped to [1, unknown - 1] (the numpy reference
  the torch sampler uses) equal the counts the official decoder actually uses, for many N0 and T. (The official
  loop's ratio is (t + 1) * (1/T) after XLA's simplification; (t + 1) / T would give 4 instead of 3 tokens for
  uniform, T=12, step 8, N0=16.)"""
  seq = 65
  n0 = np.array([2, 3, 5, 7, 10, 16, 17, 31, 33, 50, 63, 64], np.int32)
  init_ids = np.tile(np.arange(seq, dtype=np.int32) % 7, (len(n0), 1))
  for row, n in enumerate(n0):
    init_ids[row, seq - n:] = -1
  for num_iter in (12,):  # T=12: the 512px preset, and where (t+1)/T vs (t+1)*(1/T) first bites
    expected = _official_mask_counts(num_iter, init_ids, method)
    unknown = n0.copy()
    for t in range(num_iter - 1):
      count = np.floor(n0.astype(np.float32) * decode_mask_ratio(t, num_iter, n0, method)).astype(np.int64)
      count = np.maximum(1, np.minimum(unknown - 1, count))
      assert np.array_equal(count, expected[t]), (
          f"{method}, T={num_iter}, step {t}: ours {count.tolist()} vs official {expected[t].tolist()} (N0 {n0})")
      unknown = count


# Decoding -----------------------------------------------------------------------------------------------------
# The default run keeps (1, pow2.5, 2): a partly known start past step 0 and a non-default schedule. A cosine
# decode from step 0 end to end is the parity runner's decode.tokens check on every vendored case.
@pytest.mark.parametrize("seed,method,start_iter", [(1, "pow2.5", 2), pytest.param(0, "cosine", 0, marks=_SLOW),
                                                    pytest.param(2, "log", 0, marks=_SLOW),
                                                    pytest.param(4, "exp", 1, marks=_SLOW),
                                                    pytest.param(1, "uniform", 0, marks=_SLOW)])
def test_decode_matches_official(seed, method, start_iter, transformer_pair, random_params):
  """Same key, same weights: our sampler's token trajectory equals the official parallel_decode.decode's, with the
  official model as the logit function (the sampler alone) and with ours (end to end)."""
  sampler = _sampler()
  config, official, ours, _, _ = transformer_pair(seed)
  variables = random_params(config, "transformer", seed)
  k, num_iter = config.tokenizer.codebook_size, max(config.sampler.num_iter, start_iter + 2)
  init_ids = _random_ids(config, seed + 7, batch=3, known=0.0 if start_iter == 0 else 0.4)
  key = jax.random.PRNGKey(seed + 11)
  official_logits = lambda ids: official.apply(variables, ids, deterministic=True)[..., :k]
  our_logits = lambda ids: ours.apply(variables, ids, deterministic=True)[..., :k]
  expected = np.asarray(jax.jit(lambda x, r: _official().parallel_decode.decode(
      x, r, official_logits, -1, num_iter, start_iter, 4.5, method))(init_ids, key))
  for name, logits_fn in (("sampler", official_logits), ("end to end", our_logits)):
    out = sampler.decode(jnp.asarray(init_ids), logits_fn, sampler.PRNGNoise(key), num_iter=num_iter,
                         start_iter=start_iter, choice_temperature=4.5, mask_schedule=method)
    got = np.asarray(out.final_seqs)
    assert got.shape == expected.shape
    steps = [t for t in range(num_iter) if not np.array_equal(got[:, t], expected[:, t])]
    assert not steps, f"{name}: tokens differ from the official at steps {steps} ({method}, T={num_iter})"
