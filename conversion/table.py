"""The one parameter table: official/JAX flax path <-> torch state_dict key + layout transform.

`param_table(config, which)` lists every parameter of the tokenizer or the transformer, derived from the config,
in the order flax serializes them (keys sorted at every level). The same rules drive both directions:
`TRANSFORMS[rule.transform]` is a pair (to_torch(x), to_jax(x, jax_shape)) of pure layout changes (transpose /
reshape, no arithmetic), so official -> torch -> official is bit-exact.

Layouts (flax -> torch):
  dense            (in, out)            -> nn.Linear weight (out, in)
  conv             (kh, kw, in, out)    -> nn.Conv2d weight (out, in, kh, kw)
  qkv_kernel       (D, heads, hd)       -> nn.Linear weight (heads*hd, D)
  qkv_bias         (heads, hd)          -> (heads*hd,)
  attn_out_kernel  (heads, hd, D)       -> nn.Linear weight (D, heads*hd)
  identity         norm scale -> weight, biases, embedding tables, codebook
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np


class Rule(NamedTuple):
  jax_path: str  # e.g. "params/Embed_0/word_embeddings/embedding"
  torch_key: str  # e.g. "embed.word_embeddings.weight"
  transform: str  # a key of TRANSFORMS
  shape: tuple  # the official (flax) shape this config implies


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda x: x, lambda x, shape: x),
    "dense": (lambda x: x.T, lambda x, shape: x.T),
    "conv": (lambda x: x.transpose(3, 2, 0, 1), lambda x, shape: x.transpose(2, 3, 1, 0)),
    "qkv_kernel": (lambda x: x.reshape(x.shape[0], -1).T, lambda x, shape: x.T.reshape(shape)),
    "qkv_bias": (lambda x: x.reshape(-1), lambda x, shape: x.reshape(shape)),
    "attn_out_kernel": (lambda x: x.reshape(-1, x.shape[-1]).T, lambda x, shape: x.T.reshape(shape)),
}


def torch_shape(rule: Rule) -> tuple:
  """The torch shape of a rule's parameter (the official shape after its transform)."""
  s = tuple(rule.shape)
  return {
      "identity": s,
      "dense": s[::-1],
      "conv": (s[3], s[2], s[0], s[1]) if len(s) == 4 else None,
      "qkv_kernel": (math.prod(s[1:]), s[0]),
      "qkv_bias": (math.prod(s),),
      "attn_out_kernel": (s[-1], math.prod(s[:-1])),
  }[rule.transform]


def to_torch(rule: Rule, x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(TRANSFORMS[rule.transform][0](x))


def to_jax(rule: Rule, x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(TRANSFORMS[rule.transform][1](x, tuple(rule.shape)))


# Tokenizer ---------------------------------------------------------------------------------------------------------
def _norm(rules, jax_prefix, torch_prefix, channels):
  rules.append(Rule(f"{jax_prefix}/scale", f"{torch_prefix}.weight", "identity", (channels,)))
  rules.append(Rule(f"{jax_prefix}/bias", f"{torch_prefix}.bias", "identity", (channels,)))


def _conv(rules, jax_prefix, torch_prefix, k, cin, cout, bias):
  rules.append(Rule(f"{jax_prefix}/kernel", f"{torch_prefix}.weight", "conv", (k, k, cin, cout)))
  if bias:
    rules.append(Rule(f"{jax_prefix}/bias", f"{torch_prefix}.bias", "identity", (cout,)))


def _res_block(rules, jax_prefix, torch_prefix, cin, cout):
  _norm(rules, f"{jax_prefix}/GroupNorm_0", f"{torch_prefix}.norm0", cin)
  _conv(rules, f"{jax_prefix}/Conv_0", f"{torch_prefix}.conv0", 3, cin, cout, bias=False)
  _norm(rules, f"{jax_prefix}/GroupNorm_1", f"{torch_prefix}.norm1", cout)
  _conv(rules, f"{jax_prefix}/Conv_1", f"{torch_prefix}.conv1", 3, cout, cout, bias=False)
  if cin != cout:  # the official 1x1 shortcut acts on the block output, hence (1, 1, out, out)
    _conv(rules, f"{jax_prefix}/Conv_2", f"{torch_prefix}.shortcut", 1, cout, cout, bias=False)


def _tokenizer_rules(config) -> list[Rule]:
  cfg = config.tokenizer
  widths = [cfg.filters * m for m in cfg.channel_multipliers]
  n, rules = len(widths), []
  # Encoder: Conv_0, ResBlocks (per level, then num_res_blocks more at the last width), GroupNorm_0, Conv_1.
  _conv(rules, "params/encoder/Conv_0", "encoder.conv_in", 3, 3, cfg.filters, bias=False)
  ch, k = cfg.filters, 0
  for width in widths + [widths[-1]]:
    for _ in range(cfg.num_res_blocks):
      _res_block(rules, f"params/encoder/ResBlock_{k}", f"encoder.blocks.{k}", ch, width)
      ch, k = width, k + 1
  _norm(rules, "params/encoder/GroupNorm_0", "encoder.norm_out", ch)
  _conv(rules, "params/encoder/Conv_1", "encoder.conv_out", 1, ch, cfg.embedding_dim, bias=True)
  # Decoder: Conv_0, ResBlocks (last width, then per level last to first), Conv_1.. after upsampling, last Conv.
  ch, k = widths[-1], 0
  _conv(rules, "params/decoder/Conv_0", "decoder.conv_in", 3, cfg.embedding_dim, ch, bias=True)
  for width in [widths[-1]] + widths[::-1]:
    for _ in range(cfg.num_res_blocks):
      _res_block(rules, f"params/decoder/ResBlock_{k}", f"decoder.blocks.{k}", ch, width)
      ch, k = width, k + 1
  for j, level in enumerate(reversed(range(1, n))):
    _conv(rules, f"params/decoder/Conv_{j + 1}", f"decoder.upsample_convs.{j}", 3, widths[level], widths[level],
          bias=True)
  _norm(rules, "params/decoder/GroupNorm_0", "decoder.norm_out", ch)
  _conv(rules, f"params/decoder/Conv_{n}", "decoder.conv_out", 3, ch, 3, bias=True)
  rules.append(Rule("params/quantizer/codebook", "quantizer.codebook", "identity",
                    (cfg.codebook_size, cfg.embedding_dim)))
  return rules


# Transformer -------------------------------------------------------------------------------------------------------
def _dense(rules, jax_prefix, torch_prefix, cin, cout):
  rules.append(Rule(f"{jax_prefix}/kernel", f"{torch_prefix}.weight", "dense", (cin, cout)))
  rules.append(Rule(f"{jax_prefix}/bias", f"{torch_prefix}.bias", "identity", (cout,)))


def _transformer_rules(config) -> list[Rule]:
  tr = config.transformer
  d, heads, hd, v = tr.num_embeds, tr.num_heads, tr.head_dim, config.vocab_size
  rules = [
      Rule("params/Embed_0/word_embeddings/embedding", "embed.word_embeddings.weight", "identity", (v, d)),
      Rule("params/Embed_0/position_embeddings/embedding", "embed.position_embeddings.weight", "identity",
           (config.seq_len, d)),
  ]
  _norm(rules, "params/Embed_0/embeddings_ln", "embed.embeddings_ln", d)
  for i in range(tr.num_layers):
    jax_att, torch_att = f"params/TransformerLayer_{i}/Attention_0", f"layers.{i}.attention"
    for name in ("query", "key", "value"):
      rules.append(Rule(f"{jax_att}/self_attention/{name}/kernel", f"{torch_att}.self_attention.{name}.weight",
                        "qkv_kernel", (d, heads, hd)))
      rules.append(Rule(f"{jax_att}/self_attention/{name}/bias", f"{torch_att}.self_attention.{name}.bias",
                        "qkv_bias", (heads, hd)))
    rules.append(Rule(f"{jax_att}/self_attention/out/kernel", f"{torch_att}.self_attention.out.weight",
                      "attn_out_kernel", (heads, hd, d)))
    rules.append(Rule(f"{jax_att}/self_attention/out/bias", f"{torch_att}.self_attention.out.bias", "identity",
                      (d,)))
    _norm(rules, f"{jax_att}/attention_output_ln", f"{torch_att}.attention_output_ln", d)
    jax_mlp, torch_mlp = f"params/TransformerLayer_{i}/Mlp_0", f"layers.{i}.mlp"
    _dense(rules, f"{jax_mlp}/intermediate_output", f"{torch_mlp}.intermediate_output", d, tr.intermediate_size)
    _dense(rules, f"{jax_mlp}/layer_output", f"{torch_mlp}.layer_output", tr.intermediate_size, d)
    _norm(rules, f"{jax_mlp}/layer_output_ln", f"{torch_mlp}.layer_output_ln", d)
  _dense(rules, "params/MlmLayer_0/mlm_dense", "mlm.mlm_dense", d, d)
  _norm(rules, "params/MlmLayer_0/mlm_ln", "mlm.mlm_ln", d)
  rules.append(Rule("params/MlmLayer_0/mlm_bias/bias", "mlm.mlm_bias", "identity", (v,)))
  return rules


def param_table(config, which: str) -> list[Rule]:
  """Every parameter of `which` ("tokenizer" or "transformer") for this config, in flax's serialization order."""
  if which == "tokenizer":
    rules = _tokenizer_rules(config)
  elif which == "transformer":
    rules = _transformer_rules(config)
  else:
    raise ValueError(f"which must be 'tokenizer' or 'transformer', got {which!r}")
  # flax serializes variables with dict keys sorted (as strings) at every level; the full path sort is the same.
  return sorted(rules, key=lambda r: r.jax_path.split("/"))
