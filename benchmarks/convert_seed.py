"""Full-size acceptance of the seed format: valeoai MaskGIT-pytorch v1 ImageNet-256 files -> torch -> JAX -> seed.

    nice -n 10 python benchmarks/convert_seed.py [--seed_repo DIR] [--workdir DIR] [--keep] [--no_optimizer]
                                                 [--vqgan_adam] [--counts_only]

1. Parameter counts of the seed presets, counted without allocating (torch meta device, jax.eval_shape): the seed
   README's 174.161M (transformer) and 72.142M (VQGAN).
2. Random full-size seed files with the real key sets: `MaskGIT/MaskGIT_ImageNet_256.pth` as Trainer.save_network
   writes it (iter, global_epoch, model_state_dict, an AdamW optimizer_state_dict with exp_avg/exp_avg_sq for every
   parameter unless --no_optimizer) and `VQGAN/last.ckpt` (lightning dict; the VQGAN's state_dict plus taming's
   training-loss entries: LPIPS's VGG16 and the discriminator, with their real names and shapes; two Adam states,
   stepped with --vqgan_adam as in a trained checkpoint) + `VQGAN/model.yaml`. The weights are drawn by the seed's
   own MaskTransformer and VQModel with --seed_repo (a checkout of valeoai/Maskgit-pytorch at 5ce6c9e; einops
   needed), else by maskgit_torch's modules, which carry the seed's names and init.
3. Each in a fresh subprocess, so its time and peak memory (VmHWM) are its own, exactly what `run.py convert` does
   (`conversion.convert`): seed -> our torch directory, torch -> our JAX directory, JAX -> seed files. The final seed
   files must read back bit-identical to the first (every tensor, the AdamW state, iter, epoch, the lightning
   entries, the yaml text), and with --seed_repo the seed's own classes load them with strict=True.
4. torch vs JAX on the converted models: logits of a random half-masked batch and images decoded from random codes,
   with where the logits' difference comes from (module docstring of `_child_logits`).
Targets (issue 16): under a minute per conversion step on 2 CPU cores, peak memory under 3x the files, torch vs JAX
logits within 1e-4. Timings on a shared, loaded machine are not meaningful: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PRESET = "seed_imagenet_256"
PTH = "MaskGIT_ImageNet_256.pth"


def _peak_bytes() -> int:
  """This process's peak resident memory (VmHWM: ru_maxrss would keep a forked parent's size)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _seed_classes(seed_repo: str):
  """The seed's own MaskTransformer and VQModel; the imports its v1 code has but never uses here are stubbed (as
  the fixture generator did: pytorch_lightning.LightningModule is nn.Module, requests is empty)."""
  import torch
  sys.modules.setdefault("pytorch_lightning", types.SimpleNamespace(LightningModule=torch.nn.Module))
  sys.modules.setdefault("requests", types.ModuleType("requests"))
  sys.path.insert(0, seed_repo)
  from Network.Taming.models.vqgan import VQModel  # pylint: disable=import-error
  from Network.transformer import MaskTransformer  # pylint: disable=import-error
  return MaskTransformer, VQModel


def _loss_entries(rng) -> dict:
  """taming's VQLPIPSWithDiscriminator state (the `loss.*` of a real last.ckpt): LPIPS's scaling layer, its VGG16
  features (slice1..5) and lin0..4, and the 3-layer PatchGAN discriminator with its BatchNorms."""
  import numpy as np
  out = {"loss.perceptual_loss.scaling_layer.shift": rng.standard_normal((1, 3, 1, 1), np.float32),
         "loss.perceptual_loss.scaling_layer.scale": rng.random((1, 3, 1, 1), np.float32)}
  vgg = [(1, 0, 3, 64), (1, 2, 64, 64), (2, 5, 64, 128), (2, 7, 128, 128), (3, 10, 128, 256), (3, 12, 256, 256),
         (3, 14, 256, 256), (4, 17, 256, 512), (4, 19, 512, 512), (4, 21, 512, 512), (5, 24, 512, 512),
         (5, 26, 512, 512), (5, 28, 512, 512)]
  for block, index, cin, cout in vgg:
    out[f"loss.perceptual_loss.net.slice{block}.{index}.weight"] = rng.standard_normal((cout, cin, 3, 3), np.float32)
    out[f"loss.perceptual_loss.net.slice{block}.{index}.bias"] = rng.standard_normal(cout, np.float32)
  for i, c in enumerate((64, 128, 256, 512, 512)):
    out[f"loss.perceptual_loss.lin{i}.model.1.weight"] = rng.random((1, c, 1, 1), np.float32)
  convs = [(0, 3, 64, True), (2, 64, 128, False), (5, 128, 256, False), (8, 256, 512, False), (11, 512, 1, True)]
  for index, cin, cout, bias in convs:
    out[f"loss.discriminator.main.{index}.weight"] = rng.standard_normal((cout, cin, 4, 4), np.float32)
    if bias:
      out[f"loss.discriminator.main.{index}.bias"] = rng.standard_normal(cout, np.float32)
    else:  # a BatchNorm follows
      norm = f"loss.discriminator.main.{index + 1}"
      out.update({f"{norm}.weight": rng.random(cout, np.float32), f"{norm}.bias": rng.random(cout, np.float32),
                  f"{norm}.running_mean": rng.random(cout, np.float32),
                  f"{norm}.running_var": rng.random(cout, np.float32),
                  f"{norm}.num_batches_tracked": np.array(1000, np.int64)})
  return out


def _adam_state(shapes: list, rng, step: float, groups: dict) -> dict:
  import numpy as np
  state = {i: {"step": np.array(step, np.float32), "exp_avg": rng.standard_normal(s, np.float32) * np.float32(1e-4),
               "exp_avg_sq": rng.random(s, np.float32) * np.float32(1e-8)} for i, s in enumerate(shapes)}
  return {"state": state, "param_groups": groups["param_groups"]}


def _child_make(seed_dir: str, optimizer: str, vqgan_adam: str, seed_repo: str) -> None:
  """Random full-size seed files, one model at a time (module docstring, 2)."""
  import numpy as np
  import torch
  from configs import get_preset
  from conversion import seed_config, seed_formats
  config = get_preset(PRESET)
  rng = np.random.default_rng(1)
  torch.manual_seed(0)
  if seed_repo:
    mask_transformer, vq_model = _seed_classes(seed_repo)
    transformer = mask_transformer(**seed_config.transformer_kwargs(config))
    vqgan = vq_model(**dict(seed_config.taming_params(config.tokenizer), lossconfig={}))
  else:
    from maskgit_torch.seed_transformer import MaskTransformer
    from maskgit_torch.taming import VQModel
    transformer, vqgan = MaskTransformer(config), VQModel(config)
  extras = {"transformer": {"iter": 755_200, "global_epoch": 300, "file_name": PTH},
            "tokenizer": {"epoch": 40, "global_step": 2_000_000}}
  if optimizer == "yes":  # the AdamW state of model.parameters(), in their order
    groups = torch.optim.AdamW(transformer.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=1e-5).state_dict()
    shapes = [tuple(p.shape) for p in transformer.parameters()]
    extras["transformer"]["optimizer_state_dict"] = _adam_state(shapes, rng, 755_200.0, groups)
  weights = {"transformer": {k: v.numpy() for k, v in transformer.state_dict().items()},
             "tokenizer": {k: v.numpy() for k, v in vqgan.state_dict().items()}}
  loss = _loss_entries(rng)
  extras["tokenizer"]["loss_state"] = loss
  vq_shapes = [tuple(p.shape) for p in vqgan.parameters()]
  disc_shapes = [tuple(v.shape) for k, v in loss.items() if k.startswith("loss.discriminator") and "running" not in k
                 and "num_batches" not in k]
  states = []
  for shapes in (vq_shapes, disc_shapes):  # VQModel.configure_optimizers: Adam for the VQGAN, Adam for the disc
    groups = {"param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
                                "params": list(range(len(shapes)))}]}
    states.append(_adam_state(shapes, rng, 2e6, groups) if vqgan_adam == "yes" else {"state": {}, **groups})
  extras["tokenizer"]["optimizer_states"] = states
  del transformer, vqgan
  seed_formats.write_seed(seed_dir, config, weights, extras)
  print(json.dumps({"peak": _peak_bytes()}))


def _child_convert(src: str, dst: str, to: str) -> None:
  """One `run.py convert` step: conversion.convert, config inferred from the files (seed) or config.json (ours)."""
  import conversion
  baseline, start = _peak_bytes(), time.perf_counter()
  out = conversion.convert(src, dst, to=to)
  print(json.dumps({"seconds": time.perf_counter() - start, "peak": _peak_bytes(), "after_imports": baseline,
                    "config": out.config.name}))


def _child_verify(first: str, last: str) -> None:
  """The final seed files against the first, bit for bit (read memory-mapped)."""
  from conversion import seed_formats
  from parity_tests import seed_checks
  a = seed_formats.read_seed(first)
  b = seed_formats.read_seed(last, a.config)
  differ = [f"{w}/{k}" for w in a.weights for k, x in a.weights[w].items()
            if not seed_checks.same_tree(x, b.weights[w].get(k))]
  extras = seed_checks.same_tree(seed_checks._comparable_extras(a.extras), seed_checks._comparable_extras(b.extras))
  with open(a.files.vqgan_yaml) as f, open(b.files.vqgan_yaml) as g:
    yaml_same = f.read() == g.read()
  print(json.dumps({"tensors": sum(len(s) for s in a.weights.values()), "differ": differ[:5], "extras": extras,
                    "yaml": yaml_same, "config": a.config.name, "same_config": a.config == b.config,
                    "names": sorted(os.path.relpath(os.path.join(d, n), last) for d, _, ns in os.walk(last)
                                    for n in ns)}))


def _child_seed_strict(seed_repo: str, seed_dir: str) -> None:
  """The seed's own classes load the written-back files with strict=True, as its Trainer reads them."""
  import torch
  import yaml
  from configs import get_preset
  from conversion import seed_config
  mask_transformer, vq_model = _seed_classes(seed_repo)
  transformer = mask_transformer(**seed_config.transformer_kwargs(get_preset(PRESET)))
  saved = torch.load(os.path.join(seed_dir, "MaskGIT", PTH), map_location="cpu", weights_only=True)
  transformer.load_state_dict(saved["model_state_dict"], strict=True)
  optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=1e-5)
  optimizer.load_state_dict(saved["optimizer_state_dict"]) if "optimizer_state_dict" in saved else None
  with open(os.path.join(seed_dir, "VQGAN", "model.yaml")) as f:
    vqgan = vq_model(**yaml.safe_load(f)["model"]["params"])
  state = torch.load(os.path.join(seed_dir, "VQGAN", "last.ckpt"), map_location="cpu", weights_only=True)
  vqgan.load_state_dict({k: v for k, v in state["state_dict"].items() if not k.startswith("loss.")}, strict=True)
  print(json.dumps({"strict": True, "optimizer_loaded": "optimizer_state_dict" in saved,
                    "transformer_params": sum(p.numel() for p in transformer.parameters()),
                    "vqgan_params": sum(p.numel() for p in vqgan.parameters())}))


def _child_counts() -> None:
  """Parameter counts of the seed presets in both backends, without allocating."""
  import jax
  import numpy as np
  import torch
  from configs import get_preset
  from maskgit_jax import checkpoint as jax_checkpoint
  from maskgit_torch import checkpoint as torch_checkpoint
  out = {}
  for preset in ("seed_imagenet_256", "seed_imagenet_512"):
    config = get_preset(preset)
    for part in ("transformer", "tokenizer"):
      with torch.device("meta"):
        n_torch = sum(p.numel() for p in torch_checkpoint.make_model(config, part).parameters())
      n_jax = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(
          jax_checkpoint.expected_shapes(config, part)))
      out[f"{preset} {part}"] = [n_torch, n_jax]
  print(json.dumps(out))


CHILDREN = {"make": _child_make, "convert": _child_convert, "verify": _child_verify,
            "seed_strict": _child_seed_strict, "counts": _child_counts}


def _run_child(*args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], cwd=ROOT,
                        capture_output=True, text=True, env=env)
  if proc.returncode:
    raise SystemExit(f"child {args} failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _size(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def _print_counts() -> None:
  counts = _run_child("counts")
  for name, (n_torch, n_jax) in counts.items():
    print(f"parameters {name:30s} {n_torch:>12,} = {n_torch / 1e6:.3f}M (torch), {n_jax:,} (JAX)")
  print("  the seed README: 174.161M for the transformer and 72.142M for the VQGAN (256px); at 512px pos_emb and "
        "the output bias hold 32x32 + 1 positions")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
  parser.add_argument("--keep", action="store_true", help="keep the files written")
  parser.add_argument("--no_optimizer", action="store_true", help="write the .pth without the AdamW state")
  parser.add_argument("--vqgan_adam", action="store_true", help="last.ckpt with stepped Adam states, as trained")
  parser.add_argument("--seed_repo", default=None, help="valeoai/Maskgit-pytorch checkout at 5ce6c9e")
  parser.add_argument("--counts_only", action="store_true", help="print the parameter counts and stop")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    CHILDREN[args.child[0]](*args.child[1:])
    return
  _print_counts()
  if args.counts_only:
    return
  from benchmarks import convert_seed_logits  # pylint: disable=import-outside-toplevel
  work = args.workdir or tempfile.mkdtemp(prefix="maskgit_seed_convert_")
  seed, torch_dir, jax_dir, back = (os.path.join(work, d) for d in ("seed", "torch", "jax", "seed_back"))
  for d in (seed, torch_dir, jax_dir, back):
    shutil.rmtree(d, ignore_errors=True)
  try:
    start = time.perf_counter()
    _run_child("make", seed, "no" if args.no_optimizer else "yes", "yes" if args.vqgan_adam else "no",
               os.path.abspath(args.seed_repo) if args.seed_repo else "")
    total = _size(seed)
    print(f"wrote random {PRESET} seed files ({'the seed' if args.seed_repo else 'maskgit_torch'}'s modules) in "
          f"{time.perf_counter() - start:.0f} s: " + ", ".join(
              f"{os.path.relpath(os.path.join(d, f), seed)} {os.path.getsize(os.path.join(d, f)) / 2**20:.1f} MiB"
              for d, _, files in os.walk(seed) for f in sorted(files) if f != "manifest.json")
          + f"; total {total / 2**20:.1f} MiB")
    print(f"cpu cores visible: {os.cpu_count()}, affinity: {len(os.sched_getaffinity(0))}")
    results = {}
    for name, src, dst, to in (("seed -> torch", seed, torch_dir, "torch"), ("torch -> jax", torch_dir, jax_dir, "jax"),
                               ("jax -> seed", jax_dir, back, "seed")):
      r = results[name] = _run_child("convert", src, dst, to)
      print(f"{name:14s} {r['seconds']:6.1f} s   peak {r['peak'] / 2**20:7.1f} MiB ({r['peak'] / total:.2f}x the "
            f"seed files; after imports {r['after_imports'] / 2**20:.0f} MiB)   config {r['config']}")
    verify = _run_child("verify", seed, back)
    print(f"seed -> torch -> jax -> seed: {verify['tensors']} model tensors, bit-exact: {not verify['differ']} "
          f"{verify['differ'] or ''}; extras identical: {verify['extras']}; model.yaml text identical: "
          f"{verify['yaml']}; config {verify['config']}, same: {verify['same_config']}; files {verify['names']}")
    strict = _run_child("seed_strict", os.path.abspath(args.seed_repo), back) if args.seed_repo else None
    if strict:
      print(f"the seed's own MaskTransformer / VQModel (+ torch.optim.AdamW) load the written-back files: {strict}")
    logits = convert_seed_logits.run(torch_dir, jax_dir)
    ok = (not verify["differ"] and verify["extras"] and verify["yaml"] and verify["same_config"]
          and all(r["seconds"] < 60 and r["peak"] < 3 * total for r in results.values())
          and (strict is not None or not args.seed_repo))
    print("conversion targets met" if ok else "CONVERSION TARGETS MISSED",
          "; torch vs JAX logits within 1e-4:", logits["transformer"]["max_abs_diff"] <= 1e-4)
  finally:
    if not args.keep and not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
