"""torch vs JAX on converted full-size seed models, and where the transformer logits' difference comes from.

    python benchmarks/convert_seed_logits.py TORCH_DIR JAX_DIR     (benchmarks/convert_seed.py runs it)

Both directories are loaded as a user loads them (maskgit_*.checkpoint.load_checkpoint). On a random half-masked
batch: the logits of both backends, against a float64 truth (the torch module in double precision), and split in
two: the last_layer output x (everything before the tied output projection), and the projection x @ tok_emb.T
itself, computed from the same x by torch, by JAX and in float64. The seed's init draws tok_emb from N(0, 1), so the
projection is a 768-term sum of O(1) products whose result reaches ~100: float32 rounds each logit by several ulps
of that, differently in each framework's matrix product (MKL/oneDNN vs XLA/Eigen blocking). Also decoded images of
random codes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _batch(config):
  import numpy as np
  from maskgit_common.token_layout import token_layout
  layout, rng = token_layout(config), np.random.default_rng(0)
  codes = rng.integers(0, config.codebook_size, (2, config.latent_size, config.latent_size))
  masked = np.where(rng.random(codes.shape) < 0.5, layout.mask_id, codes)
  return layout.sequence(masked, layout.class_tokens(rng.integers(0, config.num_class, 2))), codes


def _max(a, b) -> float:
  import numpy as np
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def measure(torch_dir: str, jax_dir: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from maskgit_jax import checkpoint as jax_checkpoint, families
  from maskgit_torch import checkpoint as torch_checkpoint
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.set_float32_matmul_precision("highest")
  config, modules = torch_checkpoint.load_checkpoint(torch_dir)
  _, variables = jax_checkpoint.load_checkpoint(jax_dir)
  ids, codes = _batch(config)
  transformer = modules["transformer"]
  captured = {}
  hook = transformer.last_layer.register_forward_hook(lambda m, a, out: captured.update(x=out.detach()))
  with torch.inference_mode():
    ours = transformer(torch.from_numpy(ids)).numpy()
  hook.remove()
  jax_model = families.model_class(config, "transformer")(config)
  theirs, state = jax.jit(lambda v, i: jax_model.apply(v, i, capture_intermediates=True, mutable=["intermediates"]))(
      variables["transformer"], ids)
  x_jax = np.asarray(state["intermediates"]["last_layer"]["__call__"][0])
  x_torch = captured["x"].numpy()
  hook = transformer.last_layer.register_forward_hook(lambda m, a, out: captured.update(x=out.detach()))
  with torch.inference_mode():
    exact = transformer.double()(torch.from_numpy(ids)).numpy()
    transformer.float()
  hook.remove()
  x_exact = captured["x"].numpy()
  emb, bias = transformer.tok_emb.weight.detach().numpy(), transformer.bias.detach().numpy()
  l, k = config.seq_len - 1, config.codebook_size + 1
  head = {  # the projection alone, from torch's x: the same inputs, three ways of summing
      "torch": (torch.from_numpy(x_torch) @ torch.from_numpy(emb).T + torch.from_numpy(bias)).numpy(),
      "jax": np.asarray(jnp.dot(jnp.asarray(x_torch), jnp.asarray(emb).T) + bias),
      "float64": x_torch.astype(np.float64) @ emb.T.astype(np.float64) + bias}
  head = {n: v[:, :l, :k] for n, v in head.items()}
  peak = float(np.max(np.abs(exact)))
  out = {"transformer": {
      "max_abs_diff": _max(ours, theirs), "max_abs": peak, "ulp_at_max": 2.0 ** (math.floor(math.log2(peak)) - 23),
      "torch_vs_float64": _max(ours, exact), "jax_vs_float64": _max(theirs, exact),
      "last_layer_out_torch_vs_jax": _max(x_torch, x_jax), "last_layer_out_torch_vs_float64": _max(x_torch, x_exact),
      "last_layer_out_jax_vs_float64": _max(x_jax, x_exact),
      "head_torch_vs_jax_same_x": _max(head["torch"], head["jax"]),
      "head_torch_vs_float64_same_x": _max(head["torch"], head["float64"]),
      "head_jax_vs_float64_same_x": _max(head["jax"], head["float64"]),
      "torch_vs_jax_with_float64_head": _max(ours, _jax_with_exact_head(x_jax, emb, bias, l, k))}}
  with torch.inference_mode():
    images = modules["tokenizer"].decode_from_indices(torch.from_numpy(codes)).numpy()
  tokenizer = families.model_class(config, "tokenizer")(config)
  jax_images = jax.jit(lambda v, c: tokenizer.apply(v, c, method=type(tokenizer).decode_from_indices))(
      variables["tokenizer"], codes)
  out["tokenizer"] = {"max_abs_diff": _max(images, jax_images), "max_abs": float(np.max(np.abs(images)))}
  return out


def _jax_with_exact_head(x_jax, emb, bias, l, k):
  """JAX's last_layer output projected in float64: what the best possible JAX projection would give."""
  import numpy as np
  return (x_jax.astype(np.float64) @ emb.T.astype(np.float64) + bias)[:, :l, :k]


def run(torch_dir: str, jax_dir: str) -> dict:
  """Measures in a subprocess and prints the findings; returns the numbers."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), torch_dir, jax_dir], cwd=ROOT,
                        capture_output=True, text=True, env=env)
  if proc.returncode:
    raise SystemExit(f"logits measurement failed:\n{proc.stderr}")
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  t = r["transformer"]
  print(f"torch vs jax logits: max abs diff {t['max_abs_diff']:.3g} (max |logit| {t['max_abs']:.3g}, a float32 ulp "
        f"there {t['ulp_at_max']:.2g}); from the float64 truth: torch {t['torch_vs_float64']:.3g}, JAX "
        f"{t['jax_vs_float64']:.3g}")
  print(f"  last_layer output torch vs JAX {t['last_layer_out_torch_vs_jax']:.3g} (from float64: torch "
        f"{t['last_layer_out_torch_vs_float64']:.3g}, JAX {t['last_layer_out_jax_vs_float64']:.3g}); the projection "
        f"alone from the "
        f"same x: torch vs JAX {t['head_torch_vs_jax_same_x']:.3g}, torch vs float64 "
        f"{t['head_torch_vs_float64_same_x']:.3g}, JAX vs float64 {t['head_jax_vs_float64_same_x']:.3g}; torch vs "
        f"JAX with an exact (float64) projection {t['torch_vs_jax_with_float64_head']:.3g}")
  print(f"torch vs jax decoded images: max abs diff {r['tokenizer']['max_abs_diff']:.3g}")
  return r


if __name__ == "__main__":
  print(json.dumps(measure(sys.argv[1], sys.argv[2])))
