"""Sampler options (configs.SamplerConfig) on a tiny random transformer: for every option JAX and torch decode the
same tokens from the same recorded draws, every option changes the tokens, and the defaults are the official
decoder (the golden fixture's trajectory)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import configs
import conversion
from maskgit_common import halton, schedules
from maskgit_jax import sampler as jax_sampler
from maskgit_jax.transformer import Transformer as JaxTransformer
from maskgit_torch import checkpoint as torch_checkpoint
from maskgit_torch import sampler as torch_sampler
from maskgit_torch.transformer import Transformer as TorchTransformer

FIELDS = ("final_seqs", "step_input_ids", "step_sampled_ids", "step_mask_len", "step_masking", "step_state_after")
# A random-init transformer barely looks at the class token (near-uniform attention), so guidance needs a large w
# to move the tokens.
OPTIONS = {
    "cfg_constant": dict(guidance_scale=100.0),
    "cfg_linear": dict(guidance_scale=100.0, guidance_schedule="linear"),
    "softmax_temperature": dict(softmax_temperature=0.3),
    "choice_temperature_constant": dict(choice_temperature_schedule="constant"),
    "randomize_linear": dict(randomize="linear"),
    "randomize_warm_up": dict(randomize="warm_up"),
    "randomize_random": dict(randomize="random"),
    "randomize_none": dict(randomize="none"),
    "tokens_per_step": dict(tokens_per_step=(1, 2, 4, 8, 12, 16, 12, 9)),
    "halton": dict(order="halton"),
    "top_k": dict(top_k=3),
}


@pytest.fixture(scope="module")
def models(tiny_transformer_variables):
  """The tiny preset's transformer, random init in JAX, converted to torch as a user would."""
  config, variables = tiny_transformer_variables
  torch_model = TorchTransformer(config)
  flat = conversion.flatten(jax.tree_util.tree_map(np.asarray, variables))
  torch_model.load_state_dict(torch_checkpoint.from_flat(config, "transformer", flat), strict=True)
  torch_model.eval()
  jax_model = JaxTransformer(config)
  k = config.codebook_size
  apply = jax.jit(lambda ids: jax_model.apply(variables, ids, deterministic=True)[..., :k])
  return config, apply, lambda ids: torch_model(ids)[..., :k]


def _inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.full((batch, config.seq_len), -1, np.int32)
  ids[:, 0] = config.codebook_size + rng.integers(0, config.num_class, batch)
  n = config.sampler.num_iter
  draws = (rng.gumbel(size=(n, batch, config.seq_len, config.codebook_size)).astype(np.float32),
           rng.gumbel(size=(n, batch, config.seq_len)).astype(np.float32))
  return ids, draws


def _run_both(models, sampler_config, ids, draws, **kwargs):
  _, apply, torch_fn = models
  a = jax_sampler.decode_with_config(ids, apply, jax_sampler.RecordedNoise(*draws), sampler_config, **kwargs)
  with torch.inference_mode():
    b = torch_sampler.decode_with_config(torch.from_numpy(ids), torch_fn, torch_sampler.RecordedNoise(*draws),
                                         sampler_config, **kwargs)
  return a, b


@pytest.fixture(scope="module")
def default_tokens(models):
  config = models[0]
  ids, draws = _inputs(config)
  with torch.inference_mode():
    out = torch_sampler.decode_with_config(torch.from_numpy(ids), models[2], torch_sampler.RecordedNoise(*draws),
                                           config.sampler)
  return out.final_seqs.numpy()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_is_identical_in_both_backends_and_changes_the_tokens(models, default_tokens, name):
  config = models[0]
  sampler = dataclasses.replace(config.sampler, **OPTIONS[name])
  sampler.validate()
  assert not sampler.is_official
  ids, draws = _inputs(config)
  a, b = _run_both(models, sampler, ids, draws)
  for field in FIELDS:
    np.testing.assert_array_equal(getattr(b, field).numpy(), np.asarray(getattr(a, field)), err_msg=field)
  final = b.final_seqs.numpy()
  assert (final[:, -1, 1:] >= 0).all() and (final[:, -1, 1:] < config.codebook_size).all()
  assert not np.array_equal(final, default_tokens), f"{name} did not change the tokens"


def test_custom_counts_and_halton_order_are_followed(models):
  config = models[0]
  ids, draws = _inputs(config)
  counts = OPTIONS["tokens_per_step"]["tokens_per_step"]
  _, out = _run_both(models, dataclasses.replace(config.sampler, **OPTIONS["tokens_per_step"]), ids, draws)
  # The last step fills every remaining token (final_seqs keeps its samples; the official loop still re-masks
  # one in its state, unused).
  unknown = (out.step_input_ids.numpy() == -1).sum(-1)
  revealed = -np.diff(np.concatenate([unknown, np.zeros((1, 2), unknown.dtype)]), axis=0)
  assert (out.final_seqs.numpy()[:, -1] != -1).all()
  np.testing.assert_array_equal(revealed, np.repeat(np.array(counts)[:, None], 2, axis=1))
  _, out = _run_both(models, dataclasses.replace(config.sampler, order="halton"), ids, draws)
  known_after = out.step_state_after.numpy()[:, 0, 1:] != -1  # (n, L)
  order = halton.halton_order(config.latent_size)
  for step, known in enumerate(known_after[:-1]):
    count = known.sum()
    assert set(np.flatnonzero(known)) == set(order[:count]), step  # the first cells of the Halton order


def test_guidance_uses_one_batched_call_with_the_null_class(models):
  config, apply, _ = models
  calls = []

  def spy(ids):
    calls.append(np.asarray(ids))
    return torch.zeros(ids.shape + (config.codebook_size,))

  ids, draws = _inputs(config)
  torch_sampler.decode_with_config(torch.from_numpy(ids), spy, torch_sampler.RecordedNoise(*draws),
                                   dataclasses.replace(config.sampler, guidance_scale=1.0))
  assert len(calls) == config.sampler.num_iter and calls[0].shape == (4, config.seq_len)
  np.testing.assert_array_equal(calls[0][:2], ids)
  assert (calls[0][2:, 0] == -1).all() and np.array_equal(calls[0][2:, 1:], ids[:, 1:])


def test_defaults_are_the_official_decoder_on_the_golden_record(one_golden_case, golden_config):
  case = one_golden_case
  config = golden_config(case)
  rec = np.load(f"{case}/decode.npz")
  model = TorchTransformer(config)
  flat = conversion.read(f"{case}/transformer.msgpack", config).parts["transformer"]
  model.load_state_dict(torch_checkpoint.from_flat(config, "transformer", flat), strict=True)
  k = config.codebook_size
  with torch.inference_mode():
    out = torch_sampler.decode_with_config(
        torch.from_numpy(rec["init_ids"]), lambda ids: model.eval()(ids)[..., :k],
        torch_sampler.RecordedNoise(rec["step_gumbel_sample"], rec["step_gumbel_choice"]), config.sampler,
        num_iter=int(rec["num_iter"]), start_iter=int(rec["start_iter"]))
  for field in FIELDS:
    np.testing.assert_array_equal(getattr(out, field).numpy(), rec[field], err_msg=field)


def test_bad_option_values_are_clear_errors():
  with pytest.raises(configs.ConfigError, match="sampler.randomize: must be one of"):
    configs.tiny().with_overrides(["sampler.randomize=sometimes"])
  with pytest.raises(configs.ConfigError, match=r"sampler.tokens_per_step: needs one count per step"):
    configs.tiny().with_overrides(["sampler.tokens_per_step=[32, 32]"])
  with pytest.raises(configs.ConfigError, match="sampler.softmax_temperature: must be > 0"):
    configs.tiny().with_overrides(["sampler.softmax_temperature=0"])
  sampler = dataclasses.replace(configs.tiny().sampler, tokens_per_step=(1,) * 8)
  with pytest.raises(ValueError, match="sums to 8, the image has 64 tokens"):
    torch_sampler.decode_with_config(torch.full((1, 65), -1), lambda ids: torch.zeros(1, 65, 64),
                                     torch_sampler.GeneratorNoise(torch.Generator()), sampler)


def test_official_top_k_draws_among_the_k_highest_logits(models):
  config, apply, torch_fn = models
  ids, draws = _inputs(config)
  _, out = _run_both(models, dataclasses.replace(config.sampler, top_k=3), ids, draws)
  for t in range(config.sampler.num_iter):
    with torch.inference_mode():
      logits = torch_fn(out.step_input_ids[t]).numpy()[:, 1:]
    top3 = np.argsort(-logits, axis=-1, kind="stable")[..., :3]
    pred = out.image(out.step_predictions).numpy()[t]
    assert (pred[..., None] == top3).any(-1).all(), t


def test_tokens_per_step_gives_exactly_the_requested_counts_for_every_grid_size():
  """Exact integers: the float32 ratio floored after the product missed e.g. 97 of the 575 counts at L = 576."""
  for num_tokens in range(1, 4097):
    steps = min(8, num_tokens)
    counts = [(i + 1) * num_tokens // steps - i * num_tokens // steps for i in range(steps)]
    for pattern in (counts, [1] * (steps - 1) + [num_tokens - steps + 1]):
      table = schedules.mask_len_table(steps, num_tokens + 1, tokens_per_step=pattern)
      np.testing.assert_array_equal(table[:, num_tokens], num_tokens - np.cumsum(pattern), err_msg=str(num_tokens))
  one_per_step = schedules.mask_len_table(576, 577, tokens_per_step=[1] * 576)
  np.testing.assert_array_equal(one_per_step[:, 576], 576 - np.arange(1, 577))


def test_one_or_two_steps_need_no_edit_start_override():
  for steps, edit_start in ((1, 0), (2, 1), (3, 2), (12, 2)):
    config = configs.tiny().with_overrides([f"sampler.num_iter={steps}"])
    assert config.sampler.edit_start_iter is None and config.sampler.edit_start == edit_start
  assert configs.tiny().with_overrides(["sampler.decoder=halton"]).sampler.edit_start == 0
  with pytest.raises(configs.ConfigError, match=r"sampler.edit_start_iter: must be <= 1"):
    configs.tiny().with_overrides(["sampler.num_iter=2", "sampler.edit_start_iter=2"])
