"""decoder=halton against Halton-MaskGIT's own sampler (parity_tests/data_halton, made by
parity_tests/make_halton_cases.py from its code with a stand-in network and recorded draws): both backends follow
every stored trajectory step for step; the order equals its `build_halton_mask` for every grid side 1..64; its
cumulative counts and temperatures equal its torch expressions."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import configs
from maskgit_common import decode_plan, halton, seed_schedules
from maskgit_common.token_layout import seed_layout
from maskgit_jax import sampler as jax_sampler
from maskgit_torch import sampler as torch_sampler
from parity_tests import make_halton_cases

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity_tests", "data_halton")
with open(os.path.join(DATA, "cases.json")) as _f:
  INDEX = json.load(_f)


def load(name):
  with np.load(os.path.join(DATA, f"{name}.npz")) as f:
    return {k: f[k] for k in f}


def halton_config(case):
  return configs.SamplerConfig(
      decoder="halton", num_iter=int(case["steps"]), guidance_scale=float(case["w"]),
      sm_temp_min=float(case["sm_temp_min"]), sm_temp=float(case["sm_temp_max"]), temp_pow=float(case["temp_pow"]),
      temp_warmup=int(case["temp_warmup"]), halton_randomize=bool(case["randomize"]),
      top_k=max(0, int(case["top_k"])))


def stand_in(case, backend, layout):
  """tokens_to_logits of the stand-in network on our (N, S) ids (class token last: K + 1 + label, null K + 1 + C)."""
  names = ("table_position", "table_neighbour", "table_class")
  xp = torch if backend == "torch" else jnp
  tables = {n: xp.asarray(case[n]) if backend == "jax" else torch.from_numpy(case[n]) for n in names}
  image = layout.image_slice()
  return lambda ids: make_halton_cases.stand_in_logits(tables, ids[:, image], ids[:, layout.seq_len] -
                                                       layout.class_offset, xp)


def decode(case, backend):
  side, k, c = int(case["side"]), int(case["codebook_size"]), int(case["num_class"])
  layout = seed_layout(k, c, side * side)
  ids = layout.sequence(np.full((len(case["labels"]), side * side), k), layout.class_tokens(case["labels"]))
  roll = case["order_roll"] if case["order_roll"].size else None
  module = torch_sampler if backend == "torch" else jax_sampler
  noise = module.RecordedNoise(case["draws_gumbel"], order_roll=roll)
  ids = torch.as_tensor(ids) if backend == "torch" else ids
  out = module.decode_with_config(ids, stand_in(case, backend, layout), noise, halton_config(case), layout=layout)
  return {f: np.asarray(getattr(out, f)) for f in ("step_input_ids", "step_predictions", "step_unknown",
                                                    "step_masking", "step_state_after", "step_count",
                                                    "final_tokens")}, out


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("name", sorted(INDEX["cases"]))
def test_both_backends_follow_halton_maskgit_step_for_step(name, backend):
  case = load(name)
  ours, out = decode(case, backend)
  image = lambda x: np.asarray(out.image(x))
  np.testing.assert_array_equal(image(ours["step_input_ids"]), case["step_code_in"], err_msg="inputs")
  np.testing.assert_array_equal(image(ours["step_predictions"]), case["step_pred"], err_msg="l_codes")
  written = image(ours["step_unknown"]) & ~image(ours["step_masking"])
  np.testing.assert_array_equal(written, case["step_cells"], err_msg="l_mask (cells written)")
  np.testing.assert_array_equal(image(ours["step_state_after"])[-1], case["final_code"], err_msg="final code")
  np.testing.assert_array_equal(ours["final_tokens"], case["final_code_clamped"], err_msg="clamped code")
  # The per-step cells are Halton's order[prev:r]: their number follows its cumulative count.
  counts = seed_schedules.halton_counts(int(case["steps"]), int(case["side"]) ** 2)
  np.testing.assert_array_equal(ours["step_count"][:, 0], np.diff(np.concatenate([[0], counts])))
  np.testing.assert_array_equal(case["step_cells"].sum(-1)[:, 0],
                                np.diff(np.minimum(np.concatenate([[0], counts]), int(case["side"]) ** 2)))


def test_the_stored_cases_exercise_what_they_claim():
  roll, topk, many = load("roll_topk_warmup"), load("side_24_topk"), load("steps_exceed_cells")
  assert roll["order_roll"].size == 2 and len(set(roll["order_roll"].tolist())) == 2 and int(topk["top_k"]) == 3
  assert (many["step_cells"].sum(-1) == 0).any()  # steps after every cell is written still run
  # The mask id K is sampled and committed, then clamped to K - 1, as its sampler does.
  assert (roll["final_code"] == roll["codebook_size"]).sum() == 14
  np.testing.assert_array_equal(roll["final_code_clamped"], np.minimum(roll["final_code"], roll["codebook_size"] - 1))


def test_order_equals_halton_maskgit_for_every_side():
  with np.load(os.path.join(DATA, "orders.npz")) as orders:
    for side in range(1, 65):
      np.testing.assert_array_equal(halton.halton_order(side), orders[f"side_{side}"], err_msg=str(side))
  for side in (9, 18, 27, 36, 45, 54):  # multiples of 9 (a float radical inverse got them wrong): all cells
    assert sorted(halton.halton_order(side)) == list(range(side * side))


def test_uncovered_grids_are_refused_unless_the_sequence_runs_on():
  sampler = configs.SamplerConfig(decoder="halton", num_iter=4)
  with pytest.raises(decode_plan.PlanError, match=r"reach 2499 of the 2500 cells.*halton_points=0"):
    decode_plan.plan_from_config(sampler, 2501)
  plan = decode_plan.plan_from_config(dataclasses.replace(sampler, halton_points=0), 2501)
  assert sorted(plan.rank) == list(range(2500))


@pytest.mark.parametrize("num_iter", range(1, 33))
def test_cumulative_counts_and_temperatures_equal_its_torch_expressions(num_iter):
  for n in (16, 64, 256, 576, 1024, 1, 4, 9, 81, 4096):
    ref = []
    for i in range(num_iter):  # Halton-MaskGIT l.100-103
      r = 1 - (torch.arccos(torch.tensor((i + 1) / num_iter)) / (math.pi * 0.5))
      ref.append(max(i + 1, int(r * n)))
    np.testing.assert_array_equal(seed_schedules.halton_counts(num_iter, n), ref, err_msg=f"N={n}")
  for t_min, t_max, power, warmup in ((1.0, 1.2, 1.0, 0), (0.5, 2.0, 2.0, 1), (1.0, 1.0, 0.7, 3)):
    temps = torch.linspace(t_min, t_max, num_iter)
    ref = [(temps[i] ** power * (0.5 if i < warmup else 1.0)).item() for i in range(num_iter)]
    np.testing.assert_array_equal(seed_schedules.halton_temperatures(num_iter, t_min, t_max, power, warmup),
                                  np.asarray(ref, np.float32))


def test_jitted_halton_decode_equals_the_record():
  case = load("roll_topk_warmup")
  side, k, c = int(case["side"]), int(case["codebook_size"]), int(case["num_class"])
  layout = seed_layout(k, c, side * side)
  ids = layout.sequence(np.full((2, side * side), k), layout.class_tokens(case["labels"]))
  fn = jax.jit(lambda i, noise: jax_sampler.decode_with_config(i, stand_in(case, "jax", layout), noise,
                                                               halton_config(case), layout=layout).final_tokens)
  noise = jax_sampler.RecordedNoise(case["draws_gumbel"], order_roll=case["order_roll"])
  np.testing.assert_array_equal(np.asarray(fn(ids, noise)), case["final_code_clamped"])
