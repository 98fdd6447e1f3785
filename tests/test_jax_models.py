"""maskgit_jax tokenizer, transformer and checkpoint loader against the golden cases and the live official code
(parameter trees of every case; outputs of the largest case by default, of every case with `-m slow`).

Every float check has two parts:
  * ours vs the official code run live here on the case's checkpoint and inputs: max abs <= 1e-5
    (docs/ARCHITECTURE.md, 'Parity targets');
  * ours vs the recorded fixture: max abs <= 1e-5, or, where the official code itself is further than that from
    the recording on this machine, no further from it than the official is. Why: XLA:CPU's float32 convolutions
    and reductions depend on the CPU's vector ISA. The official tokenizer's reconstructions move by up to 1.5e-5
    between `--xla_cpu_max_isa=SSE4_2`, `AVX` and `AVX2` on one machine, and on an AVX2-only CPU the official
    code misses the recorded `small` reconstruction by 1.51e-5 (values up to 3.8). Our modules match the live
    official bit for bit (0.0), so the bound against the recording is the recording's own hardware spread.
Codes must be identical to both.
"""

import dataclasses
import functools
import os
import re

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet_256, imagenet_512, tiny
import conversion
from maskgit_jax.checkpoint import CheckpointError, expected_shapes, init_variables, load_checkpoint, save_checkpoint
from maskgit_jax.tokenizer import VQVAE
from maskgit_jax.transformer import Transformer
from parity_tests import oracle
from parity_tests.intermediates import flatten_flax
from tests.conftest import golden_cases

TOL = 1e-5  # docs/ARCHITECTURE.md, 'Parity targets': JAX vs official latents, reconstructions, logits
TREES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet_official_param_trees.txt")
TOKENIZER_ARRAYS = ("encoder_output", "quantized", "reconstruction", "random_codes_decoded")
LOGITS = ("all_masked", "partial", "unmasked")


def max_abs(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def flat_shapes(tree) -> dict:
  """{"params/a/b": ("(3, 3)", "float32")}, the notation of param_tree.txt."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): (str(tuple(leaf.shape)), np.dtype(leaf.dtype).name)
          for path, leaf in leaves}


def _tokenizer_outputs(model, variables, io, official: bool):
  images = io["images"]
  if official:  # the official encode takes the input dict
    quantized, result = model.apply(variables, {"image": images}, method=model.encode)
  else:
    quantized, result = model.apply(variables, images, method=VQVAE.encode)
  decode = model.decode_from_indices
  return {"codes": np.asarray(result["encoding_indices"]), "encoder_output": np.asarray(result["raw"]),
          "quantized": np.asarray(quantized),
          "reconstruction": np.asarray(model.apply(variables, io["codes"], method=decode)),
          "random_codes_decoded": np.asarray(model.apply(variables, io["random_codes"], method=decode))}


def _transformer_outputs(model, variables, tio, inter):
  out = {f"logits_{k}": np.asarray(model.apply(variables, tio[f"ids_{k}"], deterministic=True)) for k in LOGITS}
  _, state = model.apply(variables, inter["ids_row0"], deterministic=True, capture_intermediates=True,
                         mutable=["intermediates"])
  out["intermediates"] = {k: np.asarray(v) for k, v in flatten_flax(state).items()}
  return out


@pytest.fixture(scope="module")
def case_data(golden_config):
  """case_data(case_dir, outputs=True) -> config, variables (loaded with the full tree check) and fixtures; with
  outputs, also our outputs and the live official outputs (eager, the expensive part). Each computed once per case
  for the module."""
  @functools.lru_cache(maxsize=None)
  def load(case_dir):
    cfg = golden_config(case_dir)
    npz = lambda name: dict(np.load(os.path.join(case_dir, name)))
    data = dict(cfg=cfg, tokenizer_io=npz("tokenizer_io.npz"), transformer_io=npz("transformer_io.npz"),
                intermediates=npz("transformer_intermediates.npz"))
    data["variables"] = load_checkpoint(case_dir, cfg)[1]  # every leaf checked against the official table
    return data

  def get(case_dir, outputs=True):
    data = load(case_dir)
    if outputs and "ours" not in data:
      cfg, variables = data["cfg"], data["variables"]
      ours = _tokenizer_outputs(VQVAE(cfg), variables["tokenizer"], data["tokenizer_io"], official=False)
      ours.update(_transformer_outputs(Transformer(cfg), variables["transformer"], data["transformer_io"],
                                       data["intermediates"]))
      data["ours"] = ours
      data["official"] = None
      if oracle.official_skip_reason() is None:
        official = _tokenizer_outputs(oracle.official_tokenizer(cfg), variables["tokenizer"], data["tokenizer_io"],
                                      official=True)
        official.update(_transformer_outputs(oracle.official_transformer(cfg), variables["transformer"],
                                             data["transformer_io"], data["intermediates"]))
        data["official"] = official
    return data
  return get


# The output comparisons (eager, ours and the live official: tens of seconds per case) run on the largest golden
# case by default, on every case under -m slow: the largest (`small`) has every dimension of the others and more
# (4 resolution levels, 2 residual blocks, 3 layers, 6 heads), and the parity runner checks every case's JAX
# outputs against its recording on every run.
_CASES = golden_cases()
_LARGEST = max(_CASES, key=lambda c: sum(os.path.getsize(os.path.join(c, f"{w}.msgpack"))
                                         for w in ("tokenizer", "transformer")))


@pytest.fixture(scope="module", params=[pytest.param(c, id=os.path.basename(c),
                                                     marks=() if c == _LARGEST else pytest.mark.slow)
                                        for c in _CASES])
def compared_case(request):
  return request.param


def _f64(tree):
  # Compared in float64, as a max abs diff would be: a float32 difference can round across the bound.
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def check_close(ours, recorded, official, what):
  """The two-part bound of the module docstring (chex: |ours - ref| <= atol everywhere, rtol 0)."""
  chex.assert_tree_all_finite(ours)  # assert_trees_all_close counts NaN == NaN as close; ours must have none
  chex.assert_trees_all_equal_shapes(ours, recorded)
  bound = TOL
  if official is not None:
    chex.assert_trees_all_close(_f64(ours), _f64(official), atol=TOL, rtol=0, custom_message=f"{what} vs live official")
    bound = max(TOL, max_abs(official, recorded))  # the recording's own hardware spread, measured here
  chex.assert_trees_all_close(_f64(ours), _f64(recorded), atol=bound, rtol=0, custom_message=f"{what} vs recorded")


# Trees -----------------------------------------------------------------------------------------------------------
def read_param_tree(path):
  """param_tree.txt -> {file: {path: (shape, dtype)}}."""
  trees = {}
  with open(path) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      file, name, shape, dtype = line.rstrip("\n").split("\t")
      trees.setdefault(file, {})[name] = (shape, dtype)
  return trees


def test_param_trees_equal_official(golden_case, golden_config, case_data):
  case_dir = golden_case
  cfg = golden_config(case_dir)
  official = read_param_tree(os.path.join(case_dir, "param_tree.txt"))
  assert set(official) == {"tokenizer.msgpack", "transformer.msgpack"}
  for which in ("tokenizer", "transformer"):
    assert flat_shapes(expected_shapes(cfg, which)) == official[f"{which}.msgpack"], which
    # And the loaded file holds exactly that tree (load_checkpoint also checked it).
    assert flat_shapes(case_data(case_dir, outputs=False)["variables"][which]) == official[f"{which}.msgpack"]


def read_imagenet_trees():
  """{section header: ({path: (shape, dtype)}, declared parameter count)}."""
  sections, header = {}, None
  with open(TREES_FILE) as f:
    for line in f:
      line = line.rstrip("\n")
      if line.startswith("##"):
        header = line[2:].strip()
        count = int(re.search(r"(\d+) params", header).group(1))
        sections[header] = ({}, count)
      elif line.strip():
        name, shape, dtype = line.split("\t")
        sections[header][0][name] = (shape, dtype)
  return sections


def test_imagenet_preset_trees_equal_official():
  sections = read_imagenet_trees()
  found = {}
  for header, (tree, count) in sections.items():
    if header.startswith("tokenizer"):
      found[header] = [(imagenet_256(), "tokenizer"), (imagenet_512(), "tokenizer")]
    elif "image_size=256" in header:
      found[header] = [(imagenet_256(), "transformer")]
    elif "image_size=512" in header:
      found[header] = [(imagenet_512(), "transformer")]
  assert len(found) == 3, sorted(sections)
  for header, models in found.items():
    tree, count = sections[header]
    for cfg, which in models:
      shapes = expected_shapes(cfg, which)
      assert flat_shapes(shapes) == tree, (header, cfg.name)
      assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == count


# Tokenizer -------------------------------------------------------------------------------------------------------
def test_tokenizer_codes_identical(compared_case, case_data):
  data = case_data(compared_case)
  codes = data["ours"]["codes"]
  chex.assert_shape(codes, data["tokenizer_io"]["codes"].shape)
  chex.assert_trees_all_equal(codes, data["tokenizer_io"]["codes"])
  if data["official"] is not None:
    chex.assert_trees_all_equal(codes, data["official"]["codes"], strict=True)


@pytest.mark.parametrize("key", TOKENIZER_ARRAYS)
def test_tokenizer_arrays(compared_case, case_data, key):
  data = case_data(compared_case)
  official = data["official"][key] if data["official"] else None
  check_close(data["ours"][key], data["tokenizer_io"][key], official, f"{os.path.basename(compared_case)}/{key}")


def test_tokenizer_reconstruction_call_and_decode(one_golden_case, case_data):
  """__call__ = decode(encode) and decode(quantized) = decode_from_indices(codes), exactly."""
  data = case_data(one_golden_case, outputs=False)
  model, variables = VQVAE(data["cfg"]), data["variables"]["tokenizer"]
  images = data["tokenizer_io"]["images"][:1]
  via_call = model.apply(variables, images)
  codes = model.apply(variables, images, method=VQVAE.encode_to_indices)
  chex.assert_trees_all_equal(via_call, model.apply(variables, codes, method=VQVAE.decode_from_indices))


# Transformer -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOGITS)
def test_transformer_logits(compared_case, case_data, kind):
  case_dir = compared_case
  data = case_data(case_dir)
  key = f"logits_{kind}"
  chex.assert_shape(data["ours"][key], (data["transformer_io"][f"ids_{kind}"].shape[0], data["cfg"].seq_len,
                                        data["cfg"].vocab_size))
  official = data["official"][key] if data["official"] else None
  check_close(data["ours"][key], data["transformer_io"][key], official, f"{os.path.basename(case_dir)}/{key}")


def test_transformer_intermediates(compared_case, case_data):
  data = case_data(compared_case)
  ours = data["ours"]["intermediates"]
  recorded = {k: v for k, v in data["intermediates"].items() if k != "ids_row0"}
  assert len(recorded) > 5 and set(recorded) <= set(ours), sorted(set(recorded) - set(ours))
  official = data["official"]["intermediates"] if data["official"] else None
  if official is not None:
    assert set(ours) == set(official), set(ours) ^ set(official)  # every module path, not just the recorded ones
  for key in sorted(recorded):
    check_close(ours[key], recorded[key], official[key] if official else None, key)


def test_mask_id_reads_last_embedding_row(one_golden_case, case_data):
  data = case_data(one_golden_case, outputs=False)
  ids = data["transformer_io"]["ids_partial"]
  wrapped = np.where(ids == -1, data["cfg"].vocab_size - 1, ids)
  model, variables = Transformer(data["cfg"]), data["variables"]["transformer"]
  chex.assert_trees_all_equal(model.apply(variables, ids), model.apply(variables, wrapped))


def test_dropout_changes_logits_only_when_not_deterministic(tiny_transformer_variables):
  cfg, variables = tiny_transformer_variables
  ids = jnp.tile(jnp.arange(cfg.seq_len)[None] % cfg.codebook_size, (2, 1))
  apply = jax.jit(Transformer(cfg).apply, static_argnames="deterministic")  # eager flax: seconds per call
  a = apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  b = apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  c = apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
  d = apply(variables, ids)
  chex.assert_trees_all_equal(a, b)
  assert max_abs(a, c) > 1e-3 and max_abs(a, d) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_transformer_variables):
  cfg, variables = tiny_transformer_variables
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, cfg.seq_len), -1, cfg.codebook_size)
  full = jax.jit(Transformer(cfg).apply)(variables, ids)
  fast = jax.jit(Transformer(cfg, dtype=jnp.bfloat16).apply)(variables, ids)
  chex.assert_type([fast, full], jnp.float32)
  chex.assert_type(jax.tree_util.tree_leaves(variables), jnp.float32)
  # bf16 has an 8-bit mantissa; logits of a random init are O(1), so a few 1e-2 is the expected bf16 error.
  assert 0.0 < max_abs(full, fast) < 0.1


# Checkpoints -----------------------------------------------------------------------------------------------------
def _other_config(cfg, which):
  if which == "tokenizer":
    return cfg.replace(tokenizer=dataclasses.replace(cfg.tokenizer, codebook_size=2 * cfg.codebook_size))
  return cfg.replace(num_class=cfg.num_class + 1, transformer=dataclasses.replace(
      cfg.transformer, num_layers=cfg.transformer.num_layers + 1))


def test_checkpoint_of_another_config_lists_every_mismatch(one_golden_case, golden_config):
  case_dir = one_golden_case
  cfg = golden_config(case_dir)
  tok = os.path.join(case_dir, "tokenizer.msgpack")
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(tok, _other_config(cfg, "tokenizer"), parts=("tokenizer",))
  k, dim = cfg.codebook_size, cfg.tokenizer.embedding_dim
  assert tok in str(e.value)
  assert f"wrong shape: params/quantizer/codebook: got {(k, dim)}, expected {(2 * k, dim)}" in str(e.value)

  tr = os.path.join(case_dir, "transformer.msgpack")
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(tr, _other_config(cfg, "transformer"), parts=("transformer",))
  message, v = str(e.value), cfg.vocab_size
  assert tr in message
  assert f"wrong shape: params/MlmLayer_0/mlm_bias/bias: got {(v,)}, expected {(v + 1,)}" in message
  assert (f"wrong shape: params/Embed_0/word_embeddings/embedding: got {(v, cfg.transformer.num_embeds)}, "
          f"expected {(v + 1, cfg.transformer.num_embeds)}") in message
  missing = f"missing: params/TransformerLayer_{cfg.transformer.num_layers}/Attention_0/self_attention/query/kernel"
  assert missing in message
  assert message.count("\n") >= 16  # one line per problem: 2 shapes + 16 leaves of the extra layer


def test_truncated_and_foreign_files_raise_checkpoint_error(one_golden_case, golden_config, tmp_path):
  case_dir = one_golden_case
  cfg = golden_config(case_dir)
  with open(os.path.join(case_dir, "transformer.msgpack"), "rb") as f:
    data = f.read()
  files = {"half.msgpack": data[:len(data) // 2], "short.msgpack": data[:-7], "text.msgpack": b"not a checkpoint\n",
           "png.msgpack": b"\x89PNG\r\n\x1a\n" + bytes(64), "empty.msgpack": b"",
           "noparams.msgpack": flax.serialization.to_bytes({"weights": np.zeros(3, np.float32)})}
  for name, content in files.items():
    path = str(tmp_path / name)
    with open(path, "wb") as f:
      f.write(content)
    with pytest.raises(CheckpointError, match=re.escape(path)):
      load_checkpoint(path, cfg, parts=("transformer",))
  with pytest.raises(CheckpointError, match="does not exist"):
    load_checkpoint(str(tmp_path / "missing.msgpack"), cfg)


def test_save_is_flax_to_bytes_and_round_trips(tmp_path):
  """save_checkpoint writes flax `to_bytes` of the variables in flax's canonical (sorted, as after jit or
  device_get) key order, the order of the released checkpoints."""
  cfg = tiny()
  variables = init_variables(cfg, "transformer", jax.random.PRNGKey(5))
  directory = str(tmp_path / "sub")
  save_checkpoint(directory, cfg, {"transformer": variables})
  with open(os.path.join(directory, "transformer.msgpack"), "rb") as f:
    assert f.read() == flax.serialization.to_bytes(jax.device_get(variables))
  assert sorted(os.listdir(tmp_path)) == ["sub"]  # no temporary left behind
  assert sorted(os.listdir(directory)) == ["config.json", "manifest.json", "transformer.msgpack"]
  config, loaded = load_checkpoint(directory, parts=("transformer",))
  assert config == cfg
  assert conversion.check(cfg, "transformer", conversion.flatten(loaded["transformer"])) == []
  for a, b in zip(jax.tree_util.tree_leaves(loaded["transformer"]), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
