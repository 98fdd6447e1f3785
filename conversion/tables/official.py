"""The official MaskGIT family (arch "maskgit"): every parameter of google-research/maskgit's VQGAN tokenizer and
bidirectional transformer, as flax path <-> torch key + layout transform, derived from the config.

The flax paths are exactly the released checkpoints' tree (`tests/data/imagenet_official_param_trees.txt`); the
torch keys are `maskgit_torch`'s module attributes. `tokenizer_fields` / `transformer_fields` read the config
fields back from a tree's shapes (config inference, and naming the field a wrong config gets wrong).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from conversion.errors import ConversionError
from conversion.rules import Rule


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


def tokenizer_rules(config) -> list[Rule]:
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


def transformer_rules(config) -> list[Rule]:
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


def rules(config, part: str) -> list[Rule]:
  return tokenizer_rules(config) if part == "tokenizer" else transformer_rules(config)


# Which part a bare file holds, from its top-level names ------------------------------------------------------------
def holds_tokenizer(roots: set) -> bool:
  return roots <= {"encoder", "decoder", "quantizer"}


def holds_transformer(roots: set) -> bool:
  return roots <= {"Embed_0", "MlmLayer_0", "embed", "layers", "mlm"} | {
      r for r in roots if r.startswith("TransformerLayer_")}


# Config fields from shapes -----------------------------------------------------------------------------------------
def _indices(flat: Mapping, prefix: str) -> list[int]:
  pattern = re.compile(re.escape(prefix) + r"(\d+)/")
  return sorted({int(m.group(1)) for k in flat for m in [pattern.match(k)] if m})


def _shape(flat: Mapping, path: str, what: str) -> tuple:
  if path not in flat:
    raise ConversionError(f"cannot infer {what}: the checkpoint has no {path}")
  return tuple(np.shape(flat[path]))


def tokenizer_fields(flat: Mapping) -> dict:
  """The TokenizerConfig fields a flax tokenizer tree's shapes imply (num_groups/eps are not in shapes)."""
  codebook_size, embedding_dim = _shape(flat, "params/quantizer/codebook", "codebook_size/embedding_dim")
  filters = _shape(flat, "params/encoder/Conv_0/kernel", "filters")[3]
  # The decoder has one conv in, one after each upsampling and one out: levels = number of decoder convs - 1.
  num_levels = len(_indices(flat, "params/decoder/Conv_")) - 1
  encoder_blocks = len(_indices(flat, "params/encoder/ResBlock_"))
  if num_levels < 1 or encoder_blocks % (num_levels + 1):
    raise ConversionError(f"cannot infer the tokenizer layout: {encoder_blocks} encoder ResBlocks do not split into "
                          f"{num_levels} levels + 1 group of equal size")
  num_res_blocks = encoder_blocks // (num_levels + 1)
  multipliers = []
  for level in range(num_levels):
    width = _shape(flat, f"params/encoder/ResBlock_{level * num_res_blocks}/Conv_1/kernel", "channel_multipliers")[3]
    if width % filters:
      raise ConversionError(f"cannot infer channel_multipliers: level {level} width {width} is not a multiple of "
                            f"filters={filters}")
    multipliers.append(width // filters)
  return dict(filters=filters, channel_multipliers=tuple(multipliers), num_res_blocks=num_res_blocks,
              embedding_dim=embedding_dim, codebook_size=codebook_size)


def transformer_fields(flat: Mapping) -> dict:
  """The TransformerConfig fields (plus seq_len, vocab_size) a flax transformer tree's shapes imply."""
  vocab, hidden = _shape(flat, "params/Embed_0/word_embeddings/embedding", "vocab/hidden size")
  seq_len = _shape(flat, "params/Embed_0/position_embeddings/embedding", "sequence length")[0]
  _, heads, _ = _shape(flat, "params/TransformerLayer_0/Attention_0/self_attention/query/kernel", "num_heads")
  intermediate = _shape(flat, "params/TransformerLayer_0/Mlp_0/intermediate_output/kernel", "intermediate_size")[1]
  return dict(num_layers=len(_indices(flat, "params/TransformerLayer_")), num_embeds=hidden, num_heads=heads,
              intermediate_size=intermediate, seq_len=seq_len, vocab_size=vocab)
