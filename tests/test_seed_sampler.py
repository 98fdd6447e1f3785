"""decoder=seed: the seed's `MaskGIT.sample` (valeoai MaskGIT-pytorch v1, parity_tests/data/SEED_FORMAT.md) in both
backends.

The dev cases' recorded trajectories (parity_tests/data/seed_*) are reproduced step for step: where the record holds
the transformer outputs (default, inpaint) from them, and every variant with the case's seed transformer loaded
through `conversion` (`seed_model` below). Every randomize mode, schedule and quirk is also checked against a loop
written here from the pseudo-code of SEED_FORMAT.md, on a stand-in network with exact logits; the per-step counts
against adap_sche computed with torch as the seed does."""

import dataclasses
import math
import os

import jax
import numpy as np
import pytest
import torch

import configs
from configs import samplers
from maskgit_common import decode_plan, seed_schedules
from maskgit_common.token_layout import seed_layout
from maskgit_jax import sampler as jax_sampler
from maskgit_torch import sampler as torch_sampler
from parity_tests import make_halton_cases
from parity_tests import seed_sample_checks as checks
from tests.conftest import GOLDEN_DIR, seed_cases, runner_checked

DATA = GOLDEN_DIR
CASES = tuple(os.path.basename(c) for c in seed_cases())
REPLAYED = ("default", "inpaint")  # the variants that record step_logits_cond / step_logits_uncond
BACKENDS = ("torch", "jax")


def adap_sche(step, mode, num_tokens):
  """The seed's Trainer/vit.py adap_sche, written with the same torch ops."""
  r = torch.linspace(1, 0, step)
  val = {"root": lambda: 1 - (r ** .5), "linear": lambda: 1 - r, "square": lambda: 1 - (r ** 2),
         "cosine": lambda: torch.cos(r * math.pi * 0.5), "arccos": lambda: torch.arccos(r) / (math.pi * 0.5)}[mode]()
  sche = ((val / val.sum()) * num_tokens).round()
  sche[sche == 0] = 1
  sche[-1] += num_tokens - sche.sum()
  return sche.int().numpy()


@pytest.mark.parametrize("mode", seed_schedules.SEED_SCHEDULES)
def test_per_step_counts_equal_adap_sche(mode):
  for num_tokens in (16, 64, 256, 576, 1024):
    for num_iter in range(2, 33):  # T = 1 divides 0 by 0 in the seed: refused below
      sampler = configs.SamplerConfig(decoder="seed", num_iter=num_iter, mask_schedule=mode, randomize="linear")
      plan = decode_plan.plan_from_config(sampler, num_tokens + 1)
      np.testing.assert_array_equal(plan.counts, adap_sche(num_iter, mode, num_tokens), err_msg=f"{num_iter}")


def test_one_step_and_official_randomize_are_refused_for_the_seed_decoder():
  with pytest.raises(configs.ConfigError, match="sampler.num_iter: decoder='seed' needs at least 2 steps"):
    configs.tiny().with_overrides(["sampler.decoder=seed", "sampler.randomize=linear", "sampler.num_iter=1"])
  with pytest.raises(configs.ConfigError, match="sampler.randomize: decoder='seed' randomizes as the seed"):
    configs.tiny().with_overrides(["sampler.decoder=seed", "sampler.mask_schedule=arccos"])
  with pytest.raises(configs.ConfigError, match="sampler.mask_schedule: must be one of"):
    configs.tiny().with_overrides(["sampler.decoder=seed", "sampler.randomize=linear", "sampler.mask_schedule=log"])


# The recorded trajectories -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", REPLAYED)
@pytest.mark.parametrize("case", CASES)
def test_recorded_trajectory_is_reproduced_step_for_step(case, variant, backend):
  case_dir = os.path.join(DATA, case)
  record = checks.load_record(case_dir, variant)
  layout = checks.case_layout(case_dir, record)
  entries = checks.check_variant(backend, case_dir, variant, checks.replay_logits(backend, record, layout))
  entry = entries[f"{backend}.sample.{variant}.tokens"]
  assert entry["passed"], entry["detail"]
  if variant == "inpaint":  # the seed's loop stops once the box is filled: fewer steps than scheduled
    assert int(record["n_steps_run"]) < int(record["step"])


def test_a_wrong_trajectory_fails_the_check():
  case_dir = os.path.join(DATA, CASES[0])
  record = checks.load_record(case_dir, "default")
  layout = checks.case_layout(case_dir, record)
  ours = checks.run_sample("torch", record, checks.replay_logits("torch", record, layout), layout)
  ours["step_pred_code"] = ours["step_pred_code"].copy()
  ours["step_pred_code"][-1, 0, 0] += 1
  entry = checks.check_tokens(ours, record)
  assert not entry["passed"] and "step_pred_code: differs" in entry["detail"]
  assert checks.check_images(record["images"] + 2e-5, record, "torch")["passed"] is False
  assert checks.check_images(record["images"] + 2e-5, record, "jax")["passed"] is True


@pytest.mark.parametrize("case", CASES)
def test_jitted_decode_stops_like_the_seed(case):
  """Under jit the early stop is a lax.cond per step; the inpainting record (fewer steps than scheduled) is still
  reproduced."""
  case_dir = os.path.join(DATA, case)
  record = checks.load_record(case_dir, "inpaint")
  layout = checks.case_layout(case_dir, record)
  fn = jax.jit(lambda ids, noise: jax_sampler.decode_with_config(
      ids, checks.replay_logits("jax", record, layout), noise, checks.seed_sampler(record), layout=layout))
  out = fn(checks.init_ids(record, layout), checks.recorded_noise("jax", record))
  assert int(out.steps_run) == int(record["n_steps_run"]) < int(record["step"])
  np.testing.assert_array_equal(np.asarray(out.tokens).reshape(record["final_code"].shape),
                                record["final_code_clamped"])


def seed_model(case_dir, backend):
  """The case's seed transformer and VQGAN in `backend`, loaded from its files through `conversion` as a user
  would (the runner's adapter, shared with the runner in this process: seed_checks.open_backend)."""
  from parity_tests import seed_checks  # pylint: disable=import-outside-toplevel
  from parity_tests.case import Case  # pylint: disable=import-outside-toplevel
  case = Case(case_dir)
  return seed_checks.open_backend(backend, case), case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["nocfg", "warmup", "random", "smtemp", "sched_root", "sched_linear",
                                     "sched_square", "sched_cosine", "sched_arccos"])
@pytest.mark.parametrize("case", runner_checked(seed_cases()))  # the parity runner test replays them
def test_recorded_variants_with_the_seed_transformer(case, variant, backend):
  """Every step identical with the real model (the draws injected), and the images of the final tokens within
  1e-5 (torch) / 1e-4 (JAX) of the seed's."""
  b, case_obj = seed_model(os.path.join(DATA, case), backend)
  entry = checks.check_sample_tokens(b, case_obj, variant)
  assert entry["passed"], entry["detail"]
  images = checks.check_sample_images(b, case_obj, variant)
  assert images["passed"] and images["tolerance"] == checks.IMAGE_TOLERANCE[backend], images["detail"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_driven_check_fails_on_a_wrong_model(backend):
  """A transformer whose logits are slightly off changes the trajectory: the tokens check can fail."""
  b, case = seed_model(os.path.join(DATA, CASES[0]), backend)
  record = case.npz("sample_nocfg.npz")
  layout = checks.case_layout(case.path, record)
  fn = b.tokens_to_logits
  bump = np.zeros(layout.logits_width, np.float32)
  bump[0] = 1e3  # code 0 drawn everywhere
  shifted = lambda ids: fn(ids) + (torch.from_numpy(bump) if backend == "torch" else jax.numpy.asarray(bump))
  entry = checks.check_tokens(checks.run_sample(backend, record, shifted, layout), record)
  assert not entry["passed"] and "differs" in entry["detail"]


# The seed's loop, written from FORMAT.md's pseudo-code -----------------------------------------------------------
def stand_in(layout, seed=0, uniform=False):
  """Exact logits of (N, S) seed-layout ids in both backends (parity_tests/make_halton_cases.stand_in_logits)."""
  side = int(round(layout.seq_len ** 0.5))
  tables = make_halton_cases.stand_in_tables(side, layout.codebook_size, layout.num_classes, seed)
  if uniform:
    tables = {k: np.zeros_like(v) for k, v in tables.items()}

  def make(xp, convert):
    t = {k: convert(v) for k, v in tables.items()}
    return lambda ids: make_halton_cases.stand_in_logits(t, ids[:, :layout.seq_len],
                                                         ids[:, layout.seq_len] - layout.class_offset, xp)
  return make(torch, torch.from_numpy), make(jax.numpy, jax.numpy.asarray)


def reference_sample(logits_fn, layout, labels, init_code, step, sched, sm_temp, w, randomize, r_temp, draws):
  """FORMAT.md "The algorithm as recorded", with torch ops; returns the per-step (code in, mask in, pred, t)."""
  g, n, u = draws
  b, size = init_code.shape[0], layout.seq_len
  code, mask = init_code.clone().view(b, size), (init_code == layout.codebook_size).float().view(b, size)
  cls = torch.as_tensor(layout.class_tokens(labels))
  out = []
  for i, t in enumerate(adap_sche(step, sched, size).tolist()):
    if mask.sum() < t:
      t = int(mask.sum())
    if mask.sum() == 0:
      break
    record = [code.clone(), mask.clone()]
    if w != 0:
      both = logits_fn(torch.cat([torch.cat([code, cls[:, None]], 1),
                                  torch.cat([code, torch.full_like(cls, layout.null_class_id)[:, None]], 1)]))
      _w = w * (i / (step - 1))
      logit = (1 + _w) * both[:b] - _w * both[b:]
    else:
      logit = logits_fn(torch.cat([code, cls[:, None]], 1))
    prob = torch.softmax(logit * sm_temp, -1)
    pred = torch.argmax(torch.log(prob) + g[i], -1)
    conf = torch.gather(prob, 2, pred[..., None])
    if randomize == "linear":
      conf = torch.log(conf.squeeze(-1)) + torch.from_numpy(r_temp * n[i] * (1 - i / (step - 1)))
    elif randomize == "warm_up":
      conf = u[i] if i < 2 else conf
    elif randomize == "random":
      conf = u[i]
    conf = conf.reshape(b, size).clone()
    conf[~mask.bool()] = -math.inf
    thr, idx = torch.topk(conf, k=t, dim=-1)
    f_mask = mask.bool() & (conf >= thr[:, -1:])
    code[f_mask] = pred[f_mask]
    for row, ind in enumerate(idx):
      mask[row, ind] = 0
    out.append(record + [pred, t, code.clone(), mask.clone()])
  return out


def _draws(rng, step, b, size, width):
  return (torch.from_numpy((-np.log(-np.log(rng.random((step, b, size, width))))).astype(np.float32)),
          rng.gumbel(size=(step, b, size)), torch.from_numpy(rng.random((step, b, size, 1)).astype(np.float32)))


SETTINGS = [  # (randomize, batch, schedule, w, sm_temp, steps, inpaint)
    ("linear", 3, "arccos", 3.0, 1.0, 6, False), ("linear", 1, "cosine", 0.0, 1.3, 7, False),
    ("none", 2, "root", 2.0, 0.8, 5, True), ("warm_up", 1, "square", 3.0, 1.0, 6, False),
    ("random", 1, "linear", 1.5, 1.0, 8, True), ("linear", 4, "root", 3.0, 1.0, 20, False)]


# The default run keeps the first three (linear and no randomization, guidance on and off, an inpainting start);
# -m slow adds warm_up, random and a 20-step decode (the runner replays both randomizations on every seed case).
@pytest.mark.parametrize("randomize,batch,sched,w,sm_temp,step,inpaint",
                         SETTINGS[:3] + [pytest.param(*s, marks=pytest.mark.slow) for s in SETTINGS[3:]])
def test_both_backends_follow_the_pseudo_code(randomize, batch, sched, w, sm_temp, step, inpaint):
  layout = seed_layout(16, 5, 16)
  torch_fn, jax_fn = stand_in(layout, seed=step)
  rng = np.random.default_rng(step)
  init = torch.full((batch, 4, 4), 16)
  if inpaint:
    init = torch.from_numpy(rng.integers(0, 16, (batch, 4, 4)))
    init[:, 1:3, 0:3] = 16
  labels = rng.integers(0, 5, batch)
  draws = _draws(rng, step, batch, 16, 17)
  ref = reference_sample(torch_fn, layout, labels, init, step, sched, sm_temp, w, randomize, 4.5, draws)
  sampler = configs.SamplerConfig(decoder="seed", num_iter=step, mask_schedule=sched, randomize=randomize,
                                  guidance_scale=w, sm_temp=sm_temp)
  ids = layout.sequence(init.reshape(batch, -1).numpy(), layout.class_tokens(labels))
  noise_args = (draws[0].numpy(), draws[1], draws[2].numpy()[:2 if randomize == "warm_up" else step])
  for backend, fn, module in (("torch", torch_fn, torch_sampler), ("jax", jax_fn, jax_sampler)):
    inputs = torch.as_tensor(ids) if backend == "torch" else ids
    out = module.decode_with_config(inputs, fn, module.RecordedNoise(*noise_args), sampler, layout=layout)
    n = int(out.steps_run)
    assert n == len(ref), backend
    image = lambda x: np.asarray(out.image(x))[:n]
    for name, ours, k in (("code in", image(out.step_input_ids), 0), ("mask in", image(out.step_unknown), 1),
                          ("pred", image(out.step_predictions), 2), ("code out", image(out.step_state_after), 4),
                          ("mask out", image(out.step_masking), 5)):
      np.testing.assert_array_equal(ours, np.stack([r[k].numpy() for r in ref]).astype(ours.dtype),
                                    err_msg=f"{backend} {name}")
    np.testing.assert_array_equal(np.asarray(out.step_count)[:n, 0], [r[3] for r in ref], err_msg=backend)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.clip(ref[-1][4].numpy(), 0, 15), err_msg=backend)


def test_ties_at_the_threshold_write_every_tied_token_but_clear_t():
  """FORMAT.md quirk 13: with uniform logits every masked position ties; step 0 writes all L codes and clears the
  mask at t = 1 position only (torch: the same position as the seed's torch.topk; JAX: the first)."""
  layout = seed_layout(16, 5, 16)
  torch_fn, jax_fn = stand_in(layout, uniform=True)
  rng = np.random.default_rng(0)
  draws = _draws(rng, 6, 2, 16, 17)
  init = torch.full((2, 4, 4), 16)
  ref = reference_sample(torch_fn, layout, [1, 2], init, 6, "arccos", 1.0, 0.0, "none", 4.5, draws)
  sampler = configs.SamplerConfig(decoder="seed", num_iter=6, mask_schedule="arccos", randomize="none")
  ids = layout.sequence(np.full((2, 16), 16), layout.class_tokens([1, 2]))
  for backend, fn, module in (("torch", torch_fn, torch_sampler), ("jax", jax_fn, jax_sampler)):
    inputs = torch.as_tensor(ids) if backend == "torch" else ids
    out = module.decode_with_config(inputs, fn, module.RecordedNoise(draws[0].numpy()), sampler, layout=layout)
    after, unknown_after = np.asarray(out.image(out.step_state_after)), np.asarray(out.image(out.step_masking))
    np.testing.assert_array_equal(after[0], np.asarray(out.image(out.step_predictions))[0])  # all 16 written
    assert (unknown_after[0].sum(-1) == 15).all(), backend
    if backend == "torch":
      np.testing.assert_array_equal(unknown_after[0], ref[0][5].numpy().astype(bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_initial_codes_come_from_the_noise_provider(backend):
  layout = seed_layout(16, 5, 16)
  fns = dict(zip(BACKENDS, stand_in(layout)))
  module = torch_sampler if backend == "torch" else jax_sampler
  rng = np.random.default_rng(3)
  draws, init_tokens = _draws(rng, 6, 2, 16, 17), rng.integers(0, 16, (2, 16))
  sampler = configs.SamplerConfig(decoder="seed", num_iter=6, mask_schedule="arccos", randomize="linear",
                                  random_init=True)
  ids = layout.sequence(np.full((2, 16), 16), layout.class_tokens([0, 4]))
  noise = module.RecordedNoise(draws[0].numpy(), draws[1], init_tokens=init_tokens)
  out = module.decode_with_config(torch.as_tensor(ids) if backend == "torch" else ids, fns[backend], noise, sampler,
                                  layout=layout)
  np.testing.assert_array_equal(np.asarray(out.image(out.step_input_ids))[0], init_tokens)
  assert np.asarray(out.image(out.step_unknown))[0].all()  # random codes, every token still to be predicted
  assert not np.asarray(out.image(out.step_masking))[-1].any()


def test_top_k_draws_among_the_k_most_likely_in_both_backends():
  layout = seed_layout(16, 5, 16)
  torch_fn, jax_fn = stand_in(layout, seed=4)
  rng = np.random.default_rng(4)
  draws = _draws(rng, 6, 2, 16, 17)
  sampler = configs.SamplerConfig(decoder="seed", num_iter=6, mask_schedule="arccos", randomize="linear", top_k=2,
                                  guidance_scale=0.0)
  ids = layout.sequence(np.full((2, 16), 16), layout.class_tokens([0, 4]))
  a = torch_sampler.decode_with_config(torch.as_tensor(ids), torch_fn, torch_sampler.RecordedNoise(*draws[:2]),
                                       sampler, layout=layout)
  b = jax_sampler.decode_with_config(ids, jax_fn, jax_sampler.RecordedNoise(draws[0].numpy(), draws[1]), sampler,
                                     layout=layout)
  np.testing.assert_array_equal(a.step_predictions.numpy(), np.asarray(b.step_predictions))
  inputs = a.step_input_ids.numpy()
  for t in range(6):
    logits = torch_fn(torch.as_tensor(inputs[t])).numpy()
    top2 = np.argsort(-logits, axis=-1, kind="stable")[..., :2]
    pred = a.image(a.step_predictions).numpy()[t]
    assert (pred[..., None] == top2).any(-1).all(), t
  no_top_k = torch_sampler.decode_with_config(torch.as_tensor(ids), torch_fn, torch_sampler.RecordedNoise(*draws[:2]),
                                              dataclasses.replace(sampler, top_k=0), layout=layout)
  assert not torch.equal(no_top_k.step_predictions, a.step_predictions)


def test_jitted_seed_decode_with_prng_noise_equals_eager():
  """The seed's float64 confidence under jit with PRNG draws (the pipeline's path), early stop included."""
  layout = seed_layout(16, 5, 16)
  _, jax_fn = stand_in(layout)
  sampler = configs.SamplerConfig(decoder="seed", num_iter=20, mask_schedule="arccos", randomize="linear",
                                  guidance_scale=2.0)
  ids = layout.sequence(np.full((2, 16), 16), layout.class_tokens([0, 4]))
  run = lambda i, noise: jax_sampler.decode_with_config(i, jax_fn, noise, sampler, layout=layout)
  key = jax.random.PRNGKey(5)
  jitted, eager = jax.jit(run)(ids, jax_sampler.PRNGNoise(key)), run(ids, jax_sampler.PRNGNoise(key))
  assert int(jitted.steps_run) == int(eager.steps_run) == 16 and not np.asarray(jitted.step_masking)[-1].any()
  np.testing.assert_array_equal(np.asarray(jitted.step_state_after), np.asarray(eager.step_state_after))


def test_switching_decoder_takes_its_published_settings_and_keeps_the_overrides():
  config = configs.tiny()
  seed = samplers.with_decoder(config, "seed", top_k=4, overrides=["sampler.num_iter=5", "train.lr=1"])
  assert seed.sampler == dataclasses.replace(samplers.seed_256(), num_iter=5, top_k=4)
  assert samplers.with_decoder(seed, "seed") is seed  # already that decoder: unchanged
  assert samplers.with_decoder(config, None, None) is config
  assert samplers.with_decoder(config, "halton").sampler == samplers.halton()
