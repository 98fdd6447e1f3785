"""The seed's transformer (valeoai MaskGIT-pytorch v1 `MaskTransformer`) in flax, mirroring
`maskgit_torch/seed_transformer.py` class for class.

`transformer.arch=seed`. Parameter tree (flax names; `conversion/tables/seed.py` maps each leaf to the seed's key):

  tok_emb/embedding (V, D)     pos_emb (1, S, D)     bias (S, V)
  first_layer/{norm_0, dense_0, norm_1, dense_1}           LN eps 1e-12 (layer_norm_eps)
  transformer/layers_i/attention/{norm, fn/{in_proj, out_proj}}   pre-LN, LN eps 1e-5; in_proj packs q, k, v
  transformer/layers_i/feed_forward/{norm, fn/{dense_0, dense_1}}
  last_layer/{norm_0, dense_0, norm_1}

Input ids are (B, S) with the class token last (maskgit_common/token_layout.py); logits are
`last_layer(x) @ tok_emb.T + bias` sliced to (B, L, K + 1). GELU is exact (erf), as torch's nn.GELU();
LayerNorm uses the two-pass variance (as torch). Initializers draw from the seed's distributions (torch defaults:
N(0, 1) embedding, U(+-1/sqrt(fan_in)) Linear weights and biases, xavier-uniform packed in_proj, zero attention
biases), not its values. `dtype` is the compute dtype: float32 is the parity mode; with bfloat16 the parameters
and LayerNorm statistics stay float32 and the logits are returned in float32. `capture_intermediates=True` keys
the outputs by these module paths (`maskgit_jax.transformer.flatten_intermediates` flattens them).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import MaskGITConfig
from maskgit_common.token_layout import token_layout

TORCH_LAYER_NORM_EPS = 1e-5  # the seed's PreNorm builds nn.LayerNorm(dim): torch's default eps


def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # torch nn.GELU() default: the exact erf form


def torch_uniform_bias(fan_in: int):
  """torch's default nn.Linear/nn.Conv2d bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# torch's default nn.Linear/nn.Conv2d weight (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=TORCH_KERNEL_INIT, bias_init=torch_uniform_bias(fan_in), dtype=dtype,
                  name=name)


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class PreNorm(nn.Module):
  """x -> fn(LayerNorm(x)), LayerNorm eps 1e-5 (torch's default, which the seed's PreNorm keeps)."""
  config: Any  # TransformerConfig
  fn: nn.Module
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    return self.fn(layer_norm(TORCH_LAYER_NORM_EPS, self.dtype, "norm")(x), deterministic)


class SelfAttention(nn.Module):
  """torch nn.MultiheadAttention's maths: packed q/k/v projection (columns [q | k | v] of in_proj), heads as
  contiguous blocks of head_dim, q scaled by 1/sqrt(head_dim), softmax over keys, dropout on the weights, out_proj."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d, heads = self.config.num_embeds, self.config.num_heads
    b, s, _ = x.shape
    qkv = nn.Dense(3 * d, kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
                   dtype=self.dtype, name="in_proj")(x)
    q, k, v = (t.reshape(b, s, heads, d // heads) for t in jnp.split(qkv, 3, axis=-1))
    q = q * jnp.asarray(1.0 / math.sqrt(d // heads), q.dtype)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), axis=-1).astype(self.dtype)
    weights = nn.Dropout(rate=self.config.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, d)
    return nn.Dense(d, kernel_init=TORCH_KERNEL_INIT, bias_init=nn.initializers.zeros, dtype=self.dtype,
                    name="out_proj")(out)


class FeedForward(nn.Module):
  """Dense -> exact GELU -> Dropout -> Dense -> Dropout."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d, mlp, p = self.config.num_embeds, self.config.intermediate_size, self.config.dropout_rate
    x = gelu(dense(mlp, d, self.dtype, "dense_0")(x))
    x = nn.Dropout(rate=p)(x, deterministic=deterministic)
    x = dense(d, mlp, self.dtype, "dense_1")(x)
    return nn.Dropout(rate=p)(x, deterministic=deterministic)


class Block(nn.Module):
  """One pre-LN layer: x + attention(LN(x)), then + feed_forward(LN(.))."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    self.attention = PreNorm(self.config, SelfAttention(self.config, dtype=self.dtype), dtype=self.dtype)
    self.feed_forward = PreNorm(self.config, FeedForward(self.config, dtype=self.dtype), dtype=self.dtype)

  def __call__(self, x, deterministic: bool):
    x = self.attention(x, deterministic) + x
    return self.feed_forward(x, deterministic) + x


class TransformerEncoder(nn.Module):
  """`num_layers` Blocks; no final LayerNorm of its own (last_layer starts with one)."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = [Block(self.config, dtype=self.dtype) for _ in range(self.config.num_layers)]

  def __call__(self, x, deterministic: bool):
    for block in self.layers:
      x = block(x, deterministic)
    return x


class FirstLayer(nn.Module):
  """Before the blocks: LN, Dropout, Dense, GELU, LN, Dropout, Dense (LN eps = layer_norm_eps, 1e-12)."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d, p, eps = self.config.num_embeds, self.config.dropout_rate, self.config.layer_norm_eps
    x = nn.Dropout(rate=p)(layer_norm(eps, self.dtype, "norm_0")(x), deterministic=deterministic)
    x = gelu(dense(d, d, self.dtype, "dense_0")(x))
    x = nn.Dropout(rate=p)(layer_norm(eps, self.dtype, "norm_1")(x), deterministic=deterministic)
    return dense(d, d, self.dtype, "dense_1")(x)


class LastLayer(nn.Module):
  """After the blocks: LN, Dropout, Dense, GELU, LN (eps = layer_norm_eps, 1e-12)."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d, p, eps = self.config.num_embeds, self.config.dropout_rate, self.config.layer_norm_eps
    x = nn.Dropout(rate=p)(layer_norm(eps, self.dtype, "norm_0")(x), deterministic=deterministic)
    x = gelu(dense(d, d, self.dtype, "dense_0")(x))
    return layer_norm(eps, self.dtype, "norm_1")(x)


class MaskTransformer(nn.Module):
  """The seed's transformer: (B, S) token ids -> (B, L, K + 1) float32 logits."""
  config: MaskGITConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg, tr = self.config, self.config.transformer
    self.layout = token_layout(cfg)
    self.tok_emb = nn.Embed(cfg.vocab_size, tr.num_embeds, embedding_init=nn.initializers.normal(1.0),
                            dtype=self.dtype)
    # torch: trunc_normal_(std=0.02) with absolute bounds +-2 (100 std): a plain normal in effect.
    self.pos_emb = self.param("pos_emb", nn.initializers.normal(0.02), (1, cfg.seq_len, tr.num_embeds))
    self.first_layer = FirstLayer(tr, dtype=self.dtype)
    self.transformer = TransformerEncoder(tr, dtype=self.dtype)
    self.last_layer = LastLayer(tr, dtype=self.dtype)
    self.bias = self.param("bias", nn.initializers.zeros, (cfg.seq_len, cfg.vocab_size))

  def __call__(self, input_ids, deterministic: bool = True):
    x = self.tok_emb(jnp.asarray(input_ids).astype(jnp.int32)) + jnp.asarray(self.pos_emb, self.dtype)
    x = self.last_layer(self.transformer(self.first_layer(x, deterministic), deterministic), deterministic)
    # Tied output projection (x @ tok_emb.T) plus the per-position bias, then image positions and K + 1 columns.
    logits = self.tok_emb.attend(x).astype(jnp.float32) + self.bias
    return logits[:, :self.layout.seq_len, :self.layout.logits_width]
