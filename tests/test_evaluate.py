"""The evaluation package (issue 9): resumable sampling, reference formats, the Inception extractor and its weights.

Most tests use a cheap numpy extractor; the end-to-end tests run the real FID Inception architecture with seeded
random weights (no weights file is available offline) on a few tiny images.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluation
from evaluation import inception, metrics, shards, sources
from evaluation.features import EvalError, FeatureExtractor
from maskgit_common.images import to_uint8

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Helpers ---------------------------------------------------------------------------------------------------------
def _images(seed, labels, size=8):
  """Deterministic smooth images: a colour per label plus seeded noise, floats in [0, 1] (a little outside too)."""
  rng = np.random.default_rng(seed)
  base = (np.asarray(labels)[:, None, None, None] + 1) / 8.0 * np.array([1.0, 0.6, 0.3])
  return (base + 0.3 * rng.random((len(labels), size, size, 3)) - 0.05).astype(np.float32)


class CountingGenerator:
  """A `generate_fn` that records its calls and can fail after a number of calls (an interrupted run)."""

  def __init__(self, fail_after=None, offset=0.0):
    self.calls, self.fail_after, self.offset = [], fail_after, offset

  def __call__(self, labels, seed):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise KeyboardInterrupt("simulated interruption")
    self.calls.append((labels.tolist(), seed))
    images = _images(seed, labels) + self.offset
    return images, np.tile(labels[:, None, None], (1, 2, 2))


def _cheap_extractor(dim=6, random_init=False, name="cheap"):
  """A fixed random projection of pixel statistics: deterministic, different images give different features."""
  proj = np.random.default_rng(123).normal(size=(9, dim))

  def fn(images):
    x = images.astype(np.float64) / 255.0
    stats = np.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, ::2, ::2].mean((1, 2)) ** 2], axis=1)
    return stats @ proj, stats @ proj[:, :4] * 3
  return FeatureExtractor(fn=fn, id=f"{name}-{dim}", description=f"test extractor {name}", random_init=random_init)


def _write_folder(folder, images_uint8):
  os.makedirs(folder, exist_ok=True)
  for i, image in enumerate(images_uint8):
    Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
  return folder


def _quiet(*_):
  pass


@pytest.fixture(scope="module")
def random_extractor():
  return inception.build_extractor(None, device="cpu", batch_size=8, seed=0)


# Resumable sampling ----------------------------------------------------------------------------------------------
def test_resume_never_regenerates_finished_shards(tmp_path):
  out, ref = str(tmp_path / "out"), _write_folder(str(tmp_path / "ref"), to_uint8(_images(99, [0] * 8)))
  args = dict(num_samples=10, num_classes=3, ref=ref, batch_size=4, seed=5, k=2, splits=2, log=_quiet)
  interrupted = CountingGenerator(fail_after=2)
  with pytest.raises(KeyboardInterrupt):
    evaluation.evaluate(interrupted, _cheap_extractor(), out_dir=out, **args)
  assert len(interrupted.calls) == 2 and sorted(os.listdir(os.path.join(out, "samples"))) == [
      "shard_00000.npz", "shard_00001.npz"]
  resumed = CountingGenerator()
  report = evaluation.evaluate(resumed, _cheap_extractor(), out_dir=out, **args)
  assert [seed for _, seed in resumed.calls] == [shards.batch_seed(5, 2)]  # only the missing shard
  assert resumed.calls[0][0] == [2, 0, 1, 2]  # samples 8..11: class i % 3
  again = CountingGenerator()
  assert evaluation.evaluate(again, _cheap_extractor(), out_dir=out, **args) == report and again.calls == []
  # An uninterrupted run in a fresh folder gives the same report, bit for bit.
  fresh = evaluation.evaluate(CountingGenerator(), _cheap_extractor(), out_dir=str(tmp_path / "fresh"), **args)
  assert {k: v for k, v in fresh.items() if k != "samples"} == {k: v for k, v in report.items() if k != "samples"}
  # More samples later: only the new shards are generated; a damaged shard is made again.
  with open(shards.shard_path(out, 1), "wb") as f:
    f.write(b"truncated")
  more = CountingGenerator()
  report = evaluation.evaluate(more, _cheap_extractor(), out_dir=out, **{**args, "num_samples": 13})
  assert [seed for _, seed in more.calls] == [shards.batch_seed(5, i) for i in (1, 3)]
  assert report["num_samples"] == 13


def test_resume_refuses_other_settings(tmp_path):
  out, ref = str(tmp_path / "out"), _write_folder(str(tmp_path / "ref"), to_uint8(_images(9, [0] * 8)))
  args = dict(num_samples=4, num_classes=2, out_dir=out, ref=ref, batch_size=4, k=2, splits=1, log=_quiet)
  evaluation.evaluate(CountingGenerator(), _cheap_extractor(), settings={"backend": "torch", "steps": 8}, **args)
  with pytest.raises(EvalError, match="seed: 0 there, 1 now"):
    evaluation.evaluate(CountingGenerator(), _cheap_extractor(), seed=1, settings={"backend": "torch", "steps": 8},
                      **args)
  with pytest.raises(EvalError, match="backend: 'torch' there, 'jax' now"):
    evaluation.evaluate(CountingGenerator(), _cheap_extractor(), settings={"backend": "jax", "steps": 8}, **args)


def test_shards_are_keyed_on_their_plan_not_on_the_folder(tmp_path):
  """Issue 14, finding 2: a shard is reused only under the plan that made it (manifest and shard agree)."""
  out = str(tmp_path / "out")
  plan = dict(seed=0, settings={"weights_sha256": "a" * 64, "steps": 4}, log=_quiet)
  shards.generate_samples(CountingGenerator(), out, 4, 2, 4, **plan)
  made = np.load(shards.shard_path(out, 0))
  assert str(made["plan_sha256"]) == shards.plan_sha256(json.load(open(os.path.join(out, "manifest.json")))["plan"])
  with pytest.raises(EvalError, match="weights_sha256: 'aaaa.* there, 'bbbb.* now.*nothing was changed"):
    shards.generate_samples(CountingGenerator(), out, 4, 2, 4, seed=0,
                            settings={"weights_sha256": "b" * 64, "steps": 4}, log=_quiet)
  # Without its manifest, nobody can tell what made a shard: refused, not reused.
  os.remove(os.path.join(out, "manifest.json"))
  with pytest.raises(EvalError, match="manifest.json is missing"):
    shards.generate_samples(CountingGenerator(), out, 4, 2, 4, **plan)
  # A shard of another plan under this manifest (copied in): refused, not mixed.
  other = str(tmp_path / "other")
  shards.generate_samples(CountingGenerator(), other, 4, 2, 4, seed=0, settings={"steps": 5}, log=_quiet)
  os.makedirs(os.path.join(str(tmp_path / "fresh"), "samples"))
  fresh = str(tmp_path / "fresh")
  shards.check_plan(fresh, {"format": shards.MANIFEST_FORMAT, "seed": 0, "batch_size": 4, "num_classes": 2,
                            "steps": 4})
  with open(shards.shard_path(other, 0), "rb") as src, open(shards.shard_path(fresh, 0), "wb") as dst:
    dst.write(src.read())
  generator = CountingGenerator()
  with pytest.raises(EvalError, match="made with other settings"):
    shards.generate_samples(generator, fresh, 4, 2, 4, seed=0, settings={"steps": 4}, log=_quiet)
  assert generator.calls == []


def test_samples_are_class_balanced_uint8_and_exportable(tmp_path):
  out = str(tmp_path / "out")
  generator = CountingGenerator()
  made = shards.generate_samples(generator, out, 7, 3, 3, seed=2, write_png=True, log=_quiet)
  assert made == 3
  exported = np.load(shards.export_adm_npz(out, 7, 3, str(tmp_path / "samples.npz")))
  np.testing.assert_array_equal(exported["arr_1"], [0, 1, 2, 0, 1, 2, 0])
  expected = np.concatenate([to_uint8(_images(seed, labels)) for labels, seed in generator.calls])[:7]
  np.testing.assert_array_equal(exported["arr_0"], expected)  # clip + round, as a PNG stores them
  pngs = sources.list_images(os.path.join(out, "samples", "png"))
  assert [os.path.basename(p) for p in pngs][-1] == "000006_class0.png" and len(pngs) == 7
  np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), expected)


# Reference formats -----------------------------------------------------------------------------------------------
def test_reference_formats(tmp_path):
  extractor = _cheap_extractor()
  ref_images = to_uint8(_images(7, np.arange(12) % 4))
  sample_images = to_uint8(_images(8, np.arange(10) % 4))
  samples = _write_folder(str(tmp_path / "samples"), sample_images)
  ref_pool, _ = extractor(ref_images)
  pool, logits = extractor(sample_images)
  mu, sigma = metrics.feature_statistics(ref_pool)

  def score(ref, name, **kw):
    return evaluation.evaluate_folder(samples, extractor, str(tmp_path / name), ref, batch_size=4, k=3, splits=2,
                                    log=_quiet, **kw)

  folder = score(_write_folder(str(tmp_path / "ref"), ref_images), "folder")
  assert abs(folder["fid"] - metrics.frechet_distance(*metrics.feature_statistics(pool), mu, sigma)) < 1e-9
  assert folder["inception_score"] == metrics.inception_score(logits, 2)[0]
  assert {k: folder[k] for k in evaluation.PRDC_NAMES} == metrics.prdc(ref_pool, pool, k=3)
  # The same images as an ADM image batch (compressed, streamed in batches) and as our saved statistics.
  np.savez_compressed(tmp_path / "batch.npz", arr_0=ref_images)
  assert score(str(tmp_path / "batch.npz"), "batch")["fid"] == folder["fid"]
  ours = score(str(tmp_path / "folder" / "reference_stats.npz"), "ours")
  assert {k: ours[k] for k in ("fid", "inception_score") + evaluation.PRDC_NAMES} == {
      k: folder[k] for k in ("fid", "inception_score") + evaluation.PRDC_NAMES}
  # ADM reference batch: FID against its stored mu/sigma, precision/recall against its arr_0 images.
  stored_mu, stored_sigma = mu + 1.0, sigma * 2.0
  np.savez(tmp_path / "adm.npz", arr_0=ref_images, mu=stored_mu, sigma=stored_sigma)
  adm = score(str(tmp_path / "adm.npz"), "adm")
  assert abs(adm["fid"] - metrics.frechet_distance(*metrics.feature_statistics(pool), stored_mu, stored_sigma)) < 1e-9
  assert adm["precision"] == folder["precision"] and "stored in" in adm["reference"]["description"]
  assert score(str(tmp_path / "adm.npz"), "adm2", fid_stats="features")["fid"] == folder["fid"]
  # pytorch-fid statistics: FID only.
  np.savez(tmp_path / "pfid.npz", mu=mu, sigma=sigma)
  pfid = score(str(tmp_path / "pfid.npz"), "pfid")
  assert abs(pfid["fid"] - folder["fid"]) < 1e-9
  assert pfid["precision"] is None and pfid["reference"]["num_features"] is None


def test_reference_errors(tmp_path):
  extractor, random_init = _cheap_extractor(), _cheap_extractor(random_init=True, name="rand")
  images = to_uint8(_images(1, np.arange(6) % 2))
  evaluation.save_stats(str(tmp_path / "stats.npz"), *extractor(images), extractor)
  np.savez(tmp_path / "pfid.npz", mu=np.zeros(6), sigma=np.eye(6))
  np.savez(tmp_path / "odd.npz", something=np.zeros(3))
  np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32))
  load = lambda ref, ex=extractor: evaluation.load_reference(str(ref), ex, 4, str(tmp_path / "c.npz"), log=_quiet)
  with pytest.raises(EvalError, match="made by cheap-6; this run uses rand-6"):
    load(tmp_path / "stats.npz", random_init)
  with pytest.raises(EvalError, match="random-init"):
    load(tmp_path / "pfid.npz", random_init)
  with pytest.raises(EvalError, match=r"found arrays \['something'\]"):
    load(tmp_path / "odd.npz")
  with pytest.raises(EvalError, match="expected uint8"):
    load(tmp_path / "floats.npz")
  with pytest.raises(EvalError, match="no such file"):
    load(tmp_path / "missing")
  with pytest.raises(EvalError, match="no images"):
    load(_write_folder(str(tmp_path / "empty"), []))


# The Inception extractor -----------------------------------------------------------------------------------------
def test_wrong_weights_file_is_refused(tmp_path):
  with pytest.raises(inception.InceptionWeightsError, match="not found"):
    inception.build_extractor(str(tmp_path / "missing.pth"))
  # A torch state dict under the right name, but not the FID weights: refused by its hash before it is read.
  path = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
  with pytest.raises(inception.InceptionWeightsError, match="hash mismatch") as error:
    inception.build_extractor(path)
  assert inception.sha256_file(path) in str(error.value) and "6726825d0af5f729" in str(error.value)


def test_weights_loading_checks_every_key(tmp_path, monkeypatch):
  model = inception.random_inception(seed=3)
  state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
  good, bad = str(tmp_path / "good.pth"), str(tmp_path / "bad.pth")
  torch.save(state, good)
  torch.save({"fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1)}, bad)
  monkeypatch.setitem(inception.KNOWN_WEIGHTS, inception.sha256_file(good), "test weights")
  monkeypatch.setitem(inception.KNOWN_WEIGHTS, inception.sha256_file(bad), "test weights")
  loaded, _ = inception.load_inception(good)
  for key, value in model.state_dict().items():
    assert torch.equal(loaded.state_dict()[key], value), key
  with pytest.raises(inception.InceptionWeightsError, match=r"missing Conv2d_1a_3x3.bn.bias, .* \(471 in all\); "
                     r"unexpected AuxLogits.fc.weight; mis-shaped fc.weight \(1000, 2048\) != \(1008, 2048\)"):
    inception.load_inception(bad)
  # The file's names are the pytorch-fid (torchvision Inception3, aux_logits=False) names.
  assert {"Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch5x5_2.bn.running_var", "Mixed_7c.branch3x3dbl_3b.conv.weight",
          "fc.weight", "fc.bias"} <= set(state)
  # Float32 bytes of the state dict: the released file (95,628,359 bytes) is these plus ~86 kB of pickle framing.
  assert sum(v.numel() * 4 for v in state.values()) == 95_541_568


def test_tf_pooling_quirks():
  # Mixed_7c pools its fourth branch with max, the other blocks with a padding-excluding average.
  x = torch.zeros(1, 1, 3, 3)
  x[0, 0, 0, 0] = 9.0
  model = inception.FIDInceptionV3()
  assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool
  assert inception._tf_avg_pool(x)[0, 0, 0, 0] == 9.0 / 4  # corner: 4 real pixels, not 9


def test_end_to_end_random_init_and_identical_samples(tmp_path, random_extractor, monkeypatch):
  """The whole pipeline on the real architecture; two 'backends' making the same samples give the same features
  and metrics; a folder of the sample PNGs gives the same features as the shards."""
  # The same network at the smallest input Inception-v3 takes (75 px), 16x cheaper on CPU than 299.
  monkeypatch.setattr(inception, "INPUT_SIZE", 75)
  ref = _write_folder(str(tmp_path / "ref"), to_uint8(_images(50, np.arange(3))))
  args = dict(num_samples=4, num_classes=3, ref=ref, batch_size=2, seed=1, k=2, splits=2, log=_quiet)
  printed = []
  first = evaluation.evaluate(CountingGenerator(), random_extractor, out_dir=str(tmp_path / "a"), write_png=True,
                            **{**args, "log": printed.append})

  def other_backend(labels, seed):  # the same samples, in another dtype and without tokens
    return CountingGenerator()(labels, seed)[0].astype(np.float64)

  second = evaluation.evaluate(other_backend, random_extractor, out_dir=str(tmp_path / "b"), **args)
  pool_a, logits_a = shards.sample_features(str(tmp_path / "a"), 4, 2, random_extractor)
  pool_b, logits_b = shards.sample_features(str(tmp_path / "b"), 4, 2, random_extractor)
  np.testing.assert_array_equal(pool_a, pool_b)
  np.testing.assert_array_equal(logits_a, logits_b)
  names = ("fid", "inception_score", "inception_score_std") + evaluation.PRDC_NAMES
  assert {n: first[n] for n in names} == {n: second[n] for n in names}
  # The metrics are those of the features, recomputed outside the pipeline.
  ref_pool = np.load(tmp_path / "a" / "reference_stats.npz")["features"]
  assert ref_pool.shape == (3, 2048) and pool_a.shape == (4, 2048) and logits_a.shape == (4, 1008)
  # FID through the Gram matrix of the centred features (4 and 3 vectors in 2048-d: singular covariances).
  x1, x2 = pool_a.astype(np.float64), ref_pool.astype(np.float64)
  c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
  gram = (c2 @ c1.T) @ (c1 @ c2.T) / (3 * 2)
  expected = (np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.sum(c1 ** 2) / 3 + np.sum(c2 ** 2) / 2
              - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum())
  assert abs(first["fid"] - expected) < 1e-6
  assert abs(first["inception_score"] - metrics.inception_score(logits_a, 2)[0]) < 1e-6
  assert {n: first[n] for n in evaluation.PRDC_NAMES} == metrics.prdc(ref_pool, pool_a, k=2)
  assert first["fid"] > 1e-3 and pool_a.std(axis=0).mean() > 1e-4  # the random network still tells images apart
  # Clearly labelled: JSON and table.
  assert first["extractor"]["random_init"] and first["warning"] == evaluation.RANDOM_INIT_WARNING
  table = next(line for line in printed if "samples vs" in line)
  assert "RANDOM-INIT" in table and "RANDOM-INIT" in first["extractor"]["description"]
  with open(tmp_path / "a" / "metrics.json") as f:
    assert json.load(f) == first
  # Folder mode over the PNGs written during sampling: the same features, so the same metrics.
  folder = evaluation.evaluate_folder(str(tmp_path / "a" / "samples" / "png"), random_extractor, str(tmp_path / "c"),
                                    ref, batch_size=2, k=2, splits=2, log=_quiet)
  assert {n: folder[n] for n in names} == {n: first[n] for n in names}


def test_random_init_is_seeded(random_extractor):
  a, b = inception.random_inception(seed=0), inception.random_inception(seed=0)
  assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
  # build_extractor(None) is this network (seed 0) at the real 299 px input; He-scaled activations do not vanish.
  image = to_uint8(_images(3, [1]))
  pool, logits = inception.inception_features(a, image)
  assert pool.shape == (1, 2048) and logits.shape == (1, 1008) and 1e-2 < np.abs(pool).mean() < 1e2
  np.testing.assert_array_equal(random_extractor(image)[0], pool)
  assert "random-init" in random_extractor.id and random_extractor.random_init


def test_evaluation_package_imports_no_framework():
  code = ("import sys, evaluation, evaluation.metrics, evaluation.sampler, maskgit_common.generate; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'flax')))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]"
