"""The torch CPU inference fast paths (issue 20) compute what the module-by-module forward computes.

Each path against its reference: the channels_last decoder (buffers reused across calls) against the NCHW module
forward and a float64 decode; its GroupNorm against float64 where torch's own channels_last GroupNorm is coarser;
both CPU GELU forms against the float64 tanh GELU; the fused q/k/v GEMM against the three projections, its cache
against weight changes; MKL's packed GEMM against F.linear and float64, its cache against weight and row-count
changes, copies and pickles of models holding it; every kernel choice against the official logits; the kernel
chooser's pinning; native bfloat16 from the CPU's flags.
"""

import copy
import pickle
import time
import unittest.mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import conversion
from configs import get_preset
from maskgit_torch import checkpoint as torch_checkpoint
from maskgit_torch import device as device_lib
from maskgit_torch import tokenizer as torch_tokenizer
from maskgit_torch.tokenizer import VQVAE
from maskgit_torch.transformer import CPU_GELU, Transformer, gelu


@pytest.fixture(scope="module")
def tiny():
  config = get_preset("tiny")
  torch.manual_seed(0)
  return config, VQVAE(config).eval(), Transformer(config).eval()


def _float64_decode(tokenizer, codes):
  t64 = copy.deepcopy(tokenizer).double()
  with torch.no_grad():
    return t64.decoder(t64.quantizer.codebook[codes].permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)


def test_channels_last_decoder_matches_the_module_forward(tiny):
  config, tokenizer, _ = tiny
  codes = torch.randint(0, config.codebook_size, (3, config.latent_size, config.latent_size))
  module_path = tokenizer.decode_from_indices(codes).detach()  # autograd on: the NCHW module forward
  with torch.inference_mode():
    fast = tokenizer.decode_from_indices(codes)
    again = tokenizer.decode_from_indices(codes)
    other_batch = tokenizer.decode_from_indices(codes[:1])
  exact = _float64_decode(tokenizer, codes)
  assert fast.shape == (3, config.image_size, config.image_size, 3) and fast.is_contiguous()  # NHWC memory
  # Measured 6.8e-6 apart on this preset (channels_last oneDNN convolutions round differently), each within
  # 5.5e-6 of float64; the parity bound is 1e-4.
  assert (fast - module_path).abs().max() < 2e-5
  assert (fast.double() - exact).abs().max() < 2e-5
  assert torch.equal(fast, again)  # reused buffers carry nothing from call to call
  assert (other_batch.double() - exact[:1]).abs().max() < 2e-5  # a new shape: new buffers


def test_decoder_keeps_its_buffers_for_calls_of_one_shape(tiny):
  config, tokenizer, _ = tiny
  codes = torch.randint(0, config.codebook_size, (2, config.latent_size, config.latent_size))
  with torch.inference_mode():
    tokenizer.decode_from_indices(codes)
    workspace = torch_tokenizer._WORKSPACES[tokenizer.decoder]  # pylint: disable=protected-access
    pointers = {k: b.data_ptr() for k, b in workspace.buffers.items()}
    tokenizer.decode_from_indices(codes)
  assert pointers and {k: b.data_ptr() for k, b in workspace.buffers.items()} == pointers
  assert all(b.is_contiguous(memory_format=torch.channels_last) for b in workspace.buffers.values())
  assert not any("buffer" in k or "workspace" in k for k in tokenizer.state_dict())


def test_hooks_see_the_module_forward(tiny):
  """Forward hooks (parity_tests.intermediates) get the module-by-module NCHW forward, bit for bit."""
  config, tokenizer, _ = tiny
  codes = torch.randint(0, config.codebook_size, (1, config.latent_size, config.latent_size))
  seen = []
  handle = tokenizer.decoder.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
  try:
    with torch.inference_mode():
      hooked = tokenizer.decode_from_indices(codes)
  finally:
    handle.remove()
  assert len(seen) == 1
  assert torch.equal(hooked, tokenizer.decode_from_indices(codes).detach())


def test_channels_last_group_norm_is_accurate():
  """torch's channels_last GroupNorm sums a group in one float32 pass (measured 4.9e-6 off float64 here, NCHW 9e-7);
  the decoder's own keeps the NCHW accuracy."""
  torch.manual_seed(0)
  x = (torch.randn(2, 64, 96, 96) * 3 + 1.5).contiguous(memory_format=torch.channels_last)
  norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
  with torch.no_grad():
    norm.weight.uniform_(0.5, 1.5)
    norm.bias.normal_()
    exact = F.silu(F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6))
    out = torch.empty_like(x)
    ours = torch_tokenizer._group_norm_act_into(norm, F.silu, x, out)  # pylint: disable=protected-access
    torch_cl = F.silu(F.group_norm(x, 32, norm.weight, norm.bias, 1e-6))
  assert ours.data_ptr() == out.data_ptr()
  assert (ours.double() - exact).abs().max() < 2e-6
  assert (torch_cl.double() - exact).abs().max() > (ours.double() - exact).abs().max()


def test_upsample_into_is_the_nearest_upsample():
  x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
  out = torch.empty(2, 6, 8, 5).permute(0, 3, 1, 2)
  assert torch.equal(torch_tokenizer._upsample_into(x, out), torch_tokenizer.upsample(x))  # pylint: disable=protected-access


@pytest.mark.parametrize("form", sorted(CPU_GELU))
def test_both_cpu_gelu_forms_are_the_official_tanh_gelu(form):
  """Each form the chooser may take is the tanh GELU to float32 rounding; the erf GELU would fail this."""
  x = torch.linspace(-12, 12, 240001)
  xd = x.double()
  exact = 0.5 * xd * (1 + torch.tanh(0.7978845608028654 * (xd + 0.044715 * xd ** 3)))
  ulp = torch.finfo(torch.float32).eps * xd.abs().clamp_min(1)
  with torch.inference_mode():
    y = CPU_GELU[form](x)
  assert ((y.double() - exact).abs() / ulp).max() <= 2  # measured <= 1.24
  assert ((F.gelu(x).double() - exact).abs() / ulp).max() > 100  # the exact erf GELU is another function


@pytest.mark.parametrize("form", sorted(CPU_GELU))
def test_gelu_takes_the_pinned_form(form, monkeypatch):
  monkeypatch.setenv(device_lib.KERNEL_ENV, f"gelu={form}")
  x = torch.randn(4, 33, 128)
  with torch.inference_mode():
    assert torch.equal(gelu(x), CPU_GELU[form](x))
  monkeypatch.setenv(device_lib.KERNEL_ENV, "gelu=erf")
  with pytest.raises(device_lib.DeviceError, match="gelu=erf"):
    with torch.inference_mode():
      gelu(x)


def test_the_chooser_measures_once_and_reports():
  calls = {"a": 0, "b": 0}

  def make(name, seconds):
    def fn(x):
      calls[name] += 1
      end = time.perf_counter() + seconds
      while time.perf_counter() < end:
        pass
      return x
    return fn

  candidates = {"a": make("a", 2e-3), "b": make("b", 0.0)}
  x = torch.zeros(1000)
  assert device_lib.fastest("test_kernel", candidates, x, repeats=2) == "b"
  # A warm-up call, one that sizes the rounds, then one call per timed round for the 2 ms candidate (a round lasts
  # >= 0.5 ms), many per round for the instant one; nothing the second time.
  assert calls["a"] == 4 and calls["b"] > 4 + 2, calls
  before = dict(calls)
  assert device_lib.fastest("test_kernel", candidates, x, repeats=2) == "b" and calls == before
  assert device_lib.kernel_choices()["test_kernel (< 1024 elements)"] == "b"


def test_fused_qkv_equals_the_three_projections(tiny):
  config, _, transformer = tiny
  ids = torch.randint(0, config.codebook_size, (2, config.seq_len))
  reference = transformer(ids).detach()  # autograd on: three projections, F.gelu
  with torch.inference_mode():
    fused = transformer(ids)
  attention = transformer.layers[0].attention.self_attention
  assert attention._qkv_cache is not None  # pylint: disable=protected-access
  assert (fused - reference).abs().max() < 1e-5
  assert not any("qkv" in k for k in transformer.state_dict())


def test_fused_qkv_follows_weight_changes(tiny):
  config, _, transformer = tiny
  model = copy.deepcopy(transformer)
  ids = torch.randint(0, config.codebook_size, (1, config.seq_len))
  with torch.inference_mode():
    model(ids)
  state = {k: v + 0.5 * torch.randn_like(v) if "query.weight" in k else v for k, v in model.state_dict().items()}
  model.load_state_dict(state)  # in place: bumps the version counters
  with torch.inference_mode():
    changed = model(ids)
  assert (changed - model(ids).detach()).abs().max() < 1e-5
  assert (changed - transformer(ids).detach()).abs().max() > 1e-3


def test_models_made_in_inference_mode_take_the_three_projections(tiny):
  config, _, transformer = tiny
  with torch.inference_mode():
    model = Transformer(config).eval()
    model.load_state_dict(transformer.state_dict())
    model(torch.randint(0, config.codebook_size, (1, config.seq_len)))
  assert model.layers[0].attention.self_attention._qkv_cache is None  # pylint: disable=protected-access


needs_mkl = pytest.mark.skipif(
    not device_lib._mkl_packing(),  # pylint: disable=protected-access
    reason="this torch build has no MKL (e.g. ARM or macOS): PackedLinear always takes F.linear there")


@needs_mkl
@pytest.mark.parametrize("rows", [1, 7, 65])
def test_packed_gemm_is_the_same_linear(rows, monkeypatch):
  """MKL's packed sgemm against float64 and F.linear: float32 rounding apart, on every row count (each packs anew)."""
  monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=mkl_packed")
  torch.manual_seed(rows)
  x, weight, bias = torch.randn(rows, 3, 96), torch.randn(200, 96) * 0.1, torch.randn(200)
  gemm = device_lib.PackedLinear()
  with torch.inference_mode():
    packed = gemm(x, weight, bias)
    unbiased = gemm(x, weight)
  exact = F.linear(x.double(), weight.double(), bias.double())
  assert packed.shape == (rows, 3, 200) and gemm._cache is not None  # pylint: disable=protected-access
  assert (packed.double() - exact).abs().max() < 1e-5  # outputs of size ~3: a few float32 ulps
  assert (packed - F.linear(x, weight, bias)).abs().max() < 1e-5
  assert (unbiased.double() - (exact - bias.double())).abs().max() < 1e-5


@needs_mkl
def test_packed_gemm_follows_the_weight_and_the_row_count(monkeypatch):
  monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=mkl_packed")
  layer = torch.nn.Linear(64, 32)
  gemm, x = device_lib.PackedLinear(), torch.randn(5, 64)
  with torch.no_grad():
    gemm(x, layer.weight, layer.bias)
    packed = gemm._cache[1]  # pylint: disable=protected-access
    gemm(x, layer.weight, layer.bias)
    assert gemm._cache[1] is packed  # pylint: disable=protected-access  # kept while nothing changes
    layer.weight.mul_(-2)  # in place: a new version
    assert (gemm(x, layer.weight, layer.bias) - layer(x)).abs().max() < 1e-5
    assert (gemm(x[:3], layer.weight, layer.bias) - layer(x[:3])).abs().max() < 1e-5  # another row count
  assert gemm._cache[0][2] == 3  # pylint: disable=protected-access


@needs_mkl
def test_a_gemm_follows_a_pin_changed_between_calls(monkeypatch):
  """The choice a PackedLinear remembers for its shape is keyed by the pin too: changing
  $MASKGIT_TORCH_KERNELS between calls switches the kernel of a layer that has already run."""
  layer = torch.nn.Linear(64, 32)
  gemm, x = device_lib.PackedLinear(), torch.randn(5, 64)
  with torch.no_grad():
    monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=addmm")
    assert torch.equal(gemm(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    assert gemm._cache is None  # pylint: disable=protected-access
    monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=mkl_packed")
    gemm(x, layer.weight, layer.bias)
    assert gemm._cache is not None  # pylint: disable=protected-access
    monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=addmm")
    with unittest.mock.patch.object(device_lib.PackedLinear, "_packed", side_effect=AssertionError("packed")):
      assert torch.equal(gemm(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))


def test_large_gemms_take_plain_sgemm_unmeasured(monkeypatch):
  monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=mkl_packed")
  gemm, weight = device_lib.PackedLinear(), torch.randn(8, 16)
  x = torch.randn(device_lib.PACKED_MAX_ROWS + 1, 16)
  with torch.inference_mode():
    assert torch.equal(gemm(x, weight), F.linear(x, weight)) and gemm._cache is None  # pylint: disable=protected-access


def test_packed_gemm_leaves_autograd_and_pinned_plain_calls_to_f_linear(monkeypatch):
  layer = torch.nn.Linear(16, 8)
  gemm, x = device_lib.PackedLinear(), torch.randn(4, 16, requires_grad=True)
  y = gemm(x, layer.weight, layer.bias)
  assert y.grad_fn is not None and torch.equal(y, layer(x)) and gemm._cache is None  # pylint: disable=protected-access
  monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=addmm")
  with torch.inference_mode():
    assert torch.equal(gemm(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
  assert gemm._cache is None  # pylint: disable=protected-access
  monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=mkl_packed")
  with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # fast mode: autocast's bf16 GEMM
    assert gemm(x, layer.weight, layer.bias).dtype == torch.bfloat16 and gemm._cache is None  # pylint: disable=protected-access
  monkeypatch.setattr(device_lib, "_mkl_packing", lambda: False)  # a build without MKL
  monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=mkl_packed")
  with torch.inference_mode():
    assert torch.equal(gemm(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))


@needs_mkl
def test_a_transformer_with_packed_weights_copies_and_pickles(tiny, monkeypatch):
  """Packed copies are opaque MKL tensors: deepcopy and torch.save of a model that has run must still work, and
  the copy packs its own."""
  monkeypatch.setenv(device_lib.KERNEL_ENV, "linear=mkl_packed")
  config, _, transformer = tiny
  model = copy.deepcopy(transformer)
  ids = torch.randint(0, config.codebook_size, (1, config.seq_len))
  with torch.no_grad():
    packed = model(ids)
    assert model.layers[0].mlp.intermediate_output.gemm._cache is not None  # pylint: disable=protected-access
    clone = copy.deepcopy(model)
    pickle.dumps(model)  # torch.save(model) and multiprocessing pickle a module: the packed copies stay out
    gemm = model.layers[0].mlp.intermediate_output.gemm
    assert copy.copy(gemm)._cache is None  # pylint: disable=protected-access  # the state pickling writes
    assert torch.equal(clone(ids), packed)
  assert (packed - transformer(ids).detach()).abs().max() < 1e-5  # against nn.Linear under autograd
  assert list(model.state_dict()) == list(transformer.state_dict())


@pytest.mark.parametrize("kernels", ["linear=addmm,gelu=tanh", "linear=mkl_packed,gelu=sigmoid"])
def test_every_kernel_choice_meets_the_logit_parity_bound(kernels, monkeypatch, one_golden_case, golden_config):
  """Whichever forms the chooser takes on a CPU, the logits stay within the torch parity bound (1e-4) of the official
  code's recorded logits, in every recorded masking (smallest official case; the runner checks the chosen forms)."""
  monkeypatch.setenv(device_lib.KERNEL_ENV, kernels)
  case_dir = one_golden_case
  config = golden_config(case_dir)
  model = Transformer(config)
  flat = conversion.read(f"{case_dir}/transformer.msgpack", config).parts["transformer"]
  model.load_state_dict(torch_checkpoint.from_flat(config, "transformer", flat), strict=True)
  with np.load(f"{case_dir}/transformer_io.npz") as io, torch.inference_mode():
    for kind in ("all_masked", "partial", "unmasked"):
      logits = model.eval()(torch.from_numpy(io[f"ids_{kind}"]))
      assert np.abs(logits.double().numpy() - io[f"logits_{kind}"]).max() <= 1e-4, kind
  if "mkl_packed" in kernels and device_lib._mkl_packing():  # pylint: disable=protected-access
    assert model.layers[0].mlp.intermediate_output.gemm._cache is not None  # pylint: disable=protected-access


def test_native_bfloat16_needs_the_bf16_units(monkeypatch):
  for flags, native in ((frozenset({"avx512f", "avx512bw"}), False), (frozenset({"avx2"}), False),
                        (frozenset({"avx512f", "avx512_bf16"}), True), (frozenset({"amx_tile", "amx_bf16"}), True)):
    monkeypatch.setattr(device_lib, "cpu_features", lambda flags=flags: flags)
    assert device_lib.native_cpu_bfloat16() is native, flags
  assert "kernels" in device_lib.cpu_isa()
