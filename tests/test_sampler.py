"""The official sampler in both backends: schedules bit for bit, the official decode key for key (JAX) and the same
trajectory from the same draws (torch), on the golden fixtures and on a toy logits function for every schedule."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from maskgit_common import editing, schedules
from maskgit_jax import sampler as jax_sampler
from maskgit_torch import sampler as torch_sampler

OFFICIAL = ("uniform", "cosine", "pow1", "pow2", "pow2.5", "pow3", "pow0.5", "log", "exp")
SEED = ("linear", "square", "root", "arccos")
FIELDS = ("final_seqs", "step_input_ids", "step_sampled_ids", "step_mask_len", "step_masking", "step_state_after")


# Schedules ------------------------------------------------------------------------------------------------------
def test_numpy_and_jax_schedules_reproduce_the_official_grid(golden_case):
  case = golden_case
  sched = np.load(f"{case}/mask_schedule.npz")
  ratios, total = sched["ratios"][None, :], sched["total_unknown"][:, None]
  for key in (k for k in sched.files if k.startswith("mask_ratio_")):
    method = key[len("mask_ratio_"):]
    ours = np.broadcast_to(schedules.mask_ratio(ratios, total, method), sched[key].shape)
    np.testing.assert_array_equal(ours, sched[key], err_msg=method)
    np.testing.assert_array_equal(np.broadcast_to(jax_sampler.schedule(ratios, total, method), sched[key].shape),
                                  sched[key], err_msg=method)
    np.testing.assert_array_equal(np.broadcast_to(torch_sampler.schedule(torch.from_numpy(ratios),
                                                                         torch.from_numpy(total), method).numpy(),
                                                  sched[key].shape), sched[key], err_msg=method)


def test_loop_mask_ratio_emulation_equals_the_traced_official_expression():
  # The torch decoder's mask lengths come from the numpy replay of the official loop's arithmetic; it must equal
  # the official expression traced under jit (what lax.while_loop runs) for every step, T and N0.
  n0 = np.arange(0, 300, dtype=np.int32)
  for method in OFFICIAL:
    for num_iter in (3, 12):
      for step in range(num_iter):
        ours = schedules.decode_mask_ratio(step, num_iter, n0, method)
        ref = np.asarray(jax_sampler.decode_mask_ratio(step, num_iter, n0, method))
        np.testing.assert_array_equal(np.broadcast_to(ours, ref.shape), ref, err_msg=f"{method} T={num_iter}")


def test_schedule_values_and_errors():
  r = np.array([0.0, 0.5, 1.0], np.float32)
  np.testing.assert_allclose(schedules.mask_ratio(r, 64, "linear"), [1.0, 0.5, 1e-6], rtol=1e-6)
  np.testing.assert_allclose(schedules.mask_ratio(r, 64, "square"), [1.0, 0.75, 1e-6], rtol=1e-6)
  np.testing.assert_allclose(schedules.mask_ratio(r, 64, "root"), [1.0, 1 - 0.5 ** 0.5, 1e-6], rtol=1e-6)
  np.testing.assert_allclose(schedules.mask_ratio(r, 64, "arccos"), [1.0, 2 / 3, 1e-6], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown mask schedule 'foo'"):
    schedules.mask_ratio(r, 64, "foo")
  with pytest.raises(ValueError, match="'powX' needs a positive number"):
    schedules.mask_ratio(r, 64, "pow-2")


# A toy logits function, identical in both backends (tests/conftest.py's toy_logits). ---------------------------
def _init_ids(batch, seq_len, k, known_fraction=0.0, seed=1):
  rng = np.random.default_rng(seed)
  ids = np.full((batch, seq_len), -1, np.int32)
  ids[:, 0] = k + rng.integers(0, 10, batch)
  known = rng.random((batch, seq_len - 1)) < known_fraction
  ids[:, 1:] = np.where(known, rng.integers(0, k, (batch, seq_len - 1)), -1)
  return ids


def _official_draws(key, n, batch, seq_len, k):
  """The draws the official loop makes from `key`: per step split for the sample, then for the choice."""
  samples, choices = [], []
  for _ in range(n):
    key, k_sample = jax.random.split(key, 2)
    samples.append(jax.random.gumbel(k_sample, (batch, seq_len, k)))
    key, k_choice = jax.random.split(key)
    choices.append(jax.random.gumbel(k_choice, (batch, seq_len)))
  return np.stack(samples), np.stack(choices)


@pytest.mark.parametrize("method,num_iter,start_iter,known", [
    ("cosine", 8, 0, 0.0), ("pow2", 12, 0, 0.0), ("log", 12, 0, 0.0), ("cosine", 12, 3, 0.6),
    *(pytest.param(*args, marks=pytest.mark.slow) for args in (
        ("uniform", 12, 2, 0.3), ("uniform", 8, 0, 0.0), ("pow3", 12, 0, 0.0), ("pow2.5", 12, 0, 0.0),
        ("exp", 12, 0, 0.0))),
])
def test_jax_equals_official_and_torch_equals_jax(method, num_iter, start_iter, known, toy_logits):
  from maskgit.libml import parallel_decode  # the official package
  jax_fn, torch_fn, k, _ = toy_logits()
  ids = _init_ids(3, 65, k, known)
  key = jax.random.PRNGKey(7)
  kwargs = dict(num_iter=num_iter, start_iter=start_iter, choice_temperature=4.5, mask_schedule=method)
  official = np.asarray(parallel_decode.decode(jnp.asarray(ids), key, jax_fn, num_iter=num_iter,
                                               start_iter=start_iter, choice_temperature=4.5,
                                               mask_scheduling_method=method))
  ours = jax_sampler.decode(ids, jax_fn, jax_sampler.PRNGNoise(key), **kwargs)
  np.testing.assert_array_equal(np.asarray(ours.final_seqs), official)
  # torch, fed the draws the official loop made from the key, follows the same trajectory step for step.
  draws = _official_draws(key, num_iter - start_iter, 3, 65, k)
  out = torch_sampler.decode(torch.from_numpy(ids), torch_fn, torch_sampler.RecordedNoise(*draws), **kwargs)
  for field in FIELDS:
    np.testing.assert_array_equal(getattr(out, field).numpy(), np.asarray(getattr(ours, field)), err_msg=field)
  # Decoding really happened: every position filled at the end, and the masks shrank step by step.
  assert (official[:, -1] >= 0).all()
  unknown = (np.asarray(ours.step_input_ids) == -1).sum(-1)
  assert (np.diff(unknown, axis=0) < 0).all()


@pytest.mark.parametrize("method", ("arccos", pytest.param("linear", marks=pytest.mark.slow),
                                    pytest.param("square", marks=pytest.mark.slow), "root"))
def test_seed_schedules_identical_in_both_backends(method, toy_logits):
  jax_fn, torch_fn, k, _ = toy_logits()
  ids = _init_ids(2, 65, k)
  draws = _official_draws(jax.random.PRNGKey(3), 8, 2, 65, k)
  kwargs = dict(num_iter=8, start_iter=0, choice_temperature=4.5, mask_schedule=method)
  a = jax_sampler.decode(ids, jax_fn, jax_sampler.RecordedNoise(*draws), **kwargs)
  b = torch_sampler.decode(torch.from_numpy(ids), torch_fn, torch_sampler.RecordedNoise(*draws), **kwargs)
  for field in FIELDS:
    np.testing.assert_array_equal(getattr(b, field).numpy(), np.asarray(getattr(a, field)), err_msg=field)
  lens = np.asarray(a.step_mask_len)[:, 0, 0]
  expected = [max(1, min(int(u) - 1, int(np.floor(64 * schedules.mask_ratio(np.float32(t + 1) / 8, 64, method)))))
              for t, u in enumerate((np.asarray(a.step_input_ids)[:, 0] == -1).sum(-1))]
  np.testing.assert_array_equal(lens, expected)


def test_decode_is_jittable_and_generator_noise_is_reproducible(toy_logits):
  jax_fn, torch_fn, k, _ = toy_logits()
  ids = _init_ids(2, 65, k)
  fn = jax.jit(lambda i, key: jax_sampler.decode(i, jax_fn, jax_sampler.PRNGNoise(key), num_iter=8,
                                                 choice_temperature=4.5).final_seqs)
  eager = jax_sampler.decode(ids, jax_fn, jax_sampler.PRNGNoise(jax.random.PRNGKey(0)), num_iter=8,
                             choice_temperature=4.5).final_seqs
  np.testing.assert_array_equal(np.asarray(fn(ids, jax.random.PRNGKey(0))), np.asarray(eager))
  runs = [torch_sampler.decode(torch.from_numpy(ids), torch_fn,
                               torch_sampler.GeneratorNoise(torch.Generator().manual_seed(s)), num_iter=8,
                               choice_temperature=4.5).final_seqs for s in (5, 5, 6)]
  assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
  assert (runs[0][:, -1, 1:] >= 0).all() and (runs[0][:, -1, 1:] < k).all()


def test_bad_inputs_are_clear_errors(toy_logits):
  jax_fn, torch_fn, k, _ = toy_logits()
  ids = _init_ids(2, 65, k)
  draws = _official_draws(jax.random.PRNGKey(3), 2, 2, 65, k)
  with pytest.raises(ValueError, match="2 recorded steps, the decode runs 8"):
    jax_sampler.decode(ids, jax_fn, jax_sampler.RecordedNoise(*draws), num_iter=8)
  with pytest.raises(ValueError, match="2 recorded steps, the decode runs 8"):
    torch_sampler.decode(torch.from_numpy(ids), torch_fn, torch_sampler.RecordedNoise(*draws), num_iter=8)
  with pytest.raises(ValueError, match="start_iter < num_iter"):
    torch_sampler.decode(torch.from_numpy(ids), torch_fn, torch_sampler.RecordedNoise(*draws), num_iter=2,
                         start_iter=2)


# Editing inputs -------------------------------------------------------------------------------------------------
def test_edit_mask_and_input_tokens_match_the_official_record(golden_case, golden_config):
  case = golden_case
  config = golden_config(case)
  rec = np.load(f"{case}/edit.npz")
  top, left, height, width = (int(v) for v in rec["edit_bbox_top_left_height_width"])
  mask = editing.latent_mask_from_bbox(config, top, left, height, width)
  np.testing.assert_array_equal(np.broadcast_to(mask, rec["edit_latent_mask"].shape), rec["edit_latent_mask"])
  ids = editing.edit_input_tokens(rec["edit_source_codes"], mask, int(rec["edit_target_label"]), config)
  np.testing.assert_array_equal(ids, rec["edit_init_ids"])


def test_selected_probs_equal_softmax_then_gather_bit_for_bit():
  """The torch decoder divides only the gathered exp(x - max) by the row sum: the same rounding as jax.nn.softmax
  followed by take_along_axis; ids >= K (the class token) are clamped."""
  logits = torch.randn(3, 17, 50) * 4
  ids = torch.randint(0, 60, (3, 17))
  e = torch.exp(logits - logits.amax(-1, keepdim=True))
  probs = e / e.sum(-1, keepdim=True)
  expected = torch.gather(probs, -1, ids.clamp(0, 49).unsqueeze(-1)).squeeze(-1)
  assert torch.equal(torch_sampler.selected_probs(logits, ids), expected)


def test_in_place_gumbel_equals_the_formula():
  u = torch.rand((4, 9, 7), generator=torch.Generator().manual_seed(3))
  expected = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
  assert torch.equal(torch_sampler.gumbel((4, 9, 7), torch.Generator().manual_seed(3)), expected)
