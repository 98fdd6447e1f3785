"""MaskGIT bidirectional transformer in PyTorch, numerically mirroring the official flax model.

Official: google-research/maskgit `maskgit/nets/maskgit_transformer.py` (a post-LN BERT without segment ids).
  embeddings  LN(word[ids] + pos[arange(S)])
  each layer  h = LN(x + Attn(x));  out = LN(h + W2 gelu(W1 h + b1) + b2)
  MLM head    logits = LN(gelu(Dense(last))) @ word_embeddings.T + mlm_bias
Mirrors maskgit_jax/transformer.py class for class, argument for argument: every submodule takes the
`TransformerConfig` section first, then the sizes that live outside it (vocab_size, max_position_embeddings); the
top-level `Transformer` takes the whole `MaskGITConfig`. Module attributes mirror the official tree (Embed_0 ->
embed, TransformerLayer_i -> layers[i], Attention_0 -> attention, Mlp_0 -> mlp, MlmLayer_0 -> mlm);
`conversion/tables/official.py` maps every parameter, and its module names key the forward hooks that capture intermediates
(`parity_tests.intermediates.capture_torch`), so `forward` is only the maths.

Precision: float32 is the parity mode. Under `torch.autocast(..., dtype=torch.bfloat16)` ("fast" mode) the matmuls
run in bf16 while LayerNorm statistics stay in float32 and the residual stream is float32 (norms return float32);
softmax is inside scaled_dot_product_attention, whose kernels accumulate it in float32.

Speed (inference, autograd off): the q/k/v projections run as one GEMM against the three weights concatenated
(`SelfAttention._fused_qkv`; the parameters and their state_dict keys stay as they are); on a CPU in float32 every
GEMM is plain or MKL-packed sgemm (`Dense`, `device.PackedLinear`) and the tanh GELU one of two equal forms,
whichever measures faster on the running CPU (`device.fastest`; docs/ARCHITECTURE.md, "CPU inference paths").
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from configs import MaskGITConfig, TransformerConfig
from maskgit_torch import device as device_lib


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
  return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class LayerNorm(nn.LayerNorm):
  """LayerNorm with float32 statistics (and output) whatever the input dtype.

  flax computes var = E[x^2] - E[x]^2 (use_fast_variance) while torch uses a two-pass variance; the difference is
  rounding only (measured < 1e-6 on the logits of the golden cases).
  """

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(_at_least_float32(x), self.normalized_shape, self.weight, self.bias, self.eps)


_SQRT_2_OVER_PI = 0.7978845608028654


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
  """The official GELU, torch's fused kernel: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
  return F.gelu(x, approximate="tanh")


def _gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
  """The same function as x * sigmoid(2u), since 0.5 (1 + tanh(u)) = sigmoid(2u): one exp instead of a tanh, in
  five in-place passes. Against the float64 value on 1e6 normal inputs (x3): within 1.2 ulp of |x| (F.gelu 0.9)."""
  u = x * x
  u = u.mul_(2 * 0.044715 * _SQRT_2_OVER_PI).add_(2 * _SQRT_2_OVER_PI).mul_(x)
  return u.sigmoid_().mul_(x)


CPU_GELU = {"tanh": _gelu_tanh, "sigmoid": _gelu_sigmoid}


def gelu(x: torch.Tensor) -> torch.Tensor:
  """Official quirk kept: jax.nn.gelu defaults to approximate=True, the tanh form, not the exact erf GELU (which
  must never stand in for it, however much faster its kernel is).

  Float32 inference on a CPU takes the faster of two forms of that one function, measured at first use on the
  running CPU (`device.fastest("gelu", CPU_GELU, x)`): torch's tanh kernel against its sigmoid differs by CPU
  (1.73 vs 0.79 ms per call on an AVX2 EPYC, 0.92 vs 1.21 ms on an AVX-512 + AMX Xeon). Training (autograd), CUDA
  and bfloat16 keep F.gelu: one fused kernel that rounds once.
  """
  if (x.device.type == "cpu" and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled())
      and not torch.compiler.is_compiling()):  # inductor writes its own fused GELU
    return CPU_GELU[device_lib.fastest("gelu", CPU_GELU, x)](x)
  return F.gelu(x, approximate="tanh")


class Dense(nn.Linear):
  """nn.Linear (the same parameters, keys and init) whose float32 CPU inference GEMM is the faster of plain and
  MKL-packed sgemm on the running CPU (`device.PackedLinear`); autograd and other devices take nn.Linear's."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__(in_features, out_features)
    self.gemm = device_lib.PackedLinear()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.gemm(x, self.weight, self.bias)


class Embed(nn.Module):
  """Official `Embed`: word + position embeddings, then LayerNorm (no extra projection, no token types)."""

  def __init__(self, config: TransformerConfig, vocab_size: int, max_position_embeddings: int):
    super().__init__()
    self.word_embeddings = nn.Embedding(vocab_size, config.num_embeds)
    self.position_embeddings = nn.Embedding(max_position_embeddings, config.num_embeds)
    self.embeddings_ln = LayerNorm(config.num_embeds, eps=config.layer_norm_eps)
    self.dropout = nn.Dropout(config.dropout_rate)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    # The mask id -1 indexes the last row (V-1): the official jnp.take wraps negative indices like Python.
    ids = torch.where(input_ids < 0, input_ids + self.word_embeddings.num_embeddings, input_ids)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)[None, :]
    x = self.embeddings_ln(self.word_embeddings(ids) + self.position_embeddings(positions))
    return self.dropout(x)


class SelfAttention(nn.Module):
  """flax `SelfAttention` with biased q/k/v/out projections; heads are contiguous blocks of head_dim features."""

  def __init__(self, config: TransformerConfig):
    super().__init__()
    hidden = config.num_embeds
    self.dropout_rate = config.dropout_rate
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    self.query = Dense(hidden, hidden)
    self.key = Dense(hidden, hidden)
    self.value = Dense(hidden, hidden)
    self.out = Dense(hidden, hidden)
    self._qkv_cache = None  # (version key, weight (3D, D), bias (3D,)); not a buffer: not in the state_dict
    self._qkv_gemm = device_lib.PackedLinear()

  def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
    """query/key/value weights and biases concatenated, made again whenever one of them is replaced or changed in
    place (load_state_dict, .to(), an optimizer step bump the data pointer or version). Costs 3 D^2 floats per
    layer while cached (170 MiB for the ImageNet transformer)."""
    params = [p for proj in (self.query, self.key, self.value) for p in (proj.weight, proj.bias)]
    key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)  # pylint: disable=protected-access
    if self._qkv_cache is None or self._qkv_cache[0] != key:
      with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
        self._qkv_cache = (key, torch.cat(params[0::2]), torch.cat(params[1::2]))
    return self._qkv_cache[1], self._qkv_cache[2]

  def _projections(self, x: torch.Tensor):
    """q, k, v (B, S, D). Without autograd one GEMM of N = 3D: the same dot products as three (measured bit-equal
    on the ImageNet sizes), one dispatch and a better-shaped GEMM. Hooks on the projections see them separately."""
    # Parameters made in inference mode carry no version counter, so a cache could not see them change.
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or device_lib.hooked(self)
        or self.query.weight.is_inference()):
      return self.query(x), self.key(x), self.value(x)
    weight, bias = self._fused_qkv()
    return self._qkv_gemm(x, weight, bias).split(x.shape[-1], dim=-1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, s, d = x.shape
    # (B, heads, S, head_dim): the projections split into heads as flax's (D, heads, head_dim) kernels do.
    q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for t in self._projections(x))
    # The official attention mask is all ones (every token sees every token), so no mask is passed.
    # Default scale 1/sqrt(head_dim), as flax's dot_product_attention applies to the query.
    if self.training and self.dropout_rate > 0:
      # As flax (broadcast_dropout=True): one dropout mask over (q, k) shared by the batch and the heads, which
      # SDPA's per-element dropout cannot express; so the attention is written out in training.
      probs = torch.softmax((q / self.head_dim ** 0.5) @ k.transpose(2, 3), dim=-1)
      keep = torch.rand(probs.shape[-2:], device=x.device) >= self.dropout_rate
      attn = (probs * keep / (1 - self.dropout_rate)) @ v
    else:
      attn = F.scaled_dot_product_attention(q, k, v)
    return self.out(attn.transpose(1, 2).reshape(b, s, d))


class Attention(nn.Module):
  """Official `Attention`: self-attention, then post-LN around the residual: LN(x + dropout(attn(x)))."""

  def __init__(self, config: TransformerConfig):
    super().__init__()
    self.self_attention = SelfAttention(config)
    self.dropout = nn.Dropout(config.dropout_rate)
    self.attention_output_ln = LayerNorm(config.num_embeds, eps=config.layer_norm_eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.attention_output_ln(self.dropout(self.self_attention(x)) + x)


class Mlp(nn.Module):
  """Official `Mlp`: LN(x + dropout(W2 gelu(W1 x + b1) + b2)), the tanh GELU."""

  def __init__(self, config: TransformerConfig):
    super().__init__()
    self.intermediate_output = Dense(config.num_embeds, config.intermediate_size)
    self.layer_output = Dense(config.intermediate_size, config.num_embeds)
    self.dropout = nn.Dropout(config.dropout_rate)
    self.layer_output_ln = LayerNorm(config.num_embeds, eps=config.layer_norm_eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.layer_output(gelu(self.intermediate_output(x)))
    return self.layer_output_ln(self.dropout(y) + x)


class TransformerLayer(nn.Module):
  """One post-LN layer: Attention, then Mlp."""

  def __init__(self, config: TransformerConfig):
    super().__init__()
    self.attention = Attention(config)
    self.mlp = Mlp(config)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.mlp(self.attention(x))


class MlmLayer(nn.Module):
  """Official `MlmLayer`: logits = LN(gelu(Dense(x))) @ word_embeddings.T + bias over V (tied output weights)."""

  def __init__(self, config: TransformerConfig, vocab_size: int):
    super().__init__()
    self.mlm_dense = Dense(config.num_embeds, config.num_embeds)
    self.mlm_ln = LayerNorm(config.num_embeds, eps=config.layer_norm_eps)
    self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
    self.logits_gemm = device_lib.PackedLinear()

  def forward(self, x: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    h = self.mlm_ln(gelu(self.mlm_dense(x)))
    if self.logits_gemm.applies(h, embeddings):
      return self.logits_gemm(h, embeddings, self.mlm_bias)
    return h @ embeddings.t() + self.mlm_bias


class Transformer(nn.Module):
  """The official MaskGIT transformer: (B, S) token ids -> (B, S, V) float32 logits over the full vocabulary."""

  def __init__(self, config: MaskGITConfig):
    super().__init__()
    tc = config.transformer
    self.config = config
    # Dropout (train mode only) at the official places: after the embedding LN, on the attention probabilities,
    # and on the attention and MLP outputs before their residuals. eval() (inference, parity) disables it.
    self.embed = Embed(tc, config.vocab_size, config.seq_len)
    self.layers = nn.ModuleList(TransformerLayer(tc) for _ in range(tc.num_layers))
    self.mlm = MlmLayer(tc, config.vocab_size)
    self.reset_parameters()

  @torch.no_grad()
  def reset_parameters(self) -> None:
    """Official init: truncated normal (+-2 std) with std initializer_range for kernels/embeddings, zero biases."""
    std = self.config.transformer.initializer_range
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if getattr(module, "bias", None) is not None:
          nn.init.zeros_(module.bias)
      elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    nn.init.zeros_(self.mlm.mlm_bias)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids (B, S) with the class token first and -1 for masked tokens -> logits (B, S, V) float32.

    Intermediates (every submodule's output under its official flax path) come from forward hooks keyed by the
    conversion table's module names: `parity_tests.intermediates.capture_torch`.
    """
    x = self.embed(input_ids.long())
    for layer in self.layers:
      x = layer(x)
    return self.mlm(x, self.embed.word_embeddings.weight).float()
