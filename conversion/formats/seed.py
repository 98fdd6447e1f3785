"""valeoai MaskGIT-pytorch v1's own files (the seed family) as a format of the weights layer: `conversion.read(path)`,
`conversion.write(dst, config, parts, format="seed", extras=...)`, `conversion.convert(src, dst, to="seed")`.

Reads (`detect`): a transformer `.pth` (its VQGAN found in ./VQGAN or ../VQGAN), a taming `last.ckpt` or
`model.yaml`, a VQGAN folder in the Hugging Face layout (last.ckpt + model.yaml) or the seed's --vqgan-folder layout
(ckpts/last.ckpt + configs/model.yaml), or a directory holding MaskGIT/*.pth and VQGAN/ (the download's
`pretrained_maskgit/`). The files are read by `conversion.seed_formats` (safe unpickling, every problem in one
error); the weights become canonical (flax paths) through `conversion/tables/seed.py`. The config is the caller's,
checked against the files, else the one model.yaml and the shapes imply (the seed's 16 heads and dropout 0.1, which
no shape holds; a model of exactly a seed preset's architecture gets that preset).
Writes the Hugging Face layout: MaskGIT/<file_name> (+ VQGAN/last.ckpt + VQGAN/model.yaml), which the seed's own
classes load with strict=True; only the seed family has it (transformer.arch=seed, tokenizer.arch=taming).

Extras: what the seed's files hold besides the model weights, in `Checkpoint.extras` and taken back by `write`.
Our torch and JAX directories keep them too (`conversion/formats/extras.py`), so seed -> ours -> seed loses nothing.
  extras["transformer"]
    iter, global_epoch     int: Trainer.save_network's counters (written as 0 when absent)
    optimizer_state_dict   the seed's torch.optim.AdamW state_dict, tensors as numpy: {"state": {i: {"step",
                           "exp_avg", "exp_avg_sq"}}, "param_groups": [{"lr", "betas", "eps", "weight_decay", ...,
                           "params": [0..n-1]}]}; parameter i is the i-th key of
                           `conversion.tables.seed.state_dict_order(config, "transformer")` (= model.parameters()).
                           Absent when the file has none (the .pth is then written without it)
    file_name              the .pth's name, written back under it (default current.pth)
  extras["tokenizer"]
    epoch, global_step, pytorch-lightning_version, optimizer_states, lr_schedulers: last.ckpt's lightning entries
    callbacks              keyed by the dotted class name; not written back (pickling them needs lightning)
    loss_state             {"loss.*": array}: taming's LPIPS and discriminator weights, written back into last.ckpt
    key_order              the state_dict's key order in the file read (kept when writing back)
    lossconfig, base_learning_rate   model.yaml's training entries
"""

from __future__ import annotations

from conversion import seed_formats
from conversion.errors import ConversionError
from conversion.formats.common import materialize
from conversion.layout import from_torch_layout, to_torch_layout
from conversion.tables import PARTS
from conversion.tables.seed import ARCHS

NAME = "seed"
DESCRIPTION = ("valeoai MaskGIT-pytorch files (MaskGIT/*.pth, VQGAN/last.ckpt + VQGAN/model.yaml, or the "
               "--vqgan-folder layout ckpts/last.ckpt + configs/model.yaml)")
FILES = {"transformer": "MaskGIT/*.pth", "tokenizer": "VQGAN/last.ckpt + VQGAN/model.yaml"}
READS_PYTORCH = True


def detect(path: str) -> dict | None:
  files = seed_formats.locate(path)
  found = {"transformer": files.transformer, "tokenizer": files.vqgan_ckpt, "tokenizer_config": files.vqgan_yaml}
  return {k: v for k, v in found.items() if v} or None


def _loader(config, part: str, state: dict, source: str):
  return lambda: from_torch_layout(config, part, state, consume=True, source=source)


def read(path: str, config=None):
  checkpoint = seed_formats.read_seed(path, config)
  sources = {"transformer": checkpoint.files.transformer, "tokenizer": checkpoint.files.vqgan_ckpt}
  parts = {p: _loader(checkpoint.config, p, checkpoint.weights[p], sources[p]) for p in PARTS
           if p in checkpoint.weights}
  return checkpoint.config, parts, checkpoint.extras


def check_family(config, parts) -> None:
  """ConversionError unless every part to write is of the seed family (the only one with these files)."""
  wrong = [f"{p}.arch={getattr(config, p).arch!r}" for p in PARTS if p in parts and getattr(config, p).arch != ARCHS[p]]
  if wrong:
    raise ConversionError(f"format 'seed' writes valeoai MaskGIT-pytorch's models (transformer.arch=seed, "
                          f"tokenizer.arch=taming); this config has {' and '.join(wrong)}: write it as torch or jax")


def write(tmp: str, config, parts: dict, extras) -> None:
  check_family(config, parts)
  extras = materialize(extras)
  for part in PARTS:  # one part in memory at a time: materialised, converted, written, dropped
    flat = materialize(parts[part]) if part in parts else {}
    if not flat:  # absent, or failed its checks (the conversion raises once every part is checked)
      continue
    state = to_torch_layout(config, part, flat, consume=True)
    del flat
    seed_formats.write_files(tmp, config, {part: state}, extras)
