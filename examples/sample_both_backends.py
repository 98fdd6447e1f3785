"""Samples the same classes with PyTorch and with JAX from one checkpoint, and gets the same tokens.

  python examples/sample_both_backends.py [--checkpoint demo/checkpoint] [--classes 0,1,2] [--seed 0]
      [--out runs/examples/samples_both_backends.png] [--steps_out runs/examples/decoding_steps.png]

Each backend draws its own random numbers by default (torch.Generator, jax.random), so equal seeds do not give
equal samples across frameworks. Here both replay the same recorded Gumbel draws (`RecordedNoise`, filled from one
numpy generator), and then the two decoders pick identical tokens at every step. The second picture shows the
parallel decoding: each step's prediction, grey where a token is masked again for the next step.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from a plain clone

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from maskgit_common import generate  # pylint: disable=wrong-import-position
from maskgit_common.images import save_grid  # pylint: disable=wrong-import-position
from maskgit_jax import pipeline as jax_pipeline, sampler as jax_sampler  # pylint: disable=wrong-import-position
from maskgit_torch import pipeline as torch_pipeline, sampler as torch_sampler  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREY = generate.GREY


def decoding_steps(model, output) -> np.ndarray:
  """(B * n, H, W, 3): per sample, each step's prediction (cells masked again grey); the last is the result."""
  frames = generate.decoding_frames(model, output)  # (B, n, H, W, 3), as `run.py sample --save_steps` draws it
  return frames.reshape(-1, *frames.shape[2:])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=os.path.join(REPO, "demo", "checkpoint"))
  parser.add_argument("--classes", default=None, help="comma-separated labels (default: the first 8 classes)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the numpy generator of the recorded draws")
  parser.add_argument("--out", default=os.path.join(REPO, "runs", "examples", "samples_both_backends.png"))
  parser.add_argument("--steps_out", default=os.path.join(REPO, "runs", "examples", "decoding_steps.png"))
  args = parser.parse_args(argv)
  if not os.path.isdir(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint directory (config.json + weights)")

  # Parity mode (docs/ARCHITECTURE.md, "Numerics contract"): float32 matmuls at full precision, no TF32 (matters on GPUs).
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  models = {"torch": torch_pipeline.MaskGIT.from_checkpoint(args.checkpoint),
            "jax": jax_pipeline.MaskGIT.from_checkpoint(args.checkpoint)}  # converted from safetensors on the fly
  config = models["torch"].config
  labels = ([int(c) for c in args.classes.split(",")] if args.classes else list(range(min(config.num_class, 8))))

  # One set of draws for the whole decode: (steps, batch, sequence, codebook) and (steps, batch, sequence).
  rng = np.random.default_rng(args.seed)
  steps = config.sampler.num_iter
  gumbel_sample = rng.gumbel(size=(steps, len(labels), config.seq_len, config.codebook_size)).astype(np.float32)
  gumbel_choice = rng.gumbel(size=(steps, len(labels), config.seq_len)).astype(np.float32)
  noise = {"torch": torch_sampler.RecordedNoise(torch.from_numpy(gumbel_sample), torch.from_numpy(gumbel_choice)),
           "jax": jax_sampler.RecordedNoise(gumbel_sample, gumbel_choice)}
  results = {name: m.generate(labels, noise=noise[name], return_output=True) for name, m in models.items()}

  (torch_images, torch_tokens, output), (jax_images, jax_tokens, _) = results["torch"], results["jax"]
  assert np.array_equal(torch_tokens, jax_tokens), "the backends decoded different tokens from the same draws"
  diff = float(np.abs(torch_images - jax_images).max())
  print(f"{len(labels)} samples, {steps} steps: identical tokens in torch and JAX; images differ by at most "
        f"{diff:.2e} (float32 rounding in the decoders)")

  names = models["torch"].class_names(labels)
  scale = max(1, 96 // config.image_size)  # small images are enlarged so the labels fit above them
  save_grid(np.concatenate([torch_images, jax_images]), args.out, ncol=len(labels), scale=scale,
            labels=[f"torch {n}" for n in names] + [f"jax {n}" for n in names])
  step_labels = [f"{n} {t + 1}/{steps}" for n in names for t in range(steps)]
  save_grid(decoding_steps(models["torch"], output), args.steps_out, labels=step_labels, ncol=steps, scale=scale)
  print(f"samples (row 1 torch, row 2 JAX): {args.out}\ndecoding steps (one row per sample): {args.steps_out}")
  return {"labels": labels, "tokens": {"torch": torch_tokens, "jax": jax_tokens}, "max_image_diff": diff,
          "out": args.out, "steps_out": args.steps_out}


if __name__ == "__main__":
  main()
