"""torch- and JAX-made samples from the same converted weights and the same injected draws score identically
(issue 9): `run.py eval` decodes every backend's tokens with one tokenizer, so identical tokens give identical
images, features and metrics."""

import json

import numpy as np
import torch


def test_identical_tokens_give_identical_features_and_metrics_in_both_backends(tiny_checkpoint, tiny_pipelines,
                                                                              tmp_path):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import evaluation  # pylint: disable=import-outside-toplevel
  from evaluation import inception, sampler, shards  # pylint: disable=import-outside-toplevel
  from maskgit_common.data import write_synthetic_folder  # pylint: disable=import-outside-toplevel
  from maskgit_jax import sampler as jax_sampler  # pylint: disable=import-outside-toplevel
  from maskgit_torch import sampler as torch_sampler  # pylint: disable=import-outside-toplevel
  config = tiny_checkpoint[0]
  ref = write_synthetic_folder(str(tmp_path / "ref"), 20000, 6)

  def draws(labels, seed):
    rng = np.random.default_rng(seed)
    n, b = config.sampler.num_iter, len(labels)
    return (rng.gumbel(size=(n, b, config.seq_len, config.codebook_size)).astype(np.float32),
            rng.gumbel(size=(n, b, config.seq_len)).astype(np.float32))

  noise = {"jax": lambda l, s: jax_sampler.RecordedNoise(*map(jnp.asarray, draws(l, s))),
           "torch": lambda l, s: torch_sampler.RecordedNoise(*map(torch.as_tensor, draws(l, s)))}
  decoder = tiny_pipelines[("torch", "torch")]
  extractor = inception.build_extractor(None, device="cpu", batch_size=6)  # one network scores both
  reports, features = {}, {}
  for backend in ("torch", "jax"):
    model = tiny_pipelines[(backend, "torch")]
    generate = sampler.generate_fn(model, decoder, config.sampler.num_iter, noise_for=noise[backend])
    out = str(tmp_path / backend)
    reports[backend] = evaluation.evaluate(generate, extractor, 6, config.num_class, out, ref, batch_size=3, seed=5,
                                         k=2, splits=1, log=lambda *a: None)
    pool, _ = shards.sample_features(out, 6, 3, extractor)
    features[backend] = np.asarray(pool)
  np.testing.assert_array_equal(features["torch"], features["jax"])
  assert features["torch"].shape[0] == 6 and np.isfinite(features["torch"]).all()
  names = ("fid", "inception_score", "precision", "recall", "density", "coverage")
  metrics = {b: {k: r[k] for k in names} for b, r in reports.items()}
  assert json.dumps(metrics["torch"], sort_keys=True) == json.dumps(metrics["jax"], sort_keys=True)
  assert metrics["torch"]["fid"] > 0  # random weights, random-looking samples: far from the references
