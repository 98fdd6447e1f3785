"""Bidirectional (BERT-style, post-LN) transformer of MaskGIT, a flax re-implementation of the official one.

The parameter tree is identical to `maskgit.nets.maskgit_transformer.Transformer`:

  Embed_0/{word_embeddings, position_embeddings}/embedding, Embed_0/embeddings_ln
  TransformerLayer_i/Attention_0/{self_attention/{query,key,value,out}, attention_output_ln}
  TransformerLayer_i/Mlp_0/{intermediate_output, layer_output, layer_output_ln}
  MlmLayer_0/{mlm_dense, mlm_ln, mlm_bias/bias}

Input ids are (B, S): the class token (K + label) first, then codes in [0, K) or -1 for masked positions. Logits
cover the whole vocabulary V = K + num_class + 1; sampling uses [..., :K].

`dtype` is the compute dtype. float32 (the default) is the parity mode; with bfloat16 the parameters stay float32,
and softmax, LayerNorm statistics and the returned logits are float32. `capture_intermediates=True` yields the
official module paths (see `flatten_intermediates`), so a parity failure points at the first diverging layer.
The dropout masks are drawn from the same flax rng paths and shapes as the official model.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import MaskGITConfig


def truncated_normal(stddev: float):
  """The official initializer: a normal truncated to +-2 standard deviations, times stddev."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2, 2, shape, dtype) * stddev
  return init


def gelu(x):
  return jax.nn.gelu(x, approximate=True)  # the official uses jax.nn.gelu's default: the tanh approximation


class Embed(nn.Module):
  """LayerNorm(word[ids] + position[arange(S)]), then dropout; no projection (the official hidden_size=None)."""
  vocab_size: int
  max_position_embeddings: int
  hidden_size: int
  dropout_rate: float
  layer_norm_eps: float
  initializer_range: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, deterministic: bool):
    init = truncated_normal(self.initializer_range)
    position_ids = jnp.arange(input_ids.shape[-1])[None, :]
    words = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, dtype=self.dtype,
                     name="word_embeddings")(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, embedding_init=init, dtype=self.dtype,
                         name="position_embeddings")(position_ids)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="embeddings_ln")(words + positions)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
  """Multi-head self-attention with the numerics of flax's MultiHeadDotProductAttention (which the official uses).

  The official passes an all-ones attention mask, which changes nothing, so none is applied here.
  """
  num_heads: int
  hidden_size: int
  dropout_rate: float
  initializer_range: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    head_dim = self.hidden_size // self.num_heads
    init = truncated_normal(self.initializer_range)
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim), axis=-1, kernel_init=init,
                              bias_init=nn.initializers.zeros, dtype=self.dtype)
    query = dense(name="query")(x)  # (B, S, heads, head_dim), kernel (D, heads, head_dim)
    key = dense(name="key")(x)
    value = dense(name="value")(x)
    query = query / jnp.sqrt(head_dim).astype(query.dtype)  # q scaled by 1/sqrt(head_dim) before the product
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key)
    probs = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)  # softmax in float32
    if not deterministic and self.dropout_rate > 0.0:
      keep_prob = 1.0 - self.dropout_rate
      # As flax (broadcast_dropout=True): one mask over (q, k), shared by the batch and the heads.
      keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (1, 1) + probs.shape[-2:])
      probs = probs * (keep.astype(self.dtype) / jnp.asarray(keep_prob, dtype=self.dtype))
    out = jnp.einsum("...hqk,...khd->...qhd", probs, value)
    return nn.DenseGeneral(features=self.hidden_size, axis=(-2, -1), kernel_init=init,
                           bias_init=nn.initializers.zeros, dtype=self.dtype, name="out")(out)


class Attention(nn.Module):
  """Post-LN attention block: LN(x + dropout(attn(x)))."""
  hidden_size: int
  num_heads: int
  dropout_rate: float
  layer_norm_eps: float
  initializer_range: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = SelfAttention(self.num_heads, self.hidden_size, self.dropout_rate, self.initializer_range,
                      dtype=self.dtype, name="self_attention")(x, deterministic)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="attention_output_ln")(y + x)


class Mlp(nn.Module):
  """Post-LN MLP block: LN(x + dropout(W2 gelu(W1 x + b1) + b2))."""
  hidden_size: int
  intermediate_size: int
  dropout_rate: float
  layer_norm_eps: float
  initializer_range: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    init = truncated_normal(self.initializer_range)
    y = nn.Dense(self.intermediate_size, kernel_init=init, dtype=self.dtype, name="intermediate_output")(x)
    y = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="layer_output")(gelu(y))
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_output_ln")(y + x)


class TransformerLayer(nn.Module):
  hidden_size: int
  num_heads: int
  intermediate_size: int
  dropout_rate: float
  layer_norm_eps: float
  initializer_range: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = Attention(self.hidden_size, self.num_heads, self.dropout_rate, self.layer_norm_eps,
                  self.initializer_range, dtype=self.dtype)(x, deterministic)
    return Mlp(self.hidden_size, self.intermediate_size, self.dropout_rate, self.layer_norm_eps,
               self.initializer_range, dtype=self.dtype)(x, deterministic)


class Bias(nn.Module):
  """A learned bias over the last axis (the official MlmLayer's `mlm_bias`)."""

  @nn.compact
  def __call__(self, x):
    return x + self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)


class MlmLayer(nn.Module):
  """logits = LN(gelu(Dense(x))) @ word_embeddings.T + bias: output weights tied to the input embedding."""
  hidden_size: int
  layer_norm_eps: float
  initializer_range: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, embeddings):
    h = nn.Dense(self.hidden_size, kernel_init=truncated_normal(self.initializer_range), dtype=self.dtype,
                 name="mlm_dense")(x)
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="mlm_ln")(gelu(h))
    logits = jnp.matmul(h, jnp.asarray(embeddings, self.dtype).T)
    return Bias(name="mlm_bias")(logits.astype(jnp.float32))


class Transformer(nn.Module):
  """MaskGIT transformer: (B, S) token ids -> (B, S, V) float32 logits."""
  config: MaskGITConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, deterministic: bool = True):
    cfg, tc = self.config, self.config.transformer
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    # The official lookup relies on jnp.take wrapping negative ids, so the mask id -1 reads row V-1. We wrap
    # explicitly (id + V for negative ids), which gives the same rows without depending on take's index mode.
    ids = jnp.where(ids < 0, ids + cfg.vocab_size, ids)
    x = Embed(cfg.vocab_size, cfg.seq_len, tc.num_embeds, tc.dropout_rate, tc.layer_norm_eps,
              tc.initializer_range, dtype=self.dtype)(ids, deterministic)
    for _ in range(tc.num_layers):
      x = TransformerLayer(tc.num_embeds, tc.num_heads, tc.intermediate_size, tc.dropout_rate, tc.layer_norm_eps,
                           tc.initializer_range, dtype=self.dtype)(x, deterministic)
    word_embeddings = self.variables["params"]["Embed_0"]["word_embeddings"]["embedding"]
    return MlmLayer(tc.num_embeds, tc.layer_norm_eps, tc.initializer_range, dtype=self.dtype)(x, word_embeddings)


def flatten_intermediates(intermediates) -> dict:
  """flax `capture_intermediates` output -> {official module path: array}; the top-level output is "output".

  The keys match `transformer_intermediates.npz` (e.g. "TransformerLayer_0/Attention_0/self_attention/query").
  """
  flat = {}

  def visit(node, path):
    for name, value in node.items():
      if name == "__call__":
        flat["/".join(path) or "output"] = value[0]
      else:
        visit(value, path + (name,))

  visit(intermediates.get("intermediates", intermediates), ())
  return flat
