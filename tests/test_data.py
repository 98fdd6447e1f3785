"""Data, token cache, masking and the framework-free training helpers (numpy only, no model)."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

import configs
from maskgit_common import data as data_lib
from maskgit_common import masking, token_cache, training


def tiny():
  return configs.get_preset("tiny")


# Images ------------------------------------------------------------------------------------------------------
def test_synthetic_images_are_deterministic_labelled_and_distinct():
  ds = data_lib.SyntheticDataset(40, 32, 10, seed=3)
  image, label = ds[13]
  assert image.shape == (32, 32, 3) and image.dtype == np.float32 and label == 3
  assert 0.0 <= image.min() and image.max() <= 1.0
  np.testing.assert_array_equal(ds[13][0], data_lib.synthetic_image(13, 32, 10, seed=3)[0])
  assert not np.array_equal(ds[13][0], data_lib.SyntheticDataset(40, 32, 10, seed=4)[13][0])
  # The class is in the shape: the per-class mean foreground coverage patterns differ clearly between classes.
  grey = np.stack([ds[i][0].std(axis=-1) for i in range(40)])
  means = np.stack([grey[np.arange(40) % 10 == c].mean(0) for c in range(10)])
  dists = [np.abs(means[a] - means[b]).mean() for a in range(10) for b in range(a + 1, 10)]
  assert min(dists) > 1e-3
  with pytest.raises(ValueError, match="num_class=11"):
    data_lib.SyntheticDataset(4, 32, 11)


def test_preprocess_resizes_the_short_side_and_centre_crops():
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, 20:40] = 255  # a white centre third
  out = data_lib.preprocess(Image.fromarray(wide), 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.float32
  # 60x20 -> 30x10, centre 10 columns = the white third: a squashed (non-cropped) resize would average ~1/3.
  np.testing.assert_allclose(out[:, 2:8], 1.0, atol=1e-6)
  assert out.mean() > 0.85


def test_image_folder_sorted_classes(tmp_path):
  for name, value in (("b_dog", 200), ("a_cat", 50)):
    os.makedirs(tmp_path / name / "sub")
    Image.fromarray(np.full((8, 12, 3), value, np.uint8)).save(tmp_path / name / "1.png")
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name / "sub" / "2.JPEG", quality=100)
  (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
  ds = data_lib.ImageFolder(str(tmp_path), 8)
  assert ds.class_names == ["a_cat", "b_dog"] and len(ds) == 4
  labels = [ds[i][1] for i in range(4)]
  assert labels == [0, 0, 1, 1]
  np.testing.assert_allclose(ds[0][0], 50 / 255, atol=1e-6)
  with pytest.raises(ValueError, match="num_class=1"):
    data_lib.ImageFolder(str(tmp_path), 8, num_class=1)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data_lib.ImageFolder(str(tmp_path / "missing"), 8)


# Token cache -------------------------------------------------------------------------------------------------
def test_token_cache_round_trip_flips_and_checks(tmp_path, patch_encoder):
  config = tiny()
  ds = data_lib.SyntheticDataset(50, config.image_size, config.num_class)
  encode = patch_encoder(config)  # deterministic and orientation-sensitive
  path = str(tmp_path / "tokens")
  cache = token_cache.build(path, ds, encode, config, batch_size=16, shard_size=16, progress=False,
                            tokenizer_weights_hash="jax:abc")
  assert len(cache) == 50 and len(cache.index["shards"]) == 4 and cache.class_names == list(ds.class_names)
  images = np.stack([ds[i][0] for i in range(50)])
  idx = np.array([49, 0, 21, 20, 7])
  np.testing.assert_array_equal(cache.codes(idx), encode(images[idx]))
  np.testing.assert_array_equal(cache.codes(idx, flipped=True), encode(images[idx][:, :, ::-1]))
  np.testing.assert_array_equal(cache.labels, np.arange(50) % 10)
  reopened = token_cache.TokenCache(path, config, "jax:abc")
  np.testing.assert_array_equal(reopened.codes(np.arange(50)), cache.codes(np.arange(50)))
  token_cache.TokenCache(path, config, "torch:zzz")  # another backend's layout: hashes are not comparable
  with pytest.raises(token_cache.TokenCacheError, match="other tokenizer weights"):
    token_cache.TokenCache(path, config, "jax:def")
  other = config.with_overrides({"tokenizer.codebook_size": 128})
  with pytest.raises(token_cache.TokenCacheError, match="codebook_size: cache 64 vs config 128"):
    token_cache.TokenCache(path, other)
  with pytest.raises(token_cache.TokenCacheError, match="already exists"):
    token_cache.build(path, ds, encode, config, progress=False)
  np.save(os.path.join(path, "codes_00001.npy"), np.zeros((3, 8, 8), np.int16))  # a replaced shard
  with pytest.raises(token_cache.TokenCacheError, match="holds 3 examples, index says 16"):
    token_cache.TokenCache(path, config)


# Masking -----------------------------------------------------------------------------------------------------
def test_mask_ratio_matches_the_official_schedule():
  mask_schedule = pytest.importorskip("maskgit.libml.mask_schedule")
  r = np.linspace(0.0, 0.999, 97, dtype=np.float32)
  for method in ("uniform", "cosine", "log", "exp", "pow2.5"):
    want = np.asarray(mask_schedule.schedule(r, 256, method))
    np.testing.assert_allclose(masking.mask_ratio(r, 256, method), want, rtol=2e-6, atol=1e-7, err_msg=method)


def test_masks_count_and_class_dropout():
  config = tiny().with_overrides({"train.class_dropout": 0.5})
  rng = np.random.default_rng(0)
  noise = masking.draw_noise(rng, 64, config.num_tokens)
  codes = rng.integers(0, 64, (64, 8, 8))
  labels = rng.integers(0, 10, 64)
  batch = masking.make_batch(codes, labels, noise, config)
  count = masking.num_masked(noise.ratio, 64, "cosine")
  np.testing.assert_array_equal(batch["mask"].sum(1), count)
  exact = np.cos(np.pi / 2 * noise.ratio.astype(np.float64)) * 64  # ceil(gamma(r) * L), up to float32 rounding
  assert np.all(count >= exact - 1e-3) and np.all(count < exact + 1 + 1e-3) and count.min() >= 1
  np.testing.assert_array_equal(batch["weights"], batch["mask"].astype(np.float32))
  ids = batch["input_ids"]
  np.testing.assert_array_equal(ids[:, 1:][batch["mask"]], -1)
  np.testing.assert_array_equal(ids[:, 1:][~batch["mask"]], codes.reshape(64, -1)[~batch["mask"]])
  dropped = noise.class_drop < 0.5
  np.testing.assert_array_equal(ids[dropped, 0], masking.NULL_CLASS_TOKEN)
  np.testing.assert_array_equal(ids[~dropped, 0], labels[~dropped] + 64)
  everything = masking.make_batch(codes, labels, noise, config.with_overrides({"train.compute_loss_for_all": True}))
  assert everything["weights"].min() == 1.0


def test_bernoulli_masking_masks_each_token_with_the_schedule_probability():
  """train.masking=bernoulli (the seed's rule): token i of row b is masked iff its draw < schedule(r_b)."""
  config = tiny().with_overrides({"train.masking": "bernoulli", "train.mask_schedule": "arccos"})
  rng = np.random.default_rng(3)
  noise = masking.draw_noise(rng, 512, config.num_tokens)
  codes = rng.integers(0, 64, (512, 8, 8))
  batch = masking.make_batch(codes, rng.integers(0, 10, 512), noise, config)
  rate = np.arccos(noise.ratio.astype(np.float64)) / (np.pi / 2)
  np.testing.assert_array_equal(batch["mask"], noise.position < rate.astype(np.float32)[:, None])
  counts = batch["mask"].sum(1)
  assert len(np.unique(counts)) > 20  # not a fixed count per ratio: independent tokens
  # Each row's masked fraction is its rate up to binomial noise (std of the mean over rows: ~0.003).
  assert abs((batch["mask"].mean(1) - rate).mean()) < 0.012
  np.testing.assert_array_equal(batch["input_ids"][:, 1:][batch["mask"]], -1)
  with pytest.raises(configs.ConfigError, match="train.masking"):
    tiny().with_overrides({"train.masking": "random"})


def test_training_batches_are_a_pure_function_of_step_and_position(tmp_path, patch_encoder):
  config = tiny().with_overrides({"train.batch_size": 8})
  ds = data_lib.SyntheticDataset(20, config.image_size, config.num_class)
  cache = token_cache.build(str(tmp_path / "t"), ds, patch_encoder(config), config, progress=False)
  a, b = training.TrainingData(cache, config), training.TrainingData(cache, config)
  first = [a.global_batch(s, 8 * s) for s in range(6)]  # 48 examples: crosses two epoch boundaries
  for s in (5, 2):
    for key in first[s]:
      np.testing.assert_array_equal(b.global_batch(s, 8 * s)[key], first[s][key])
  epoch = np.concatenate([a.indices(0, 20)])
  assert sorted(epoch) == list(range(20))
  halves = [training.shard(first[0], i, 2)["input_ids"] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), first[0]["input_ids"])


# Training helpers --------------------------------------------------------------------------------------------
def test_learning_rate_warmup_and_cosine():
  train = configs.TrainConfig(lr=1e-3, warmup_steps=10, num_train_steps=110, lr_schedule="cosine")
  lr = lambda step: training.learning_rate(step, train.lr, train.warmup_steps, train.lr_schedule,
                                           train.num_train_steps)
  assert lr(0) == pytest.approx(1e-4)
  assert lr(9) == pytest.approx(1e-3)
  assert lr(60) == pytest.approx(5e-4)
  assert lr(110) == pytest.approx(0.0, abs=1e-12)
  assert training.learning_rate(500, 1e-3, 10) == 1e-3  # constant after the warmup


def test_data_order_is_one_scheme_for_every_trainer():
  """Epoch permutations read from a position: batches cross epoch boundaries, and with a batch size dividing the
  dataset it is the tokenizer trainers' former per-epoch order (each epoch a permutation, read in batches)."""
  order = training.DataOrder(20, seed=5)
  stream = np.concatenate([order.indices(8 * s, 8) for s in range(5)])  # 40 examples = two epochs
  assert sorted(stream[:20]) == list(range(20)) and sorted(stream[20:]) == list(range(20))
  np.testing.assert_array_equal(stream[:20], np.random.default_rng([5, 0, 0]).permutation(20))
  np.testing.assert_array_equal(training.DataOrder(20, seed=5).indices(13, 11), stream[13:24])  # any position
  assert not np.array_equal(stream[:20], stream[20:])


def test_checkpoint_dir_keeps_last_n_and_skips_corrupt(tmp_path):
  ckpts = training.CheckpointDir(str(tmp_path), keep=2)

  def writer(value):
    def write(directory):
      os.makedirs(os.path.join(directory, "sub"))
      with open(os.path.join(directory, "sub", "x.bin"), "wb") as f:
        f.write(bytes([value]) * 100)
    return write

  for step in (1, 2, 3):
    ckpts.save(step, writer(step), {"position": step * 10})
  assert ckpts.steps() == [2, 3]
  with open(os.path.join(ckpts.path(3), "sub", "x.bin"), "r+b") as f:
    f.write(b"\x00")
  with pytest.warns(RuntimeWarning, match="ckpt_000000003 is corrupt .checksum mismatch in sub/x.bin"):
    step, _, manifest = ckpts.latest()
  assert step == 2 and manifest["meta"]["position"] == 20
  os.remove(os.path.join(ckpts.path(2), training.MANIFEST))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert ckpts.latest() is None


def test_metrics_writer_tensorboard_events_and_resume(tmp_path, tensorboard_scalars):
  pytest.importorskip("tensorboard")
  writer = training.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step, "lr": 0.5})
  writer.close()
  writer = training.MetricsWriter(str(tmp_path), resume_step=2)  # resumed from step 2: step 3 is logged again
  writer.write(3, {"loss": 7.0})
  writer.close()
  rows = training.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 7.0)]
  assert len([f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]) == 2
  scalars = tensorboard_scalars(str(tmp_path))
  assert scalars["loss"] == [(1, 1.0), (2, 0.5), (3, 7.0)]  # the first run's step 3 purged by the resumed one
  assert scalars["lr"] == [(1, 0.5), (2, 0.5)]
