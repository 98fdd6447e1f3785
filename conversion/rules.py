"""One parameter rule: flax path <-> torch state_dict key + a pure numpy layout transform, used in both directions.

A `Transform` is a pair of layout changes (transpose / reshape, no arithmetic) and the torch shape it gives, so
flax -> torch -> flax is bit-exact. The transforms the official family needs (flax -> torch):
  dense            (in, out)            -> nn.Linear weight (out, in)
  conv             (kh, kw, in, out)    -> nn.Conv2d weight (out, in, kh, kw)
  qkv_kernel       (D, heads, hd)       -> nn.Linear weight (heads*hd, D)
  qkv_bias         (heads, hd)          -> (heads*hd,)
  attn_out_kernel  (heads, hd, D)       -> nn.Linear weight (D, heads*hd)
  identity         norm scale -> weight, biases, embedding tables, codebook
A model family with other layouts adds its transforms to `TRANSFORMS` next to its table.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np


class Transform(NamedTuple):
  to_torch: Callable[[np.ndarray], np.ndarray]
  to_jax: Callable[[np.ndarray, tuple], np.ndarray]  # (torch array, flax shape) -> flax array
  torch_shape: Callable[[tuple], tuple]  # flax shape -> torch shape


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda x: x, lambda x, shape: x, lambda s: s),
    "dense": Transform(lambda x: x.T, lambda x, shape: x.T, lambda s: s[::-1]),
    "conv": Transform(lambda x: x.transpose(3, 2, 0, 1), lambda x, shape: x.transpose(2, 3, 1, 0),
                      lambda s: (s[3], s[2], s[0], s[1])),
    "qkv_kernel": Transform(lambda x: x.reshape(x.shape[0], -1).T, lambda x, shape: x.T.reshape(shape),
                            lambda s: (math.prod(s[1:]), s[0])),
    "qkv_bias": Transform(lambda x: x.reshape(-1), lambda x, shape: x.reshape(shape), lambda s: (math.prod(s),)),
    "attn_out_kernel": Transform(lambda x: x.reshape(-1, x.shape[-1]).T, lambda x, shape: x.T.reshape(shape),
                                 lambda s: (s[-1], math.prod(s[:-1]))),
}


class Rule(NamedTuple):
  jax_path: str  # e.g. "params/Embed_0/word_embeddings/embedding"
  torch_key: str  # e.g. "embed.word_embeddings.weight"
  transform: str  # a key of TRANSFORMS
  shape: tuple  # the flax shape this config implies


def torch_shape(rule: Rule) -> tuple:
  """The torch shape of a rule's parameter (the flax shape after its transform)."""
  return tuple(TRANSFORMS[rule.transform].torch_shape(tuple(rule.shape)))


def to_torch(rule: Rule, x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(TRANSFORMS[rule.transform].to_torch(x))


def to_jax(rule: Rule, x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(TRANSFORMS[rule.transform].to_jax(x, tuple(rule.shape)))
