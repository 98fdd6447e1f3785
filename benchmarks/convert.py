"""Conversion benchmark: the full ImageNet-256 MaskGIT (official msgpack layout) -> torch -> JAX.

    nice -n 10 python benchmarks/convert.py [--workdir DIR] [--keep] [--preset imagenet_256]

Builds a randomly initialised ImageNet-256 checkpoint pair (shapes from `conversion.param_table`, numpy random,
kernels N(0, 1/fan_in)) in the official msgpack layout, then converts official -> torch and torch -> JAX, each in a
fresh subprocess so the time and peak RSS (VmHWM) are that conversion's alone. Prints both against the
checkpoint size, whether the round trip is bit-exact (file bytes), and torch vs JAX logits on a small CPU batch
(<= 1e-4, the torch parity bound of docs/ARCHITECTURE.md). Targets (issue 4): under 60 s per direction on 2 CPU
cores, peak RSS under 3x the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WHICH = ("tokenizer", "transformer")


def _peak_rss_bytes() -> int:
  """This program's peak RSS. Linux's VmHWM starts afresh at exec; getrusage's ru_maxrss does not: it keeps the
  forked parent's resident size (here the parent has just written the whole random checkpoint)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # kB
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_random_official(config, directory: str, seed: int = 0) -> None:
  """{tokenizer,transformer}.msgpack in the official layout, one model at a time.

  Transformer: the official initializer scales (dense kernels and embeddings N(0, 0.02^2), as its truncated normal
  with stddev 0.02), with biases N(0, 0.02^2) and LayerNorm scales 1 + N(0, 0.02^2) instead of zeros and ones, so
  every parameter carries random bits through the round trip. Tokenizer: kernels N(0, 1/fan_in), norm scales
  1 + N(0, 0.1^2), biases N(0, 0.1^2), codebook N(0, 1).
  """
  import numpy as np
  from conversion import param_table, unflatten
  from conversion.formats.flax_msgpack import write_msgpack
  rng = np.random.default_rng(seed)
  for which in WHICH:
    flat = {}
    for rule in param_table(config, which):
      shape, name = tuple(rule.shape), rule.jax_path.rsplit("/", 1)[-1]
      x = rng.standard_normal(shape, dtype=np.float32)
      if which == "transformer":
        x *= np.float32(0.02)
        x += np.float32(name == "scale")
      elif name == "kernel":
        x *= np.float32(1 / np.sqrt(np.prod(shape[:-1])))
      elif name in ("bias", "scale"):
        x *= np.float32(0.1)
        x += np.float32(name == "scale")
      flat[rule.jax_path] = x
    write_msgpack(os.path.join(directory, f"{which}.msgpack"), unflatten(flat))
    del flat


def _child_convert(src: str, dst: str, to: str) -> None:
  """Runs in a fresh process: import, then time one conversion; prints JSON."""
  from conversion import convert
  baseline = _peak_rss_bytes()
  start = time.perf_counter()
  convert(src, dst, to=to, overwrite=True)  # replaces only a checkpoint this project wrote (an earlier run's)
  seconds = time.perf_counter() - start
  print(json.dumps({"seconds": seconds, "peak_rss": _peak_rss_bytes(), "rss_after_imports": baseline}))


def _child_logits(torch_dir: str, jax_dir: str) -> None:
  """Runs in a fresh process: torch vs JAX logits of the converted checkpoints on a small CPU batch."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  import numpy as np
  import torch
  torch.backends.cuda.matmul.allow_tf32 = False
  from maskgit_jax import checkpoint as jax_checkpoint
  from maskgit_jax.transformer import Transformer as JaxTransformer
  from maskgit_torch import checkpoint as torch_checkpoint
  config, models = torch_checkpoint.load_checkpoint(torch_dir, parts=("transformer",))
  model = models["transformer"]
  rng = np.random.default_rng(0)
  k, batch = config.tokenizer.codebook_size, 2
  ids = rng.integers(0, k, (batch, config.seq_len)).astype(np.int32)
  ids[:, 0] = k + rng.integers(0, config.num_class, batch)
  ids[:, 1:][rng.random((batch, config.seq_len - 1)) < 0.5] = -1
  with torch.inference_mode():
    torch_logits = model(torch.from_numpy(ids).long()).numpy()
  variables = jax_checkpoint.load_checkpoint(jax_dir, parts=("transformer",))[1]["transformer"]
  jax_logits = np.asarray(jax.jit(lambda v, x: JaxTransformer(config).apply(v, x, deterministic=True))(variables, ids))
  diff = float(np.max(np.abs(torch_logits.astype(np.float64) - jax_logits)))
  print(json.dumps({"logits_max_abs_diff": diff, "logits_std": float(jax_logits.std()),
                    "shape": list(jax_logits.shape)}))


def _run_child(*args) -> dict:
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"child {args} failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
  parser.add_argument("--preset", default="imagenet_256", help="model size (tiny: a functional check in seconds)")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    {"convert": _child_convert, "logits": _child_logits}[args.child[0]](*args.child[1:])
    return
  from configs.presets import get_preset
  from maskgit_common.fileio import sha256_file
  config = get_preset(args.preset)
  work = args.workdir or tempfile.mkdtemp(prefix="maskgit_convert_bench_")
  official, torch_dir, jax_dir = (os.path.join(work, d) for d in ("official", "torch", "jax"))
  os.makedirs(official, exist_ok=True)
  try:
    start = time.perf_counter()
    write_random_official(config, official)
    sizes = {w: os.path.getsize(os.path.join(official, f"{w}.msgpack")) for w in WHICH}
    total = sum(sizes.values())
    print(f"wrote a random {config.name} checkpoint in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{w} {s / 2**20:.1f} MiB" for w, s in sizes.items()) + f", total {total / 2**20:.1f} MiB")
    print(f"cpu cores visible: {os.cpu_count()}, affinity: {len(os.sched_getaffinity(0))}")
    results = {}
    for name, src, dst, to in (("official -> torch", official, torch_dir, "torch"),
                               ("torch -> jax", torch_dir, jax_dir, "jax")):
      r = results[name] = _run_child("--child", "convert", src, dst, to)
      print(f"{name:18s} {r['seconds']:6.1f} s   peak RSS {r['peak_rss'] / 2**20:7.1f} MiB "
            f"({r['peak_rss'] / total:.2f}x checkpoint; after imports {r['rss_after_imports'] / 2**20:.0f} MiB, "
            f"conversion adds {(r['peak_rss'] - r['rss_after_imports']) / total:.2f}x)")
    exact = {w: sha256_file(os.path.join(official, f"{w}.msgpack")) == sha256_file(os.path.join(jax_dir, f"{w}.msgpack"))
             for w in WHICH}
    print(f"round trip official -> torch -> jax bit-exact: {exact}")
    logits = _run_child("--child", "logits", torch_dir, jax_dir)
    print(f"torch vs jax logits {tuple(logits['shape'])} on CPU: max abs diff {logits['logits_max_abs_diff']:.3g} "
          f"(logit std {logits['logits_std']:.3g}; target <= 1e-4)")
    ok = (all(exact.values()) and logits["logits_max_abs_diff"] <= 1e-4
          and all(r["seconds"] < 60 and r["peak_rss"] < 3 * total for r in results.values()))
    print("targets met" if ok else "TARGETS MISSED")
  finally:
    if not args.keep and not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
