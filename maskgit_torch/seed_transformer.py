"""The seed's transformer (valeoai MaskGIT-pytorch v1, `Network/transformer.py` `MaskTransformer`) in PyTorch.

`transformer.arch=seed`. Module attributes carry the seed's names, so its checkpoints (`MaskGIT/*.pth`
`model_state_dict`) load with `load_state_dict(strict=True)` unchanged, and the seed's own class loads ours:

  tok_emb (V, D)         V = K + 1 + C + 1 rows: codes, the mask id K, C classes, the null class
  pos_emb (1, S, D)      S = L + 1
  first_layer.{0..6}     LayerNorm(eps 1e-12), Dropout, Linear, GELU, LayerNorm(eps 1e-12), Dropout, Linear
  transformer.layers.i   pre-LN blocks: .0 = PreNorm(attention), .1 = PreNorm(feed-forward); LayerNorm eps 1e-5
  last_layer.{0..4}      LayerNorm(eps 1e-12), Dropout, Linear, GELU, LayerNorm(eps 1e-12)
  bias (S, V)            a per-position output bias
  logits = last_layer(x) @ tok_emb.weight.T + bias, sliced to [:, :L, :K+1] (image positions, codes + mask id)

Where the class token sits and the special ids are the token layout's (`maskgit_common/token_layout.py`: class
token last, mask id K, class id K + 1 + label, null class K + 1 + C); callers build the (B, S) input ids with it.
The seed's numerics are kept by using the same torch modules in the same order: nn.MultiheadAttention (packed
in_proj weights, called as the seed calls it), exact (erf) nn.GELU, the same LayerNorm eps, and the same init, so
`torch.manual_seed(s)` then this class gives the seed's own random weights. `maskgit_jax/seed_transformer.py`
mirrors it class for class; `conversion/tables/seed.py` maps the parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from maskgit_common.token_layout import token_layout


class PreNorm(nn.Module):
  """x -> fn(LayerNorm(x)), LayerNorm at torch's default eps 1e-5 (the seed's PreNorm does not set it)."""

  def __init__(self, config, fn: nn.Module):
    super().__init__()
    self.norm = nn.LayerNorm(config.num_embeds)
    self.fn = fn

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fn(self.norm(x))


class SelfAttention(nn.Module):
  """nn.MultiheadAttention over the sequence, biased, with dropout on the attention weights (train mode)."""

  def __init__(self, config):
    super().__init__()
    self.mha = nn.MultiheadAttention(config.num_embeds, num_heads=config.num_heads, dropout=config.dropout_rate,
                                     batch_first=True, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # Called exactly as the seed calls it (need_weights left at True), so torch takes the same kernels, fused fast
    # path included; the head-averaged weights it also returns are unused (a forward hook on `mha` sees them).
    return self.mha(x, x, x)[0]


class FeedForward(nn.Module):
  """Linear -> exact GELU -> Dropout -> Linear -> Dropout (`net.0`, `net.3` hold the weights)."""

  def __init__(self, config):
    super().__init__()
    d, p = config.num_embeds, config.dropout_rate
    self.net = nn.Sequential(nn.Linear(d, config.intermediate_size), nn.GELU(), nn.Dropout(p),
                             nn.Linear(config.intermediate_size, d), nn.Dropout(p))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.net(x)


class Block(nn.ModuleList):
  """One pre-LN layer: x + attention(LN(x)), then + feed_forward(LN(.)). A ModuleList so that the keys are the
  seed's `layers.<i>.0` / `layers.<i>.1`."""

  def __init__(self, config):
    super().__init__([PreNorm(config, SelfAttention(config)), PreNorm(config, FeedForward(config))])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    attention, feed_forward = self
    x = attention(x) + x
    return feed_forward(x) + x


class TransformerEncoder(nn.Module):
  """`num_layers` Blocks; no final LayerNorm of its own (last_layer starts with one)."""

  def __init__(self, config):
    super().__init__()
    self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for block in self.layers:
      x = block(x)
    return x


class FirstLayer(nn.Sequential):
  """Before the blocks: LN, Dropout, Linear, GELU, LN, Dropout, Linear (LayerNorm eps = layer_norm_eps, 1e-12)."""

  def __init__(self, config):
    d, p, eps = config.num_embeds, config.dropout_rate, config.layer_norm_eps
    super().__init__(nn.LayerNorm(d, eps=eps), nn.Dropout(p), nn.Linear(d, d), nn.GELU(),
                     nn.LayerNorm(d, eps=eps), nn.Dropout(p), nn.Linear(d, d))


class LastLayer(nn.Sequential):
  """After the blocks: LN, Dropout, Linear, GELU, LN (eps = layer_norm_eps, 1e-12)."""

  def __init__(self, config):
    d, p, eps = config.num_embeds, config.dropout_rate, config.layer_norm_eps
    super().__init__(nn.LayerNorm(d, eps=eps), nn.Dropout(p), nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=eps))


class MaskTransformer(nn.Module):
  """The seed's transformer. `forward(input_ids (B, S))` -> logits (B, L, K + 1) float32."""

  def __init__(self, config):
    super().__init__()
    tr = config.transformer
    self.config = config
    self.layout = token_layout(config)
    # Created in the seed's order, with its initializers: the same torch.manual_seed gives the same weights.
    self.tok_emb = nn.Embedding(config.vocab_size, tr.num_embeds)  # N(0, 1)
    self.pos_emb = nn.Parameter(torch.zeros(1, config.seq_len, tr.num_embeds))
    nn.init.trunc_normal_(self.pos_emb, 0.0, 0.02)  # bounds +-2 absolute, i.e. +-100 std: in effect untruncated
    self.first_layer = FirstLayer(tr)
    self.transformer = TransformerEncoder(tr)
    self.last_layer = LastLayer(tr)
    self.bias = nn.Parameter(torch.zeros(config.seq_len, config.vocab_size))
    # Parameter order (= the seed's AdamW state indices): the module's own pos_emb and bias first, then tok_emb,
    # first_layer, transformer, last_layer, because nn.Module lists its own parameters before its children's.

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids (B, S): image tokens (codes, or the mask id K) then the class token (layout.sequence)."""
    x = self.tok_emb(input_ids.long()) + self.pos_emb
    x = self.last_layer(self.transformer(self.first_layer(x)))
    # The output projection is tied to the token embedding, plus the (S, V) bias; the full product is computed
    # and then sliced, as the seed does, so the matmul rounds as the seed's.
    logits = torch.matmul(x, self.tok_emb.weight.T) + self.bias
    return logits[:, :self.layout.seq_len, :self.layout.logits_width]
