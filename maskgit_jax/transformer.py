"""Bidirectional (BERT-style, post-LN) transformer of MaskGIT, a flax re-implementation of the official one.

The parameter tree is identical to `maskgit.nets.maskgit_transformer.Transformer`:

  Embed_0/{word_embeddings, position_embeddings}/embedding, Embed_0/embeddings_ln
  TransformerLayer_i/Attention_0/{self_attention/{query,key,value,out}, attention_output_ln}
  TransformerLayer_i/Mlp_0/{intermediate_output, layer_output, layer_output_ln}
  MlmLayer_0/{mlm_dense, mlm_ln, mlm_bias/bias}

Mirrors maskgit_torch/transformer.py class for class: every submodule takes the `TransformerConfig` section first,
then the sizes that live outside it (vocab_size, max_position_embeddings), then `dtype` (JAX only; torch uses
autocast); the top-level `Transformer` takes the whole `MaskGITConfig`.

Input ids are (B, S): the class token (K + label) first, then codes in [0, K) or -1 for masked positions. Logits
cover the whole vocabulary V = K + num_class + 1; sampling uses [..., :K].

`dtype` is the compute dtype. float32 (the default) is the parity mode; with bfloat16 the parameters stay float32,
and softmax, LayerNorm statistics and the returned logits are float32. Intermediates come from flax's
`capture_intermediates=True` under the official module paths (`parity_tests.intermediates.flatten_flax`), so a
parity failure points at the first diverging layer. The dropout masks are drawn from the same flax rng paths and
shapes as the official model.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import MaskGITConfig, TransformerConfig


def truncated_normal(stddev: float):
  """The official initializer: a normal truncated to +-2 standard deviations, times stddev."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2, 2, shape, dtype) * stddev
  return init


def gelu(x):
  return jax.nn.gelu(x, approximate=True)  # the official uses jax.nn.gelu's default: the tanh approximation


class Embed(nn.Module):
  """Official `Embed`: LayerNorm(word[ids] + position[arange(S)]), then dropout; no projection (hidden_size=None)."""
  config: TransformerConfig
  vocab_size: int
  max_position_embeddings: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, deterministic: bool):
    tc = self.config
    init = truncated_normal(tc.initializer_range)
    position_ids = jnp.arange(input_ids.shape[-1])[None, :]
    words = nn.Embed(self.vocab_size, tc.num_embeds, embedding_init=init, dtype=self.dtype,
                     name="word_embeddings")(input_ids)
    positions = nn.Embed(self.max_position_embeddings, tc.num_embeds, embedding_init=init, dtype=self.dtype,
                         name="position_embeddings")(position_ids)
    x = nn.LayerNorm(epsilon=tc.layer_norm_eps, dtype=self.dtype, name="embeddings_ln")(words + positions)
    return nn.Dropout(rate=tc.dropout_rate)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
  """Multi-head self-attention with the numerics of flax's MultiHeadDotProductAttention (which the official uses).

  The official passes an all-ones attention mask, which changes nothing, so none is applied here.
  """
  config: TransformerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    tc = self.config
    head_dim = tc.head_dim
    init = truncated_normal(tc.initializer_range)
    dense = functools.partial(nn.DenseGeneral, features=(tc.num_heads, head_dim), axis=-1, kernel_init=init,
                              bias_init=nn.initializers.zeros, dtype=self.dtype)
    query = dense(name="query")(x)  # (B, S, heads, head_dim), kernel (D, heads, head_dim)
    key = dense(name="key")(x)
    value = dense(name="value")(x)
    query = query / jnp.sqrt(head_dim).astype(query.dtype)  # q scaled by 1/sqrt(head_dim) before the product
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key)
    probs = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)  # softmax in float32
    if not deterministic and tc.dropout_rate > 0.0:
      keep_prob = 1.0 - tc.dropout_rate
      # As flax (broadcast_dropout=True): one mask over (q, k), shared by the batch and the heads.
      keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (1, 1) + probs.shape[-2:])
      probs = probs * (keep.astype(self.dtype) / jnp.asarray(keep_prob, dtype=self.dtype))
    out = jnp.einsum("...hqk,...khd->...qhd", probs, value)
    return nn.DenseGeneral(features=tc.num_embeds, axis=(-2, -1), kernel_init=init,
                           bias_init=nn.initializers.zeros, dtype=self.dtype, name="out")(out)


class Attention(nn.Module):
  """Official `Attention`: self-attention, then post-LN around the residual: LN(x + dropout(attn(x)))."""
  config: TransformerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    tc = self.config
    y = SelfAttention(tc, dtype=self.dtype, name="self_attention")(x, deterministic)
    y = nn.Dropout(rate=tc.dropout_rate)(y, deterministic=deterministic)
    return nn.LayerNorm(epsilon=tc.layer_norm_eps, dtype=self.dtype, name="attention_output_ln")(y + x)


class Mlp(nn.Module):
  """Official `Mlp`: LN(x + dropout(W2 gelu(W1 x + b1) + b2)), the tanh GELU."""
  config: TransformerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    tc = self.config
    init = truncated_normal(tc.initializer_range)
    y = nn.Dense(tc.intermediate_size, kernel_init=init, dtype=self.dtype, name="intermediate_output")(x)
    y = nn.Dense(tc.num_embeds, kernel_init=init, dtype=self.dtype, name="layer_output")(gelu(y))
    y = nn.Dropout(rate=tc.dropout_rate)(y, deterministic=deterministic)
    return nn.LayerNorm(epsilon=tc.layer_norm_eps, dtype=self.dtype, name="layer_output_ln")(y + x)


class TransformerLayer(nn.Module):
  """One post-LN layer: Attention, then Mlp."""
  config: TransformerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = Attention(self.config, dtype=self.dtype)(x, deterministic)
    return Mlp(self.config, dtype=self.dtype)(x, deterministic)


class Bias(nn.Module):
  """A learned bias over the last axis (the official MlmLayer's `mlm_bias`)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return x + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


class MlmLayer(nn.Module):
  """Official `MlmLayer`: logits = LN(gelu(Dense(x))) @ word_embeddings.T + bias over V (tied output weights)."""
  config: TransformerConfig
  vocab_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, embeddings):
    tc = self.config
    h = nn.Dense(tc.num_embeds, kernel_init=truncated_normal(tc.initializer_range), dtype=self.dtype,
                 name="mlm_dense")(x)
    h = nn.LayerNorm(epsilon=tc.layer_norm_eps, dtype=self.dtype, name="mlm_ln")(gelu(h))
    logits = jnp.matmul(h, jnp.asarray(embeddings, self.dtype).T)
    return Bias(self.vocab_size, name="mlm_bias")(logits.astype(jnp.float32))


class Transformer(nn.Module):
  """The official MaskGIT transformer: (B, S) token ids -> (B, S, V) float32 logits over the full vocabulary."""
  config: MaskGITConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, deterministic: bool = True):
    cfg, tc = self.config, self.config.transformer
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    # The official lookup relies on jnp.take wrapping negative ids, so the mask id -1 reads row V-1. We wrap
    # explicitly (id + V for negative ids), which gives the same rows without depending on take's index mode.
    ids = jnp.where(ids < 0, ids + cfg.vocab_size, ids)
    x = Embed(tc, cfg.vocab_size, cfg.seq_len, dtype=self.dtype)(ids, deterministic)
    for _ in range(tc.num_layers):
      x = TransformerLayer(tc, dtype=self.dtype)(x, deterministic)
    word_embeddings = self.variables["params"]["Embed_0"]["word_embeddings"]["embedding"]
    return MlmLayer(tc, cfg.vocab_size, dtype=self.dtype)(x, word_embeddings)
