"""Resuming a full-size seed checkpoint in both backends, and the seed's own loader on what we export (issue 18).

  python benchmarks/seed_resume.py                         # seed_imagenet_256: 174M parameters (~3 GB RAM, minutes)
  python benchmarks/seed_resume.py --set transformer.num_layers=2 --set transformer.num_embeds=64 \
      --set transformer.num_heads=2 --set transformer.intermediate_size=128   # a functional run in seconds
  python benchmarks/seed_resume.py --seed_source PATH      # also load the export with the seed's own module

1. writes a seed-format `MaskGIT/current.pth` (valeoai MaskGIT-pytorch v1 `Trainer.save_network`): random weights
   of the config's transformer, the torch.optim.AdamW state after one step, iter and global_epoch;
2. `train(..., init=that file)` for one step in torch, then in JAX, on the same fixed batch of a token cache
   (random codes; dropout off so that both backends compute the same function): each must start at step = iter
   and data position global_epoch * N, and their first losses must agree within 1e-4 (relative);
3. the `seed/MaskGIT/current.pth` each export writes must load with strict keys into the seed-named MaskTransformer
   (`--seed_source`: the seed's own Network/transformer.py from a checkout of commit 5ce6c9e, run from there) and
   into torch.optim.AdamW, hold iter + 1 and the epoch, and equal the torch run's own state bit for bit.
Prints one line per measurement; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import configs  # pylint: disable=wrong-import-position
from maskgit_common import token_cache, train_init  # pylint: disable=wrong-import-position

ITER, EPOCH, EXAMPLES = 3000, 2, 8


class _Blank:
  """Images the token cache never looks at (the codes are random)."""

  def __init__(self, n, size):
    self.n, self.size, self.class_names = n, size, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return np.zeros((self.size, self.size, 3), np.float32), i % 10


def make_config(args):
  base = configs.resolve(args.config).with_overrides(args.set)
  return base.with_overrides({"train.batch_size": args.batch, "train.num_train_steps": ITER + 1,
                              "train.checkpoint_every_steps": 1, "train.log_every_steps": 1,
                              "transformer.dropout_rate": 0.0, "data.random_crops": 1, "data.random_flip": False})


def write_file(path, config):
  """The seed's .pth: our seed-named module's init, one AdamW step (the seed's optimizer settings) on random ids."""
  import torch  # pylint: disable=import-outside-toplevel
  from conversion import seed_formats  # pylint: disable=import-outside-toplevel
  from conversion.formats import torch_pickle  # pylint: disable=import-outside-toplevel
  from maskgit_torch.seed_transformer import MaskTransformer  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = MaskTransformer(config)
  optimizer = torch.optim.AdamW(model.parameters(), 1e-4, betas=(0.9, 0.96), weight_decay=1e-5)
  ids = torch.randint(0, config.codebook_size, (2, config.seq_len))
  model(ids).logsumexp(-1).mean().backward()
  optimizer.step()
  extras = {"iter": ITER, "global_epoch": EPOCH,
            "optimizer_state_dict": torch_pickle.numpy_tree(optimizer.state_dict())}
  seed_formats.write_transformer(path, config, {k: v.detach().numpy() for k, v in model.state_dict().items()}, extras)
  return sum(p.numel() for p in model.parameters())


def seed_module_class(seed_source):
  """The seed's MaskTransformer class from a checkout (its Network/transformer.py needs torch only), or ours."""
  if not seed_source:
    from maskgit_torch.seed_transformer import MaskTransformer  # pylint: disable=import-outside-toplevel
    return lambda config: MaskTransformer(config), "maskgit_torch.seed_transformer.MaskTransformer (seed names)"
  from conversion import seed_config  # pylint: disable=import-outside-toplevel
  path = os.path.join(seed_source, "Network", "transformer.py")
  spec = importlib.util.spec_from_file_location("seed_network_transformer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return lambda config: module.MaskTransformer(**seed_config.transformer_kwargs(config)), f"the seed's {path}"


def check_export(path, config, make_module, torch_state=None):
  """Strict loads into the module and AdamW; equality with the torch run's own state when given."""
  import torch  # pylint: disable=import-outside-toplevel
  ck = torch.load(path, map_location="cpu", weights_only=True)
  model = make_module(config)
  model.load_state_dict(ck["model_state_dict"], strict=True)
  optimizer = torch.optim.AdamW(model.parameters(), 1e-4, betas=(0.9, 0.96), weight_decay=1e-5)
  optimizer.load_state_dict(ck["optimizer_state_dict"])
  ok = ck["iter"] == ITER + 1 and ck["global_epoch"] == EPOCH
  if torch_state is not None:
    names = dict(model.named_parameters())
    for name, value in ck["model_state_dict"].items():
      ok &= torch.equal(value, torch_state[f"model/{name}"]) and torch.equal(names[name].detach(), value)
    order = [n for n, _ in model.named_parameters()]
    for i, entry in ck["optimizer_state_dict"]["state"].items():
      for key in ("exp_avg", "exp_avg_sq"):
        ok &= torch.equal(entry[key], torch_state[f"optimizer/{order[i]}/{key}"])
  return bool(ok), ck["iter"], ck["global_epoch"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="seed_imagenet_256")
  parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
  parser.add_argument("--seed_source", default=None, help="a checkout of valeoai/Maskgit-pytorch at 5ce6c9e")
  args = parser.parse_args(argv)
  config = make_config(args)
  with tempfile.TemporaryDirectory() as scratch:
    root = args.workdir or scratch
    os.makedirs(root, exist_ok=True)
    pth = os.path.join(root, "MaskGIT", "current.pth")
    count = write_file(pth, config)
    print(f"wrote {pth}: {config.name}, {count:,} parameters, AdamW state, iter {ITER}, global_epoch {EPOCH}")
    cache = os.path.join(root, "tokens")
    if not os.path.exists(cache):
      rng = np.random.default_rng(0)
      token_cache.build(cache, _Blank(EXAMPLES, config.image_size),
                        lambda im: rng.integers(0, config.codebook_size, (len(im), config.latent_size,
                                                                          config.latent_size)),
                        config, flip=False, progress=False)
    config = config.with_overrides({"data.dataset": "tokens", "data.token_cache": cache})
    return run_both(root, pth, config, args.seed_source)


def run_both(root, pth, config, seed_source) -> int:
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from maskgit_torch import train as torch_train  # pylint: disable=import-outside-toplevel
  from maskgit_jax import train as jax_train  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")
  results, failures = {}, []
  for name, train in (("torch", torch_train.train), ("jax", jax_train.train)):
    out = train(config, os.path.join(root, name), init=pth, progress=False)
    start = (out["resumed_from"], out["position"] - config.train.batch_size)
    results[name] = out
    ok = start == (ITER, EPOCH * EXAMPLES)
    failures += [] if ok else [f"{name} started at {start}"]
    print(f"{name}: started at step {start[0]}, data position {start[1]} ({'ok' if ok else 'WRONG'}); first loss "
          f"{out['losses'][0]:.7f}")
  a, b = results["torch"]["losses"][0], results["jax"]["losses"][0]
  rel = abs(a - b) / abs(a)
  print(f"first-step loss torch vs jax: relative diff {rel:.3g} (bound 1e-4)")
  if not rel <= 1e-4 or not math.isfinite(rel):
    failures.append("first-step losses differ")
  make_module, described = seed_module_class(seed_source)
  state = safetensors.torch.load_file(os.path.join(results["torch"]["last_checkpoint"], "state.safetensors"))
  for name in ("torch", "jax"):
    ok, it, epoch = check_export(train_init.seed_export_path(os.path.join(root, name)), config, make_module,
                                 state if name == "torch" else None)
    print(f"{name} export: strict load into {described} + torch.optim.AdamW, iter {it}, global_epoch {epoch}"
          + (", weights and moments equal to the run's state" if name == "torch" else "") + (" ok" if ok else
                                                                                              " FAILED"))
    failures += [] if ok else [f"{name} export"]
  print("PASS" if not failures else f"FAIL: {failures}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
