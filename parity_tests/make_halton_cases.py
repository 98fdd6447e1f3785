"""Stored cases for `sampler.decoder=halton`, made by running Halton-MaskGIT's own sampler.

    python -m parity_tests.make_halton_cases --halton /path/to/Halton-MaskGIT --out parity_tests/data_halton

imports `Sampler/halton_sampler.py` from a checkout the user gives (valeoai/Halton-MaskGIT, f61b0a1; nothing is
fetched, none of its code is kept here) and calls `HaltonSampler(...)(trainer, init_code, nb_sample, labels)`
unmodified, with a stand-in trainer:
  - the network is `stand_in_logits`: logits[n, l] = A[l] + B[token at (l + 1) mod L] + C[class or null], exact
    multiples of 2^-16 (every framework computes them bit for bit), so the trajectory checks the sampler alone;
  - the draws are injected and recorded, as the seed's fixtures do: `torch.distributions.Categorical(probs).sample()`
    becomes argmax(log(probs) + G) and, with top_k, `torch.multinomial(top_k_probs)` becomes
    argmax(log(top_k_probs) + G at the top-k ids) (G float32 -log(-log(U)), U from a seeded torch.Generator); the
    order roll's `torch.randint` runs under torch.manual_seed and its result is recorded;
  - the trajectory: each step's input codes (the network's conditional rows), `l_codes` (the step's predictions),
    `l_mask` (the cells written), the final codes (`init_code`, which the sampler writes in place) and the clamped
    codes it decodes.
Each `<case>.npz` holds the settings, labels, tables, draws and trajectory; `orders.npz` holds
`build_halton_mask(side)` for every side 1..64 (as flat row * side + col); `cases.json` says how they were made.
Regenerate only on purpose: tests/test_halton_sampler.py checks both backends against these files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
from unittest import mock

import numpy as np

# name: (side, codebook K, classes C, batch, steps, w, sm_temp_min, sm_temp_max, temp_pow, temp_warmup, randomize,
#        top_k). They cover CFG on and off, the temperature ramp and warm-up, exponents, top-k, the roll, more steps
#        than cells, a side that is a multiple of 9 and the 24 x 24 grid of its 384px models. (Sides whose 10,000
#        points miss cells, 50, 52, 53 and >= 55, make its sampler fail: `expand` / assignment of M < N cells.)
CASES = {
    "cfg_ramp": (4, 16, 10, 3, 6, 2.0, 1.0, 1.5, 1.0, 0, False, -1),
    "roll_topk_warmup": (8, 32, 10, 2, 12, 0.0, 0.8, 1.2, 2.0, 2, True, 5),
    "steps_exceed_cells": (3, 8, 4, 2, 16, 1.5, 1.0, 1.0, 1.0, 1, False, -1),
    "side_9_roll": (9, 12, 5, 2, 8, 0.7, 1.0, 1.3, 0.5, 0, True, -1),
    "side_24_topk": (24, 8, 3, 1, 5, 1.0, 1.0, 1.0, 3.0, 0, False, 3),
}
FIELDS = ("side", "codebook_size", "num_class", "batch", "steps", "w", "sm_temp_min", "sm_temp_max", "temp_pow",
          "temp_warmup", "randomize", "top_k")


def stand_in_tables(side: int, codebook_size: int, num_class: int, seed: int) -> dict:
  """A (L, K+1), B (K+1, K+1), C (num_class+1, K+1): multiples of 2^-16 in (-4, 4), so every sum of three is exact
  in float32, and fine enough that two tokens' logits (top-k's boundary) practically never tie."""
  rng = np.random.default_rng(seed)
  width, step = codebook_size + 1, np.float32(2.0 ** -16)
  table = lambda *shape: rng.integers(-2 ** 18 + 1, 2 ** 18, shape).astype(np.float32) * step
  return {"table_position": table(side * side, width), "table_neighbour": table(width, width),
          "table_class": table(num_class + 1, width)}


def stand_in_logits(tables: dict, codes, class_index, xp):
  """(N, L, K+1) logits of codes (N, L) in [0, K] and class_index (N,) in [0, C] (C = the null class); `xp` is
  torch or jax.numpy, `tables` that framework's arrays."""
  neighbour = xp.concatenate([codes[:, 1:], codes[:, :1]], axis=1) if xp.__name__ != "torch" else \
      xp.roll(codes, -1, dims=1)
  return (tables["table_position"][None] + tables["table_neighbour"][neighbour]
          + tables["table_class"][class_index][:, None, :])


class _Recorder:
  """The injected draws (module docstring) and the network's inputs, in the order the sampler consumes them."""

  def __init__(self, torch, draws):
    self.torch, self.draws, self.step, self.inputs, self.top_ids = torch, draws, 0, [], None
    self.real_topk, self.real_randint, self.rolls = torch.topk, torch.randint, []

  def categorical(self, probs):
    torch, g = self.torch, self.draws[self.step]
    self.step += 1
    return types.SimpleNamespace(sample=lambda: torch.argmax(torch.log(probs) + g, dim=-1))

  def topk(self, x, k, *args, **kwargs):
    values, ids = self.real_topk(x, k, *args, **kwargs)
    self.top_ids = ids
    return values, ids

  def multinomial(self, probs, num_samples):
    assert num_samples == 1
    torch, g = self.torch, self.draws[self.step]
    self.step += 1
    g_top = torch.gather(g, -1, self.top_ids).reshape(probs.shape)
    return torch.argmax(torch.log(probs) + g_top, dim=-1, keepdim=True)

  def randint(self, *args, **kwargs):
    out = self.real_randint(*args, **kwargs)
    self.rolls.append(out.clone())
    return out


def run_case(sampler_module, torch, name: str, index: int) -> dict:
  side, k, c, b, steps, w, t_min, t_max, t_pow, warmup, randomize, top_k = CASES[name]
  tables = stand_in_tables(side, k, c, seed=index)
  torch_tables = {n: torch.from_numpy(v) for n, v in tables.items()}
  generator = torch.Generator().manual_seed(1000 + index)
  u = torch.rand((steps, b, side * side, k + 1), generator=generator, dtype=torch.float64)
  draws = (-torch.log(-torch.log(u))).float()
  labels = torch.from_numpy(np.random.default_rng(index).integers(0, c, b))
  recorder = _Recorder(torch, draws)

  class Network(torch.nn.Module):
    def forward(self, x, y, drop_label):
      recorder.inputs.append(x[:b].reshape(b, -1).clone())
      cls = torch.where(drop_label, torch.full_like(y, c), y)
      return stand_in_logits(torch_tables, x.reshape(len(x), -1), cls, torch)

  decoded = []
  trainer = types.SimpleNamespace(
      input_size=side, vit=Network(), autocast=contextlib.nullcontext(),
      args=types.SimpleNamespace(device="cpu", mask_value=k, codebook_size=k),
      ae=types.SimpleNamespace(decode_code=lambda code: decoded.append(code.clone()) or code.float()[:, None]))
  sampler = sampler_module.HaltonSampler(sm_temp_min=t_min, sm_temp_max=t_max, temp_pow=t_pow, w=w, step=steps,
                                         randomize=randomize, top_k=top_k, temp_warmup=warmup)
  code = torch.full((b, side, side), k)
  torch.manual_seed(2000 + index)
  with mock.patch.object(torch.distributions, "Categorical", recorder.categorical), \
       mock.patch.object(torch, "topk", recorder.topk), mock.patch.object(torch, "multinomial", recorder.multinomial), \
       mock.patch.object(torch, "randint", recorder.randint):
    _, l_codes, l_mask = sampler(trainer, init_code=code, nb_sample=b, labels=labels, verbose=False)
  assert recorder.step == steps and len(recorder.inputs) == steps
  settings = dict(zip(FIELDS, CASES[name]))
  return {**{f: np.asarray(v) for f, v in settings.items()}, **tables, "labels": labels.numpy(),
          "draws_gumbel": draws.numpy(),
          "order_roll": recorder.rolls[0].numpy() if recorder.rolls else np.zeros(0, np.int64),
          "step_code_in": torch.stack(recorder.inputs).numpy(),
          "step_pred": torch.stack(l_codes).reshape(steps, b, -1).numpy(),
          "step_cells": torch.stack(l_mask).reshape(steps, b, -1).numpy() > 0,
          "final_code": code.reshape(b, -1).numpy(), "final_code_clamped": decoded[0].reshape(b, -1).numpy()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--halton", required=True, help="a checkout of valeoai/Halton-MaskGIT (commit f61b0a1)")
  parser.add_argument("--commit", default="f61b0a1", help="the checkout's commit, recorded in cases.json")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  from maskgit_common import fileio  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.abspath(args.halton))
  from Sampler import halton_sampler  # pylint: disable=import-outside-toplevel,import-error
  torch.set_num_threads(1)
  os.makedirs(args.out, exist_ok=True)
  for index, name in enumerate(CASES):
    arrays = run_case(halton_sampler, torch, name, index)
    fileio.atomic_write(os.path.join(args.out, f"{name}.npz"), lambda f, a=arrays: np.savez_compressed(f, **a))
    print(f"wrote {name}.npz")
  orders = {}
  for side in range(1, 65):
    cells = halton_sampler.HaltonSampler.build_halton_mask(side).numpy()
    orders[f"side_{side}"] = (cells[:, 0] * side + cells[:, 1]).astype(np.int16)
  fileio.atomic_write(os.path.join(args.out, "orders.npz"), lambda f: np.savez_compressed(f, **orders))
  index = {"generated_by": "parity_tests/make_halton_cases.py", "halton_maskgit_commit": args.commit,
           "torch": torch.__version__, "numpy": np.__version__, "fields": list(FIELDS),
           "cases": {n: dict(zip(FIELDS, v)) for n, v in CASES.items()}}
  fileio.atomic_write_json(os.path.join(args.out, "cases.json"), index)
  print(f"wrote orders.npz, cases.json to {args.out}")


if __name__ == "__main__":
  main()
