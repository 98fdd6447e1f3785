"""Transformer training in both backends: learning, exact resume, corrupt checkpoints, NaN, data parallel, parity.

Fast tests read a token cache built with a cheap numpy "tokenizer" (4x4 patch mean colour -> one of 64 codes): it
gives codes with real structure in milliseconds, so the tests exercise the training loop, not the VQGAN encoder.
The whole path from images through a real tokenizer is in the slow tests.
"""

import math
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

import configs
import conversion
from maskgit_common import masking, training
from tests.conftest import small_train_config as small_config, tensorboard_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(train_token_cache):
  return train_token_cache


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def backend(name):
  if name == "jax":
    pytest.importorskip("flax")
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_default_matmul_precision", "highest")
    from maskgit_jax import train  # pylint: disable=import-outside-toplevel
  else:
    pytest.importorskip("torch")
    from maskgit_torch import train  # pylint: disable=import-outside-toplevel
  return train


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_learns_resumes_exactly_and_skips_a_corrupt_checkpoint(name, cache, tmp_path):
  train = backend(name)
  config = small_config(cache)
  workdir = str(tmp_path / "run")
  full = train.train(config, workdir, progress=False)
  losses = np.asarray(full["losses"])
  assert len(losses) == 30 and np.all(np.isfinite(losses))
  # Uniform prediction over K codes costs ln K (label smoothing adds nothing to a uniform guess).
  uniform = math.log(config.codebook_size)
  assert abs(losses[0] - uniform) < 0.05, losses[0]
  assert losses[-5:].mean() < uniform - 0.45, losses[-5:]

  ckpts = training.CheckpointDir(os.path.join(workdir, "checkpoints"))
  assert ckpts.steps() == [10, 20, 30]
  meta = ckpts.verify(30)[2]["meta"]  # what the resume checks read: the writer, the data position, the run
  assert (meta["backend"], meta["step"], meta["position"]) == (name, 30, 30 * 16)
  assert meta["run"] == training.transformer_fingerprint(config)
  # Corrupt the newest checkpoint: the run must warn, resume from step 20 and retrace the same losses bit for bit.
  newest = ckpts.path(30)
  victim = max((os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs if f != training.MANIFEST),
               key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\xff\x00\xff\x00")
  with pytest.warns(RuntimeWarning, match="ckpt_000000030 is corrupt"):
    resumed = train.train(config, workdir, progress=False)
  np.testing.assert_array_equal(np.asarray(resumed["losses"]), losses[20:])
  assert ckpts.verify(30)[0]

  logged = training.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]  # the resumed steps replaced, not repeated
  assert logged[-1]["loss"] == pytest.approx(losses[29], rel=1e-6)
  scalars = tensorboard_scalars(workdir)  # as TensorBoard shows them: the resumed steps purged, not repeated
  assert [s for s, _ in scalars["loss"]] == [5, 10, 15, 20, 25, 30]
  np.testing.assert_allclose([v for _, v in scalars["loss"]], losses[4::5], rtol=1e-7)
  exported = configs.MaskGITConfig.load(os.path.join(workdir, "export", "config.json"))
  assert exported == config


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(name, cache, tmp_path):
  train = backend(name)
  # lr 1e37: the first Adam step moves every weight by ~1e37 (still finite), so the second forward pass overflows.
  config = small_config(cache, lr=1e37, warmup_steps=0, checkpoint_every_steps=1, num_train_steps=5)
  workdir = str(tmp_path / "run")
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite training values at step 1 .*checkpoint \(step 1"):
    train.train(config, workdir, progress=False)
  ckpts = training.CheckpointDir(os.path.join(workdir, "checkpoints"))
  assert ckpts.steps() == [1] and ckpts.verify(1)[0]


def test_one_step_cross_backend_parity(tmp_path):
  """Same converted weights, batch and masks: one AdamW step in JAX and torch agree.

  Measured on CPU (float32, highest matmul precision): loss |diff| 4.8e-7 (1 ulp at 4.16), updated weights max
  |diff| 6.5e-7 while every weight moved by ~lr = 1e-3. The weights tolerance is 2e-3 * lr: Adam's first step is
  lr * g / (|g| + eps), so weights whose gradients are rounding-level (|g| ~ eps, e.g. the key bias, whose exact
  gradient is 0) move by amounts that depend on the last bits of g; every other weight agrees to float32 rounding.
  """
  pytest.importorskip("torch")
  pytest.importorskip("flax")
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import conversion  # pylint: disable=import-outside-toplevel
  from maskgit_torch import checkpoint as torch_checkpoint  # pylint: disable=import-outside-toplevel
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  from maskgit_torch.transformer import Transformer  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")
  lr = 1e-3
  # No dropout: dropout masks are framework RNG draws, which this check does not inject.
  config = small_config(lr=lr, warmup_steps=0).with_overrides({"transformer.dropout_rate": 0.0})
  params = jax_train.initial_params(config, 0)
  rng = np.random.default_rng(0)
  codes = rng.integers(0, config.codebook_size, (16, config.latent_size, config.latent_size))
  labels = rng.integers(0, config.num_class, 16)
  batch = masking.make_batch(codes, labels, masking.draw_noise(rng, 16, config.num_tokens), config)

  step = jax.jit(jax_train.make_train_step(config))
  new_state, jax_metrics = step(jax_train.create_state(config, params),
                                {k: jnp.asarray(batch[k]) for k in jax_train.BATCH_KEYS}, jnp.float32(lr),
                                jnp.int32(0))
  model = Transformer(config)
  model.load_state_dict(torch_checkpoint.from_flat(config, "transformer",
                                                   conversion.flatten({"params": jax.device_get(params)})))
  optimizer = torch_train.make_optimizer(model, config.train)
  torch_metrics = torch_train.train_step(model, optimizer, torch_train.EMA(model),
                                         {k: torch.from_numpy(batch[k]) for k in torch_train.BATCH_KEYS}, lr, config)
  assert abs(float(jax_metrics["loss"]) - float(torch_metrics["loss"])) <= 2e-6
  assert float(jax_metrics["grad_norm"]) == pytest.approx(float(torch_metrics["grad_norm"]), rel=1e-5)

  want = conversion.flatten({"params": jax.device_get(new_state["params"])})
  got = torch_checkpoint.to_flat(config, "transformer", model)
  before = conversion.flatten({"params": jax.device_get(params)})
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=0, atol=2e-3 * lr, err_msg=key)
  moved = np.median([np.abs(np.asarray(want[k]) - np.asarray(before[k])).max() for k in want])
  assert moved > 0.5 * lr  # the step really moved the weights, so the comparison is not vacuous


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_gradient_accumulation_equals_one_batch_k_times_larger(name):
  """train.grad_accum=4 splits the batch of 16 into 4 micro-batches: loss, gradient norm and the AdamW update equal
  the one-batch step up to float32 rounding (measured on CPU: equal losses, grad norms within 1 ulp, weights
  within 3.5e-7 (JAX) and 2.2e-8 (torch) while each moved by ~lr = 1e-3. The weights bound is the cross-backend
  step's above, for the same reason: Adam's first step turns rounding-level gradients into moves of up to lr)."""
  backend(name)
  lr = 1e-3
  config = small_config(lr=lr, warmup_steps=0).with_overrides({"transformer.dropout_rate": 0.0})
  rng = np.random.default_rng(1)
  codes = rng.integers(0, config.codebook_size, (16, config.latent_size, config.latent_size))
  labels = rng.integers(0, config.num_class, 16)
  batch = masking.make_batch(codes, labels, masking.draw_noise(rng, 16, config.num_tokens), config)
  runs = {}
  for k in (1, 4):
    cfg = config.with_overrides({"train.grad_accum": k})
    if name == "jax":
      import jax  # pylint: disable=import-outside-toplevel
      import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
      from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
      state = jax_train.create_state(cfg, jax_train.initial_params(cfg, 0))
      new, metrics = jax.jit(jax_train.make_train_step(cfg))(state, {k: jnp.asarray(batch[k]) for k in
                                                                     jax_train.BATCH_KEYS}, jnp.float32(lr), 0)
      weights = conversion.flatten({"params": jax.device_get(new["params"])})
    else:
      import torch  # pylint: disable=import-outside-toplevel
      from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
      from maskgit_torch.transformer import Transformer  # pylint: disable=import-outside-toplevel
      torch.manual_seed(0)
      model = Transformer(cfg)
      metrics = torch_train.train_step(model, torch_train.make_optimizer(model, cfg.train), None,
                                       {k: torch.from_numpy(batch[k]) for k in torch_train.BATCH_KEYS}, lr, cfg)
      weights = {k: v.numpy() for k, v in model.state_dict().items()}
    runs[k] = ({m: float(metrics[m]) for m in ("loss", "grad_norm")}, weights)
  (one, w1), (four, w4) = runs[1], runs[4]
  assert four["loss"] == pytest.approx(one["loss"], rel=1e-6) and four["loss"] > 1.0
  assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5) and four["grad_norm"] > 0.01
  for key in w1:
    np.testing.assert_allclose(w4[key], w1[key], rtol=0, atol=2e-3 * lr, err_msg=key)


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_a_row_without_masked_tokens_adds_nothing_to_the_loss(name):
  """Bernoulli masking can mask no token of a row: its masked-token loss is 0 / 0; it must count as 0, and the
  other rows keep the official per-example mean."""
  backend(name)
  from maskgit_common.token_layout import token_layout  # pylint: disable=import-outside-toplevel
  config = small_config()
  layout = token_layout(config)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, config.seq_len, layout.logits_width)).astype(np.float32)
  targets = rng.integers(0, config.codebook_size, (2, config.num_tokens)).astype(np.int32)
  weights = np.zeros((2, config.num_tokens), np.float32)
  weights[0, :5] = 1.0
  if name == "jax":
    from maskgit_jax.train import cross_entropy_loss  # pylint: disable=import-outside-toplevel
    loss, (_, counted) = cross_entropy_loss(logits, targets, weights, 0.1, layout)
    one, _ = cross_entropy_loss(logits[:1], targets[:1], weights[:1], 0.1, layout)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    from maskgit_torch.train import cross_entropy_loss  # pylint: disable=import-outside-toplevel
    t = lambda x: torch.from_numpy(x)
    loss, (_, counted) = cross_entropy_loss(t(logits), t(targets), t(weights), 0.1, layout)
    one, _ = cross_entropy_loss(t(logits[:1]), t(targets[:1]), t(weights[:1]), 0.1, layout)
  assert np.isfinite(float(loss)) and float(counted) == 5.0
  assert float(loss) == pytest.approx(float(one) / 2, rel=1e-6)  # the empty row: 0 in the batch mean


# Data parallel and kill -9 (subprocesses: slow) ------------------------------------------------------------------
_SCRIPT = """
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import test_train as t
from tests.conftest import small_train_config
cfg = small_train_config({cache!r}, num_train_steps={steps}, log_every_steps=1).with_overrides({overrides!r})
t.backend({name!r}).train(cfg, {workdir!r}, progress=False)
"""


def _script(tmp_dir, name, cache, workdir, steps, overrides=None):
  path = os.path.join(tmp_dir, f"run_{name}_{os.path.basename(workdir)}.py")
  with open(path, "w") as f:
    f.write(_SCRIPT.format(repo=REPO, tests=os.path.dirname(__file__), cache=cache, steps=steps, name=name,
                           workdir=workdir, overrides=dict(overrides or {})))
  return path


def _run(name, cache, workdir, steps, env=None, launcher=(), overrides=None):
  """Trains in a subprocess; returns the per-step losses of metrics.jsonl (exact: JSON keeps every float bit)."""
  script = _script(os.path.dirname(workdir), name, cache, workdir, steps, overrides)
  proc = subprocess.run([*launcher, script] if launcher else [sys.executable, script], capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.asarray([r["loss"] for r in training.read_jsonl(os.path.join(workdir, "metrics.jsonl"))])


@pytest.mark.slow
def test_jax_eight_devices_match_one(cache, tmp_path):
  backend("jax")
  one = _run("jax", cache, str(tmp_path / "one"), 6)
  eight = _run("jax", cache, str(tmp_path / "eight"), 6,
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  # Same global batch, masks and dropout keys; only the order of the cross-device sums differs.
  np.testing.assert_allclose(eight, one, rtol=2e-6, atol=0)


@pytest.mark.slow
def test_torch_ddp_two_processes_match_one(cache, tmp_path):
  backend("torch")
  # Dropout off: torch draws dropout masks from each process's own generator, so 2 processes cannot draw the
  # masks one process draws for the same rows (JAX derives them from one key over the global batch, so its
  # 8-device test keeps dropout on). What is compared is the data-parallel math: sharded batch, all-reduce.
  no_dropout = {"transformer.dropout_rate": 0.0}
  one = _run("torch", cache, str(tmp_path / "one"), 6, overrides=no_dropout)
  two = _run("torch", cache, str(tmp_path / "two"), 6, overrides=no_dropout,
             launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"))
  np.testing.assert_allclose(two, one, rtol=2e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jax", "torch"])
def test_sigkill_mid_training_resumes_bit_identical(name, cache, tmp_path):
  backend(name)
  resumed, reference = sigkill_and_resume(name, cache, tmp_path)
  np.testing.assert_array_equal(resumed, reference)  # steps before the kill and after the resume, bit for bit


def sigkill_and_resume(name, cache, tmp_path, overrides=None):
  """(losses of a run killed with SIGKILL after step 15 and run again, losses of an uninterrupted run), 30 steps
  each; tests/test_train_recipe.py runs it under the seed recipe."""
  reference = _run(name, cache, str(tmp_path / "ref"), 30, overrides=overrides)
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, _script(str(tmp_path), name, cache, workdir, 30, overrides)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, "metrics.jsonl")
  while proc.poll() is None:  # kill -9 once step 15 is logged: the last checkpoint is step 10
    if os.path.exists(metrics) and any(r["step"] >= 15 for r in training.read_jsonl(metrics)):
      os.kill(proc.pid, signal.SIGKILL)
      break
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
  # The same command again: resumes from the newest good checkpoint.
  return _run(name, cache, workdir, 30, overrides=overrides), reference


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jax", "torch"])
def test_tiny_preset_on_synthetic_images(name, tmp_path):
  """The real path: synthetic images -> the demo's trained tokenizer -> token cache -> 300 steps of the tiny
  transformer. (With a random tokenizer the codes carry little of the images' structure: 300 steps only reach
  ~0.55 below ln K, measured 3.60 in both backends.)"""
  train = backend(name)
  tokenizer = os.path.join(REPO, "demo", "checkpoint")
  if not os.path.isdir(tokenizer):
    pytest.skip("the embedded demo model (its tokenizer) is missing from this checkout")
  config = configs.get_preset("tiny").with_overrides({"train.num_train_steps": 300,
                                                      "train.checkpoint_every_steps": 300})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = train.train(config, str(tmp_path / "run"), tokenizer=tokenizer, num_synthetic=1000, progress=False)
  losses = np.asarray(out["losses"])
  assert losses[-20:].mean() < math.log(config.codebook_size) - 1.0, losses[-20:].mean()
  assert os.path.isdir(out["export"])


def test_jax_state_checkpoint_accepts_a_relative_workdir(tmp_path, monkeypatch):
  """orbax wants absolute paths; `run.py train --workdir runs/x` passes a relative one."""
  pytest.importorskip("flax")
  from maskgit_jax import train_state  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  state = {"step": np.int32(3), "w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  os.makedirs("relative/ckpt")
  train_state.save("relative/ckpt", state)
  chex = pytest.importorskip("chex")
  chex.assert_trees_all_equal(train_state.restore("relative/ckpt", state), state)


def test_jax_trainers_and_their_tensorboard_logs_never_import_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed; the JAX trainers' MetricsWriter must not (the backends
  never import each other)."""
  pytest.importorskip("flax")
  code = f"""
import sys
import maskgit_jax.train, maskgit_jax.train_tokenizer
from maskgit_common import training
writer = training.MetricsWriter({str(tmp_path)!r})
writer.write(1, {{"loss": 1.5}})
writer.close()
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"
  assert tensorboard_scalars(str(tmp_path))["loss"] == [(1, 1.5)]
