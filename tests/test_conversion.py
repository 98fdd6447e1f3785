"""Checkpoint conversion (issue 4): official msgpack <-> torch safetensors <-> JAX msgpack, and its error handling.

  * bit-exact round trips official -> torch -> JAX on every golden case, in process and through `run.py convert`;
  * config inference from official shapes, and a disagreeing config refused with the field named;
  * damaged checkpoints (renamed / missing / extra / mis-shaped parameters, truncated or non-msgpack files) fail with
    ONE error listing every problem, and the destination is never touched;
  * property tests: random small configs with random weights, torch vs JAX within the torch parity bound
    (<= 1e-4, docs/ARCHITECTURE.md, "Numerics contract").

Random configs and weights come from tests/conftest.py (`random_config`, `random_params`, shared with test_oracle.py).
"""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

import conversion
from configs import MaskGITConfig
from conversion import (ConversionError, as_flat, check_config, convert, flatten, infer_config, param_table,
                        torch_shape, unflatten)
from conversion.formats.flax_msgpack import read_msgpack, write_msgpack
from maskgit_jax.tokenizer import VQVAE as JaxVQVAE
from maskgit_jax.transformer import Transformer as JaxTransformer
from maskgit_torch import checkpoint as torch_checkpoint
from maskgit_torch.tokenizer import VQVAE as TorchVQVAE
from maskgit_torch.transformer import Transformer as TorchTransformer

# torch vs official (docs/ARCHITECTURE.md, "Numerics contract"), and so torch vs our JAX (within 1e-5 of the official)
TOL = 1e-4
WHICH = ("tokenizer", "transformer")


def max_abs(a, b) -> float:
  a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def jax_to_torch(tree, config, which):
  """A flax tree (nested or flat) -> torch state dict, the way the torch backend loads canonical weights."""
  return torch_checkpoint.from_flat(config, which, as_flat(tree))


def torch_to_jax(state, config, which):
  return unflatten(torch_checkpoint.to_flat(config, which, state))


def load_checkpoint_dir(path):
  """(config, tokenizer module or None, transformer module or None) of a torch checkpoint directory."""
  checkpoint = conversion.read(path)
  config, modules = torch_checkpoint.load_checkpoint(path, parts=tuple(checkpoint.parts))
  return config, modules.get("tokenizer"), modules.get("transformer")


def _run_convert(run_py, *args, expect_rc=0):
  """(stdout, stderr) of `run.py convert ARGS`, run in this process (tests/test_convert_cli.py runs the process)."""
  rc, out, err = run_py("convert", *args)
  assert rc == expect_rc, f"rc={rc}\nstdout:\n{out}\nstderr:\n{err}"
  if expect_rc:
    assert err.startswith("error:") and "Traceback" not in err, err
  return out, err


def _read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _snapshot(directory):
  """{relative path: bytes} of every file under `directory` (to prove a destination was left untouched)."""
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(base, name)
      out[os.path.relpath(path, directory)] = _read_bytes(path)
  return out


# Round trips ---------------------------------------------------------------------------------------------------
def test_official_torch_jax_roundtrip_is_bit_exact(golden_case, golden_config, tmp_path):
  """official msgpack -> torch state_dict -> official layout: every array bit-identical, and the file written from
  it byte-identical to the official file (same keys, order, dtypes)."""
  case_dir = golden_case
  config = golden_config(case_dir)
  for which in WHICH:
    path = os.path.join(case_dir, f"{which}.msgpack")
    official = read_msgpack(path)
    state = jax_to_torch(official, config, which)
    assert {k: tuple(v.shape) for k, v in state.items()} == {r.torch_key: torch_shape(r)
                                                            for r in param_table(config, which)}
    back = torch_to_jax(state, config, which)
    flat_official, flat_back = flatten(official), flatten(back)
    assert list(flat_back) == list(flat_official)  # flax's key order
    for key, value in flat_official.items():
      assert flat_back[key].dtype == value.dtype and flat_back[key].shape == value.shape, key
      assert flat_back[key].tobytes() == value.tobytes(), f"{key} changed in the round trip"
    write_msgpack(str(tmp_path / f"{which}.msgpack"), back)
    assert _read_bytes(tmp_path / f"{which}.msgpack") == _read_bytes(path)
    # The converted state dict loads strictly into the torch module.
    module = (TorchVQVAE if which == "tokenizer" else TorchTransformer)(config)
    module.load_state_dict(state, strict=True)


def test_cli_convert_both_directions(tmp_path, one_golden_case, golden_config, run_py):
  """`run.py convert`: official dir -> torch dir -> JAX dir (byte-identical to the official files), official dir ->
  JAX dir directly, and the torch dir loads in maskgit_torch with exactly the converted weights."""
  case_dir = one_golden_case
  config = golden_config(case_dir)
  torch_dir, jax_dir, direct_dir = tmp_path / "torch", tmp_path / "jax", tmp_path / "direct"
  out, _ = _run_convert(run_py, "--src", case_dir, "--dst", str(torch_dir), "--to", "torch")
  assert str(torch_dir) in out or "wrote" in out
  assert sorted(os.listdir(torch_dir)) == ["config.json", "manifest.json", "tokenizer.safetensors", "transformer.safetensors"]
  _run_convert(run_py, "--src", str(torch_dir), "--dst", str(jax_dir), "--to", "jax")
  _run_convert(run_py, "--src", case_dir, "--dst", str(direct_dir), "--to", "jax")
  for which in WHICH:
    official = _read_bytes(os.path.join(case_dir, f"{which}.msgpack"))
    assert _read_bytes(jax_dir / f"{which}.msgpack") == official, f"torch -> jax {which} is not bit-exact"
    assert _read_bytes(direct_dir / f"{which}.msgpack") == official
  loaded_config, tokenizer, transformer = load_checkpoint_dir(str(torch_dir))
  assert (loaded_config.tokenizer, loaded_config.transformer) == (config.tokenizer, config.transformer)
  assert (loaded_config.image_size, loaded_config.num_class) == (config.image_size, config.num_class)
  for which, module in (("tokenizer", tokenizer), ("transformer", transformer)):
    expected = jax_to_torch(read_msgpack(os.path.join(case_dir, f"{which}.msgpack")), config, which)
    got = module.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
      assert torch.equal(got[key], value), key
  # The JAX export's config.json is ours and reloads to the same config.
  assert MaskGITConfig.load(str(jax_dir / "config.json")) == loaded_config


def test_raw_safetensors_input(tmp_path, one_golden_case, golden_config):
  """A bare .safetensors file (torch keys, no metadata) converts to the official layout with a given config; without
  one it is refused with a message saying to pass it."""
  case_dir = one_golden_case
  config = golden_config(case_dir)
  config_path = tmp_path / "config.json"
  config.save(str(config_path))
  for which in WHICH:
    state = jax_to_torch(read_msgpack(os.path.join(case_dir, f"{which}.msgpack")), config, which)
    raw = tmp_path / f"weights_{which}.safetensors"
    safetensors.torch.save_file(state, str(raw))  # no metadata, arbitrary file name
    dst = tmp_path / f"out_{which}"
    convert(str(raw), str(dst), to="jax", config=str(config_path))
    assert _read_bytes(dst / f"{which}.msgpack") == _read_bytes(os.path.join(case_dir, f"{which}.msgpack"))
    with pytest.raises(ConversionError, match="pass --config"):
      convert(str(raw), str(tmp_path / f"none_{which}"), to="jax")
    assert not (tmp_path / f"none_{which}").exists()
  # torch -> torch through a raw file is also a plain copy of the weights.
  convert(str(tmp_path / "weights_transformer.safetensors"), str(tmp_path / "tt"), to="torch", config=config)
  _, _, transformer = load_checkpoint_dir(str(tmp_path / "tt"))
  assert transformer is not None


# Config inference ---------------------------------------------------------------------------------------------
def test_infer_config_from_shapes(golden_case, golden_config):
  case_dir = golden_case
  expected = golden_config(case_dir)
  trees = {w: read_msgpack(os.path.join(case_dir, f"{w}.msgpack")) for w in WHICH}
  inferred = infer_config(trees["tokenizer"], trees["transformer"])
  assert inferred.tokenizer == expected.tokenizer
  assert inferred.transformer == expected.transformer
  assert (inferred.image_size, inferred.num_class) == (expected.image_size, expected.num_class)
  assert (inferred.seq_len, inferred.vocab_size) == (expected.seq_len, expected.vocab_size)


@pytest.mark.parametrize("seed", range(4))
def test_infer_config_random(seed, random_config, random_params):
  config = random_config(seed)
  inferred = infer_config(random_params(config, "tokenizer", 0), random_params(config, "transformer", 0))
  assert (inferred.tokenizer, inferred.transformer, inferred.image_size, inferred.num_class) == (
      config.tokenizer, config.transformer, config.image_size, config.num_class)


def test_disagreeing_config_is_refused_naming_the_field(tmp_path, one_golden_case, golden_config):
  case_dir = one_golden_case
  config = golden_config(case_dir)
  tr = config.transformer
  wrong = dataclasses.replace(config, num_class=config.num_class + 3, transformer=dataclasses.replace(
      tr, num_layers=tr.num_layers + 1, intermediate_size=tr.intermediate_size * 2))
  dst = tmp_path / "dst"
  with pytest.raises(ConversionError) as info:
    convert(case_dir, str(dst), to="torch", config=wrong)
  message = str(info.value)
  for text in (f"transformer.num_layers: the config has {tr.num_layers + 1}, the checkpoint implies {tr.num_layers}",
               f"transformer.intermediate_size: the config has {tr.intermediate_size * 2}",
               f"vocab_size (= codebook_size + num_class + 1): the config has {wrong.vocab_size}, the checkpoint "
               f"implies {config.vocab_size}",
               f"params/TransformerLayer_{tr.num_layers}/Mlp_0/intermediate_output/kernel"):
    assert text in message, message
  assert not dst.exists()
  # check_config says the same for in-memory trees.
  with pytest.raises(ConversionError, match="transformer.num_layers"):
    check_config(wrong, {"transformer": read_msgpack(os.path.join(case_dir, "transformer.msgpack"))})
  check_config(config, {w: read_msgpack(os.path.join(case_dir, f"{w}.msgpack")) for w in WHICH})


# Damaged checkpoints -----------------------------------------------------------------------------------------
_RENAMED = ("params/MlmLayer_0/mlm_bias/bias", "params/MlmLayer_0/mlm_bias/b")
_MISSING = "params/Embed_0/embeddings_ln/scale"
_EXTRA = "params/Extra_0/kernel"
_RESHAPED = "params/TransformerLayer_0/Mlp_0/intermediate_output/kernel"
_TOKENIZER_MISSING = "params/quantizer/codebook"


def _damaged_source(case_dir, tmp_path):
  """A copy of the case with four problems in the transformer and one in the tokenizer; -> (dir, expected lines)."""
  src = tmp_path / "damaged"
  src.mkdir()
  shutil.copy(os.path.join(case_dir, "config.json"), src / "config.json")
  flat = flatten(read_msgpack(os.path.join(case_dir, "transformer.msgpack")))
  flat[_RENAMED[1]] = flat.pop(_RENAMED[0])
  missing_shape = flat.pop(_MISSING).shape
  flat[_EXTRA] = np.zeros((2, 3), np.float32)
  good_shape = flat[_RESHAPED].shape
  bad_shape = good_shape[:-1] + (good_shape[-1] + 1,)
  flat[_RESHAPED] = np.zeros(bad_shape, np.float32)
  write_msgpack(str(src / "transformer.msgpack"), unflatten(flat))
  tok = flatten(read_msgpack(os.path.join(case_dir, "tokenizer.msgpack")))
  codebook_shape = tok.pop(_TOKENIZER_MISSING).shape
  write_msgpack(str(src / "tokenizer.msgpack"), unflatten(tok))
  expected = [f"missing: {_RENAMED[0]}", f"unexpected: {_RENAMED[1]}", f"missing: {_MISSING} (expected shape "
              f"{missing_shape})", f"unexpected: {_EXTRA} (shape (2, 3))",
              f"wrong shape: {_RESHAPED}: got {bad_shape}, expected {good_shape}",
              f"missing: {_TOKENIZER_MISSING} (expected shape {codebook_shape})",
              str(src / "transformer.msgpack"), str(src / "tokenizer.msgpack")]
  return src, expected


@pytest.fixture
def existing_dst(tmp_path):
  """A destination that already holds a checkpoint-like directory; returns (path, snapshot of its files)."""
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "config.json").write_text('{"keep": "me"}')
  (dst / "transformer.safetensors").write_bytes(b"old weights")
  return dst, _snapshot(dst)


def _assert_untouched(dst, snapshot):
  assert _snapshot(dst) == snapshot
  leftovers = [n for n in os.listdir(dst.parent) if n.startswith(f".{dst.name}.")]
  assert not leftovers, f"temporary files left beside the destination: {leftovers}"


@pytest.mark.parametrize("to", ["torch", "jax"])
def test_damaged_checkpoint_one_error_listing_everything(tmp_path, existing_dst, to, one_golden_case):
  src, expected = _damaged_source(one_golden_case, tmp_path)
  dst, snapshot = existing_dst
  with pytest.raises(ConversionError) as info:
    convert(str(src), str(dst), to=to, overwrite=True)  # overwrite allowed: only the damage may stop it
  message = str(info.value)
  for text in expected:
    assert text in message, f"{text!r} not in:\n{message}"
  _assert_untouched(dst, snapshot)


def test_damaged_checkpoint_cli(tmp_path, existing_dst, one_golden_case, run_py):
  src, expected = _damaged_source(one_golden_case, tmp_path)
  dst, snapshot = existing_dst
  _, err = _run_convert(run_py, "--src", str(src), "--dst", str(dst), "--to", "torch", "--overwrite", expect_rc=2)
  for text in expected:
    assert text in err, f"{text!r} not in:\n{err}"
  _assert_untouched(dst, snapshot)


def test_damaged_torch_checkpoint(tmp_path, existing_dst, one_golden_case, golden_config):
  """The same checks on a torch checkpoint directory (torch key names and torch shapes)."""
  case_dir = one_golden_case
  config = golden_config(case_dir)
  state = jax_to_torch(read_msgpack(os.path.join(case_dir, "transformer.msgpack")), config, "transformer")
  state["extra.weight"] = torch.zeros(3)
  del state["embed.embeddings_ln.weight"]
  good = tuple(state["mlm.mlm_dense.weight"].shape)
  state["mlm.mlm_dense.weight"] = torch.zeros(good[0] + 1, good[1])
  src = tmp_path / "torch_src"
  src.mkdir()
  config.save(str(src / "config.json"))
  safetensors.torch.save_file(state, str(src / "transformer.safetensors"))
  dst, snapshot = existing_dst
  with pytest.raises(ConversionError) as info:
    convert(str(src), str(dst), to="jax", overwrite=True)
  message = str(info.value)
  for text in ("unexpected: extra.weight (shape (3,))", "missing: embed.embeddings_ln.weight",
               f"wrong shape: mlm.mlm_dense.weight: got {(good[0] + 1, good[1])}, expected {good}"):
    assert text in message, message
  _assert_untouched(dst, snapshot)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "random_bytes", "msgpack_list"])
def test_unreadable_file(tmp_path, existing_dst, damage, one_golden_case, run_py):
  case_dir = one_golden_case
  src = tmp_path / "src"
  shutil.copytree(case_dir, src, ignore=shutil.ignore_patterns("*.npz", "*.txt"))
  target = src / "transformer.msgpack"
  data = target.read_bytes()
  target.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                      "text": b"this is not a checkpoint\n" * 10,
                      "random_bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                      "msgpack_list": b"\x93\x01\x02\x03"}[damage])
  dst, snapshot = existing_dst
  with pytest.raises(ConversionError) as info:
    convert(str(src), str(dst), to="torch", overwrite=True)
  message = str(info.value)
  assert str(target) in message, message
  if damage in ("truncated", "empty"):
    assert "truncated" in message, message
  _assert_untouched(dst, snapshot)
  if damage == "truncated":
    _, err = _run_convert(run_py, "--src", str(src), "--dst", str(dst), "--to", "jax", "--overwrite", expect_rc=2)
    assert str(target) in err, err
    _assert_untouched(dst, snapshot)


def test_existing_destination_refused_without_overwrite(tmp_path, existing_dst, one_golden_case, run_py):
  dst, snapshot = existing_dst
  with pytest.raises(ConversionError, match="exists and is not empty"):
    convert(one_golden_case, str(dst), to="torch")
  _assert_untouched(dst, snapshot)
  _, err = _run_convert(run_py, "--src", one_golden_case, "--dst", str(dst), "--to", "torch", expect_rc=2)
  assert "--overwrite" in err, err
  _assert_untouched(dst, snapshot)
  # With overwrite the old content is replaced, completely (no stale files).
  convert(one_golden_case, str(dst), to="torch", overwrite=True)
  assert sorted(os.listdir(dst)) == ["config.json", "manifest.json", "tokenizer.safetensors", "transformer.safetensors"]
  assert (dst / "config.json").read_text() != '{"keep": "me"}'


# Property tests: random configs, random weights, torch vs JAX ---------------------------------------------------
def _torch_model(cls, config, params, which):
  model = cls(config)
  model.load_state_dict(jax_to_torch(params, config, which), strict=True)
  return model.eval()


@pytest.mark.parametrize("seed", range(6))
def test_random_transformer_torch_equals_jax(seed, random_config, random_params):
  config = random_config(seed)
  params = random_params(config, "transformer", seed)
  rng = np.random.default_rng(seed + 100)
  batch, s, k = 2, config.seq_len, config.tokenizer.codebook_size
  ids = rng.integers(0, k, (batch, s)).astype(np.int32)
  ids[:, 0] = k + rng.integers(0, config.num_class, batch)  # class token first
  ids[:, 1:][rng.random((batch, s - 1)) < 0.5] = -1  # half the image tokens masked
  model = JaxTransformer(config)
  jax_logits = jax.jit(lambda p, x: model.apply(p, x, deterministic=True))(params, ids)  # jit: faster than eager
  with torch.inference_mode():
    torch_logits = _torch_model(TorchTransformer, config, params, "transformer")(torch.from_numpy(ids).long())
  assert tuple(torch_logits.shape) == (batch, s, config.vocab_size)
  assert float(np.std(np.asarray(jax_logits))) > 0.1  # not a degenerate (near-constant) model
  diff = max_abs(torch_logits, jax_logits)
  assert diff <= TOL, f"{config.transformer}: logits max abs diff {diff}"


def _clear_margin(latents, codebook, latent_err):
  """Per position: True where the nearest code wins by more than any error of size `latent_err` could change.

  d_k = |z - e_k|^2. Moving z by delta (|delta|_inf <= latent_err) changes d_j - d_i by 2 <delta, e_i - e_j>, at
  most 2 * latent_err * |e_i - e_j|_1; float32 rounding of the distances adds ~1e-6 relative. Where the margin
  exceeds that, both backends must pick the same code; elsewhere a different choice is a legitimate tie.
  """
  z = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
  e = codebook.astype(np.float64)
  d = ((z[:, None, :] - e[None]) ** 2).sum(-1)
  order = np.argsort(d, axis=1)
  first, second = order[:, 0], order[:, 1]
  rows = np.arange(len(z))
  margin = d[rows, second] - d[rows, first]
  bound = 2 * latent_err * np.abs(e[first] - e[second]).sum(-1) + 1e-5 * (1 + d[rows, second])
  return (margin > bound).reshape(latents.shape[:-1])


@pytest.mark.parametrize("seed", range(3))
def test_random_tokenizer_torch_equals_jax(seed, random_config, random_params):
  config = random_config(seed)
  params = random_params(config, "tokenizer", seed)
  images = np.random.default_rng(seed + 200).random((2, config.image_size, config.image_size, 3), np.float32)
  jax_model = JaxVQVAE(config)
  jax_quantized, jax_result = jax.jit(lambda p, x: jax_model.apply(p, x, method=JaxVQVAE.encode))(params, images)
  codes = np.array(jax_result["encoding_indices"])
  jax_images = jax.jit(lambda p, c: jax_model.apply(p, c, method=JaxVQVAE.decode_from_indices))(params, codes)
  model = _torch_model(TorchVQVAE, config, params, "tokenizer")
  with torch.inference_mode():
    torch_quantized, torch_result = model.encode(torch.from_numpy(images))
    torch_images = model.decode_from_indices(torch.from_numpy(codes))
  latent_diff = max_abs(torch_result["raw"], jax_result["raw"])
  assert latent_diff <= TOL, f"{config.tokenizer}: latents max abs diff {latent_diff}"
  image_diff = max_abs(torch_images, jax_images)
  assert image_diff <= TOL, f"{config.tokenizer}: reconstructions max abs diff {image_diff}"
  clear = _clear_margin(np.asarray(jax_result["raw"]), params["params"]["quantizer"]["codebook"], max(latent_diff,
                                                                                                      1e-7))
  assert clear.mean() >= 0.9, f"only {clear.mean():.0%} of positions have a clear nearest code: weak test"
  torch_codes = torch_result["encoding_indices"].numpy()
  assert np.array_equal(torch_codes[clear], codes[clear]), "codes differ where the nearest code is clear"
  # Quantized latents are codebook rows: equal wherever the codes are.
  same = torch_codes == codes
  assert same.mean() >= 0.9
  assert max_abs(torch_quantized.numpy()[same], np.asarray(jax_quantized)[same]) == 0.0
