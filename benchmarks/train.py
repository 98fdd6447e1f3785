"""Training throughput of both backends side by side: steps/s, images/s and MFU from analytic FLOPs.

  python benchmarks/train.py                                   # tiny preset, CPU, both backends (about a minute)
  python benchmarks/train.py --preset imagenet_256 --batch_size 64 --precision fast     # full model, on a GPU

It times the trainers' own step functions (maskgit_jax.train.make_train_step, maskgit_torch.train.train_step: loss,
backward, clipping, AdamW, EMA) on host-built masked batches, after warm-up steps (compilation excluded).
FLOPs per step = 3 x forward (forward + backward): per layer 8 S D^2 (q, k, v, out) + 4 S^2 D (scores, mix) +
4 S D I (MLP), plus the MLM head 2 S D^2 + 2 S D V, times the batch. MFU = FLOPs/s / peak: the peak comes from
--peak_tflops, or a table of dense bf16/fp32 peaks for known GPUs; on a CPU it is "n/a" unless given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# Before torch loads: OpenMP threads that spin while waiting make torch ~20x slower on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # pylint: disable=wrong-import-position
from maskgit_common import masking  # pylint: disable=wrong-import-position

# Dense peak TFLOP/s (bf16 tensor cores, fp32 without TF32), from the vendors' data sheets (SXM parts).
GPU_PEAKS = {"H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5), "V100": (125.0, 15.7)}


def train_flops_per_step(config, batch_size: int) -> float:
  s, d = config.seq_len, config.transformer.num_embeds
  i, v, n = config.transformer.intermediate_size, config.vocab_size, config.transformer.num_layers
  forward = n * (8 * s * d * d + 4 * s * s * d + 4 * s * d * i) + 2 * s * d * d + 2 * s * d * v
  return 3.0 * forward * batch_size


def make_batches(config, count: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  b, h = config.train.batch_size, config.latent_size
  return [masking.make_batch(rng.integers(0, config.codebook_size, (b, h, h)), rng.integers(0, config.num_class, b),
                             masking.draw_noise(rng, b, config.num_tokens), config) for _ in range(count)]


def bench_jax(config, batches, warmup: int) -> tuple[float, str]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from maskgit_jax import train  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest" if config.train.precision == "parity" else "default")
  state = train.create_state(config, train.initial_params(config, 0))
  step = jax.jit(train.make_train_step(config), donate_argnums=(0,) if jax.default_backend() != "cpu" else ())
  device_batches = [{k: jnp.asarray(b[k]) for k in train.BATCH_KEYS} for b in batches]
  for i in range(warmup):
    state, metrics = step(state, device_batches[i % len(batches)], jnp.float32(1e-4), jnp.int32(i))
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(len(batches)):
    state, metrics = step(state, device_batches[i], jnp.float32(1e-4), jnp.int32(i))
  jax.block_until_ready(metrics)
  return time.perf_counter() - t0, str(jax.devices()[0].device_kind)


def bench_torch(config, batches, warmup: int) -> tuple[float, str]:
  import torch  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train  # pylint: disable=import-outside-toplevel
  from maskgit_torch.transformer import Transformer  # pylint: disable=import-outside-toplevel
  parity = config.train.precision == "parity"
  torch.backends.cuda.matmul.allow_tf32 = not parity
  torch.backends.cudnn.allow_tf32 = not parity
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = Transformer(config).to(device).train()
  optimizer, ema = train.make_optimizer(model, config.train), train.EMA(model)
  device_batches = [{k: torch.from_numpy(b[k]).to(device) for k in train.BATCH_KEYS} for b in batches]
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  for i in range(warmup):
    train.train_step(model, optimizer, ema, device_batches[i % len(batches)], 1e-4, config)
  sync()
  t0 = time.perf_counter()
  for b in device_batches:
    train.train_step(model, optimizer, ema, b, 1e-4, config)  # metrics stay on the device, as in training
  sync()
  name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
  return time.perf_counter() - t0, name


def peak_tflops(device_name: str, precision: str, override: float | None) -> float | None:
  if override:
    return override
  for key, (bf16, fp32) in GPU_PEAKS.items():
    if key in device_name.upper():
      return bf16 if precision == "fast" else fp32
  return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch_size", type=int, default=None, help="default: the preset's train.batch_size")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--precision", choices=("parity", "fast"), default="parity")
  parser.add_argument("--backends", default="jax,torch")
  parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: table/GPU)")
  args = parser.parse_args()
  config = configs.get_preset(args.preset)
  overrides = {"train.precision": args.precision}
  if args.batch_size:
    overrides["train.batch_size"] = args.batch_size
  config = config.with_overrides(overrides)
  batches = make_batches(config, args.steps)
  flops = train_flops_per_step(config, config.train.batch_size)
  print(f"preset {args.preset}: batch {config.train.batch_size}, seq {config.seq_len}, "
        f"{config.transformer.num_layers}x{config.transformer.num_embeds}, precision {args.precision}, "
        f"{flops / 1e9:.2f} GFLOP/step (analytic)")
  print(f"{'backend':8s} {'device':24s} {'steps/s':>9s} {'images/s':>10s} {'TFLOP/s':>9s} {'MFU':>7s}")
  for name in args.backends.split(","):
    seconds, device = (bench_jax if name == "jax" else bench_torch)(config, batches, args.warmup)
    steps_per_s = args.steps / seconds
    achieved = flops * steps_per_s / 1e12
    peak = peak_tflops(device, args.precision, args.peak_tflops)
    mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
    print(f"{name:8s} {device[:24]:24s} {steps_per_s:9.2f} {steps_per_s * config.train.batch_size:10.1f} "
          f"{achieved:9.4f} {mfu:>7s}", flush=True)


if __name__ == "__main__":
  main()
