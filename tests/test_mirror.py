"""The two backends mirror each other: the same classes with the same constructor arguments in the same order, the
same methods and functions, the same package exports, the same intermediates under the official module paths, and
the quantizer losses in the same place (the quantizer's train mode) with the same values.

The documented exceptions, each a framework difference and nothing else:
  torch only  LayerNorm / GroupNorm (norms with float32 statistics under autocast; flax's norms take `dtype`),
              `conv` (nn.Conv2d with TF SAME padding; flax's nn.Conv pads itself), `Dense` (nn.Linear whose CPU
              inference GEMM is measured per shape, device.PackedLinear; flax's nn.Dense is used as it is),
              forward / reset_parameters (torch's call and the official init; flax: __call__ and initializers).
  JAX only    Bias (the official `mlm_bias/bias` module path; torch holds the vector as `mlm.mlm_bias`),
              truncated_normal (the official initializer), setup, and a trailing `dtype` argument (the compute
              dtype; torch takes its precision from autocast).
"""

import dataclasses
import inspect
import os

import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import maskgit_jax
import maskgit_torch
import conversion
from conversion import param_table
from maskgit_jax import checkpoint as jax_checkpoint
from maskgit_jax import tokenizer as jax_tokenizer, transformer as jax_transformer
from maskgit_torch import checkpoint as torch_checkpoint
from maskgit_torch import tokenizer as torch_tokenizer, transformer as torch_transformer
from parity_tests.intermediates import capture_torch, flatten_flax

PAIRS = {"tokenizer": (torch_tokenizer, jax_tokenizer), "transformer": (torch_transformer, jax_transformer)}
TORCH_ONLY = {"LayerNorm", "GroupNorm", "conv", "Dense", "forward", "reset_parameters"}
JAX_ONLY = {"Bias", "truncated_normal", "setup", "dtype"}
# torch vs official (docs/ARCHITECTURE.md, 'Parity targets'); JAX is within 1e-5 of the official, so torch vs JAX
# stays within this.
TOL = 1e-4


def _defined(module, kind):
  """Public classes (kind="class") or functions (kind="function") defined in `module` itself."""
  test = inspect.isclass if kind == "class" else inspect.isfunction
  return {name: obj for name, obj in vars(module).items()
          if test(obj) and obj.__module__ == module.__name__ and not name.startswith("_")}


def _torch_arguments(cls):
  return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def _flax_arguments(cls):
  # flax adds `parent` and `name` to every module's dataclass fields.
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _methods(cls, base):
  return {name for name, value in vars(cls).items()
          if callable(value) and not name.startswith("_") and not hasattr(base, name)} | (
              {"__call__"} if "__call__" in vars(cls) or "forward" in vars(cls) else set())


@pytest.mark.parametrize("which", sorted(PAIRS))
def test_same_classes_arguments_and_methods(which):
  torch_module, jax_module = PAIRS[which]
  torch_classes, jax_classes = _defined(torch_module, "class"), _defined(jax_module, "class")
  assert set(torch_classes) - TORCH_ONLY == set(jax_classes) - JAX_ONLY
  for name in set(torch_classes) & set(jax_classes):
    torch_cls, jax_cls = torch_classes[name], jax_classes[name]
    assert issubclass(torch_cls, torch.nn.Module) and issubclass(jax_cls, flax_nn.Module), name
    flax_args = _flax_arguments(jax_cls)
    assert flax_args[-1] == "dtype", f"{name}: the JAX compute dtype comes last"
    assert _torch_arguments(torch_cls) == flax_args[:-1], name
    # Submodules take their config section, the top-level models the whole MaskGITConfig.
    assert _torch_arguments(torch_cls)[0] == "config", name
    assert _methods(torch_cls, torch.nn.Module) - TORCH_ONLY == _methods(jax_cls, flax_nn.Module) - JAX_ONLY, name
  torch_functions, jax_functions = _defined(torch_module, "function"), _defined(jax_module, "function")
  assert set(torch_functions) - TORCH_ONLY == set(jax_functions) - JAX_ONLY
  for name in set(torch_functions) & set(jax_functions):
    assert (list(inspect.signature(torch_functions[name]).parameters)
            == list(inspect.signature(jax_functions[name]).parameters)), name


def test_package_exports_match():
  assert maskgit_torch.__all__ == maskgit_jax.__all__
  for name in maskgit_torch.__all__:
    assert getattr(maskgit_torch, name).__name__ == getattr(maskgit_jax, name).__name__ == name


# The same weights in both backends: the smallest vendored case, read once. -------------------------------------
@pytest.fixture(scope="module")
def models(golden_cases, golden_config):
  case_dir = min(golden_cases, key=lambda c: os.path.getsize(os.path.join(c, "tokenizer.msgpack")))
  config = golden_config(case_dir)
  out = {"config": config, "io": dict(np.load(os.path.join(case_dir, "tokenizer_io.npz"))),
         "ids": np.load(os.path.join(case_dir, "transformer_io.npz"))["ids_partial"]}
  for which in ("tokenizer", "transformer"):
    flat = conversion.read(os.path.join(case_dir, f"{which}.msgpack"), config).parts[which]
    out[f"jax_{which}"] = jax_checkpoint.from_flat(config, which, flat)
    out[f"torch_{which}"] = torch_checkpoint.from_flat(config, which, flat)
  return out


def _torch_model(cls, config, state_dict, **kwargs):
  model = cls(config, **kwargs)
  model.load_state_dict(state_dict, strict=True)
  return model.eval()


def _numpy_tree(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x.detach().numpy() if hasattr(x, "detach") else x), tree)


def _assert_same_intermediates(torch_record, jax_record):
  """Every torch intermediate has its JAX twin under the same official path, equal within TOL (integers exact)."""
  assert set(torch_record) <= set(jax_record), sorted(set(torch_record) - set(jax_record))
  for key in sorted(torch_record):
    ours, theirs = _numpy_tree(torch_record[key]), _numpy_tree(jax_record[key])
    chex.assert_trees_all_equal_structs(ours, theirs)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
      chex.assert_equal_shape([a, b], custom_message=key)
      if b.dtype.kind in "iub":
        np.testing.assert_array_equal(a, b, err_msg=key)
      else:
        chex.assert_tree_all_finite(a)
        chex.assert_trees_all_close(a.astype(np.float64), b.astype(np.float64), atol=TOL, rtol=0, custom_message=key)


def test_transformer_intermediates_are_the_same_in_both_backends(models):
  """Torch forward hooks keyed by the conversion table give every module's output that flax's
  capture_intermediates gives (all layers), in the official layout; JAX has more only where torch has no module:
  parameter-free dropout (a torch module that the table cannot name) and the official `mlm_bias` wrapper."""
  config = models["config"]
  model = _torch_model(torch_transformer.Transformer, config, models["torch_transformer"])
  with torch.inference_mode():
    logits, torch_record = capture_torch(model, param_table(config, "transformer"),
                                         lambda: model(torch.from_numpy(models["ids"])))
  model_jax = jax_transformer.Transformer(config)
  capture = jax.jit(lambda v, ids: model_jax.apply(v, ids, deterministic=True, capture_intermediates=True,
                                                   mutable=["intermediates"]))
  _, state = capture(models["jax_transformer"], models["ids"])
  jax_record = flatten_flax(state)
  extra = set(jax_record) - set(torch_record)
  assert all(k.rsplit("/", 1)[-1].startswith("Dropout_") or k == "MlmLayer_0/mlm_bias" for k in extra), extra
  last = f"TransformerLayer_{config.transformer.num_layers - 1}"
  assert {f"{last}/Attention_0/self_attention/query", f"{last}/Mlp_0/layer_output_ln", "output"} <= set(torch_record)
  b, s, heads, head_dim = *models["ids"].shape, config.transformer.num_heads, config.transformer.head_dim
  assert torch_record["TransformerLayer_0/Attention_0/self_attention/key"].shape == (b, s, heads, head_dim)
  assert torch.equal(torch_record["output"], logits)
  _assert_same_intermediates(torch_record, jax_record)


def test_tokenizer_intermediates_are_the_same_in_both_backends(models):
  """The same for the tokenizer's reconstruction (encoder, every ResBlock and conv, quantizer, decoder): conv
  outputs come back NHWC, the quantizer's (quantized, {codes, raw}) output compares leaf by leaf."""
  config = models["config"]
  model = _torch_model(torch_tokenizer.VQVAE, config, models["torch_tokenizer"])
  images = models["io"]["images"]
  with torch.inference_mode():
    _, torch_record = capture_torch(model, param_table(config, "tokenizer"), lambda: model(torch.from_numpy(images)))
  model_jax = jax_tokenizer.VQVAE(config)
  _, state = jax.jit(lambda v, x: model_jax.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))(
      models["jax_tokenizer"], images)
  jax_record = flatten_flax(state)
  assert set(torch_record) == set(jax_record), set(torch_record) ^ set(jax_record)
  assert {"encoder/ResBlock_0", "decoder/Conv_0", "quantizer", "output"} <= set(torch_record)
  _assert_same_intermediates(torch_record, jax_record)


def test_capture_removes_its_hooks(models):
  config = models["config"]
  model = _torch_model(torch_transformer.Transformer, config, models["torch_transformer"])
  ids = torch.from_numpy(models["ids"])
  with pytest.raises(RuntimeError, match="stop"):
    capture_torch(model, param_table(config, "transformer"), lambda: (model(ids), _raise(RuntimeError("stop"))))
  assert not any(m._forward_hooks for m in model.modules())  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="which Transformer does not have"):  # a table of another model
    capture_torch(model, param_table(config, "tokenizer"), lambda: model(ids))
  assert not any(m._forward_hooks for m in model.modules())  # pylint: disable=protected-access


def _raise(e):
  raise e


def test_quantizer_losses_live_in_the_quantizer_of_both_backends(models):
  """VectorQuantizer(config, train=True), reached through VQVAE(config, train=True): the quantizer returns the
  official train-mode losses and the straight-through value in both backends, with the same values and the same
  gradients, from the same latents (the fixture's encoder output) and codebook."""
  config, z = models["config"], models["io"]["encoder_output"]
  codebook = models["jax_tokenizer"]["params"]["quantizer"]["codebook"]
  torch_vq = torch_tokenizer.VQVAE(config, train=True).quantizer
  torch_vq.load_state_dict({"codebook": torch.from_numpy(np.array(codebook))})
  torch_z = torch.from_numpy(z.copy()).requires_grad_()
  quantized, result = torch_vq(torch_z)
  (result["quantizer_loss"] + quantized.sum()).backward()

  jax_vq = jax_tokenizer.VectorQuantizer(config.tokenizer, train=True)

  def loss(codebook, z):
    q, r = jax_vq.apply({"params": {"codebook": codebook}}, z)
    return r["quantizer_loss"] + q.sum(), (q, r)

  (_, (jax_quantized, jax_result)), (jax_codebook_grad, jax_z_grad) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(codebook, z)
  assert config.tokenizer.entropy_loss_ratio != 0 and float(jax_result["entropy_loss"]) != 0.0
  # Means over B*h*w*E float32 terms summed in another order: the O(0.1) losses agree to 1e-6 (measured <= 2.6e-7).
  for name in ("quantizer_loss", "e_latent_loss", "q_latent_loss", "entropy_loss"):
    np.testing.assert_allclose(float(result[name].detach()), float(jax_result[name]), atol=1e-6, rtol=0,
                               err_msg=name)
  np.testing.assert_array_equal(result["encoding_indices"].numpy(), np.asarray(jax_result["encoding_indices"]))
  # Straight-through: the value is the codebook row (to the rounding of z + (q - z)); the gradient of q.sum()
  # reaches z whole, and the codebook only through the codebook and entropy losses.
  np.testing.assert_allclose(quantized.detach().numpy(), np.asarray(jax_quantized), atol=1e-6, rtol=0)
  assert np.abs(np.asarray(jax_codebook_grad)).max() > 0
  # The entropy term's softmax of -distances / entropy_temperature (0.01) amplifies the distances' float32
  # rounding a hundredfold: measured <= 1.6e-5 on the codebook (values up to 0.16), <= 1.8e-6 on z.
  np.testing.assert_allclose(torch_vq.codebook.grad.numpy(), np.asarray(jax_codebook_grad), atol=TOL, rtol=0)
  np.testing.assert_allclose(torch_z.grad.numpy(), np.asarray(jax_z_grad), atol=1e-5, rtol=0)
  # Eval mode (the default) returns the codebook rows themselves and no losses, in both backends.
  eval_vq = torch_tokenizer.VectorQuantizer(config.tokenizer)
  eval_vq.load_state_dict(torch_vq.state_dict())
  with torch.inference_mode():
    rows, eval_result = eval_vq(torch.from_numpy(z))
  _, jax_eval = jax_tokenizer.VectorQuantizer(config.tokenizer).apply({"params": {"codebook": codebook}}, z)
  assert set(eval_result) == set(jax_eval) == {"encoding_indices", "raw"}
  assert torch.equal(rows, torch.from_numpy(np.array(codebook))[eval_result["encoding_indices"]])
