"""The seed family's parameter table: JAX flax path <-> the seed's torch state_dict key + layout transform.

The same `Rule` and `TRANSFORMS` as the official table (`conversion/tables/official.py`), for `transformer.arch=seed`
(valeoai MaskGIT-pytorch v1 `MaskTransformer`) and `tokenizer.arch=taming` (taming `VQModel`). The torch keys
are the seed's own (`maskgit_torch/seed_transformer.py`, `maskgit_torch/taming.py`), so a seed checkpoint's
state_dict is the torch side as it is; the JAX paths follow the flax modules of `maskgit_jax/seed_transformer.py`
and `maskgit_jax/taming.py`. Transforms are pure layout changes (no arithmetic), so seed -> JAX -> seed is
bit-exact:
  dense     nn.Linear weight (out, in) and the packed in_proj_weight (3D, D)  <->  flax kernel (in, out)
  conv      nn.Conv2d weight (out, in, kh, kw)                                <->  flax kernel (kh, kw, in, out)
  identity  LayerNorm/GroupNorm weight <-> scale, biases, embeddings, pos_emb, the (S, V) output bias, codebook

`param_table(config, which)` lists the rules in flax's serialization order (keys sorted at every level), as the
official table does; `state_dict_order(config, which)` gives the torch keys in the seed's own order, which is
also the index order of its AdamW state (`model.parameters()`).
"""

from __future__ import annotations

from conversion.rules import TRANSFORMS, Rule, to_jax, to_torch, torch_shape
from conversion.tables.official import _conv as _conv_rules, _norm  # pylint: disable=protected-access

__all__ = ["ARCHS", "Rule", "TRANSFORMS", "param_table", "state_dict_order", "to_jax", "to_torch", "torch_shape"]

# The architecture each part of the config must have for this table.
ARCHS = {"transformer": "seed", "tokenizer": "taming"}


def _dense(rules, jax_prefix, torch_prefix, cin, cout, weight="weight", bias="bias"):
  rules.append(Rule(f"{jax_prefix}/kernel", f"{torch_prefix}{weight}", "dense", (cin, cout)))
  rules.append(Rule(f"{jax_prefix}/bias", f"{torch_prefix}{bias}", "identity", (cout,)))


def _conv(rules, jax_prefix, torch_prefix, k, cin, cout):
  _conv_rules(rules, jax_prefix, torch_prefix, k, cin, cout, bias=True)  # every taming conv has a bias


# Transformer (valeoai MaskGIT-pytorch v1) --------------------------------------------------------------------------
def _block(rules, i, d, mlp):
  jax_prefix, torch_prefix = f"params/transformer/layers_{i}", f"transformer.layers.{i}"
  attention, ff = f"{jax_prefix}/attention", f"{jax_prefix}/feed_forward"
  _norm(rules, f"{attention}/norm", f"{torch_prefix}.0.norm", d)
  # nn.MultiheadAttention's packed projection: rows [W_q; W_k; W_v] of (3D, D) -> one flax kernel (D, 3D).
  _dense(rules, f"{attention}/fn/in_proj", f"{torch_prefix}.0.fn.mha.", d, 3 * d, "in_proj_weight", "in_proj_bias")
  _dense(rules, f"{attention}/fn/out_proj", f"{torch_prefix}.0.fn.mha.out_proj.", d, d)
  _norm(rules, f"{ff}/norm", f"{torch_prefix}.1.norm", d)
  _dense(rules, f"{ff}/fn/dense_0", f"{torch_prefix}.1.fn.net.0.", d, mlp)
  _dense(rules, f"{ff}/fn/dense_1", f"{torch_prefix}.1.fn.net.3.", mlp, d)


def _transformer_rules(config) -> list[Rule]:
  """In the seed's state_dict order: pos_emb, bias, tok_emb, first_layer, the blocks, last_layer."""
  tr = config.transformer
  d, s, v = tr.num_embeds, config.seq_len, config.vocab_size
  rules = [Rule("params/pos_emb", "pos_emb", "identity", (1, s, d)),
           Rule("params/bias", "bias", "identity", (s, v)),
           Rule("params/tok_emb/embedding", "tok_emb.weight", "identity", (v, d))]
  # first_layer = LN, Dropout, Linear, GELU, LN, Dropout, Linear: weights at indices 0, 2, 4, 6.
  _norm(rules, "params/first_layer/norm_0", "first_layer.0", d)
  _dense(rules, "params/first_layer/dense_0", "first_layer.2.", d, d)
  _norm(rules, "params/first_layer/norm_1", "first_layer.4", d)
  _dense(rules, "params/first_layer/dense_1", "first_layer.6.", d, d)
  for i in range(tr.num_layers):
    _block(rules, i, d, tr.intermediate_size)
  # last_layer = LN, Dropout, Linear, GELU, LN: weights at indices 0, 2, 4.
  _norm(rules, "params/last_layer/norm_0", "last_layer.0", d)
  _dense(rules, "params/last_layer/dense_0", "last_layer.2.", d, d)
  _norm(rules, "params/last_layer/norm_1", "last_layer.4", d)
  return rules


# Tokenizer (taming VQGAN) ----------------------------------------------------------------------------------------
def _resnet_block(rules, jax_prefix, torch_prefix, cin, cout):
  _norm(rules, f"{jax_prefix}/norm1", f"{torch_prefix}.norm1", cin)
  _conv(rules, f"{jax_prefix}/conv1", f"{torch_prefix}.conv1", 3, cin, cout)
  _norm(rules, f"{jax_prefix}/norm2", f"{torch_prefix}.norm2", cout)
  _conv(rules, f"{jax_prefix}/conv2", f"{torch_prefix}.conv2", 3, cout, cout)
  if cin != cout:  # taming's 1x1 shortcut acts on the block input: (out, in, 1, 1)
    _conv(rules, f"{jax_prefix}/nin_shortcut", f"{torch_prefix}.nin_shortcut", 1, cin, cout)


def _attn_block(rules, jax_prefix, torch_prefix, c):
  _norm(rules, f"{jax_prefix}/norm", f"{torch_prefix}.norm", c)
  for name in ("q", "k", "v", "proj_out"):
    _conv(rules, f"{jax_prefix}/{name}", f"{torch_prefix}.{name}", 1, c, c)


def _mid(rules, jax_prefix, torch_prefix, c):
  _resnet_block(rules, f"{jax_prefix}/block_1", f"{torch_prefix}.block_1", c, c)
  _attn_block(rules, f"{jax_prefix}/attn_1", f"{torch_prefix}.attn_1", c)
  _resnet_block(rules, f"{jax_prefix}/block_2", f"{torch_prefix}.block_2", c, c)


def _level(rules, jax_prefix, torch_prefix, cin, cout, num_blocks, attention, resample):
  for j in range(num_blocks):
    _resnet_block(rules, f"{jax_prefix}/block_{j}", f"{torch_prefix}.block.{j}", cin if j == 0 else cout, cout)
  for j in range(num_blocks if attention else 0):
    _attn_block(rules, f"{jax_prefix}/attn_{j}", f"{torch_prefix}.attn.{j}", cout)
  if resample:
    _conv(rules, f"{jax_prefix}/{resample}/conv", f"{torch_prefix}.{resample}.conv", 3, cout, cout)


def _tokenizer_rules(config) -> list[Rule]:
  """In the seed's state_dict order: encoder, decoder, quantize, quant_conv, post_quant_conv."""
  cfg = config.tokenizer
  widths = [cfg.filters * m for m in cfg.channel_multipliers]
  n, rules = len(widths), []
  enc_res, dec_res = cfg.level_resolutions
  _conv(rules, "params/encoder/conv_in", "encoder.conv_in", 3, cfg.in_channels, cfg.filters)
  for lvl in range(n):
    _level(rules, f"params/encoder/down_{lvl}", f"encoder.down.{lvl}", ([cfg.filters] + widths)[lvl], widths[lvl],
           cfg.num_res_blocks, enc_res[lvl] in cfg.attn_resolutions, "downsample" if lvl < n - 1 else None)
  _mid(rules, "params/encoder/mid", "encoder.mid", widths[-1])
  _norm(rules, "params/encoder/norm_out", "encoder.norm_out", widths[-1])
  _conv(rules, "params/encoder/conv_out", "encoder.conv_out", 3, widths[-1], cfg.z_channels)
  _conv(rules, "params/decoder/conv_in", "decoder.conv_in", 3, cfg.z_channels, widths[-1])
  _mid(rules, "params/decoder/mid", "decoder.mid", widths[-1])
  for lvl in range(n):
    _level(rules, f"params/decoder/up_{lvl}", f"decoder.up.{lvl}", (widths[1:] + widths[-1:])[lvl], widths[lvl],
           cfg.num_res_blocks + 1, dec_res[lvl] in cfg.attn_resolutions, "upsample" if lvl > 0 else None)
  _norm(rules, "params/decoder/norm_out", "decoder.norm_out", widths[0])
  _conv(rules, "params/decoder/conv_out", "decoder.conv_out", 3, widths[0], cfg.out_channels)
  rules.append(Rule("params/quantize/embedding/embedding", "quantize.embedding.weight", "identity",
                    (cfg.codebook_size, cfg.embedding_dim)))
  _conv(rules, "params/quant_conv", "quant_conv", 1, cfg.z_channels, cfg.embedding_dim)
  _conv(rules, "params/post_quant_conv", "post_quant_conv", 1, cfg.embedding_dim, cfg.z_channels)
  return rules


_RULES = {"transformer": _transformer_rules, "tokenizer": _tokenizer_rules}


def rules(config, which: str) -> list[Rule]:
  if which not in _RULES:
    raise ValueError(f"which must be 'tokenizer' or 'transformer', got {which!r}")
  arch = getattr(config, which).arch
  if arch != ARCHS[which]:
    raise ValueError(f"conversion.tables.seed maps {which}.arch={ARCHS[which]!r}, the config has {arch!r}")
  return _RULES[which](config)


def state_dict_order(config, which: str) -> list[str]:
  """The torch keys of `which` in the seed's state_dict order (= its AdamW state indices for the transformer)."""
  return [r.torch_key for r in rules(config, which)]


def param_table(config, which: str) -> list[Rule]:
  """Every parameter of `which` ("tokenizer": taming, "transformer": seed) in flax's serialization order."""
  return sorted(rules(config, which), key=lambda r: r.jax_path.split("/"))
