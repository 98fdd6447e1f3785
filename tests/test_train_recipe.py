"""The seed's training recipe (issue 18): train.recipe and its fields, the seed's step reproduced from its fixtures,
starting from the seed's .pth and exporting it back, random crops, and the recipe under accumulation.

Fast tests use a 1-layer seed-architecture transformer on a token cache from the cheap patch "tokenizer"
(tests/conftest.py); the full paths (kill -9, DDP / mesh, learning on real tokens) are slow.
"""

import math
import os

import numpy as np
import pytest

import configs
from configs import recipes
from maskgit_common import data as data_lib
from maskgit_common import masking, token_cache, train_init, training
from parity_tests.case import Case
from tests.conftest import patch_encoder, seed_cases, small_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seed_config(cache="", **overrides):
  """small_train_config with the seed's transformer and recipe (short warmup, one crop: the cache's)."""
  return small_train_config(cache).with_overrides({"train.recipe": "seed", "transformer.arch": "seed",
                                                   "train.warmup_steps": 5, "data.random_crops": 1, **overrides})


@pytest.fixture(scope="module")
def cache(train_token_cache):
  return train_token_cache


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# train.recipe ----------------------------------------------------------------------------------------------------
def test_recipe_sets_every_seed_field_and_each_stays_overridable():
  seed = configs.tiny().with_overrides(["train.recipe=seed"])
  for key, value in recipes.RECIPES["seed"].items():
    section, field = key.split(".")
    assert getattr(getattr(seed, section), field) == value, key
  assert recipes.changes(seed) == [] and seed.train.lr == configs.tiny().train.lr  # not a recipe field: kept
  # Mixing: the other overrides apply on top of the recipe, whatever their order.
  for order in (["train.recipe=seed", "train.polyak_decay=0.999"], ["train.polyak_decay=0.999", "train.recipe=seed"]):
    mixed = configs.tiny().with_overrides(order)
    assert mixed.train.polyak_decay == 0.999 and mixed.train.masking == "bernoulli"
    assert recipes.changes(mixed) == [("train.polyak_decay", 0.999, 0.0)]
  back = seed.with_overrides(["train.recipe=official"])
  assert back.train.masking == "count" and back.train.weight_decay == 0.045 and back.train.warmup_rule == "official"
  # A partial train section in JSON takes its recipe's values for the fields it leaves out; a full one is kept.
  partial = configs.MaskGITConfig.from_dict({"train": {"recipe": "seed", "weight_decay": 0.5}})
  assert partial.train.clip_rule == "torch" and partial.train.weight_decay == 0.5 and partial.data.random_crops == 5
  assert configs.MaskGITConfig.from_json(mixed.to_json()) == mixed
  with pytest.raises(configs.ConfigError, match=r"train\.recipe: must be one of \['official', 'seed'\]"):
    configs.tiny().with_overrides(["train.recipe=valeoai"])


def test_seed_presets_use_the_seed_recipe_and_the_others_the_official_one():
  for name in ("seed_imagenet_256", "seed_imagenet_512"):
    config = configs.get_preset(name)
    assert config.train.recipe == "seed" and recipes.changes(config) == [], name
  for name in ("imagenet_256", "imagenet_512", "tiny"):
    assert configs.get_preset(name).train.recipe == "official", name
  assert recipes.changes(configs.imagenet_256()) == []


def test_seed_warmup_is_adapt_learning_rate():
  """The seed's Trainer.adapt_learning_rate, replayed over its micro-batch loop: lr * iter / (W * k) while
  iter < W * k, the optimizer stepping on the last micro-batch of each group; constant after (lr at a resume)."""
  lr, warmup = 1e-4, 7
  for k in (1, 3):
    seed_lrs, current = [], lr
    for it in range(3 * warmup * k):
      if it < warmup * k:
        current = lr * (it / (warmup * k))
      if it % k == k - 1:
        seed_lrs.append(current)
    ours = [training.learning_rate(s, lr, warmup, rule="seed", grad_accum=k) for s in range(len(seed_lrs))]
    assert ours[:warmup] == seed_lrs[:warmup] and ours[warmup:] == [lr] * (len(ours) - warmup), k
  assert training.learning_rate(0, lr, warmup, rule="seed") == 0.0  # the seed's first step does not move
  assert training.learning_rate(0, lr, warmup) == lr / warmup  # the official rule's does


# The seed's step: masks, loss, clipping -------------------------------------------------------------------------
def test_bernoulli_masking_uses_the_seed_rate_and_mask_rule():
  """masked iff draw < acos(r) / (pi * 0.5) in float32 (the seed's get_mask_code), against the recorded fixtures."""
  cases = seed_cases()
  assert cases, "no seed fixture case found"
  for path in cases:
    record = np.load(os.path.join(path, "train_step.npz"))
    b = record["mask"].shape[0]
    mask = masking.token_mask(record["draw_mask_rate_rand"], record["draw_mask_position_rand"].reshape(b, -1),
                              "arccos", "bernoulli")
    np.testing.assert_array_equal(mask, record["mask"].reshape(b, -1))
    rate = masking.seed_mask_rate(record["draw_mask_rate_rand"])
    np.testing.assert_allclose(rate, record["val_to_mask"], rtol=3e-7)  # torch's acos is within an ulp or two


def test_the_all_token_loss_is_torchs_cross_entropy_and_jax_agrees():
  torch = pytest.importorskip("torch")
  pytest.importorskip("flax")
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from maskgit_common.token_layout import token_layout  # pylint: disable=import-outside-toplevel
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  config = seed_config()
  layout = token_layout(config)
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 4, (3, config.num_tokens, layout.logits_width)).astype(np.float32)
  targets = rng.integers(0, config.codebook_size, (3, config.num_tokens)).astype(np.int32)
  ones = np.ones(targets.shape, np.float32)
  t = torch.from_numpy
  ours, _ = torch_train.cross_entropy_loss(t(logits), t(targets), t(ones), 0.1, layout, all_tokens=True)
  seed = F.cross_entropy(t(logits).reshape(-1, layout.logits_width), t(targets).long().view(-1), label_smoothing=0.1)
  assert float(ours) == float(seed)  # the seed's own call, bit for bit
  official, _ = torch_train.cross_entropy_loss(t(logits), t(targets), t(ones), 0.1, layout)
  assert float(official) == pytest.approx(float(seed), rel=1e-6)  # the same number in exact maths
  jax_loss, _ = jax_train.cross_entropy_loss(logits, targets, ones, 0.1, layout, all_tokens=True)
  assert float(jax_loss) == pytest.approx(float(seed), rel=1e-6)


def test_torch_clip_rule_is_clip_grad_norm_and_jax_matches_it():
  torch = pytest.importorskip("torch")
  pytest.importorskip("flax")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  for scale in (10.0, 0.01):  # above and below max_norm
    grads = [rng.normal(0, scale, s).astype(np.float32) for s in ((4, 3), (5,))]
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    reference = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, q, g in zip(params, reference, grads):
      p.grad, q.grad = torch.from_numpy(g.copy()), torch.from_numpy(g.copy())
    norm = torch_train.clip_grad_norm(params, 1.0, "torch")
    want = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert float(norm) == float(want)
    for p, q in zip(params, reference):
      assert torch.equal(p.grad, q.grad)
    clipped, _ = jax_train.clip_like_torch(1.0).update([jnp.asarray(g) for g in grads], None)
    for c, q in zip(clipped, reference):
      np.testing.assert_allclose(np.asarray(c), q.grad.numpy(), rtol=2e-6, atol=0)


def _check(backend, path):
  from parity_tests import seed_train_checks  # pylint: disable=import-outside-toplevel
  module = __import__(f"parity_tests.checks_{backend}", fromlist=["Session"])
  with module.Session("cpu") as session:
    case = Case(path)
    return seed_train_checks.check_train_step(session.open(case), case)


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_train_step_check_passes_on_every_seed_case(backend):
  """<backend>.train.step on the shipped seed cases (the hidden ones run through the same code)."""
  pytest.importorskip("flax" if backend == "jax" else "torch")
  for path in seed_cases():
    r = _check(backend, path)
    assert r["passed"], (path, r["detail"])
    assert "masked batch" in r["detail"] and "exact" in r["detail"] and r["tolerance"] == 1e-6
    if backend == "torch":  # the seed's own modules and calls: bit for bit
      assert r["max_abs_diff"] == 0.0, r["detail"]


def test_train_step_check_fails_when_one_dropout_mask_or_draw_changes(tmp_path):
  """The check can fail: one flipped keep entry of the last dropout site, or one mask-position draw moved across
  its row's rate, is found."""
  pytest.importorskip("torch")
  import shutil  # pylint: disable=import-outside-toplevel
  source = seed_cases()[0]
  for what in ("dropout", "draw"):
    case = tmp_path / what
    shutil.copytree(source, case)
    record = dict(np.load(case / "train_step.npz"))
    if what == "dropout":
      last = sorted(k for k in record if k.startswith("dropout_keep_"))[-1]
      record[last] = record[last].copy()
      record[last].flat[0] = ~record[last].flat[0]
    else:
      draws = record["draw_mask_position_rand"].copy()
      draws.flat[0] = 0.999999 if record["mask"].flat[0] else 0.0
      record["draw_mask_position_rand"] = draws
    np.savez_compressed(case / "train_step.npz", **record)
    r = _check("torch", str(case))
    assert not r["passed"], what
    assert ("masked batch differs" in r["detail"]) == (what == "draw"), r["detail"]


# Gradient accumulation under the seed recipe -------------------------------------------------------------------
# JAX under -m slow (two train-step compiles, ~19 s): its micro-batch scan is the one function both recipes use,
# which tests/test_train.py checks by default; torch here by default.
@pytest.mark.parametrize("name", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
def test_seed_recipe_gradient_accumulation_equals_one_batch_k_times_larger(name):
  """grad_accum=4 micro-batches of 4 = one batch of 16 under the seed recipe (loss over all tokens, torch clipping,
  seed warmup): loss and grad norm to float rounding, weights within the cross-backend bound of test_train.py,
  except the key rows [D:2D] of every in_proj_bias: their gradient is exactly 0 in exact maths (softmax ignores a
  constant added to every key), so Adam's first step turns rounding noise into a move of up to lr (the
  train.step check's exemption, for the same reason); those are held to lr."""
  pytest.importorskip("flax" if name == "jax" else "torch")
  lr = 1e-3
  config = seed_config(**{"train.lr": lr, "train.warmup_steps": 0, "transformer.dropout_rate": 0.0})
  rng = np.random.default_rng(1)
  codes = rng.integers(0, config.codebook_size, (16, config.latent_size, config.latent_size))
  batch = masking.make_batch(codes, rng.integers(0, config.num_class, 16),
                             masking.draw_noise(rng, 16, config.num_tokens), config)
  runs = {k: _one_step(name, config.with_overrides({"train.grad_accum": k}), batch, lr) for k in (1, 4)}
  (one, w1), (four, w4) = runs[1], runs[4]
  assert four["loss"] == pytest.approx(one["loss"], rel=1e-6) and four["loss"] > 1.0
  assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5) and four["grad_norm"] > 0.01
  assert_weights_close(w4, w1, config.transformer.num_embeds, lr, 2e-3 * lr)


def assert_weights_close(have, want, d, lr, atol):
  """Every weight within atol, the key rows [D:2D] of each in_proj_bias (exact gradient 0: rounding noise that
  Adam's step turns into a move of up to lr) within lr."""
  for key in want:
    a, b = np.array(have[key], np.float64), np.array(want[key], np.float64)
    if key.endswith("in_proj_bias") or key.endswith("in_proj/bias"):
      np.testing.assert_allclose(a[d:2 * d], b[d:2 * d], rtol=0, atol=lr, err_msg=key)
      a[d:2 * d] = b[d:2 * d]
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=key)


def _one_step(name, config, batch, lr):
  if name == "jax":
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import conversion  # pylint: disable=import-outside-toplevel
    from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
    state = jax_train.create_state(config, jax_train.initial_params(config, 0))
    new, metrics = jax.jit(jax_train.make_train_step(config))(
        state, {k: jnp.asarray(batch[k]) for k in jax_train.BATCH_KEYS}, jnp.float32(lr), 0)
    weights = conversion.flatten({"params": jax.device_get(new["params"])})
  else:
    import torch  # pylint: disable=import-outside-toplevel
    from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
    model = torch_train.build_model(config, "transformer", seed=0)
    metrics = torch_train.train_step(model, torch_train.make_optimizer(model, config.train), None,
                                     {k: torch.from_numpy(batch[k]) for k in torch_train.BATCH_KEYS}, lr, config)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
  return {m: float(metrics[m]) for m in ("loss", "grad_norm")}, weights


# Random crops ----------------------------------------------------------------------------------------------------
def test_random_crops_are_cached_per_image_and_drawn_per_example(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from maskgit_common import fileio  # pylint: disable=import-outside-toplevel
  root = tmp_path / "images"
  rng = np.random.default_rng(0)
  for c in range(2):
    os.makedirs(root / f"class{c}")
    for i in range(4):  # landscape images: the crops move along the width
      pixels = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
      fileio.atomic_write(str(root / f"class{c}" / f"{i}.png"),
                          lambda f, p=pixels: Image.fromarray(p).save(f, format="PNG"))
  config = configs.tiny().with_overrides({"data.dataset": "folder", "data.data_dir": str(root), "train.batch_size": 8,
                                          "data.random_crops": 3, "num_class": 10})
  dataset = data_lib.make_dataset(config)
  crops, _ = dataset.crops(0, 3)
  assert [data_lib.crop_offsets(16, 3)] == [[0, 8, 16]]
  np.testing.assert_array_equal(crops[1], dataset[0][0])  # the middle crop is the centre crop
  cache = token_cache.build(str(tmp_path / "tokens"), dataset, patch_encoder(config), config, progress=False, crops=3)
  assert cache.num_crops == 3 and cache.codes([0, 1]).shape == (2, 8, 8)
  np.testing.assert_array_equal(cache.codes([0]), patch_encoder(config)(dataset[0][0][None]))
  np.testing.assert_array_equal(cache.codes([0], crops=[2]), patch_encoder(config)(crops[2][None]))
  data = training.TrainingData(cache, config)
  picked = [data.global_batch(s, 0) for s in range(4)]
  assert any(not np.array_equal(picked[0]["targets"], p["targets"]) for p in picked[1:])  # crops/flips drawn
  with pytest.raises(token_cache.TokenCacheError, match=r"built with 3 crop\(s\) per image, data.random_crops=5"):
    training.TrainingData(cache, config.with_overrides({"data.random_crops": 5}))


# Starting from the seed's .pth, exporting back --------------------------------------------------------------------
def write_seed_pth(path, config, iteration=3000, epoch=7):
  """A seed-format MaskGIT .pth of `config`'s transformer (random weights, AdamW state after one step)."""
  import torch  # pylint: disable=import-outside-toplevel
  from conversion import seed_formats  # pylint: disable=import-outside-toplevel
  from conversion.formats import torch_pickle  # pylint: disable=import-outside-toplevel
  from maskgit_torch.seed_transformer import MaskTransformer  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = MaskTransformer(config)
  optimizer = torch.optim.AdamW(model.parameters(), 1e-4, betas=(0.9, 0.96), weight_decay=1e-5)
  ids = torch.randint(0, config.codebook_size, (4, config.seq_len))
  model(ids).square().mean().backward()
  optimizer.step()
  extras = {"iter": iteration, "global_epoch": epoch,
            "optimizer_state_dict": torch_pickle.numpy_tree(optimizer.state_dict())}
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return seed_formats.write_transformer(path, config, state, extras), model, optimizer


def test_init_from_a_seed_pth_continues_iter_epoch_and_adamw_in_both_backends(cache, tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("flax")
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  from maskgit_torch.seed_transformer import MaskTransformer  # pylint: disable=import-outside-toplevel
  config = seed_config(cache, **{"train.num_train_steps": 3002, "train.checkpoint_every_steps": 2,
                                 "train.log_every_steps": 1, "transformer.dropout_rate": 0.0})
  pth, _, seed_optimizer = write_seed_pth(str(tmp_path / "MaskGIT_seed.pth"), config)
  runs = {}
  for name, train in (("torch", torch_train.train), ("jax", jax_train.train)):
    runs[name] = train(config, str(tmp_path / name), init=pth, progress=False)
    assert runs[name]["resumed_from"] == 3000 and runs[name]["step"] == 3002
    assert runs[name]["position"] == 7 * 256 + 2 * 16  # global_epoch 7 of the 256-example cache, then 2 batches
  # Same weights, AdamW state and batches: the two backends' first losses agree (float32 rounding).
  np.testing.assert_allclose(runs["jax"]["losses"], runs["torch"]["losses"], rtol=1e-5)
  # The loaded AdamW state is used: a fresh optimizer gives another first update than the file's.
  fresh = torch_train.train(config, str(tmp_path / "fresh"), init=pth, init_optimizer=False, progress=False)
  assert fresh["losses"][0] == runs["torch"]["losses"][0] and fresh["losses"][1] != runs["torch"]["losses"][1]
  # The seed export loads strictly into the seed-named module and torch.optim.AdamW, and continues the count.
  for name in ("torch", "jax"):
    ck = torch.load(train_init.seed_export_path(str(tmp_path / name)), map_location="cpu", weights_only=True)
    assert (ck["iter"], ck["global_epoch"]) == (3002, 7) and set(ck) == {"iter", "global_epoch", "model_state_dict",
                                                                        "optimizer_state_dict"}
    model = MaskTransformer(config)
    model.load_state_dict(ck["model_state_dict"], strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4, betas=(0.9, 0.96), weight_decay=1e-5)
    optimizer.load_state_dict(ck["optimizer_state_dict"])
    saved = ck["optimizer_state_dict"]
    assert saved["param_groups"][0].keys() == seed_optimizer.state_dict()["param_groups"][0].keys()
    assert all(float(s["step"]) == 3.0 for s in saved["state"].values())  # 1 in the file + 2 steps here
  a, b = (torch.load(train_init.seed_export_path(str(tmp_path / n)), weights_only=True)["model_state_dict"]
          for n in ("torch", "jax"))
  assert_weights_close({k: v.numpy() for k, v in b.items()}, {k: v.numpy() for k, v in a.items()},
                       config.transformer.num_embeds, config.train.lr, 2e-3 * config.train.lr)


def test_init_is_ignored_once_the_workdir_has_checkpoints(cache, tmp_path, capsys):
  pytest.importorskip("torch")
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  config = seed_config(cache, **{"train.num_train_steps": 3002, "train.checkpoint_every_steps": 1})
  pth, _, _ = write_seed_pth(str(tmp_path / "seed.pth"), config)
  first = torch_train.train(config.with_overrides({"train.num_train_steps": 3001}), str(tmp_path / "run"), init=pth,
                            progress=False)
  assert first["step"] == 3001
  capsys.readouterr()
  again = torch_train.train(config, str(tmp_path / "run"), init=pth, progress=False, allow_config_change=False)
  assert again["resumed_from"] == 3001 and again["step"] == 3002
  assert "not used: the workdir's run resumes from its own checkpoint" in capsys.readouterr().out


def test_init_errors_name_the_file(tmp_path):
  pytest.importorskip("torch")
  config = seed_config()
  with pytest.raises(train_init.InitError, match="no such file"):
    train_init.read_init(str(tmp_path / "missing.pth"), config, 10)
  other = seed_config(**{"transformer.num_layers": 2})
  pth, _, _ = write_seed_pth(str(tmp_path / "two_layers.pth"), other)
  with pytest.raises(Exception, match="two_layers.pth"):
    train_init.read_init(pth, config, 10)
  assert math.isfinite(train_init.read_init(pth, other, 10).position)


# Slow: kill -9, data parallel, learning on real tokens ------------------------------------------------------------
# pylint: disable=protected-access
SEED_RUN = {"train.recipe": "seed", "transformer.arch": "seed", "train.warmup_steps": 5, "data.random_crops": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jax", "torch"])
def test_seed_recipe_sigkill_mid_training_resumes_bit_identical(name, cache, tmp_path):
  """As tests/test_train.py's kill -9 test, under the seed recipe (Bernoulli masks, label dropout, seed warmup,
  torch clipping, no EMA) and the seed's transformer."""
  from tests import test_train  # pylint: disable=import-outside-toplevel
  test_train.backend(name)
  resumed, reference = test_train.sigkill_and_resume(name, cache, tmp_path, overrides=SEED_RUN)
  np.testing.assert_array_equal(resumed, reference)


@pytest.mark.slow
def test_seed_recipe_jax_eight_devices_match_one(cache, tmp_path):
  from tests import test_train  # pylint: disable=import-outside-toplevel
  test_train.backend("jax")
  one = test_train._run("jax", cache, str(tmp_path / "one"), 6, overrides=SEED_RUN)
  eight = test_train._run("jax", cache, str(tmp_path / "eight"), 6, overrides=SEED_RUN,
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  np.testing.assert_allclose(eight, one, rtol=2e-6, atol=0)


@pytest.mark.slow
def test_seed_recipe_torch_ddp_two_processes_match_one(cache, tmp_path):
  """Dropout off, as the official recipe's DDP test (each rank draws its own masks); with grad accumulation too."""
  import sys  # pylint: disable=import-outside-toplevel
  from tests import test_train  # pylint: disable=import-outside-toplevel
  test_train.backend("torch")
  overrides = {**SEED_RUN, "transformer.dropout_rate": 0.0, "train.grad_accum": 2}
  one = test_train._run("torch", cache, str(tmp_path / "one"), 6, overrides=overrides)
  two = test_train._run("torch", cache, str(tmp_path / "two"), 6, overrides=overrides,
                        launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"))
  np.testing.assert_allclose(two, one, rtol=2e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jax", "torch"])
def test_tiny_seed_model_learns_on_synthetic_images(name, tmp_path):
  """Proof of learning: synthetic images -> the demo's trained tokenizer -> the tiny preset with the seed's
  transformer and recipe (loss over all K + 1 classes of every token), 300 steps. The uniform guess costs
  ln(K + 1); the seed's init starts far above it (N(0, 1) token embeddings tied to the output: ~17). Measured on
  CPU: torch 17.6 -> 2.59 (mean of the last 20 steps)."""
  import warnings  # pylint: disable=import-outside-toplevel
  from tests import test_train  # pylint: disable=import-outside-toplevel
  train = test_train.backend(name)
  tokenizer = os.path.join(REPO, "demo", "checkpoint")
  if not os.path.isdir(tokenizer):
    pytest.skip("the embedded demo model (its tokenizer) is missing from this checkout")
  config = learning_config(300)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = train.train(config, str(tmp_path / "run"), tokenizer=tokenizer, num_synthetic=1000, progress=False)
  losses = np.asarray(out["losses"])
  uniform = math.log(config.codebook_size + 1)
  assert losses[:5].mean() > uniform and losses[-20:].mean() < uniform - 1.0, (losses[:5], losses[-20:].mean())


def learning_config(steps):
  """The proof-of-learning run (also docs/make_figures.py's seed-recipe curve)."""
  return configs.get_preset("tiny").with_overrides({
      "train.recipe": "seed", "transformer.arch": "seed", "train.num_train_steps": steps,
      "train.checkpoint_every_steps": steps, "train.warmup_steps": 20, "train.lr": 1e-3, "train.log_every_steps": 10,
      "train.batch_size": 32})


def test_fp16_loss_scaling_path_resumes_exactly(cache, tmp_path, monkeypatch):
  """train.precision=fp16 (float16 autocast + GradScaler, CUDA only in real runs) exercised on the CPU with the
  device check patched: the scaler scales, its scale and growth counter are checkpointed, and a resumed run
  retraces the uninterrupted one bit for bit."""
  torch = pytest.importorskip("torch")
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(torch_train, "fp16_enabled", lambda precision, device: precision == "fp16")
  config = seed_config(cache, **{"train.num_train_steps": 6, "train.checkpoint_every_steps": 3,
                                 "train.log_every_steps": 1, "train.precision": "fp16"})
  full = torch_train.train(config, str(tmp_path / "full"), progress=False)
  assert np.all(np.isfinite(full["losses"])) and len(full["losses"]) == 6
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  state = safetensors.torch.load_file(os.path.join(full["last_checkpoint"], "state.safetensors"))
  assert float(state["scaler/scale"]) > 1.0  # the loss is scaled (GradScaler's 65536, backed off on overflow)
  first = torch_train.train(config, str(tmp_path / "resumed"), progress=False, stop_after=4)  # saved at 3, lost 4
  assert first["last_checkpoint"].endswith("ckpt_000000003")
  rest = torch_train.train(config, str(tmp_path / "resumed"), progress=False)
  assert rest["resumed_from"] == 3
  np.testing.assert_array_equal(rest["losses"], full["losses"][3:])
  with torch_train.autocast("fp16", torch.device("cpu")):
    assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float16


def test_runs_checkpointed_before_the_recipe_fields_resume_unchanged():
  """A fingerprint from before train.recipe / warmup_rule / clip_rule / data.random_crops existed is the official
  recipe's: no change is reported; a seed value against such a checkpoint is one."""
  from maskgit_common import workdir  # pylint: disable=import-outside-toplevel
  new = training.transformer_fingerprint(configs.tiny())
  old = {k: v for k, v in new.items() if k not in workdir.ADDED_SETTINGS}
  assert len(old) == len(new) - len(workdir.ADDED_SETTINGS) and workdir.config_changes(old, new) == []
  seeded = training.transformer_fingerprint(configs.tiny().with_overrides({"train.clip_rule": "torch"}))
  assert workdir.config_changes(old, seeded) == [("train.clip_rule", "optax", "torch")]
