"""The seed family's models (valeoai MaskGIT-pytorch v1 transformer, taming VQGAN) in both backends against the
seed's own code: every vendored seed case (parity_tests/data/seed_*, SEED_FORMAT.md there) through the checks the runner
uses, the schema's family fields, the token layout, the parameter counts, and the two backends mirroring."""

import inspect
import os

import numpy as np
import pytest
import torch

import configs
from configs import samplers
from configs import ConfigError, MaskGITConfig
from maskgit_common.token_layout import seed_layout, token_layout
from parity_tests import seed_checks
from parity_tests.case import Case
from tests.conftest import GOLDEN_DIR, golden_cases, seed_cases, runner_checked

DATA = GOLDEN_DIR
CASES = [os.path.basename(c) for c in seed_cases()]
RUNNER_CHECKED = runner_checked(seed_cases())  # the parity runner test makes these checks
BACKENDS = ("torch", "jax")


@pytest.fixture(scope="module")
def adapters():
  """One adapter per (case, backend), shared: the JAX programs compile once per case."""
  opened = {}

  def get(case_name, backend):
    if (case_name, backend) not in opened:
      case = Case(os.path.join(DATA, case_name))
      opened[case_name, backend] = (seed_checks.open_backend(backend, case), case)
    return opened[case_name, backend]
  return get


# Parity with the seed's code ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", RUNNER_CHECKED)
def test_tokenizer_codes_identical(adapters, case_name, backend):
  b, case = adapters(case_name, backend)
  entry = seed_checks.check_codes(b, case)
  assert entry["passed"], entry["detail"]
  io = case.npz("tokenizer_io.npz")
  assert np.array_equal(b.encode_to_indices(np.transpose(io["images_01"], (0, 2, 3, 1))), io["codes"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", RUNNER_CHECKED)
def test_tokenizer_decodes_within_bound(adapters, case_name, backend):
  b, case = adapters(case_name, backend)
  entry = seed_checks.check_decode(b, case)
  assert entry["passed"], entry["detail"]
  assert entry["tolerance"] == {"torch": 1e-5, "jax": 1e-4}[backend]
  assert entry["max_abs_diff"] <= entry["tolerance"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", RUNNER_CHECKED)
def test_transformer_logits_every_input_set(adapters, case_name, backend):
  b, case = adapters(case_name, backend)
  entry = seed_checks.check_logits(b, case)
  assert entry["passed"], entry["detail"]
  io = case.npz("transformer_io.npz")
  rel = {"torch": 1e-6, "jax": 1e-5}[backend]
  layout = token_layout(seed_checks.case_config(case))
  for name in io["input_sets"]:
    ref = io[f"{name}_logits"]
    ours = b.logits(seed_checks.input_ids(layout, io, str(name)))
    assert ours.shape == ref.shape  # all rows, all L positions, K + 1 columns
    assert np.max(np.abs(ours - ref)) <= rel * max(1.0, float(np.max(np.abs(ref)))), name
  assert "all" in entry["detail"] and "within the bound" in entry["detail"]  # the row-0 diagnosis ran and matched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", CASES)
def test_row0_intermediates_by_module_name(adapters, case_name, backend):
  b, case = adapters(case_name, backend)
  io = case.npz("transformer_io.npz")
  ours = b.intermediates(io["l0_row0_input_ids"])
  expected = {k for k, torch_name, jax_path in seed_checks.INTERMEDIATES if (jax_path if backend == "jax" else
                                                                               torch_name) is not None}
  assert set(ours) == expected
  for key, value in ours.items():
    ref = io[key]
    assert value.shape == ref.shape, key
    assert np.max(np.abs(value - ref)) <= b.logits_rel_tolerance * max(1.0, float(np.max(np.abs(ref)))), key


@pytest.mark.parametrize("case_name", RUNNER_CHECKED)
def test_conversion_roundtrip_bit_exact(case_name):
  entry = seed_checks.check_roundtrip(Case(os.path.join(DATA, case_name)))
  assert entry["passed"], entry["detail"]
  assert "bit-identical" in entry["detail"] and "maskgit_jax's" in entry["detail"]


class _Perturbed:
  """A backend adapter whose outputs are shifted just past its own bound: every check must then fail."""

  def __init__(self, b):
    self.b, self.name = b, b.name
    self.logits_rel_tolerance, self.decode_tolerance = b.logits_rel_tolerance, b.decode_tolerance

  def __getattr__(self, name):
    return getattr(self.b, name)

  def logits(self, ids):
    out = self.b.logits(ids)
    return out + 2 * self.logits_rel_tolerance * max(1.0, float(np.max(np.abs(out))))

  def decode_code(self, codes):
    return self.b.decode_code(codes) + 2 * self.decode_tolerance

  def encode_to_indices(self, images):
    codes = self.b.encode_to_indices(images)
    return np.where(codes == 0, 1, codes - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checks_fail_past_their_bound(adapters, backend):
  b, case = adapters(CASES[0], backend)
  for check in (seed_checks.check_codes, seed_checks.check_decode, seed_checks.check_logits):
    assert not check(_Perturbed(b), case)["passed"], check.__name__


def test_strict_load_names_every_key():
  """The torch modules carry the seed's names: its state_dicts load strictly, a renamed key does not."""
  from conversion import seed_formats  # pylint: disable=import-outside-toplevel
  from maskgit_torch import families  # pylint: disable=import-outside-toplevel
  case = Case(os.path.join(DATA, CASES[0]))
  ck = seed_formats.read_seed(case.path, seed_checks.case_config(case))
  for which, state in ck.weights.items():
    state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    module = families.model_class(ck.config, which)(ck.config)
    module.load_state_dict(state, strict=True)
    assert list(module.state_dict()) == list(state)
    key = next(iter(state))
    state["renamed." + key] = state.pop(key)
    with pytest.raises(RuntimeError, match="Missing key"):
      module.load_state_dict(state, strict=True)


# Family fields, presets, layout ---------------------------------------------------------------------------------
def test_seed_presets_and_parameter_counts():
  """The seed README's sizes (174.161M transformer, 72.142M VQGAN without the loss), counted without allocating
  (torch meta device, jax.eval_shape), and the published sampling settings."""
  from maskgit_jax import seed_transformer as jax_transformer  # pylint: disable=import-outside-toplevel
  from maskgit_jax import taming as jax_taming  # pylint: disable=import-outside-toplevel
  from maskgit_torch import seed_transformer, taming  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  expected = {"transformer": 174_160_874, "tokenizer": 72_141_699}
  for name, steps, r_temp, w in (("seed_imagenet_256", 8, 4.5, 3.0), ("seed_imagenet_512", 15, 7.0, 2.8)):
    config = configs.get_preset(name)
    s = config.sampler
    assert (s.decoder, s.num_iter, s.choice_temperature, s.guidance_scale, s.mask_schedule, s.randomize,
            s.sm_temp) == ("seed", steps, r_temp, w, "arccos", "linear", 1.0)
    assert s == {"seed_imagenet_256": samplers.seed_256, "seed_imagenet_512": samplers.seed_512}[name]()
    with torch.device("meta"):
      counts = {"transformer": sum(p.numel() for p in seed_transformer.MaskTransformer(config).parameters()),
                "tokenizer": sum(p.numel() for p in taming.VQModel(config).parameters())}
    if name == "seed_imagenet_256":  # the 512 transformer has 32x32 positions: more pos_emb and bias rows
      assert counts == expected
    else:
      assert counts["tokenizer"] == expected["tokenizer"]
    if name != "seed_imagenet_256":
      continue
    jax_counts = {}
    for which, module, dummy in (
        ("transformer", jax_transformer.MaskTransformer(config), np.zeros((1, config.seq_len), np.int32)),
        ("tokenizer", jax_taming.VQModel(config), np.zeros((1, 16, 16, 3), np.float32))):
      shapes = jax.eval_shape(lambda m=module, x=dummy: m.init(jax.random.key(0), x))
      jax_counts[which] = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))
    assert jax_counts == counts


def test_token_layout_and_derived_sizes_of_a_seed_config():
  config = configs.seed_imagenet_256()
  k, c, l = 1024, 1000, 256
  assert token_layout(config) == seed_layout(k, c, l)
  assert (config.vocab_size, config.mask_token_id, config.seq_len) == (k + 1 + c + 1, k, l + 1)
  official = configs.imagenet_256()
  assert (official.vocab_size, official.mask_token_id) == (k + c + 1, -1)


def test_configs_without_family_fields_load_unchanged(tmp_path):
  """Every config.json written before the family fields existed loads with the official families."""
  import json  # pylint: disable=import-outside-toplevel
  demo = os.path.join(os.path.dirname(DATA), "..", "demo", "checkpoint", "config.json")
  config = MaskGITConfig.load(demo)
  assert (config.tokenizer.arch, config.transformer.arch) == ("maskgit", "maskgit")
  data = configs.imagenet_256().to_dict()
  for section in ("tokenizer", "transformer"):
    for field in ("arch", "z_channels", "resolution", "attn_resolutions", "dropout_rate", "in_channels",
                  "out_channels"):
      if section == "tokenizer" or field == "arch":
        data[section].pop(field)
  (tmp_path / "config.json").write_text(json.dumps(data))
  assert MaskGITConfig.load(str(tmp_path)) == configs.imagenet_256()


@pytest.mark.parametrize("override, message", [
    ("transformer.arch=bert", r"transformer\.arch: must be one of \['maskgit', 'seed'\]"),
    ("tokenizer.arch=vqgan", r"tokenizer\.arch: must be one of \['maskgit', 'taming'\]"),
    ("tokenizer.attn_resolutions=[16]", r"tokenizer\.attn_resolutions: applies to arch=taming only"),
    ("tokenizer.z_channels=8", r"tokenizer\.z_channels: applies to arch=taming only"),
])
def test_family_fields_are_validated_naming_the_field(override, message):
  with pytest.raises(ConfigError, match=message):
    configs.tiny().with_overrides([override])


@pytest.mark.parametrize("override, message", [
    ("tokenizer.z_channels=0", r"tokenizer\.z_channels: must be >= 1"),
    ("tokenizer.resolution=0", r"tokenizer\.resolution: must be >= 1"),
    ("tokenizer.attn_resolutions=[0]", r"tokenizer\.attn_resolutions\[0\]: must be >= 1"),
    ("tokenizer.dropout_rate=1.0", r"tokenizer\.dropout_rate: must be < 1"),
    ("tokenizer.commitment_cost=0.5", r"tokenizer\.commitment_cost: must be 0.25 for arch=taming"),
])
def test_taming_fields_are_validated_naming_the_field(override, message):
  with pytest.raises(ConfigError, match=message):
    configs.seed_imagenet_256().with_overrides([override])


# The two backends mirror each other ------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["seed_transformer", "taming"])
def test_backends_mirror_classes_and_arguments(module):
  import importlib  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  ours_torch = importlib.import_module(f"maskgit_torch.{module}")
  ours_jax = importlib.import_module(f"maskgit_jax.{module}")
  torch_classes = {n for n, c in vars(ours_torch).items() if inspect.isclass(c) and issubclass(c, torch.nn.Module)
                   and c.__module__ == ours_torch.__name__}
  jax_classes = {n for n, c in vars(ours_jax).items() if inspect.isclass(c) and issubclass(c, nn.Module)
                 and c.__module__ == ours_jax.__name__}
  assert torch_classes == jax_classes
  for name in torch_classes:
    torch_args = [p for p in inspect.signature(getattr(ours_torch, name).__init__).parameters if p != "self"]
    jax_fields = [f for f in getattr(ours_jax, name).__dataclass_fields__ if f not in ("parent", "name", "dtype")]
    assert torch_args == jax_fields, name


@pytest.mark.parametrize("backend", ["torch"])  # JAX: the same flax Dropout sites; its training step is issue 18's
def test_dropout_is_active_only_in_training(backend):
  config = configs.seed_imagenet_256().with_overrides(
      ["image_size=32", "transformer.num_layers=1", "transformer.num_embeds=32", "transformer.num_heads=2",
       "transformer.intermediate_size=64", "num_class=3", "tokenizer.codebook_size=8"])
  ids = np.tile(np.arange(config.seq_len) % config.codebook_size, (2, 1))
  if backend == "torch":
    from maskgit_torch.seed_transformer import MaskTransformer  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    model = MaskTransformer(config)
    run = lambda train: model.train(train)(torch.from_numpy(ids)).detach().numpy()
  else:
    import jax  # pylint: disable=import-outside-toplevel
    from maskgit_jax.seed_transformer import MaskTransformer  # pylint: disable=import-outside-toplevel
    model = MaskTransformer(config)
    variables = jax.jit(model.init)(jax.random.key(0), ids)
    apply = jax.jit(lambda v, train: model.apply(v, ids, deterministic=not train, rngs={"dropout": jax.random.key(1)}),
                    static_argnums=1)
    run = lambda train: np.asarray(apply(variables, train))
  assert np.array_equal(run(False), run(False))
  assert not np.allclose(run(True), run(False))
  assert run(False).shape == (2, config.num_tokens, config.codebook_size + 1)


def test_family_tables_pick_the_classes_in_both_backends():
  from maskgit_jax import families as jax_families  # pylint: disable=import-outside-toplevel
  from maskgit_torch import families as torch_families  # pylint: disable=import-outside-toplevel
  for config, names in ((configs.seed_imagenet_256(), ("VQModel", "MaskTransformer")),
                        (configs.imagenet_256(), ("VQVAE", "Transformer"))):
    for families in (torch_families, jax_families):
      assert (families.model_class(config, "tokenizer").__name__,
              families.model_class(config, "transformer").__name__) == names


def test_torch_checks_run_on_the_fixtures_thread_count_and_restore_it(adapters):
  """torch's CPU kernels round by thread count; the adapter uses the count the case records, then restores ours."""
  b, case = adapters(CASES[0], "torch")
  recorded = case.official["versions"]["torch_num_threads"]
  seen = []
  original = b.model("tokenizer").decoder.forward
  b.model("tokenizer").decoder.forward = lambda z: seen.append(torch.get_num_threads()) or original(z)
  before = torch.get_num_threads()
  try:
    b.decode_code(case.npz("tokenizer_io.npz")["codes"])
  finally:
    del b.model("tokenizer").decoder.forward
  assert seen == [recorded] and torch.get_num_threads() == before


def test_seed_cases_are_recognised_from_their_files():
  """Beside the official cases in the one fixture directory, the seed cases are told apart by their format, and
  declare every check, train.step (issue 18) included, each with an implementation."""
  from parity_tests import checks, plan  # pylint: disable=import-outside-toplevel
  for path in golden_cases():
    assert plan.case_format(Case(path)).name == "official", path
  for name in CASES:
    case = Case(os.path.join(DATA, name))
    assert plan.case_format(case).name == "seed"
    planned = {c.report_name(b): c for b in BACKENDS for c in plan.planned_checks(case, b)}
    variants = {f[len("sample_"):-len(".npz")] for f in os.listdir(case.path) if f.startswith("sample_")}
    assert {f"{b}.sample.{v}.{k}" for b in BACKENDS for v in variants for k in ("tokens", "images")} <= set(planned)
    assert "torch.train.step" in planned and "jax.train.step" in planned
    assert all(("seed", c.kind) in checks.CHECKS for c in planned.values()), name
