"""Seed-format conversion check at full size: valeoai MaskGIT-pytorch v1 ImageNet-256 files -> torch -> JAX -> seed.

    nice -n 10 python benchmarks/convert_seed.py [--workdir DIR] [--keep] [--no_optimizer] [--seed_repo DIR]

Writes random full-size seed checkpoints with the real key sets, made by maskgit_torch's seed modules (which carry
the seed's names): `MaskGIT/MaskGIT_ImageNet_256.pth` as Trainer.save_network writes it (iter, global_epoch,
model_state_dict, an AdamW optimizer_state_dict with exp_avg/exp_avg_sq for every parameter unless
--no_optimizer) and `VQGAN/last.ckpt` (lightning dict; a few `loss.*` entries stand in for LPIPS and the
discriminator) + `VQGAN/model.yaml`. Then, each in a fresh subprocess so its time and peak RSS (getrusage
ru_maxrss) are its own: seed -> our torch directory (config.json + safetensors), torch -> our JAX directory
(config.json + flax msgpack), JAX -> seed files; the model tensors of the final seed files must equal the first's
bit for bit. Also torch vs JAX logits and decoded images of the converted models (<= 1e-4), and, with --seed_repo
(a checkout of valeoai/Maskgit-pytorch at 5ce6c9e; needs einops), the seed's own MaskTransformer and VQModel
loading the written-back files with strict=True. Targets (issue 16): under a minute per step on 2 CPU cores,
peak RSS under 3x the files. Timings on a shared, loaded machine are not meaningful.
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
PTH = "MaskGIT_ImageNet_256.pth"


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _config(preset):
  from configs import get_preset
  return get_preset(preset)


def _child_make(preset: str, seed_dir: str, optimizer: str) -> None:
  """Random seed files, one model at a time (torch modules with the seed's names, the seed's own init)."""
  import numpy as np
  import torch
  from conversion import seed_formats
  from conversion.tables import seed as seed_table
  from maskgit_torch.seed_transformer import MaskTransformer
  from maskgit_torch.taming import VQModel
  config = _config(preset)
  torch.manual_seed(0)
  model = MaskTransformer(config)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  extras = {"iter": 755_200, "global_epoch": 300}
  if optimizer == "yes":
    groups = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=1e-5).state_dict()
    rng = np.random.default_rng(1)
    groups["state"] = {i: {"step": np.array(755_200.0, np.float32),
                           "exp_avg": rng.standard_normal(state[k].shape, np.float32) * np.float32(1e-4),
                           "exp_avg_sq": rng.random(state[k].shape, np.float32) * np.float32(1e-8)}
                       for i, k in enumerate(seed_table.state_dict_order(config, "transformer"))}
    extras["optimizer_state_dict"] = groups
  del model
  weights = {"transformer": state}
  all_extras = {"transformer": extras}
  vq = VQModel(config)
  weights["tokenizer"] = {k: v.numpy() for k, v in vq.state_dict().items()}
  del vq
  rng = np.random.default_rng(2)  # a few of taming's training-loss entries: LPIPS and the discriminator
  all_extras["tokenizer"] = {"epoch": 0, "global_step": 0, "loss_state": {
      "loss.perceptual_loss.net.slice1.0.weight": rng.standard_normal((64, 3, 3, 3), np.float32),
      "loss.perceptual_loss.lin0.model.1.weight": rng.standard_normal((1, 64, 1, 1), np.float32),
      "loss.discriminator.main.0.weight": rng.standard_normal((64, 3, 4, 4), np.float32),
      "loss.discriminator.main.3.num_batches_tracked": np.array(0, np.int64)}}
  seed_formats.write_seed(seed_dir, config, weights, all_extras, transformer_name=PTH)
  print(json.dumps({"peak_rss": _peak_rss_bytes()}))


def _child_to_torch(seed_dir: str, torch_dir: str) -> None:
  """seed files -> config.json + {tokenizer,transformer}.safetensors (torch layout: the seed's keys)."""
  from conversion import seed_formats
  from maskgit_common import fileio
  from maskgit_torch import checkpoint
  baseline, start = _peak_rss_bytes(), time.perf_counter()
  ck = seed_formats.read_seed(os.path.join(seed_dir, "MaskGIT", PTH))
  import torch
  with fileio.atomic_directory(torch_dir) as tmp:
    ck.config.save(os.path.join(tmp, checkpoint.CONFIG_FILE))
    for which, state in ck.weights.items():
      checkpoint.write_state_dict(os.path.join(tmp, checkpoint.WEIGHT_FILES[which]),
                                  {k: torch.from_numpy(v) for k, v in state.items()}, which)
  _report(start, baseline)


def _child_to_jax(torch_dir: str, jax_dir: str) -> None:
  """torch safetensors -> config.json + {tokenizer,transformer}.msgpack (flax to_bytes layout), via the table."""
  import safetensors.numpy
  from configs import MaskGITConfig
  from conversion.tables import seed as seed_table
  from maskgit_common import fileio, msgpack_io
  baseline, start = _peak_rss_bytes(), time.perf_counter()
  config = MaskGITConfig.load(torch_dir)
  with fileio.atomic_directory(jax_dir) as tmp:
    config.save(os.path.join(tmp, "config.json"))
    for which in WHICH:
      state = safetensors.numpy.load_file(os.path.join(torch_dir, f"{which}.safetensors"))
      tree = msgpack_io.unflatten({r.jax_path: seed_table.to_jax(r, state.pop(r.torch_key))
                                   for r in seed_table.param_table(config, which)})
      msgpack_io.write_msgpack(os.path.join(tmp, f"{which}.msgpack"), tree)
      del state, tree
  _report(start, baseline)


def _child_to_seed(jax_dir: str, seed_dir: str) -> None:
  """flax msgpack -> the seed's files (MaskGIT/*.pth, VQGAN/last.ckpt + model.yaml), via the table."""
  from configs import MaskGITConfig
  from conversion import seed_formats
  from conversion.tables import seed as seed_table
  from maskgit_common import msgpack_io
  baseline, start = _peak_rss_bytes(), time.perf_counter()
  config = MaskGITConfig.load(jax_dir)
  weights = {}
  for which in WHICH:
    flat = msgpack_io.flatten(msgpack_io.read_msgpack(os.path.join(jax_dir, f"{which}.msgpack")))
    weights[which] = {r.torch_key: seed_table.to_torch(r, flat.pop(r.jax_path))
                      for r in seed_table.param_table(config, which)}
  seed_formats.write_seed(seed_dir, config, weights, transformer_name=PTH)
  _report(start, baseline)


def _report(start, baseline):
  print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": _peak_rss_bytes(),
                    "rss_after_imports": baseline}))


def _child_verify(first: str, last: str) -> None:
  """Model tensors of two seed directories, bit for bit (memory-mapped)."""
  from conversion import seed_formats
  a = seed_formats.read_seed(os.path.join(first, "MaskGIT", PTH))
  b = seed_formats.read_seed(os.path.join(last, "MaskGIT", PTH), a.config)
  differ = [f"{w}/{k}" for w in a.weights for k, x in a.weights[w].items()
            if not (x.dtype == b.weights[w][k].dtype and x.shape == b.weights[w][k].shape
                    and x.tobytes() == b.weights[w][k].tobytes())]
  print(json.dumps({"tensors": sum(len(s) for s in a.weights.values()), "differ": differ[:5],
                    "same_config": a.config == b.config}))


def _child_logits(torch_dir: str, jax_dir: str) -> None:
  """torch vs JAX on the converted models: logits of a random batch, decoded images of random codes."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  import numpy as np
  import safetensors.torch
  import torch
  from configs import MaskGITConfig
  from maskgit_common import msgpack_io
  from maskgit_common.token_layout import token_layout
  from maskgit_jax import families as jax_families
  from maskgit_torch import families as torch_families
  config = MaskGITConfig.load(torch_dir)
  layout, rng, out = token_layout(config), np.random.default_rng(0), {}
  codes = rng.integers(0, config.codebook_size, (2, config.latent_size, config.latent_size))
  masked = np.where(rng.random(codes.shape) < 0.5, layout.mask_id, codes)
  ids = layout.sequence(masked, layout.class_tokens(rng.integers(0, config.num_class, 2)))
  for which, x in (("transformer", ids), ("tokenizer", codes)):
    with torch.device("meta"):
      module = torch_families.model_class(config, which)(config)
    module.load_state_dict(safetensors.torch.load_file(os.path.join(torch_dir, f"{which}.safetensors")),
                           strict=True, assign=True)
    module.eval()
    variables = msgpack_io.read_msgpack(os.path.join(jax_dir, f"{which}.msgpack"))
    jax_module = jax_families.model_class(config, which)(config)
    with torch.inference_mode():
      ours = module(torch.from_numpy(x)) if which == "transformer" else module.decode_from_indices(
          torch.from_numpy(x))
    method = None if which == "transformer" else type(jax_module).decode_from_indices
    theirs = np.asarray(jax.jit(lambda v, x: jax_module.apply(v, x, method=method))(variables, x), np.float64)
    out[which] = {"max_abs_diff": float(np.max(np.abs(ours.numpy().astype(np.float64) - theirs))),
                  "shape": list(theirs.shape), "std": float(theirs.std()), "max_abs": float(np.max(np.abs(theirs)))}
    if which == "transformer":  # how far each float32 result is from the float64 truth (the same module in double)
      with torch.inference_mode():
        exact = module.double()(torch.from_numpy(x)).numpy()
      out[which]["torch_vs_float64"] = float(np.max(np.abs(ours.numpy() - exact)))
      out[which]["jax_vs_float64"] = float(np.max(np.abs(theirs - exact)))
    del module, variables
  print(json.dumps(out))


def _child_seed_strict(seed_repo: str, seed_dir: str) -> None:
  """The seed's own classes load the written-back files strictly (pytorch_lightning replaced by nn.Module, as the
  fixture generator did: the v1 VQModel never uses it)."""
  import types
  import torch
  import yaml
  from conversion import seed_config, seed_formats
  sys.modules.setdefault("pytorch_lightning", types.SimpleNamespace(LightningModule=torch.nn.Module))
  sys.path.insert(0, seed_repo)
  from Network.Taming.models.vqgan import VQModel  # pylint: disable=import-error
  from Network.transformer import MaskTransformer  # pylint: disable=import-error
  ck = seed_formats.read_seed(os.path.join(seed_dir, "MaskGIT", PTH))
  transformer = MaskTransformer(**seed_config.transformer_kwargs(ck.config))
  saved = torch.load(os.path.join(seed_dir, "MaskGIT", PTH), map_location="cpu", weights_only=True)
  transformer.load_state_dict(saved["model_state_dict"], strict=True)
  with open(os.path.join(seed_dir, "VQGAN", "model.yaml")) as f:
    vqgan = VQModel(**yaml.safe_load(f)["model"]["params"])
  state = torch.load(os.path.join(seed_dir, "VQGAN", "last.ckpt"), map_location="cpu", weights_only=True)
  vqgan.load_state_dict({k: v for k, v in state["state_dict"].items() if not k.startswith("loss.")}, strict=True)
  print(json.dumps({"strict": True, "transformer_params": sum(p.numel() for p in transformer.parameters()),
                    "vqgan_params": sum(p.numel() for p in vqgan.parameters())}))


CHILDREN = {"make": _child_make, "to_torch": _child_to_torch, "to_jax": _child_to_jax, "to_seed": _child_to_seed,
            "verify": _child_verify, "logits": _child_logits, "seed_strict": _child_seed_strict}


def _run_child(*args) -> dict:
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], cwd=ROOT,
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"child {args} failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _floor_log2(x: float) -> int:
  import math  # pylint: disable=import-outside-toplevel
  return math.floor(math.log2(x))


def _size(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
  parser.add_argument("--keep", action="store_true", help="keep the files written")
  parser.add_argument("--preset", default="seed_imagenet_256", help="the seed preset to build (full size)")
  parser.add_argument("--no_optimizer", action="store_true", help="write the .pth without the AdamW state")
  parser.add_argument("--seed_repo", default=None, help="valeoai/Maskgit-pytorch checkout: strict-load check")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    CHILDREN[args.child[0]](*args.child[1:])
    return
  work = args.workdir or tempfile.mkdtemp(prefix="maskgit_seed_convert_")
  seed, torch_dir, jax_dir, back = (os.path.join(work, d) for d in ("seed", "torch", "jax", "seed_back"))
  for d in (seed, torch_dir, jax_dir, back):
    shutil.rmtree(d, ignore_errors=True)
  try:
    start = time.perf_counter()
    _run_child("make", args.preset, seed, "no" if args.no_optimizer else "yes")
    total = _size(seed)
    print(f"wrote random {args.preset} seed files in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{os.path.relpath(os.path.join(d, f), seed)} {os.path.getsize(os.path.join(d, f)) / 2**20:.1f}"
                      f" MiB" for d, _, files in os.walk(seed) for f in files if f != "manifest.json")
          + f"; total {total / 2**20:.1f} MiB")
    print(f"cpu cores visible: {os.cpu_count()}, affinity: {len(os.sched_getaffinity(0))}")
    results = {}
    for name, step, src, dst in (("seed -> torch", "to_torch", seed, torch_dir), ("torch -> jax", "to_jax", torch_dir,
                                                                                   jax_dir),
                                 ("jax -> seed", "to_seed", jax_dir, back)):
      r = results[name] = _run_child(step, src, dst)
      print(f"{name:14s} {r['seconds']:6.1f} s   peak RSS {r['peak_rss'] / 2**20:7.1f} MiB "
            f"({r['peak_rss'] / total:.2f}x the seed files; after imports {r['rss_after_imports'] / 2**20:.0f} MiB)")
    verify = _run_child("verify", seed, back)
    print(f"seed -> torch -> jax -> seed: {verify['tensors']} model tensors, bit-exact: {not verify['differ']} "
          f"{verify['differ'] or ''}; same config: {verify['same_config']}")
    logits = _run_child("logits", torch_dir, jax_dir)
    for which, r in logits.items():
      print(f"torch vs jax {which} {tuple(r['shape'])}: max abs diff {r['max_abs_diff']:.3g} (std {r['std']:.3g}, "
            f"max |x| {r['max_abs']:.3g}; target <= 1e-4)")
    r = logits["transformer"]
    print(f"  float64 truth (the torch module in double): torch float32 {r['torch_vs_float64']:.3g} from it, JAX "
          f"float32 {r['jax_vs_float64']:.3g}. The seed's init draws tok_emb from N(0, 1), so the tied logits reach "
          f"{r['max_abs']:.3g}, where a float32 ulp is {2.0 ** (_floor_log2(r['max_abs']) - 23):.2g}; the seed "
          f"cases' bound 1e-5 * max(1, max|logits|) = {1e-5 * max(1.0, r['max_abs']):.3g}")
    strict = _run_child("seed_strict", args.seed_repo, back) if args.seed_repo else None
    if strict:
      print(f"the seed's own MaskTransformer / VQModel load the written-back files strictly: {strict}")
    ok = (not verify["differ"] and verify["same_config"] and all(r["max_abs_diff"] <= 1e-4 for r in logits.values())
          and all(r["seconds"] < 60 and r["peak_rss"] < 3 * total for r in results.values()))
    print("targets met" if ok else "TARGETS MISSED")
  finally:
    if not args.keep and not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
