"""What several test files share, built once: the vendored golden cases, the tiny configs, random checkpoints in both
layouts and the pipelines loaded from them, random configs and weights, the stand-ins (a patch-colour tokenizer, a
toy logits table) and the TensorBoard reader.

Expensive setup is session-scoped (a checkpoint is written once, a pipeline loaded and compiled once); the values
are shared, so a test must not change them (copy first). Plain functions are fixtures too; the few callers that
cannot take fixtures (subprocess scripts) import them from here.

The frameworks are imported inside the functions that need them, so a suite run without one of them (the tests
that need it skip themselves) still collects.
"""
# pylint: disable=import-outside-toplevel

import functools
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "parity_tests", "data")


# The vendored golden cases ---------------------------------------------------------------------------------------
def _cases(family):
  """The vendored cases of one format, smallest first (tests that need one case take the cheapest), then by name."""
  from parity_tests import plan
  from parity_tests.case import Case, case_size, find_cases
  return sorted((c for c in find_cases(GOLDEN_DIR) if plan.case_format(Case(c)).name == family),
                key=lambda c: (case_size(c), c))


def golden_cases():
  """Case directories of the vendored official golden fixtures (google-research/maskgit), smallest first."""
  return _cases("official")


def seed_cases():
  """Case directories of the vendored seed fixtures (valeoai MaskGIT-pytorch v1: MaskGIT/, VQGAN/, config.json;
  parity_tests/data/SEED_FORMAT.md), beside the official ones, smallest first."""
  return _cases("seed")


@functools.lru_cache(maxsize=None)
def golden_config(case_dir):
  """The MaskGITConfig of a golden case (its official config.json), read once."""
  from configs import MaskGITConfig
  with open(os.path.join(case_dir, "config.json")) as f:
    return MaskGITConfig.from_official(json.load(f), name=os.path.basename(case_dir))


def runner_checked(cases):
  """pytest.params of the case names, each under `-m slow`: for per-module tests that call the checks the parity
  runner makes (parity_tests/test_runner.py runs them on the smallest case of each format by default and on every
  case under `-m slow`), so the default run does not compile the same programs twice."""
  return [pytest.param(os.path.basename(c), marks=pytest.mark.slow) for c in cases]


@pytest.fixture(scope="module", params=golden_cases(), ids=os.path.basename)
def golden_case(request):
  """Each vendored golden case directory in turn (a test taking it runs once per case). Module scope: pytest groups
  a module's tests by case, never moving tests across modules (as a session-scoped parameter would)."""
  return request.param


@pytest.fixture(scope="session", name="golden_cases")
def golden_cases_fixture():
  """Every vendored official case directory, smallest first."""
  return golden_cases()


@pytest.fixture(scope="session")
def one_golden_case():
  """The smallest vendored official case, for tests that need one real official checkpoint and its records."""
  return golden_cases()[0]


@pytest.fixture(scope="session", name="golden_config")
def golden_config_fixture():
  """golden_config(case_dir) -> MaskGITConfig."""
  return golden_config


# Tiny configs, random checkpoints, pipelines ---------------------------------------------------------------------
TINY_CLASSES = ("circle", "square", "triangle")


def tiny_model_config(class_names=TINY_CLASSES):
  """The tiny preset (32x32 images, 8x8 tokens, 64 codes) with a 1-layer 32-wide transformer, 4 decoding steps (edits
  from step 1) and one class per name: seconds to sample in either backend."""
  import configs
  config = configs.get_preset("tiny").with_overrides({
      "num_class": len(class_names), "transformer.num_layers": 1, "transformer.num_embeds": 32,
      "transformer.num_heads": 2, "transformer.intermediate_size": 64, "sampler.num_iter": 4,
      "sampler.edit_start_iter": 1})
  return config.replace(data=config.data.__class__(dataset="synthetic", class_names=tuple(class_names)))


def write_random_checkpoint(path, config, tokenizer=True, transformer=True, seed=0, overwrite=False):
  """A torch checkpoint directory of randomly initialised models (torch's init, seeded); returns `path`."""
  import torch
  from maskgit_torch.checkpoint import save_checkpoint
  from maskgit_torch.tokenizer import VQVAE
  from maskgit_torch.transformer import Transformer
  torch.manual_seed(seed)
  models = {"tokenizer": VQVAE(config)} if tokenizer else {}
  if transformer:
    models["transformer"] = Transformer(config)
  save_checkpoint(path, config, models, overwrite=overwrite)
  return path


@pytest.fixture(scope="session", name="tiny_model_config")
def tiny_model_config_fixture():
  """tiny_model_config(class_names=TINY_CLASSES) -> the config of the tiny random checkpoints."""
  return tiny_model_config


@pytest.fixture(scope="session", name="write_random_checkpoint")
def write_random_checkpoint_fixture():
  """write_random_checkpoint(path, config, tokenizer=True, transformer=True, seed=0, overwrite=False) -> path."""
  return write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """(config, torch checkpoint dir, the same weights converted to a JAX checkpoint dir): 3 classes, random init."""
  import conversion
  config = tiny_model_config()
  root = tmp_path_factory.mktemp("tiny_checkpoint")
  torch_dir = write_random_checkpoint(str(root / "torch"), config)
  jax_dir = str(root / "jax")
  conversion.convert(torch_dir, jax_dir, to="jax")
  return config, torch_dir, jax_dir


@pytest.fixture(scope="session")
def tiny_pipelines(tiny_checkpoint):
  """{(backend, layout): MaskGIT} for both backends over both layouts of tiny_checkpoint, on the CPU, parity
  precision; loaded (and the JAX ones compiled) once for the session."""
  from maskgit_jax import pipeline as jax_pipeline
  from maskgit_torch import pipeline as torch_pipeline
  _, torch_dir, jax_dir = tiny_checkpoint
  return {(backend, layout): module.MaskGIT.from_checkpoint(path, device="cpu")
          for backend, module in (("torch", torch_pipeline), ("jax", jax_pipeline))
          for layout, path in (("torch", torch_dir), ("jax", jax_dir))}


@pytest.fixture(scope="session")
def tiny_transformer_variables():
  """(config, variables): the tiny preset's transformer, JAX random init from PRNGKey(0)."""
  import configs
  import jax
  from maskgit_jax.checkpoint import init_variables
  config = configs.tiny()
  return config, jax.jit(lambda key: init_variables(config, "transformer", key))(jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def tokenizer_only_checkpoint(tmp_path_factory):
  """A torch checkpoint directory of tiny_checkpoint's config holding the tokenizer alone."""
  return write_random_checkpoint(str(tmp_path_factory.mktemp("tokenizer_only") / "tok"), tiny_model_config(),
                                 transformer=False)


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory):
  """(config, torch checkpoint dir): the tiny model over the ten built-in synthetic classes, as the demo model."""
  from maskgit_common import data
  config = tiny_model_config(data.SYNTHETIC_CLASSES)
  return config, write_random_checkpoint(str(tmp_path_factory.mktemp("synthetic") / "checkpoint"), config)


# Random configs and weights (property tests) ---------------------------------------------------------------------
def random_config(seed: int):
  """A small MaskGIT config drawn from `seed`, in the space the official modules support (GroupNorm 32 groups).

  Varies filters, channel multipliers (1 to 3 levels, widths going up and down), residual blocks, embedding dim,
  codebook size, image size (odd latent sides included: TF SAME padding of stride-2 pooling), layers, heads, head
  dim, MLP size and class count.
  """
  import configs
  rng = np.random.default_rng(seed)
  levels = int(rng.integers(1, 4))
  side = int(rng.integers(2, 6))
  heads = int(rng.choice([1, 2, 4]))
  num_iter = int(rng.integers(2, 9))
  return configs.MaskGITConfig(
      name=f"random_{seed}", image_size=side * 2 ** (levels - 1), num_class=int(rng.integers(1, 11)),
      tokenizer=configs.TokenizerConfig(filters=int(rng.choice([32, 64])),
                                        channel_multipliers=tuple(int(m) for m in rng.choice([1, 2], levels)),
                                        num_res_blocks=int(rng.integers(1, 3)),
                                        embedding_dim=int(rng.choice([4, 8, 16])),
                                        codebook_size=int(rng.choice([8, 16, 32, 64]))),
      transformer=configs.TransformerConfig(num_layers=int(rng.integers(1, 4)),
                                            num_embeds=heads * int(rng.choice([4, 8, 16])), num_heads=heads,
                                            intermediate_size=int(rng.choice([16, 32, 64, 96]))),
      sampler=configs.SamplerConfig(num_iter=num_iter, edit_start_iter=int(rng.integers(0, num_iter))))


def random_params(config, which: str, seed: int) -> dict:
  """{"params": ...} float32 numpy tree in the official layout, from the table's shapes.

  Kernels are N(0, 1/fan_in) so activations stay O(1) through many layers; norm scales 1 + N(0, 0.1^2), biases
  N(0, 0.1^2); embeddings and the codebook N(0, 1) (codebook rows then sit far apart compared with float32 error,
  which keeps nearest-code margins clear).
  """
  import conversion
  rng = np.random.default_rng(seed)
  flat = {}
  for rule in conversion.param_table(config, which):
    shape, name = tuple(rule.shape), rule.jax_path.rsplit("/", 1)[-1]
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1])) if rule.transform != "qkv_kernel" else shape[0]
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(shape)
    else:  # embedding tables, codebook
      value = rng.standard_normal(shape)
    flat[rule.jax_path] = value.astype(np.float32)
  return conversion.unflatten(flat)


@pytest.fixture(scope="session", name="random_config")
def random_config_fixture():
  """random_config(seed) -> a small MaskGITConfig."""
  return random_config


@pytest.fixture(scope="session", name="random_params")
def random_params_fixture():
  """random_params(config, which, seed) -> {"params": ...} numpy tree in the official layout."""
  return random_params


# Stand-ins ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def toy_logits(seq_len=65, k=32, num_class=10, seed=0):
  """A toy logits function, identical in both backends: a random table indexed by (position, token).

  Returns (jax_fn, torch_fn, k, num_class); ids are taken modulo the vocabulary, so -1 (mask) reads the last row.
  The same arguments give the same functions (cached), so jitted callers reuse their compilations."""
  import jax.numpy as jnp
  import torch
  vocab = k + num_class + 1
  table = np.random.default_rng(seed).normal(size=(seq_len, vocab, k)).astype(np.float32)
  jt, tt = jnp.asarray(table), torch.from_numpy(table)
  jax_fn = lambda ids: jt[jnp.arange(seq_len)[None, :], ids % vocab]
  torch_fn = lambda ids: tt[torch.arange(seq_len)[None, :], ids % vocab]
  return jax_fn, torch_fn, k, num_class


@pytest.fixture(scope="session", name="toy_logits")
def toy_logits_fixture():
  """toy_logits(seq_len=65, k=32, num_class=10, seed=0) -> (jax_fn, torch_fn, k, num_class)."""
  return toy_logits


def patch_encoder(config):
  """A stand-in tokenizer: the mean colour of each f x f patch quantised to 4 levels per channel (64 codes).

  It gives token caches with real structure in milliseconds, so training tests exercise the loop, not the VQGAN."""
  f = config.downsample_factor

  def encode(images):
    b, h, w, _ = images.shape
    mean = images.reshape(b, h // f, f, w // f, f, 3).mean(axis=(2, 4))
    q = np.clip((mean * 4).astype(np.int64), 0, 3)
    return (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]) % config.codebook_size
  return encode


def small_train_config(cache: str = "", **train):
  """The tiny preset with a 1-layer 32-wide transformer and batch 16 (seconds per run on a CPU); `cache`: read
  this token cache; `train`: train.<field> overrides."""
  import configs
  overrides = {"transformer.num_layers": 1, "transformer.num_embeds": 32, "transformer.num_heads": 2,
               "transformer.intermediate_size": 64, "train.batch_size": 16, "train.warmup_steps": 5,
               "train.num_train_steps": 30, "train.checkpoint_every_steps": 10, "train.log_every_steps": 5}
  if cache:
    overrides.update({"data.dataset": "tokens", "data.token_cache": cache})
  overrides.update({f"train.{k}": v for k, v in train.items()})
  return configs.get_preset("tiny").with_overrides(overrides)


@pytest.fixture(scope="session", name="patch_encoder")
def patch_encoder_fixture():
  """patch_encoder(config) -> encode(images) -> codes."""
  return patch_encoder


@pytest.fixture(scope="session", name="small_train_config")
def small_train_config_fixture():
  """small_train_config(cache="", **train) -> the tiny training config."""
  return small_train_config


@pytest.fixture(scope="module")
def one_torch_thread():
  """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): the tiny
  training models run faster on one thread than on oversubscribed cores."""
  try:
    import torch
  except ImportError:
    yield
    return
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_token_cache(tmp_path_factory):
  """A token cache of 256 synthetic images through patch_encoder, for small_train_config (built once)."""
  from maskgit_common import data as data_lib, token_cache
  path = str(tmp_path_factory.mktemp("token_cache") / "tokens")
  config = small_train_config()
  token_cache.build(path, data_lib.SyntheticDataset(256, config.image_size, config.num_class), patch_encoder(config),
                    config, progress=False)
  return path


# Readers -----------------------------------------------------------------------------------------------------------
def tensorboard_scalars(logdir):
  """Every scalar of a log directory as TensorBoard reads it ({tag: [(step, value)]}, its EventAccumulator:
  several event files in order, with the steps a resumed run purged left out)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(logdir)
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="session", name="tensorboard_scalars")
def tensorboard_scalars_fixture():
  """tensorboard_scalars(logdir) -> {tag: [(step, value)]}."""
  return tensorboard_scalars
