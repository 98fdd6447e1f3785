"""Trains a tiny transformer for a few steps in PyTorch and in JAX, then swaps the exported checkpoints.

  python examples/train_tiny.py [--checkpoint demo/checkpoint] [--steps 30] [--workdir DIR]

Both backends read the same batches (one token cache, masks drawn by numpy) and start from the same weights (the
official JAX initialisation, converted for torch); without dropout their losses then agree step for step up to
float32 rounding. The images are the built-in synthetic dataset, tokenized by the checkpoint's tokenizer. Each run
exports a portable checkpoint (workdir/<backend>/export), which is converted to the other layout and loaded by the
other backend, which computes the same logits. Real training: `python run.py train` (README).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from a plain clone

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from configs import MaskGITConfig  # pylint: disable=wrong-import-position
import conversion  # pylint: disable=wrong-import-position
from maskgit_jax import pipeline as jax_pipeline, train as jax_train  # pylint: disable=wrong-import-position
from maskgit_torch import checkpoint as torch_checkpoint  # pylint: disable=wrong-import-position
from maskgit_torch import pipeline as torch_pipeline, train as torch_train  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = {"torch": torch_pipeline.MaskGIT, "jax": jax_pipeline.MaskGIT}


def logits(model, ids: np.ndarray) -> np.ndarray:
  if isinstance(model, torch_pipeline.MaskGIT):
    return model.tokens_to_logits(torch.as_tensor(ids, device=model.device)).cpu().numpy()
  return np.asarray(model.tokens_to_logits(jax.numpy.asarray(ids)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=os.path.join(REPO, "demo", "checkpoint"),
                      help="where the tokenizer (and the config's model sizes) come from")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--num_synthetic", type=int, default=64, help="synthetic training images")
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint directory (config.json + weights)")
  workdir = args.workdir or tempfile.mkdtemp(prefix="maskgit_train_")

  jax.config.update("jax_default_matmul_precision", "highest")  # parity mode (docs/ARCHITECTURE.md, "Numerics contract")
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  # The checkpoint's tokenizer with a smaller transformer; no dropout, whose masks are each framework's own draws.
  config = MaskGITConfig.load(os.path.join(args.checkpoint, "config.json")).with_overrides({
      "transformer.num_layers": 1, "transformer.num_embeds": 32, "transformer.num_heads": 2,
      "transformer.intermediate_size": 64, "transformer.dropout_rate": 0.0, "data.dataset": "synthetic",
      "data.token_cache": "", "train.batch_size": args.batch_size, "train.num_train_steps": args.steps,
      "train.warmup_steps": min(5, args.steps), "train.checkpoint_every_steps": args.steps,
      "train.log_every_steps": max(1, args.steps // 5), "train.precision": "parity"})
  params = jax_train.initial_params(config, config.train.seed)
  same_init = torch_checkpoint.from_flat(config, "transformer", conversion.flatten({"params": jax.device_get(params)}))

  common = {"tokenizer": args.checkpoint, "num_synthetic": args.num_synthetic, "progress": False}
  runs = {"torch": torch_train.train(config, os.path.join(workdir, "torch"), init_state_dict=same_init, **common),
          "jax": jax_train.train(config, os.path.join(workdir, "jax"), init_params=params, **common)}
  losses = {name: np.asarray(run["losses"]) for name, run in runs.items()}
  shown = sorted(set(np.linspace(0, args.steps - 1, 6).astype(int)))
  for name, loss in losses.items():
    print(f"{name:5s} loss " + ", ".join(f"step {i + 1}: {loss[i]:.4f}" for i in shown))
  loss_diff = float(np.abs(losses["torch"] - losses["jax"]).max())
  print(f"max |torch - jax| loss difference over {args.steps} steps: {loss_diff:.2e}")

  # Each export, converted to the other layout, loaded by the other backend: the same logits on random inputs.
  rng = np.random.default_rng(0)
  ids = rng.integers(-1, config.codebook_size, (4, config.seq_len))  # -1 = masked
  ids[:, 0] = config.codebook_size + rng.integers(0, config.num_class, 4)  # the class token
  logits_diff = {}
  for name, other in (("torch", "jax"), ("jax", "torch")):
    exported, converted = runs[name]["export"], os.path.join(workdir, f"{name}_export_as_{other}")
    conversion.convert(exported, converted, to=other, overwrite=True)
    mine, theirs = PIPELINES[name].from_checkpoint(exported), PIPELINES[other].from_checkpoint(converted)
    logits_diff[name] = float(np.abs(logits(mine, ids) - logits(theirs, ids)).max())
    print(f"{name} export -> {other} layout ({converted}): {other} logits differ by {logits_diff[name]:.2e}")
  return {"losses": losses, "loss_diff": loss_diff, "logits_diff": logits_diff, "workdir": workdir,
          "exports": {name: run["export"] for name, run in runs.items()}}


if __name__ == "__main__":
  main()
